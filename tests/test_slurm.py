"""The smoke table through a real Slurm (tools/slurm_local.sh), and preemption: a stage interrupted by submitit
(USR2, as on preemption/timeout) is requeued and resumes from checkpoint-last with the same final weights; a job
killed by USR2 before submitit could handle it is resubmitted by the driver. The test cluster is self-contained:
starting it leaves /etc byte-identical, and a second one is refused beside it."""
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from harness.core.checkpoints import safe_load, state_dict_of
from harness.plan.config import load_config
from harness.plan.resolve import runtime_of
from harness.run.executors import slurm_executor
from harness.plan.graph import Plan, build_plan
from harness.run.cli import run_table
from harness.run.launch import execute
from harness.run.preflight import PreflightError
from harness.run.stage_job import stage_job
from harness.core.stages import run_stage

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SLURM = ["launcher=slurm", "launcher.partition=debug", "launcher.mem_gb=3", "launcher.timeout_min=15",
         "launcher.poll_s=1"]


def _top1(plan):
    return {(c.row, c.seed): json.loads((plan.dir(c.evaluate) / "result.json").read_text())["top1"]
            for c in plan.cells}


def test_smoke_table_on_slurm_matches_in_process_run(slurm_cluster, tmp_path):
    slurm_args = ["profile=smoke", *SLURM, f"results_root={tmp_path / 'slurm'}", "report=false"]
    assert run_table("table2", slurm_args) == 0
    slurm_plan = build_plan(load_config("table2", slurm_args))
    for sid in slurm_plan.stages:
        assert (slurm_plan.dir(sid) / "result.json").exists(), sid
        assert json.loads((slurm_plan.dir(sid) / "job.json").read_text())["job_id"]
    debug_args = ["profile=smoke", "launcher=debug", f"results_root={tmp_path / 'debug'}", "report=false"]
    assert run_table("table2", debug_args) == 0
    # same seeds, same thread count: Slurm jobs give exactly the in-process numbers
    assert _top1(slurm_plan) == _top1(build_plan(load_config("table2", debug_args)))


def test_unknown_partition_is_refused_before_submission(slurm_cluster, tmp_path):
    with pytest.raises(PreflightError, match="partition"):
        run_table("table2", ["profile=smoke", "launcher=slurm", "launcher.partition=nope",
                             f"results_root={tmp_path}"])
    assert not list(tmp_path.glob("table2/smoke/*/"))


def _submit_mae_pretrain_and_wait_for_two_epochs(args, distributed: bool):
    """Submit the smoke table's first MAE pre-train alone as a Slurm job; return once it logged two epochs."""
    cfg = load_config("table2", args)
    plan = build_plan(cfg)
    stage = next(s for s in plan.stages.values() if s.role == "student-pretrain" and not s.inputs)
    job = slurm_executor(plan, cfg).submit(stage_job(plan, stage, cfg, distributed=distributed))
    log, deadline = plan.dir(stage.id) / "log.jsonl", time.time() + 300
    try:
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert time.time() < deadline and not job.done(), "the stage never wrote two epochs"
            time.sleep(0.1)
    except BaseException:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
        raise
    return cfg, plan, stage, job


