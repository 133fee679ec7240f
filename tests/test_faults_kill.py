"""A stage SIGKILLed at an arbitrary point resumes from its last checkpoint and ends with exactly the weights, log and
metrics of an uninterrupted run (CPU, same seed, one thread).

Each stage run is a real process killed with SIGKILL. To keep the many kill points cheap, runs are forked from a
"zygote" process that imported torch/timm/harness once (a fresh `python -m harness.core.stages` costs ~5 s of imports on
the 2-core box); two kill points also use the real command line `python -m harness.core.stages <run_dir>`. Kill points:

- deterministic, from inside the child (it SIGKILLs itself): in the middle of writing checkpoint-last (the first one
  and a later one), after the temp file is written but before the rotation, between the two renames (only
  checkpoint-prev exists), right after the final rename, after the epoch's log line but before its checkpoint, in the
  middle of an epoch, while writing model.pth, after model.pth but before result.json, while writing result.json,
  while the resumed run rewrites log.jsonl (a second kill during the resume);
- found by polling files from the test: as soon as a .checkpoint-last.pth.tmp-* appears (during the write), as soon as
  checkpoint-last.pth appears, after k log lines, as soon as model.pth appears;
- at a spread of times over the run.

Also: a submitit local job that times out (USR2 -> checkpoint -> requeue) resumes identically.
The counts are printed at the end of the main test (`-s` shows them).
"""
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.core.checkpoints import safe_load, state_dict_of
from harness.core.rundir import ATTEMPT_FIELDS, CONFIG_FILE, spec_hash, write_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, holdout=32, eval_crop_pct=1.0)
MODEL = dict(preset="vit_w32d2_dec32d1", patch_size=4)
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)
TIMING = ATTEMPT_FIELDS  # the fields in which an interrupted run may differ from a clean one


