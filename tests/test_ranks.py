"""Ranks of a multi-task stage (harness.core.ranks): a plain `srun python -m harness.core.stages <dir>` of a
launcher.write_sbatch script gets the rank, world size and rendez-vous a submitit job's task gets, from Slurm's
variables; and, under the local Slurm, a 2-task stage written as an sbatch script runs to the end as 2-rank gloo DDP."""
import json
import os
import subprocess
import time

import pytest

import harness.core.ranks as ranks
from harness.plan.config import load_config
from harness.plan.graph import build_plan
from harness.core.ranks import KEYS, RankEnvError, export_rank_env, port_of_job, rank_env, slurm_hostnames
from harness.run.cli import run_table

SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def _submitit_ranks(monkeypatch, env: dict) -> dict:
    """What submitit's TorchDistributedEnvironment gives a task of a submitit Slurm job with these variables."""
    import submitit
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in KEYS:
            monkeypatch.delenv(k)
    for k, v in {**env, "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(k, v)
    t = submitit.helpers.TorchDistributedEnvironment()
    return {"RANK": str(t.rank), "LOCAL_RANK": str(t.local_rank), "WORLD_SIZE": str(t.world_size),
            "LOCAL_WORLD_SIZE": str(t.local_world_size), "MASTER_ADDR": t.master_addr,
            "MASTER_PORT": str(t.master_port)}


@pytest.mark.parametrize("array", [False, True])
@pytest.mark.parametrize("scontrol", [True, False])
def test_a_plain_srun_task_gets_the_ranks_a_submitit_task_gets(monkeypatch, array, scontrol):
    env = dict(SLURM_TASK, **({"SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"} if array else {}))
    calls = []

    def fake_scontrol(cmd, **kw):
        calls.append(cmd)
        if not scontrol:  # no scontrol on the node: Slurm's node-list syntax is parsed in Python
            raise FileNotFoundError("scontrol")
        return subprocess.CompletedProcess(cmd, 0, "gpu07\ngpu08\n", "")
    monkeypatch.setattr(ranks.subprocess, "run", fake_scontrol)
    got = rank_env(env)
    assert got == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(port_of_job("4240_2" if array else "4242"))}
    assert 20000 <= int(got["MASTER_PORT"]) <= 60000
    assert calls[0] == ["scontrol", "show", "hostnames", "gpu[07-08]"]
    assert got == _submitit_ranks(monkeypatch, env)  # the submitit path's values, key for key
    # every task of the job meets at the same address and port; each has its own rank
    other = rank_env({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert (other["MASTER_ADDR"], other["MASTER_PORT"], other["RANK"]) == (got["MASTER_ADDR"], got["MASTER_PORT"], "0")
    # a site's MASTER_PORT is kept, as submitit keeps it
    assert rank_env({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"


def test_hostnames_expand_like_slurm():
    assert slurm_hostnames("gpu[07-08],cpu3")[:2] == ["gpu07", "gpu08"]
    assert slurm_hostnames("node1") == ["node1"]


def test_export_sets_the_variables_and_refuses_other_values(monkeypatch):
    env = dict(SLURM_TASK)
    values = export_rank_env(env)
    assert {k: env[k] for k in KEYS} == values and values["RANK"] == "3"
    assert export_rank_env(env) == values  # the same values again: fine
    env = {**SLURM_TASK, "RANK": "0"}  # e.g. set by something else: ranks that disagree would hang
    with pytest.raises(RankEnvError, match=r"RANK=0 \(this task: 3\)"):
        export_rank_env(env)
    with pytest.raises(RankEnvError, match="neither a Slurm task .* srun"):
        rank_env({})
    with pytest.raises(RankEnvError, match="SLURM_PROCID"):
        rank_env({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1"})


def test_stages_main_exports_the_ranks_of_a_multi_task_srun(monkeypatch, tmp_path):
    """harness.core.stages main (what an sbatch script's srun runs) starts the ranks from Slurm's variables: before,
    submitit's TorchDistributedEnvironment refused outside a submitit job ("Could not figure out which environment
    the job is running in")."""
    import harness.core.stages as stages
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in KEYS:
            monkeypatch.delenv(k)
    for k in KEYS:  # set, then deleted: monkeypatch removes what the test exports (it leaked into later sbatch jobs)
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k, v in SLURM_TASK.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "config.json").write_text(json.dumps({"spec": {}, "inputs": {}, "runtime": {}, "stage_id": "x"}))
    seen = {}

    def run_stage(*a):
        seen.update({k: os.environ[k] for k in KEYS})
        return {"status": "done"}
    monkeypatch.setattr(stages, "run_stage", run_stage)
    monkeypatch.setattr(stages, "_requeue_on_usr2", lambda: None)
    stages.main([str(tmp_path)])
    assert seen == rank_env(SLURM_TASK)


# ------------------------------------------------------------------------------------------- on the local Slurm
def _sbatch_args(tmp_path, *extra):
    return ["profile=smoke", "launcher=slurm", "launcher.write_sbatch=true", "launcher.partition=debug",
            "launcher.timeout_min=15", "launcher.cpus_per_task=1", "launcher.mem_gb=3", "launcher.tasks_per_node=2",
            f"results_root={tmp_path}", "report=false", *extra]


@pytest.mark.slow
@pytest.mark.slurm
def test_two_task_sbatch_stage_runs_as_two_rank_ddp(slurm_cluster, tmp_path):
    """A stage's sbatch script with 2 tasks per node (CPU, gloo): `srun python -m harness.core.stages` starts 2 ranks
    that
    train together to the end; the result says world_size 2."""
    args = _sbatch_args(tmp_path)
    assert run_table("table2", args) == 0
    plan = build_plan(load_config("table2", args))
    stage = next(s for s in plan.stages.values() if s.role == "student-pretrain" and not s.inputs)
    script = plan.root / "sbatch" / f"{stage.id}.sbatch"
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=2" in text and "srun --cpus-per-task=1 " in text
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                         timeout=60).stdout.strip().split(";")[0]
    result = plan.dir(stage.id) / "result.json"
    deadline = time.time() + 300  # ~20 s when it works
    try:
        while not result.exists():
            state = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True,
                                   text=True).stdout.split()
            logs = "\n".join(p.read_text()[-3000:] for p in sorted((plan.root / "sbatch" / "logs").glob(f"{job}.*")))
            assert not (state and state[0] in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")), logs
            assert time.time() < deadline, f"job {job} did not finish: {state}\n{logs}"
            time.sleep(2)
    finally:  # a job left hanging would hold the test cluster's CPUs and stall every later Slurm test
        subprocess.run(["scancel", job], capture_output=True, timeout=60)
    res = json.loads(result.read_text())
    assert res["world_size"] == 2 and res["status"] == "done" and res["steps"] > 0
    # both ranks printed the result: each ran the stage to its end
    out = (plan.root / "sbatch" / "logs" / f"{job}.out").read_text()
    assert out.count('"world_size": 2') == 2, out[-3000:]
