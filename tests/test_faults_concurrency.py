"""Concurrent runs: no stage runs twice at once.

- per stage: run_stage holds an exclusive flock on <run_dir>/.stage.lock (rank 0); a second runner of the same stage
  fails at once with StageLocked naming the holder, and writes nothing into the run directory;
- per results root: a second `reproduce` on the same root is refused (driver_lock), before it writes anything;
- a driver killed mid-table leaves its running job behind: the rerun waits for that job (it holds the stage lock)
  instead of starting the stage again, then submits only what is missing.

Re-attaching to Slurm jobs by job.json and requeue after preemption: tests/test_slurm.py.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.locks import LOCK_FILE, StageLocked, lock_holder, stage_lock
from harness.core.rundir import CONFIG_FILE, spec_hash, write_json
from harness.core.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, eval_crop_pct=1.0)
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)


def spec(epochs=1):
    pt = dict(epochs=epochs, warmup_epochs=0, batch_size=16, accum_iter=1, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
              betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
    return dict(kind="pretrain", name="pt", seed=1, data=DATA, model=dict(preset="vit_w32d2_dec32d1", patch_size=4),
                objective="mae", pretrain=pt)


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def wait_for(cond, timeout=120, what="condition", proc=None):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)


def test_second_runner_of_a_stage_is_refused_naming_the_holder(tmp_path):
    with stage_lock(tmp_path, "pt"):
        assert lock_holder(tmp_path).startswith(f"pid {os.getpid()} on ")
        with pytest.raises(StageLocked, match=rf"stage pt is already being run by pid {os.getpid()} on .*"
                                              rf"{LOCK_FILE}.*refusing to run it twice"):
            run_stage(spec(), tmp_path, {}, RUNTIME, "pt")
    # the refused runner wrote nothing: no config, no error.json (the stage is not failed, it is busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    assert lock_holder(tmp_path) is None  # released, and a stale lock file blocks nobody
    assert run_stage(spec(), tmp_path, {}, RUNTIME, "pt")["status"] == "done"


@pytest.mark.slow
def test_stage_lock_between_two_real_processes(tmp_path):
    """A real `python -m harness.core.stages` runs the stage; this process tries the same stage meanwhile."""
    d = tmp_path / "stage"
    d.mkdir()
    s = spec(epochs=60)
    write_json({"stage_id": "pt", "spec": s, "inputs": {}, "runtime": RUNTIME, "spec_hash": spec_hash(s)},
               d / CONFIG_FILE)
    p = subprocess.Popen([sys.executable, "-m", "harness.core.stages", str(d)], cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (d / "log.jsonl").exists() and (d / "log.jsonl").read_text().count("\n") >= 1,
                 what="the first epoch", proc=p)
        assert lock_holder(d).startswith(f"pid {p.pid} on ")
        with pytest.raises(StageLocked, match=f"already being run by pid {p.pid} on "):
            run_stage(s, d, {}, RUNTIME, "pt")
        assert not (d / "error.json").exists()
        out, _ = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    epochs = [json.loads(x)["epoch"] for x in (d / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 61))  # one runner, every epoch once
    assert json.loads((d / "result.json").read_text())["resumed_from_epoch"] == 0
    # once it is done, another runner just returns the stored result
    assert run_stage(s, d, {}, RUNTIME, "pt")["resumed_from_epoch"] == 0


def test_driver_lock_is_taken_once_and_exclusive_across_processes(tmp_path):
    from harness.core.locks import DriverLocked, driver_lock
    with driver_lock(tmp_path):
        assert (tmp_path / ".driver.lock").read_text().startswith(f"pid {os.getpid()}")
        with pytest.raises(DriverLocked):  # not re-entrant: run_plan takes it once, around the manifest and execute
            with driver_lock(tmp_path):
                pass
    # another process holds it (a bare flock, to keep this fast; the full two-driver case is the slow test below)
    code = ("import fcntl, os, sys\nf = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.truncate(0); f.write(f'pid {os.getpid()} on elsewhere'); f.flush(); print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".driver.lock")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(DriverLocked, match=rf"another reproduce driver \(pid {other.pid} on elsewhere\) is "
                                               rf"running on {tmp_path}"):
            with driver_lock(tmp_path):
                pass
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    with driver_lock(tmp_path):  # released with its process
        pass


SMALL = ["profile=smoke", "launcher=local", "report=false", "teacher.train=false", "~rows.kd_finetuned_teacher",
         "~rows.dmae_75", "~rows.dmae_95", "~rows.dmae_98", "data.test_subset=128", "launcher.poll_s=0.5",
         "launcher.max_parallel=1", "~rows.scratch", "probe.enabled=false"]


@pytest.mark.slow
def test_second_driver_refused_and_killed_driver_rerun_waits_then_submits_only_the_rest(tmp_path, capsys):
    """Driver A (a real `python -m harness.reproduce` process, local launcher) runs the MAE row's 3 stages. While
    A's pre-training job runs: a second driver on the same root is refused and changes nothing. Then A is SIGKILLed;
    its job goes on: a chained job that runs the pre-training, the fine-tune and the evaluation. The rerun (this
    process) finds that job by its stage lock and its job.json, waits for the whole chain instead of starting any of
    it again, and ends with every stage done."""
    from harness.plan.config import load_config
    from harness.plan.graph import build_plan
    from harness.run.cli import main, run_table
    args = SMALL + [f"results_root={tmp_path / 'results'}", "pretrain.epochs=25"]
    plan = build_plan(load_config("table2", args))
    pre, fin, ev = plan.cells[0].pretrain, plan.cells[0].finetune, plan.cells[0].evaluate
    assert list(plan.stages) == [pre, fin, ev]
    a = subprocess.Popen([sys.executable, "-m", "harness.reproduce", "table2", *args], cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = plan.dir(pre) / "log.jsonl"
    try:
        wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, what="A's pre-training", proc=a)
        manifest = plan.root / "manifest.json"
        before = manifest.stat().st_mtime_ns
        capsys.readouterr()
        assert main(["table2", *args]) == 3
        err = capsys.readouterr().err
        assert f"another reproduce driver (pid {a.pid} on " in err and "Nothing was submitted" in err
        assert manifest.stat().st_mtime_ns == before

        os.kill(a.pid, signal.SIGKILL)  # the driver only: its local job keeps running, orphaned
        a.wait(timeout=30)
        holder = lock_holder(plan.dir(pre))
        assert holder and not holder.startswith(f"pid {a.pid} ")  # held by the job, not by the dead driver
        assert not (plan.dir(pre) / "result.json").exists(), "pre-training ended before the driver was killed"

        assert run_table("table2", args) == 0
        out = capsys.readouterr().out
    finally:
        try:
            os.killpg(a.pid, signal.SIGKILL)  # anything left of A's session (its job, if a test step failed)
        except ProcessLookupError:
            pass
    assert f"{pre}: re-attached (running elsewhere: {holder})" in out
    assert f"{pre}: submitted" not in out  # never started a second time
    # the orphan is a chained job (pre-train -> fine-tune -> evaluate): the rerun waits for the whole chain and
    # submits nothing of it, not even in the moment between two of its stages when no stage lock is held
    assert f"{pre}: re-attached (running elsewhere: {holder}), then {fin}, {ev} in the same job" in out
    assert f"{fin}: submitted" not in out and f"{ev}: submitted" not in out
    for sid in plan.stages:
        assert (plan.dir(sid) / "result.json").exists(), sid
    res = json.loads((plan.dir(pre) / "result.json").read_text())
    assert res["resumed_from_epoch"] == 0  # the orphaned job finished it in one go
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == list(range(1, 26))


@pytest.mark.slow
def test_every_rank_stops_when_the_stage_is_locked(tmp_path):
    """Under torchrun (2 gloo ranks) only rank 0 takes the lock; it tells the other ranks, so none of them starts
    training (or hangs in a collective) while another process holds the stage."""
    d = tmp_path / "stage"
    d.mkdir()
    s = spec()
    write_json({"stage_id": "pt", "spec": s, "inputs": {}, "runtime": RUNTIME, "spec_hash": spec_hash(s)},
               d / CONFIG_FILE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "harness.core.stages", str(d)]
    e = {k: v for k, v in env().items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    with stage_lock(d, "pt"):
        out = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"StageLocked: stage pt is already being run by pid {os.getpid()}" in text
    assert "rank 0 found it already running elsewhere" in text  # rank 1 stopped too
    assert not (d / "log.jsonl").exists() and not (d / "error.json").exists()


def _models(plan):
    """{stage id: (sha256 of model.pth or None, top-1 or None)} of a finished plan."""
    import hashlib
    out = {}
    for sid in plan.stages:
        d = plan.dir(sid)
        res = json.loads((d / "result.json").read_text())
        sha = hashlib.sha256((d / "model.pth").read_bytes()).hexdigest() if (d / "model.pth").exists() else None
        out[sid] = (sha, res.get("top1"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job_file", ["kept", "lost"])
def test_driver_killed_in_the_submit_window_one_rerun_finishes_identically(tmp_path, capsys, job_file):
    """Driver A is SIGKILLed the moment it prints `submitted`: its job has been started but, still importing, holds
    no stage lock yet. `kept`: A wrote job.json, so the rerun sees a live local controller and waits for its chain.
    `lost`: job.json removed, as if A died between submitting and writing it; the rerun submits the stage again and
    whichever job comes second finds the stage locked and steps back (never a failure). Either way one rerun ends
    with rc 0 and the same weights and top-1 as an uninterrupted run."""
    from harness.plan.config import load_config
    from harness.plan.graph import build_plan
    from harness.run.cli import run_table
    args = SMALL + [f"results_root={tmp_path / 'killed'}"]
    plan = build_plan(load_config("table2", args))
    pre = plan.cells[0].pretrain
    with open(tmp_path / "a.out", "w") as out:
        a = subprocess.Popen([sys.executable, "-m", "harness.reproduce", "table2", *args], cwd=ROOT, env=env(),
                             stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: ": submitted (job " in (tmp_path / "a.out").read_text(), what="A's submission", proc=a)
        os.kill(a.pid, signal.SIGKILL)  # the driver only: its job goes on
        a.wait(timeout=30)
        if job_file == "lost":
            (plan.dir(pre) / "job.json").unlink()
        assert run_table("table2", args) == 0
        out = capsys.readouterr().out
    finally:
        try:
            os.killpg(a.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert ": failed" not in out and ": blocked" not in out
    if job_file == "kept":
        assert f"{pre}: re-attached (running elsewhere: " in out and f"{pre}: submitted" not in out
    clean = SMALL + [f"results_root={tmp_path / 'clean'}"]
    assert run_table("table2", clean) == 0
    assert _models(plan) == _models(build_plan(load_config("table2", clean)))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_driver_ends_with_one_line_and_no_traceback(tmp_path, how):
    """Ctrl-C at a terminal signals the whole foreground process group (driver, submitit's local job controllers,
    their tasks); SIGTERM reaches the driver alone, which cancels its jobs. Either way the user's terminal shows the
    driver's one-line note last and no traceback (the controllers' go to .submitit/controllers.err)."""
    args = SMALL + [f"results_root={tmp_path / 'results'}", "pretrain.epochs=25"]
    out_p, err_p = tmp_path / "out", tmp_path / "err"
    with open(out_p, "w") as out, open(err_p, "w") as err:
        # as at a terminal: SIGINT handled (a shell starting `make test &` without job control leaves it ignored,
        # and the children would inherit that)
        a = subprocess.Popen([sys.executable, "-m", "harness.reproduce", "table2", *args], cwd=ROOT, env=env(),
                             stdout=out, stderr=err, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        logs = lambda: list((tmp_path / "results").glob("table2/smoke/*/log.jsonl"))  # noqa: E731
        wait_for(lambda: any(p.read_text().count("\n") >= 1 for p in logs()), what="a running stage", proc=a)
        if how == "ctrl-c":
            os.killpg(a.pid, signal.SIGINT)
        else:
            os.kill(a.pid, signal.SIGTERM)
        rc = a.wait(timeout=60)
    finally:
        try:
            os.killpg(a.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err = err_p.read_text()
    assert rc == (130 if how == "ctrl-c" else 143), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: "), err