def pretrain_spec(epochs=4, **over):
    pt = dict(epochs=epochs, warmup_epochs=1, batch_size=16, accum_iter=2, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
              betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
    pt.update(over)
    return dict(kind="pretrain", name="pt", seed=5, data=DATA, model=MODEL, objective="mae", pretrain=pt)


def finetune_spec(epochs=3):
    ft = dict(epochs=epochs, warmup_epochs=1, batch_size=16, accum_iter=1, blr=2e-3, min_lr=1e-6, weight_decay=0.05,
              betas=[0.9, 0.999], clip_grad=1.0, layer_decay=0.75, drop_path=0.1, mixup=0.8, cutmix=1.0,
              smoothing=0.1, reprob=0.25, randaug="rand-m9-mstd0.5-inc1", eval_batch_size=32)
    return dict(kind="finetune", name="ft", seed=5, data=DATA, model=MODEL, finetune=ft, kd=None)


def prepare(run_dir: Path, spec: dict, runtime=RUNTIME) -> Path:
    """What run_stage writes first (config.json), so `python -m harness.core.stages <run_dir>` can run the stage."""
    run_dir.mkdir(parents=True)
    write_json({"stage_id": spec["name"], "spec": spec, "inputs": {}, "runtime": runtime,
                "spec_hash": spec_hash(spec)}, run_dir / CONFIG_FILE)
    return run_dir


# The zygote: imports once, then forks one child per request. A child runs the stage of a run directory exactly as
# `python -m harness.core.stages` does, optionally with a hook that SIGKILLs the child at a precise point.
ZYGOTE = r'''
import io, json, os, signal, sys, traceback
import torch, timm, timm.optim, timm.scheduler, timm.data, torchvision
import harness.core.stages, harness.core.train, harness.core.checkpoints, harness.core.objectives, harness.core.data
import functools
# read Fashion-MNIST's IDX files once, before forking (a file cache only: every run still builds its dataset)
harness.core.data._read_idx = functools.lru_cache(maxsize=None)(harness.core.data._read_idx)
for split, (images, labels) in harness.core.data.FASHION_FILES.items():
    root = harness.core.data.Path(harness.core.data.FASHION_MNIST_DIR)
    harness.core.data._read_idx(root / images, 16), harness.core.data._read_idx(root / labels, 8)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def install(hook):
    kind = hook["kind"]
    if kind in ("ckpt_write", "model_write"):  # write part of the temp file, then die (a torn write)
        marker = ".checkpoint-last.pth.tmp-" if kind == "ckpt_write" else ".model.pth.tmp-"
        real_save = torch.save
        def save(obj, f, *a, **k):
            name = getattr(f, "name", str(f))
            if marker in str(name) and (kind == "model_write" or obj.get("epoch") == hook["epoch"]):
                buf = io.BytesIO(); real_save(obj, buf, *a, **k)
                data = buf.getvalue(); f.write(data[: int(len(data) * hook["frac"])]); f.flush(); os.fsync(f.fileno())
                die()
            return real_save(obj, f, *a, **k)
        torch.save = save
    elif kind == "replace":  # die just before / after the nth os.replace whose source name starts with `src`
        real_replace, seen = os.replace, [0]
        def replace(src, dst, *a, **k):
            hit = os.path.basename(str(src)).startswith(hook["src"])
            if hit:
                seen[0] += 1
            if hit and seen[0] == hook["nth"] and hook["when"] == "before":
                die()
            out = real_replace(src, dst, *a, **k)
            if hit and seen[0] == hook["nth"] and hook["when"] == "after":
                die()
            return out
        os.replace = replace
    elif kind == "save_last_enter":  # the epoch's log line is written, its checkpoint not yet
        real = harness.core.train.save_last
        def save_last(state, run_dir):
            if state["epoch"] == hook["epoch"]:
                die()
            return real(state, run_dir)
        harness.core.train.save_last = save_last
    elif kind == "step":  # in the middle of an epoch: the nth forward pass
        real, n = harness.core.train.autocast, [0]
        def autocast(device, amp):
            n[0] += 1
            if n[0] == hook["n"]:
                die()
            return real(device, amp)
        harness.core.train.autocast = autocast
    else:
        raise ValueError(kind)

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1); os.dup2(fd, 2)
            sys.stdin.close()
            if req.get("hook"):
                install(req["hook"])
            sys.argv = ["harness.core.stages", req["run_dir"]]
            harness.core.stages.main()
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
'''


class Zygote:
    def __init__(self, tmp: Path):
        script = tmp / "zygote.py"
        script.write_text(ZYGOTE)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, env=env)
        self.buf = b""
        assert self.read(timeout=120).get("ready"), "zygote did not start"

    def read(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.time())
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if not r:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, "zygote died"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, run_dir: Path, hook=None) -> int:
        req = {"run_dir": str(run_dir), "out": str(run_dir.parent / f"{run_dir.name}.out"), "hook": hook}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self.read(timeout=60)["pid"]

    def wait(self, timeout=300) -> dict:
        msg = self.read(timeout=timeout)
        assert msg is not None, "stage run did not end"
        return msg

    def poll(self):
        """The exit message if the running child has ended, else None."""
        return self.read(timeout=0)

    def run(self, run_dir: Path, hook=None) -> dict:
        self.start(run_dir, hook)
        return self.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def output(run_dir: Path) -> str:
    p = run_dir.parent / f"{run_dir.name}.out"
    return p.read_text() if p.exists() else ""


