"""Plain sbatch scripts for sites that forbid a long-running driver (`launcher.write_sbatch=true`).

    python -m harness.reproduce table2 profile=paper launcher=slurm launcher.write_sbatch=true ...
    bash results/table2/paper/sbatch/submit_all.sh      # submits every unfinished stage, chained with afterok

Each stage gets `<stage dir>/config.json` (what it runs) and `sbatch/<stage id>.sbatch`, which runs
`srun python -m harness.core.stages <stage dir>`: one task per GPU (launcher.tasks_per_node), each of which takes its
rank,
world size and rendez-vous from Slurm's variables exactly as a submitit job's task does (harness.core.ranks), so a
multi-GPU stage runs DDP as under the driver. Dependencies are Slurm's (`--dependency=afterok:<input job ids>`);
`--requeue` lets a preempted job come back, and the stage resumes from its checkpoint-last;
`--signal=USR2@<launcher.signal_delay_s or 90>` warns a job before its time limit, and harness.core.stages then
requeues it
(scontrol requeue) instead of being killed as failed. launcher.setup lines run first; with launcher.snapshot (default
on for slurm) the scripts run a copy of the code taken when they were written, not the working tree of later. After
the jobs end, `python -m harness.report <table> --profile <profile>` writes the report.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List

from omegaconf import DictConfig

from harness.plan.resolve import mem_gb_of, runtime_of, tasks_per_node
from harness.plan.graph import Plan
from harness.core.rundir import RunTree, write_stage_config
from harness.core.spec import spec_dict
from harness.run.executors import code_snapshot, snapshot_wanted


def _directives(cfg: DictConfig, stage_id: str, log_dir: Path) -> List[str]:
    la = cfg.launcher
    tasks = tasks_per_node(la)
    lines = [f"--job-name={stage_id[:60]}", f"--output={log_dir}/%j.out", f"--error={log_dir}/%j.err",
             f"--time={la.timeout_min}", f"--nodes={la.nodes}", f"--ntasks-per-node={tasks}",
             f"--cpus-per-task={la.cpus_per_task}", "--requeue",
             f"--signal=USR2@{la.signal_delay_s if la.get('signal_delay_s') is not None else 90}"]
    if la.gpus_per_node:
        lines.append(f"--gpus-per-node={la.gpus_per_node}")
    mem = mem_gb_of(la)
    if mem:
        lines.append(f"--mem={int(mem * 1024)}M")
    for key in ("partition", "account", "qos"):
        if la[key]:
            lines.append(f"--{key}={la[key]}")
    for key, value in la.additional_parameters.items():
        lines.append(f"--{key.replace('_', '-')}={value}")
    return [f"#SBATCH {shlex.quote(x)}" for x in lines]


def write_sbatch(plan: Plan, cfg: DictConfig) -> Path:
    """Write one sbatch script per unfinished stage and submit_all.sh; returns the latter's path."""
    runtime = spec_dict(runtime_of(cfg))
    out = plan.root / "sbatch"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    setup = [str(x) for x in (cfg.launcher.get("setup") or [])]
    if snapshot_wanted(cfg):
        snap = code_snapshot(out / "code")
        setup.append(f"export PYTHONSAFEPATH=1 PYTHONPATH={shlex.quote(str(snap))}${{PYTHONPATH:+:$PYTHONPATH}}")
    submit = ["#!/usr/bin/env bash", f"# {plan.table} ({plan.profile}): submit every unfinished stage in graph order.",
              "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", "declare -A JOB"]
    tree = RunTree.of(plan)
    tree.set_aside_stale()  # as a driver would: a damaged or stale stage is recomputed, not listed done
    for sid, stage in plan.stages.items():
        if tree.status(sid) == "done":
            submit.append(f"# {sid}: done")
            continue
        run_dir = plan.dir(sid)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_stage_config(run_dir, sid, spec_dict(stage.spec), plan.input_paths(stage), runtime)
        script = out / f"{sid}.sbatch"
        script.write_text("\n".join(["#!/usr/bin/env bash", *_directives(cfg, sid, logs), *setup,
                                     "set -euo pipefail",
                                     f"cd {shlex.quote(str(Path.cwd()))}",
                                     # sbatch exports the submitting shell's environment: a rank of another job
                                     # there (torchrun, a test) would make every task here think it is that rank
                                     "unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR"
                                     "  # each task's ranks come from Slurm (harness.core.ranks)",
                                     # --cpus-per-task again: srun of Slurm 22.05 to 23.02 does not inherit it
                                     f"srun --cpus-per-task={int(cfg.launcher.cpus_per_task)} {python} -m "
                                     f"harness.core.stages {shlex.quote(str(run_dir))}", ""]))
        deps = [d for d in plan.deps(stage) if tree.status(d) != "done"]
        dep_arg = (f"--dependency=afterok:{':'.join('${JOB[' + d + ']}' for d in deps)} " if deps else "")
        submit.append(f"JOB[{sid}]=$(sbatch --parsable {dep_arg}{shlex.quote(str(script))})")
        submit.append(f'echo "{sid}: job ${{JOB[{sid}]}}"')
    path = out / "submit_all.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return path
