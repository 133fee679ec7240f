"""Where a plan's jobs run: in this process (launcher=debug), as submitit local jobs (local) or as Slurm jobs (slurm).

- in process: stage after stage in graph order; a failure is reported and the stages that do not need it go on.
- local: submitit's LocalExecutor; each job's controller writes its stderr to .submitit/controllers.err.
- slurm: submitit's Slurm executor; queued jobs run a snapshot of this repository's code. Two workarounds of
  submitit on Slurm live here: an array task cancelled while pending is seen as ended through the array's own sacct
  record (ended_unseen), and a job that ended on its own is described from sacct (how_it_ended). The third, the
  requeue run immune to SIGTERM, runs inside the job (harness.run.stage_job).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import submitit
from omegaconf import DictConfig, OmegaConf

from harness.core.rundir import read_job
from harness.core.stages import run_stage
from harness.plan.resolve import mem_gb_of, runtime_of, tasks_per_node
from harness.plan.graph import Plan
from harness.run.progress import Progress

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}
ENDED = {"CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL",
         "COMPLETED"}


def run_in_process(plan: Plan, cfg: DictConfig) -> Dict[str, str]:
    """launcher=debug: every stage not done, in this process and in graph order. Returns {stage id: state}."""
    prog = Progress(plan, quiet=bool(cfg.run.get("quiet", False)))
    for sid, stage in plan.stages.items():
        if prog.state[sid] == "done":
            continue
        dep = prog.blocked_by_failure(stage)
        if dep:
            prog.set(sid, "blocked", f"(input {dep} failed)")
            continue
        prog.set(sid, "running")
        try:
            run_stage(stage.spec, plan.dir(sid), plan.input_paths(stage), runtime_of(cfg), sid)
            prog.set(sid, "done")
        except Exception as e:  # reported; independent stages go on
            prog.set(sid, "failed", f"{type(e).__name__}: {e}")
    return dict(prog.state)


def local_executor(plan: Plan, cfg: DictConfig) -> submitit.LocalExecutor:
    """Jobs on this machine. On launcher.timeout_min a job gets USR2 (signal_delay_s before the limit, submitit's
    default 30 s), checkpoints and is restarted, at most launcher.max_requeues times, as on Slurm."""
    la = cfg.launcher
    ex = submitit.LocalExecutor(folder=plan.root / ".submitit" / "%j", max_num_timeout=la.max_requeues)
    params = dict(timeout_min=la.timeout_min, gpus_per_node=la.gpus_per_node, tasks_per_node=tasks_per_node(la))
    if la.get("signal_delay_s") is not None:
        params["signal_delay_s"] = la.signal_delay_s
    ex.update_parameters(**params)
    return ex


@contextmanager
def controller_stderr(ex, path: Path):
    """Start submitit's local job controllers with their stderr in `path`, not the driver's. A controller is a child
    of the driver in its process group: a Ctrl-C at the terminal reaches it too and, as when the driver cancels its
    job (SIGINT), it stops its tasks and prints a KeyboardInterrupt traceback. The driver's one-line note should be
    the last thing the user sees. The jobs' own output goes to their .submitit logs either way."""
    if not isinstance(ex, submitit.LocalExecutor):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)  # inherited by the controller processes started inside the block
        os.close(fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def snapshot_wanted(cfg: DictConfig) -> bool:
    snap = cfg.launcher.get("snapshot")
    return cfg.launcher.name == "slurm" if snap is None else bool(snap)


def code_snapshot(parent: Path) -> Path:
    """A copy of this repository's code in parent/<time>, for jobs that start later: submitit's RsyncSnapshot (the
    tracked files as they are in the working tree, plus untracked files git does not ignore), or, without rsync or
    git, a plain copy of the Python packages. Jobs import it first via PYTHONSAFEPATH=1 and PYTHONPATH=<copy> (the
    job's working directory, the submission one, is then not put before it)."""
    repo = Path(__file__).resolve().parents[2]  # harness/run/executors.py -> the repository
    dest = Path(parent) / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = Path(parent) / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    try:
        if not submitit.helpers.RsyncSnapshot.available():
            raise RuntimeError("rsync not found")
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=repo, check=True,
                                   capture_output=True, text=True).stdout.split()
        snap = submitit.helpers.RsyncSnapshot(dest, root_dir=repo, include=untracked)
        with snap:  # copies, and chdir's into the copy: back out at once (the driver keeps its own paths)
            pass
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for pkg in ("harness", "baselines"):
            if (repo / pkg).is_dir():
                shutil.copytree(repo / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def slurm_executor(plan: Plan, cfg: DictConfig) -> submitit.AutoExecutor:
    la = cfg.launcher
    ex = submitit.AutoExecutor(folder=plan.root / ".submitit" / "%j", cluster="slurm",
                               slurm_max_num_timeout=la.max_requeues)
    params = dict(timeout_min=la.timeout_min, nodes=la.nodes, tasks_per_node=tasks_per_node(la),
                  cpus_per_task=la.cpus_per_task,
                  slurm_array_parallelism=la.array_parallelism,
                  slurm_additional_parameters=OmegaConf.to_container(la.additional_parameters, resolve=True),
                  # srun of Slurm 22.05 to 23.02 does not inherit --cpus-per-task: data workers would share one CPU
                  slurm_srun_args=[f"--cpus-per-task={int(la.cpus_per_task)}"])
    if la.gpus_per_node:
        params["gpus_per_node"] = la.gpus_per_node
    mem = mem_gb_of(la)
    if mem:
        params["mem_gb"] = mem
    if la.get("signal_delay_s") is not None:
        params["slurm_signal_delay_s"] = la.signal_delay_s
    for key in ("partition", "account", "qos"):
        if la[key]:
            params[f"slurm_{key}"] = la[key]
    setup = [str(x) for x in (la.get("setup") or [])]
    if snapshot_wanted(cfg):
        snap = code_snapshot(plan.root / ".submitit" / "code")
        setup.append(f"export PYTHONSAFEPATH=1 PYTHONPATH={shlex.quote(str(snap))}${{PYTHONPATH:+:$PYTHONPATH}}")
        print(f"[reproduce] queued jobs run the code snapshot {snap}", flush=True)
    if setup:
        params["slurm_setup"] = setup
    ex.update_parameters(**params)
    return ex


def _sacct(job_id: str, fields: str) -> list:
    """sacct's allocation records for job_id, each a list of `fields` (comma-separated); [] when sacct fails."""
    try:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("|") for line in out.splitlines() if line.strip()]