def test_interrupted_stage_requeues_and_resumes_identically(slurm_cluster, tmp_path):
    args = ["profile=smoke", *SLURM, "pretrain.epochs=30", f"results_root={tmp_path / 'slurm'}"]
    cfg, plan, stage, job = _submit_mae_pretrain_and_wait_for_two_epochs(args, distributed=False)
    run_dir, log = plan.dir(stage.id), plan.dir(stage.id) / "log.jsonl"
    job._interrupt()  # what submitit does on preemption / timeout: USR2 -> checkpoint() -> requeue
    result = job.result()
    assert 1 <= result["resumed_from_epoch"] < 30, result  # epoch 2 is logged just before its checkpoint
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert sorted(set(epochs)) == list(range(1, 31))

    ref_dir = tmp_path / "reference"
    # the job's own runtime (the smoke profile's thread count): 1 and 2 threads differ in the last bits
    ref = run_stage(stage.spec, ref_dir, plan.input_paths(stage), runtime_of(cfg), stage.id)
    assert ref["resumed_from_epoch"] == 0 and ref["final_loss"] == result["final_loss"]
    a = state_dict_of(safe_load(run_dir / "model.pth"))
    b = state_dict_of(safe_load(ref_dir / "model.pth"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_usr2_to_a_two_rank_job_with_data_workers_requeues_it_exactly_once(slurm_cluster, tmp_path):
    """Preemption of a multi-rank job: USR2 reaches both tasks (and, through them, their DataLoader workers, which
    ignore it): task 0 requeues the job once, every rank resumes from checkpoint-last and the stage ends done, with
    no error file. A worker that inherited the requeue handler would requeue the job again (or fail it)."""
    args = ["profile=smoke", *SLURM, "launcher.tasks_per_node=2", "launcher.cpus_per_task=1", "launcher.mem_gb=6",
            "run.num_workers=1", "pretrain.epochs=30", f"results_root={tmp_path / 'slurm'}"]
    cfg, plan, stage, job = _submit_mae_pretrain_and_wait_for_two_epochs(args, distributed=True)
    run_dir, log = plan.dir(stage.id), plan.dir(stage.id) / "log.jsonl"
    try:
        job._interrupt()  # submitit's preemption / timeout signal: USR2 to the job's tasks
        result = job.results()[0]  # one per task; rank 0's
    finally:
        if not job.done():
            subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
    assert result["world_size"] == 2 and result["status"] == "done", result
    assert 1 <= result["resumed_from_epoch"] < 30, result
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert sorted(set(epochs)) == list(range(1, 31))
    assert not (run_dir / "error.json").exists()
    logs = "".join(p.read_text() for p in sorted(Path(job.paths.folder).glob(f"{job.job_id}_*_log.*")))
    assert logs.count("[launch] requeued Slurm job") == 1, logs[-4000:]  # by task 0, once
    assert logs.count("Not checkpointing nor requeuing since I am a slave (procid=1)") == 1  # task 1 left it to 0
    assert logs.count("resumed from checkpoint-last at epoch") == 1, logs[-4000:]


def _usr2_to_the_first_job_step(sent: list, timeout_s: float = 300) -> None:
    """As soon as a job step (the job's Python, just exec'd) shows in squeue: USR2 to the job's steps, as Slurm sends
    it before a time limit or a preemption. submitit installs its USR2 handler only after it has unpickled the job
    (imports torch: seconds), so the signal's default action kills the job. `sent` gets the job id."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        steps = subprocess.run(["squeue", "-h", "-s", "-o", "%i"], capture_output=True, text=True,
                               timeout=60).stdout.split()
        step = next((s for s in steps if s.endswith(".0")), None)
        if step is not None:
            job = step.rsplit(".", 1)[0]
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
            sent.append(job)
            return
        time.sleep(0.05)


def test_a_job_killed_by_usr2_before_submitit_handles_it_is_resubmitted(slurm_cluster, tmp_path, capsys):
    """USR2 while the job's Python is still starting: the job ends FAILED (12:0) without a result.json or an
    error.json. The driver submits it again, saying why, and the stage finishes in one plain run (no resume), with
    the weights of an in-process run."""
    args = ["profile=smoke", *SLURM, "pretrain.epochs=3", f"results_root={tmp_path / 'slurm'}", "report=false"]
    cfg = load_config("table2", args)
    full = build_plan(cfg)
    stage = next(s for s in full.stages.values() if s.role == "student-pretrain" and not s.inputs)
    plan = Plan(full.table, full.profile, full.root, {stage.id: stage}, [])  # that stage alone
    sent: list = []
    watcher = threading.Thread(target=_usr2_to_the_first_job_step, args=(sent,), daemon=True)
    watcher.start()
    states = execute(plan, cfg)
    watcher.join(timeout=60)
    out = capsys.readouterr().out
    assert sent, "no job step was seen"
    assert states == {stage.id: "done"}, out[-3000:]
    assert re.search(rf"{stage.id}: job {sent[0]} ended \(FAILED \S+, signal USR2\) before its stage wrote a result "
                     r"or an error: resubmitting, 1 of 30", out), out[-3000:]
    assert out.count(": submitted (job ") == 2  # the killed job and the one that ran the stage
    run_dir = plan.dir(stage.id)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_from_epoch"] == 0, result  # one plain run: the killed job never started the stage
    assert [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run_dir / "error.json").exists()
    ref_dir = tmp_path / "reference"
    run_stage(stage.spec, ref_dir, plan.input_paths(stage), runtime_of(cfg), stage.id)

    def sha(d):
        return hashlib.sha256((d / "model.pth").read_bytes()).hexdigest()
    assert sha(run_dir) == sha(ref_dir) == result["model_sha256"]


SCRIPT = ROOT / "tools" / "slurm_local.sh"
ETC_FILES = [Path("/etc/slurm/slurm.conf"), Path("/etc/slurm/slurmdbd.conf"), Path("/etc/hosts"),
             Path("/etc/munge/munge.key")]


def _script(cmd, **env):
    return subprocess.run(["bash", str(SCRIPT), cmd], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **env))


def test_starting_the_test_cluster_leaves_etc_byte_identical(slurm_cluster):
    """A site's /etc/slurm/slurm.conf (a dummy one here if the machine has none) is neither read nor written by the
    test cluster: a cold start (stop, start) leaves it, slurmdbd.conf, /etc/hosts and the munge key as they were."""
    site = ETC_FILES[0]
    created = not site.exists()
    if created:
        site.parent.mkdir(parents=True, exist_ok=True)
        site.write_text("# a site's Slurm config: the harness's test cluster must never read or write it\n"
                        "ClusterName=not-the-test-cluster\nSlurmctldHost=elsewhere\n")
    try:
        before = {p: p.read_bytes() if p.exists() else None for p in ETC_FILES}
        stopped = _script("stop")
        assert stopped.returncode == 0, stopped.stderr
        started = _script("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert {p: p.read_bytes() if p.exists() else None for p in ETC_FILES} == before
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"ClusterName\s*=\s*harness", conf) and os.environ["SLURM_CONF"] in conf
    finally:
        if created:
            site.unlink()


def test_a_second_prefix_refuses_to_start_beside_this_cluster(slurm_cluster, tmp_path):
    other = tmp_path / "other-prefix"
    out = _script("start", HARNESS_SLURM_PREFIX=str(other))
    assert out.returncode != 0 and "Slurm daemons this script did not start are running" in out.stderr, out.stderr
    assert not other.exists()


def test_a_pending_array_task_cancelled_before_it_starts_is_seen_as_ended(slurm_cluster, tmp_path):
    """sacct keeps no record of an array task cancelled while pending: submitit reports it UNKNOWN (not done) for
    ever. The driver reads the array's own record instead (a driver hung on this in the tools.faults campaign)."""
    import submitit

    from harness.run.executors import ended_unseen
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="debug", slurm_additional_parameters={"hold": True})
    jobs = ex.map_array(abs, [-1, -2])  # held: they stay pending
    assert all(not ended_unseen(j) for j in jobs)  # pending is not ended
    subprocess.run(["scancel", "--signal=KILL", jobs[0].job_id.split("_")[0]], check=True, timeout=60)
    deadline = time.time() + 120
    while not all(ended_unseen(j) or j.done() for j in jobs):
        assert time.time() < deadline, [j.state for j in jobs]
        time.sleep(1)
