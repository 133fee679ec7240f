"""launcher.write_sbatch: plain sbatch scripts chained by Slurm dependencies, for sites without a long driver."""
import json
import subprocess
import time

import pytest

from harness.plan.config import load_config
from harness.plan.graph import build_plan
from harness.core.spec import spec_dict
from harness.run.cli import run_table


def _args(tmp_path, *extra):
    return ["profile=smoke", "launcher=slurm", "launcher.write_sbatch=true", "launcher.partition=debug",
            "launcher.timeout_min=10", f"results_root={tmp_path}", *extra]


def test_scripts_chain_stages_with_dependencies(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.run.preflight.check_slurm", lambda partition: None)  # no cluster needed to write
    assert run_table("schedule", _args(tmp_path, "+launcher.additional_parameters.constraint=a100")) == 0
    plan = build_plan(load_config("schedule", _args(tmp_path)))
    submit = (plan.root / "sbatch" / "submit_all.sh").read_text()
    for sid, stage in plan.stages.items():
        script = (plan.root / "sbatch" / f"{sid}.sbatch").read_text()
        assert "#SBATCH --partition=debug" in script and "#SBATCH --requeue" in script
        assert "#SBATCH --constraint=a100" in script
        assert f"-m harness.core.stages {plan.dir(sid)}" in script
        cfg = json.loads((plan.dir(sid) / "config.json").read_text())
        assert cfg["spec"] == spec_dict(stage.spec) and cfg["inputs"] == plan.input_paths(stage)
        line = next(x for x in submit.splitlines() if x.startswith(f"JOB[{sid}]="))
        for dep in plan.deps(stage):
            assert f"${{JOB[{dep}]}}" in line
            assert submit.index(f"JOB[{dep}]=") < submit.index(f"JOB[{sid}]=")
    assert not list(plan.root.glob("*/result.json"))  # nothing ran


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_all_runs_the_table_on_slurm(slurm_cluster, tmp_path):
    assert run_table("schedule", _args(tmp_path, "launcher.cpus_per_task=1", "launcher.mem_gb=3")) == 0
    plan = build_plan(load_config("schedule", _args(tmp_path)))
    subprocess.run(["bash", str(plan.root / "sbatch" / "submit_all.sh")], check=True, timeout=60)
    deadline = time.time() + 600
    while not all((plan.dir(sid) / "result.json").exists() for sid in plan.stages):
        assert time.time() < deadline, "sbatch jobs did not finish"
        time.sleep(2)
    for c in plan.cells:
        assert 0 <= json.loads((plan.dir(c.evaluate) / "result.json").read_text())["top1"] <= 100


def test_scripts_carry_signal_setup_and_code_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.run.preflight.check_slurm", lambda partition: None)
    args = _args(tmp_path, "launcher.signal_delay_s=120", "launcher.setup=[module load cuda,source activate dmae]")
    assert run_table("schedule", args) == 0
    plan = build_plan(load_config("schedule", _args(tmp_path)))
    snaps = list((plan.root / "sbatch" / "code").iterdir())
    assert len(snaps) == 1 and (snaps[0] / "harness" / "core" / "stages.py").is_file()
    for sid in plan.stages:
        lines = (plan.root / "sbatch" / f"{sid}.sbatch").read_text().splitlines()
        assert lines.index("#SBATCH --signal=USR2@120") == lines.index("#SBATCH --requeue") + 1
        setup = lines.index("module load cuda")
        assert lines[setup + 1] == "source activate dmae" and setup < lines.index("set -euo pipefail")
        assert f"export PYTHONSAFEPATH=1 PYTHONPATH={snaps[0]}${{PYTHONPATH:+:$PYTHONPATH}}" in lines


def test_default_signal_and_no_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.run.preflight.check_slurm", lambda partition: None)
    assert run_table("schedule", _args(tmp_path, "launcher.snapshot=false")) == 0
    plan = build_plan(load_config("schedule", _args(tmp_path)))
    script = (plan.root / "sbatch" / f"{next(iter(plan.stages))}.sbatch").read_text()
    assert "#SBATCH --signal=USR2@90" in script and "PYTHONPATH" not in script
    assert not (plan.root / "sbatch" / "code").exists()


def test_usr2_requeues_the_slurm_job(monkeypatch):
    import os
    import signal

    import harness.core.stages as stages
    calls = []
    monkeypatch.setattr(stages.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    old = signal.getsignal(signal.SIGUSR2)
    try:
        stages._requeue_on_usr2()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert calls == [["scontrol", "requeue", "4242"]]