def ended_unseen(job) -> bool:
    """A Slurm array task cancelled (or failed) while still pending never gets a sacct record of its own: submitit
    then reports it UNKNOWN, i.e. not done, forever, and a driver waiting for it hangs (found by tools.faults: a
    `scancel -s KILL` of a pending array). The array's own record, `<id>` or `<id>_[...]`, says that it ended."""
    if not isinstance(job, submitit.SlurmJob):
        return False
    jid = str(job.job_id)
    if "_" not in jid or job.state.split()[0] != "UNKNOWN":
        return False
    parent = jid.split("_")[0]
    for ident, state in _sacct(parent, "JobID,State"):
        if ident == jid:
            return False  # the task has its own record: submitit will see it
        if (ident == parent or ident.startswith(parent + "_[")) and state.split()[0] in ENDED:
            return True
    return False


def attach_slurm_job(plan: Plan, sid: str) -> Optional[submitit.SlurmJob]:
    """The still-active Slurm job of a stage submitted by an earlier driver (its job.json), if any."""
    info = read_job(plan.dir(sid))
    if info is None:
        return None
    try:
        job = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
        return job if job.state.split()[0] in ACTIVE and not ended_unseen(job) else None
    except Exception:
        return None


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name.removeprefix("SIG")
    except ValueError:
        return str(n)


def how_it_ended(job) -> str:
    """A job's end in a few words, for a console line: on Slurm its accounting state and exit code, with the signal
    that killed it or one of its steps ("FAILED 12:0, signal USR2"; sacct's ExitCode is <code>:<signal>); a local
    job's state and its controller's exit status."""
    if isinstance(job, submitit.SlurmJob):
        rows = _sacct(str(job.job_id), "JobID,State,ExitCode,DerivedExitCode")
        row = next((r for r in rows if r[0] == str(job.job_id)), rows[0] if rows else None)
        if row is None or len(row) < 4:
            return job.state
        state, code, derived = row[1], row[2], row[3]
        sig = next((int(s) for s in (code.partition(":")[2], derived.partition(":")[2]) if s.isdigit() and int(s)), 0)
        return f"{state} {code}" + (f", signal {_signal_name(sig)}" if sig else "")
    state = str(getattr(job, "state", "ended"))
    rc = getattr(getattr(job, "_process", None), "returncode", None)
    if isinstance(rc, int) and rc < 0:
        return f"{state}, signal {_signal_name(-rc)}"
    return f"{state}, exit code {rc}" if isinstance(rc, int) and rc else state