def log_rows(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def metrics(run_dir: Path):
    return {k: v for k, v in json.loads((run_dir / "result.json").read_text()).items() if k not in TIMING}


def same_as(ref: Path, run_dir: Path) -> bool:
    a, b = state_dict_of(safe_load(ref / "model.pth")), state_dict_of(safe_load(run_dir / "model.pth"))
    weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return weights and log_rows(ref) == log_rows(run_dir) and metrics(ref) == metrics(run_dir)


def finish(z: Zygote, run_dir: Path, max_runs=3) -> dict:
    """Resume (unhooked) until the stage completes."""
    for _ in range(max_runs):
        msg = z.run(run_dir)
        if msg["code"] == 0:
            return json.loads((run_dir / "result.json").read_text())
    raise AssertionError(f"{run_dir} did not complete:\n{output(run_dir)[-3000:]}")


def kill_when(z: Zygote, run_dir: Path, cond, timeout=120):
    """Start a run; SIGKILL it as soon as cond(run_dir, t) holds. Returns True if killed, False if it ended first."""
    pid = z.start(run_dir)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond(run_dir, time.time() - t0):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended (and was reaped) just now
                pass
            msg = z.wait()
            return msg["signal"] == signal.SIGKILL
        msg = z.poll()
        if msg is not None:
            return False
        time.sleep(0.0005)
    raise AssertionError("condition never met")


def tmp_ckpt(d: Path):
    return [p for p in d.glob(".checkpoint-last.pth.tmp-*")]


def n_log(d: Path) -> int:
    p = d / "log.jsonl"
    return p.read_text().count("\n") if p.exists() else 0


# Deterministic kill points from inside the child: (name, spec kind, hooks of successive runs, text the resumed
# run must print). Pre-train: 4 epochs x 4 steps (2 updates). Fine-tune: 3 epochs x 4 steps, evaluation per epoch.
HOOKED = [
    ("during the first checkpoint write", "pretrain", [{"kind": "ckpt_write", "epoch": 1, "frac": 0.5}],
     "starting from scratch at epoch 0"),
    ("during a later checkpoint write", "pretrain", [{"kind": "ckpt_write", "epoch": 3, "frac": 0.3}],
     "left by an interrupted checkpoint write"),
    ("checkpoint temp written, before the rotation", "pretrain",
     [{"kind": "replace", "src": "checkpoint-last.pth", "when": "before", "nth": 1}], "resumed from checkpoint-last"),
    ("between the two renames (only checkpoint-prev)", "pretrain",
     [{"kind": "replace", "src": "checkpoint-last.pth", "when": "after", "nth": 2}], "checkpoint-prev.pth instead"),
    ("right after the final rename", "pretrain",
     [{"kind": "replace", "src": ".checkpoint-last.pth.tmp-", "when": "after", "nth": 2}], "at epoch 2/4"),
    ("after the log line, before its checkpoint", "pretrain", [{"kind": "save_last_enter", "epoch": 3}],
     "at epoch 2/4"),
    ("in the middle of an epoch", "pretrain", [{"kind": "step", "n": 10}], "at epoch 2/4"),
    ("during the model.pth write", "pretrain", [{"kind": "model_write", "frac": 0.5}], "at epoch 4/4"),
    ("after model.pth, before result.json", "pretrain",
     [{"kind": "replace", "src": ".model.pth.tmp-", "when": "after", "nth": 1}], "at epoch 4/4"),
    ("during the result.json write", "pretrain",
     [{"kind": "replace", "src": ".result.json.tmp-", "when": "before", "nth": 1}], "removed"),
    ("during the config.json write at start", "pretrain",
     [{"kind": "replace", "src": ".config.json.tmp-", "when": "before", "nth": 1}], "starting from scratch"),
    ("twice: after epoch 2, then while the resume rewrites log.jsonl", "pretrain",
     [{"kind": "save_last_enter", "epoch": 3}, {"kind": "replace", "src": ".log.jsonl.tmp-", "when": "before",
                                                "nth": 1}], "at epoch 2/4"),
    ("fine-tune: during a checkpoint write", "finetune", [{"kind": "ckpt_write", "epoch": 2, "frac": 0.6}],
     "at epoch 1/3"),
    ("fine-tune: during the evaluation of epoch 2", "finetune", [{"kind": "step", "n": 10}],
     "at epoch 1/3"),
]


def test_sigkill_at_many_points_resumes_identically(zygote, tmp_path, capsys):
    specs = {"pretrain": pretrain_spec(), "finetune": finetune_spec()}
    refs = {}
    for kind, spec in specs.items():
        refs[kind] = prepare(tmp_path / f"ref-{kind}", spec)
        assert zygote.run(refs[kind])["code"] == 0, output(refs[kind])
        assert "starting from scratch (no checkpoint" in output(refs[kind])
    counts = {"kill points": 0, "kills": 0, "identical": 0}
    report = []

    def check(name, d, kills, expect=None):
        res = finish(zygote, d)
        assert not tmp_ckpt(d) and not list(d.glob(".*.tmp-*")), f"{name}: temp files left"
        ok = same_as(refs["finetune" if d.name.startswith("ft") else "pretrain8" if d.name.startswith("pt8")
                          else "pretrain"], d)
        if expect:
            assert expect in output(d), f"{name}: expected {expect!r} in\n{output(d)[-3000:]}"
        counts["kill points"] += 1
        counts["kills"] += kills
        counts["identical"] += ok
        report.append(f"{'ok ' if ok else 'BAD'} resumed_from_epoch={res['resumed_from_epoch']} kills={kills} {name}")
        assert ok, f"{name}: resumed run differs from the uninterrupted one"

    # 1. deterministic kill points, from inside the child
    for i, (name, kind, hooks, expect) in enumerate(HOOKED):
        d = prepare(tmp_path / f"{'ft' if kind == 'finetune' else 'pt'}-hook{i}", specs[kind])
        for hook in hooks:
            msg = zygote.run(d, hook)
            assert msg["signal"] == signal.SIGKILL, f"{name}: the hook {hook} never fired:\n{output(d)[-3000:]}"
        if "first checkpoint" in name:
            assert tmp_ckpt(d) and (d / "log.jsonl").exists() and not (d / "checkpoint-last.pth").exists()
        if "between the two renames" in name:
            assert (d / "checkpoint-prev.pth").exists() and not (d / "checkpoint-last.pth").exists()
        check(name, d, len(hooks), expect)

    # 2. kill points found by polling the run directory from outside
    polled = [
        ("as soon as a checkpoint temp file appears", lambda d, t: bool(tmp_ckpt(d))),
        ("as soon as the second checkpoint temp file appears", lambda d, t: n_log(d) >= 2 and bool(tmp_ckpt(d))),
        ("as soon as checkpoint-last.pth appears", lambda d, t: (d / "checkpoint-last.pth").exists()),
        ("after 3 log lines", lambda d, t: n_log(d) >= 3),
        ("as soon as model.pth appears", lambda d, t: (d / "model.pth").exists()),
    ]
    caught_tmp = 0
    for i, (name, cond) in enumerate(polled):
        d = prepare(tmp_path / f"pt-poll{i}", specs["pretrain"])
        landed = kill_when(zygote, d, cond)
        caught_tmp += bool(tmp_ckpt(d))
        check(name, d, int(landed))

    # 3. a spread of times over a longer run (8 epochs; its length measured on the reference: fork to result.json)
    refs["pretrain8"] = prepare(tmp_path / "ref-pretrain8", pretrain_spec(epochs=8))
    t0 = time.time()
    zygote.start(refs["pretrain8"])
    while not (refs["pretrain8"] / "result.json").exists():
        time.sleep(0.001)
    total = time.time() - t0
    assert zygote.wait()["code"] == 0
    for i, frac in enumerate((0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.9)):
        d = prepare(tmp_path / f"pt8-time{i}", pretrain_spec(epochs=8))
        landed = kill_when(zygote, d, lambda d, t, at=frac * total: t >= at)
        check(f"at {frac:.0%} of the run ({frac * total:.2f} s)", d, int(landed))

    # 4. the real command line, killed from outside while it trains, resumed by the command line
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for i, (name, cond) in enumerate([("CLI: as soon as a checkpoint temp file appears", lambda d: bool(tmp_ckpt(d))),
                                      ("CLI: after 2 log lines", lambda d: n_log(d) >= 2)]):
        d = prepare(tmp_path / f"pt-cli{i}", pretrain_spec(epochs=6))
        cmd = [sys.executable, "-m", "harness.core.stages", str(d)]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and not cond(d):
            time.sleep(0.0005)
        p.send_signal(signal.SIGKILL)
        landed = p.wait() == -signal.SIGKILL
        caught_tmp += bool(tmp_ckpt(d))
        if i == 0:
            ref6 = prepare(tmp_path / "ref-pt6", pretrain_spec(epochs=6))
            assert zygote.run(ref6)["code"] == 0
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        ok = same_as(ref6, d)
        counts["kill points"] += 1
        counts["kills"] += landed
        counts["identical"] += ok
        report.append(f"{'ok ' if ok else 'BAD'} kills={int(landed)} {name}")
        assert ok, name

    with capsys.disabled():
        print("\n" + "\n".join(report))
        print(f"kill points tried: {counts['kill points']}, SIGKILLs that landed before the run ended: "
              f"{counts['kills']}, polled kills with a checkpoint temp file on disk: {caught_tmp}, "
              f"resumes with identical weights/log/metrics: {counts['identical']}")
    assert counts["identical"] == counts["kill points"]
    # every hooked kill lands (checked above); a polled or timed one may rarely come after the run ended
    assert counts["kills"] >= 0.8 * counts["kill points"]


def test_timeout_requeues_and_resumes_identically(tmp_path):
    """launcher=local: the timeout/preemption signal (USR2, sent here as soon as two epochs are logged, so the test
    does not depend on machine speed) makes the job checkpoint itself (StageJob is
    Checkpointable) and requeue; the stage resumes from checkpoint-last and ends identical."""
    import time
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from harness.run.executors import local_executor
    from harness.run.stage_job import StageJob
    from harness.core.stages import run_stage
    spec = pretrain_spec(epochs=30)
    spec["data"] = dict(DATA, train_subset=512)
    la = OmegaConf.create({"launcher": {"timeout_min": 10, "gpus_per_node": 0, "max_requeues": 3}})
    ex = local_executor(SimpleNamespace(root=tmp_path), la)
    d = tmp_path / "stage"
    job = ex.submit(StageJob("pt-timeout", spec, str(d), {}, RUNTIME))
    log, deadline = d / "log.jsonl", time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert time.time() < deadline and not job.done(), "the stage never logged two epochs"
        time.sleep(0.05)
    # what submitit's local controller forwards to its task when the time limit nears (job._interrupt() only
    # signals the controller, which does not pass it on)
    pid = job._process.pid
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        os.kill(int(child), signal.SIGUSR2)
    res = job.result()
    # the log line of an epoch is written just before its checkpoint: at least epoch 1's checkpoint exists
    assert res["resumed_from_epoch"] >= 1, "the stage was not requeued after the signal"
    ref = tmp_path / "ref"
    run_stage(spec, ref, {}, RUNTIME, "pt-timeout")
    assert same_as(ref, d)
    logs = "".join(p.read_text() for p in (tmp_path / ".submitit").rglob("*.out"))
    assert "resumed from checkpoint-last" in logs


@pytest.mark.slurm
def test_real_slurm_timeout_requeues_and_resumes_identically(slurm_cluster, tmp_path):
    """The signal Slurm sends before a time limit or a preemption (USR2; here by `scancel --signal=USR2` as soon as
    two epochs are logged, so the test does not depend on machine speed): submitit checkpoints and requeues the job
    (a real `scontrol requeue`), which resumes from checkpoint-last until the stage is done; the weights equal an
    uninterrupted run's."""
    import subprocess
    import time

    from harness.plan.config import load_config
    from harness.plan.resolve import runtime_of
    from harness.run.executors import slurm_executor
    from harness.run.stage_job import stage_job as _job
    from harness.plan.graph import build_plan
    from harness.core.stages import run_stage
    args = ["profile=smoke", "launcher=slurm", "launcher.partition=debug", "launcher.mem_gb=3", "launcher.poll_s=1",
            "launcher.timeout_min=20", "launcher.max_requeues=6", "pretrain.epochs=60", "run.keep_checkpoints=true",
            f"results_root={tmp_path / 'slurm'}"]
    cfg = load_config("table2", args)
    plan = build_plan(cfg)
    stage = next(s for s in plan.stages.values() if s.role == "student-pretrain" and not s.inputs)
    job = slurm_executor(plan, cfg).submit(_job(plan, stage, cfg, distributed=False))
    log, deadline = plan.dir(stage.id) / "log.jsonl", time.time() + 900
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert time.time() < deadline and not job.done(), "the stage never logged two epochs"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True, timeout=60)
    result = job.result()
    assert result["resumed_from_epoch"] >= 1, "the stage was not requeued after the signal"
    ref = tmp_path / "reference"
    run_stage(stage.spec, ref, plan.input_paths(stage), runtime_of(cfg), stage.id)
    assert same_as(ref, plan.dir(stage.id))
    out = "".join(p.read_text() for p in (plan.root / ".submitit").rglob("*.out"))
    assert "resumed from checkpoint-last" in out


def test_the_requeue_request_survives_the_sigterm_of_a_preemption(tmp_path, monkeypatch):
    """A preempted job gets SIGTERM too, and Slurm signals every process of a job it requeues: scontrol requeue runs
    immune to SIGTERM, so the request is sent; scontrol exiting with an error (requeue refused) is still an error."""
    import subprocess
    import types

    from harness.run.stage_job import requeue_immune_to_sigterm
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = types.SimpleNamespace(job_id="42")
    # a SIGTERM arrives while scontrol is still sending its request
    scontrol.write_text("#!/bin/sh\nkill -TERM $$\necho \"$@\" > \"$(dirname \"$0\")/sent\"\n")
    scontrol.chmod(0o755)
    requeue_immune_to_sigterm(env, 3)
    assert (bin_dir / "sent").read_text().split() == ["requeue", "42"]
    scontrol.write_text("#!/bin/sh\necho 'slurm_requeue error: Job is no longer pending execution' >&2\nexit 1\n")
    with pytest.raises(subprocess.CalledProcessError):
        requeue_immune_to_sigterm(env, 3)
