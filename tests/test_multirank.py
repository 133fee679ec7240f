"""Several ranks on CPU (gloo, torch.multiprocessing), 2 and 4 of them: each rank resumes its own random streams and a
multi-rank resume is bit-identical to an uninterrupted run of as many ranks; a checkpoint of several ranks is refused
on one; a NaN or an exception on rank 1 only stops (or, with run.nan_restarts, restarts) every rank at the same step
within seconds, naming rank 1.

The scenarios run in one group of spawned processes per world size (one start-up of torch for all of them), in order,
each in its own run directory; every rank writes what it saw (its random streams and losses per step, the error it
raised and when) to rank<r>.json, which the tests read. Faults are injected as tests/test_resume.py and
tests/test_faults_nan.py inject them: a save_last that raises after writing, a NaN loss, here on one rank only.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness.core.data as data_mod
import harness.core.objectives as objectives
import harness.core.runtime as runtime_mod
import harness.core.train as train_mod
from harness.core.checkpoints import LAST, CheckpointError, load_last, safe_load, save_last, state_dict_of
from harness.core.rundir import ATTEMPT_FIELDS
from harness.core.stages import run_stage
from harness.core.resume import own_rng_state, rng_state, seed_all, set_rng_state
from harness.core.runtime import Runtime, setup_runtime

WORLDS = (2, 4)
GLOO_TIMEOUT_S = 60  # a rank left waiting in a collective fails after this instead of blocking the test run
STOP_BOUND_S = 15  # "within seconds": from the fault to every rank's exception, far below GLOO_TIMEOUT_S
EPOCHS, IMAGES, BATCH = 3, 64, 8
DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=IMAGES,
            test_subset=32, eval_crop_pct=1.0)
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)
def steps(world: int) -> int:
    return IMAGES // world // BATCH  # 64 images / 2 ranks / batch 8 = 4 steps per epoch and rank (4 ranks: 2)


def fault_call(world: int) -> int:
    return steps(world) + 1  # the injected faults hit epoch 1, step 1 (0-based), after the checkpoint of epoch 1
TIMING = ATTEMPT_FIELDS  # the fields in which an interrupted run may differ from a clean one


def spec():
    pt = dict(epochs=EPOCHS, warmup_epochs=1, batch_size=BATCH, accum_iter=1, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
              betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
    return dict(kind="pretrain", name="pt", seed=5, data=DATA, model=dict(preset="vit_w32d2_dec32d1", patch_size=4),
                objective="mae", pretrain=pt)


# ---- inside each spawned rank -----------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


CALLS: list = []  # per objective call of this rank: its random streams before the call, and the loss
FAULT: dict = {}  # what to inject in the running scenario on this rank, and when it was injected


def _streams() -> dict:
    """Fingerprints of this process's torch, numpy and python random streams (reading them draws nothing)."""
    np_state = np.random.get_state()
    digest = lambda b: hashlib.sha1(b).hexdigest()[:16]  # noqa: E731
    return {"torch": digest(torch.get_rng_state().numpy().tobytes()),
            "numpy": digest(np_state[1].tobytes() + str(np_state[2:]).encode()),
            "python": digest(repr(random.getstate()).encode())}


def _install_probes() -> None:
    real_objective, real_batch, real_save = (objectives.MAEObjective.__call__, data_mod.TensorImages.batch,
                                             train_mod.save_last)
    batches = [0]

    def objective(self, model, imgs, labels):
        n = len(CALLS)
        CALLS.append(_streams())
        loss, terms = real_objective(self, model, imgs, labels)
        if FAULT.get("nan_at") == n:
            FAULT["t"] = time.time()
            loss, terms = loss * float("nan"), {k: v * float("nan") for k, v in terms.items()}
        CALLS[-1]["loss"] = loss.item()
        return loss, terms

    def batch(self, idx, g):
        n, batches[0] = batches[0], batches[0] + 1
        if FAULT.get("raise_at") == n:
            FAULT["t"] = time.time()
            raise RuntimeError("injected data fault on rank 1")
        return real_batch(self, idx, g)

    def save_then_die(state, run_dir):
        real_save(state, run_dir)
        if FAULT.get("die_after_epoch") == state["epoch"]:
            raise Interrupted(f"killed after epoch {state['epoch']}")

    def reset():
        CALLS.clear()
        FAULT.clear()
        batches[0] = 0

    objectives.MAEObjective.__call__ = objective
    data_mod.TensorImages.batch = batch
    train_mod.save_last = save_then_die
    return reset


def _scenario(reset, root: Path, name: str, run_dir: str, runtime=RUNTIME, **fault) -> dict:
    reset()
    FAULT.update(fault)
    try:
        res = run_stage(spec(), root / run_dir, {}, runtime, "pt")
        out = {"ok": True, "resumed_from_epoch": res["resumed_from_epoch"]}
    except Exception as e:
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.update(t_end=time.time(), t_fault=FAULT.get("t"), calls=list(CALLS))
    return out


def _worker(rank: int, world: int, ports, root: str) -> None:
    root = Path(root)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # started here, not by the harness, for its short timeout: setup_runtime() uses the group it finds
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    reset = _install_probes()
    one = lambda r: {} if rank != 1 else {r: fault_call(world)}  # noqa: E731  (a fault on rank 1 only)
    out = {"ref": _scenario(reset, root, "ref", "ref")}
    out["interrupted"] = _scenario(reset, root, "interrupted", "run",
                                   **({"die_after_epoch": 1} if rank == 0 else {}))
    if rank == 0:  # the world-size test resumes this checkpoint on one process
        shutil.copytree(root / "run", root / "at-epoch-1")
    out["resumed"] = _scenario(reset, root, "resumed", "run")
    out["nan"] = _scenario(reset, root, "nan", "nan", **one("nan_at"))
    out["raise"] = _scenario(reset, root, "raise", "raise", **one("raise_at"))
    out["nan_restart"] = _scenario(reset, root, "nan_restart", "nan-restart", dict(RUNTIME, nan_restarts=1),
                                   **one("nan_at"))
    # a group setup_runtime starts itself is the harness's to close
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(ports[1])
    rt = setup_runtime(device="cpu", amp="none", threads=1, log_every=0)
    t = torch.ones(1)
    dist.all_reduce(t)
    owned = rt.owns_process_group
    rt.close()
    out["close"] = {"owned": owned, "sum": t.item(), "initialized_after": dist.is_initialized()}
    (root / f"rank{rank}.json").write_text(json.dumps(out))


# ---- in the test process ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}-ranks")
def ranks(request, tmp_path_factory):
    """(results folder, world size, what each rank saw): every scenario run once by `world` spawned ranks."""
    world = request.param
    root = tmp_path_factory.mktemp(f"multirank{world}")
    ctx = mp.start_processes(_worker, args=(world, (_free_port(), _free_port()), str(root)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.time() + 900
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish in 900 s")
    return root, world, [json.loads((root / f"rank{r}.json").read_text()) for r in range(world)]


def log_rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# Two ranks: a resumed run is bit-identical to an uninterrupted one. More ranks: equal to float32 round-off. DDP
# rebuilds its gradient buckets after a process's first step (in the order the gradients became ready), so the first
# step after a resume all-reduces with the initial layout where the uninterrupted run used the rebuilt one; a ring
# all-reduce sums an element in an order set by the chunk it falls in, and a + b == b + a only for two ranks.
# Measured at 4 ranks: max |w_resumed - w_uninterrupted| = 4.0e-6 (weights up to 1.0); the resumed runs (interrupted,
# NaN-restarted) are bit-identical to each other, and every rank's random streams match exactly.
ROUND_OFF = dict(rel=1e-5, abs=1e-5)


def assert_same_weights(a, b, world=2):
    sa, sb = state_dict_of(safe_load(a / "model.pth")), state_dict_of(safe_load(b / "model.pth"))
    assert sa.keys() == sb.keys()
    for k in sa:
        if world == 2:
            assert torch.equal(sa[k], sb[k]), f"{k} differs"
        else:
            assert torch.allclose(sa[k], sb[k], rtol=ROUND_OFF["rel"], atol=ROUND_OFF["abs"]), f"{k} differs"


def assert_same_log(a, b, world=2):
    ra, rb = log_rows(a), log_rows(b)
    if world == 2:
        assert ra == rb
        return
    assert [r.keys() for r in ra] == [r.keys() for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            assert x[k] == (pytest.approx(y[k], **ROUND_OFF) if isinstance(y[k], float) else y[k]), k


def error_of(run_dir) -> str:
    return json.loads((run_dir / "error.json").read_text())["error"]


STREAMS = ("torch", "numpy", "python")


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_streams(ranks):
    _, world, seen = ranks
    n = steps(world)
    for r, out in enumerate(seen):
        ref, first, resumed = out["ref"]["calls"], out["interrupted"]["calls"], out["resumed"]["calls"]
        assert (len(ref), len(first), len(resumed)) == (EPOCHS * n, n, (EPOCHS - 1) * n)
        strip = lambda calls: [{k: c[k] for k in STREAMS} for c in calls]  # noqa: E731
        assert strip(first) == strip(ref[:n]), f"rank {r} before the interruption"
        assert strip(resumed) == strip(ref[n:]), f"rank {r} resumed other streams than it had"
    # after the resume the ranks draw different masks (and would draw different augmentation, Mixup): every stream
    # differs between every two ranks at every step
    for step in zip(*(out["resumed"]["calls"] for out in seen)):
        for k in STREAMS:
            assert len({c[k] for c in step}) == world, f"{k} stream shared by two ranks after the resume"


@pytest.mark.slow
def test_multi_rank_resume_is_bit_identical_and_the_interruption_names_its_rank(ranks):
    root, world, seen = ranks
    for out in seen:  # rank 0 raised after writing checkpoint-last; the others stopped with it instead of waiting
        assert out["interrupted"]["error"] == (f"RankFailed: rank 0 of {world} failed after epoch 1 (writing its log "
                                               "line and checkpoint) in pt: Interrupted: killed after epoch 1")
        assert out["resumed"]["ok"] and out["resumed"]["resumed_from_epoch"] == 1
    assert not (root / "run" / "error.json").exists()  # removed by the successful resume
    assert_same_weights(root / "ref", root / "run", world)
    assert_same_log(root / "run", root / "ref", world)
    res, ref = (json.loads((root / d / "result.json").read_text()) for d in ("run", "ref"))
    numeric = ("final_loss", "final_loss_pix", "model_sha256")
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING + numeric}  # noqa: E731
    assert strip(res) == strip(ref) and res["final_loss"] == pytest.approx(ref["final_loss"], **ROUND_OFF)
    if world == 2:
        assert [res[k] for k in numeric] == [ref[k] for k in numeric]
    else:  # the resumed runs took the same path: bit-identical to each other
        assert_same_weights(root / "run", root / "nan-restart")
    assert res["world_size"] == world


@pytest.mark.slow
def test_logged_loss_is_the_mean_over_ranks(ranks):
    root, world, seen = ranks
    n = steps(world)
    for e, row in enumerate(log_rows(root / "ref")):
        per_rank = [sum(c["loss"] for c in out["ref"]["calls"][e * n:(e + 1) * n]) / n for out in seen]
        assert per_rank[0] != per_rank[1]  # so rank 0's mean alone would not pass
        assert row["loss"] == pytest.approx(sum(per_rank) / world, rel=1e-12, abs=0)


@pytest.mark.slow
def test_checkpoint_of_several_ranks_is_refused_on_one(ranks, tmp_path, monkeypatch):
    root, world, _ = ranks
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "at-epoch-1"
    shutil.copytree(root / "at-epoch-1", d)
    state = safe_load(d / LAST)
    assert state["world_size"] == world and isinstance(state["rng"], list) and len(state["rng"]) == world
    before = (d / LAST).read_bytes()
    with pytest.raises(CheckpointError, match=rf"written by a run on world size {world} .* this run has world size "
                                              r"1: refusing to resume"):
        run_stage(spec(), d, {}, RUNTIME, "pt")
    assert (d / LAST).read_bytes() == before
    assert error_of(d).startswith("CheckpointError: ")
    assert not (d / "result.json").exists()


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_at_once_naming_it(ranks):
    root, world, seen = ranks
    t_fault = seen[1]["nan"]["t_fault"]
    assert t_fault is not None and all(out["nan"]["t_fault"] is None for r, out in enumerate(seen) if r != 1)
    msg = f"NonFiniteLoss: non-finite loss nan at epoch 1 step 1 (0-based; loss_pix=nan) in pt, on rank 1 of {world}"
    for r, out in enumerate(seen):
        assert out["nan"]["error"] == msg, f"rank {r}"
        assert out["nan"]["t_end"] - t_fault < STOP_BOUND_S, f"rank {r} hung until a collective timed out"
        assert len(out["nan"]["calls"]) == fault_call(world) + 1  # every rank stopped at the faulty step
    assert error_of(root / "nan") == msg
    assert safe_load(root / "nan" / LAST)["epoch"] == 1  # the last good checkpoint is kept
    assert not (root / "nan" / "model.pth").exists()


@pytest.mark.slow
def test_exception_on_one_rank_stops_every_rank_at_once_naming_it(ranks):
    root, world, seen = ranks
    t_fault = seen[1]["raise"]["t_fault"]
    assert t_fault is not None and all(out["raise"]["t_fault"] is None for r, out in enumerate(seen) if r != 1)
    msg = (f"RankFailed: rank 1 of {world} failed at epoch 1 step 1 (0-based) in pt: "
           "RuntimeError: injected data fault on rank 1")
    for r, out in enumerate(seen):
        assert out["raise"]["error"] == msg, f"rank {r}"
        assert out["raise"]["t_end"] - t_fault < STOP_BOUND_S, f"rank {r} hung until a collective timed out"
    # rank 1 failed fetching the batch of step 1, the others had run its forward pass: none ran a backward pass
    calls = [len(out["raise"]["calls"]) for out in seen]
    assert calls[1] == fault_call(world) and all(c == fault_call(world) + 1 for r, c in enumerate(calls) if r != 1)
    assert error_of(root / "raise") == msg
    tb = json.loads((root / "raise" / "error.json").read_text())["traceback"]
    assert "traceback on rank 1:" in tb and "injected data fault on rank 1" in tb  # rank 1's, in rank 0's file
    assert safe_load(root / "raise" / LAST)["epoch"] == 1


@pytest.mark.slow
def test_nan_restart_restarts_every_rank_together(ranks):
    root, world, seen = ranks
    for out in seen:
        assert out["nan_restart"]["ok"] and out["nan_restart"]["resumed_from_epoch"] == 1
    # each rank restarted from the checkpoint with its own streams: the result is the uninterrupted run's
    assert_same_weights(root / "ref", root / "nan-restart", world)
    assert_same_log(root / "nan-restart", root / "ref", world)


@pytest.mark.slow
def test_process_group_started_by_the_harness_is_closed_by_it(ranks):
    _, world, seen = ranks
    for out in seen:
        assert out["close"] == {"owned": True, "sum": float(world), "initialized_after": False}


# ---- one process ------------------------------------------------------------------------------------------------

def _seeded_state(seed):
    seed_all(seed)
    return rng_state()


def test_every_ranks_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    states = [_seeded_state(10), _seeded_state(11)]
    save_last({"rng": states, "world_size": 2}, tmp_path)
    loaded = load_last(tmp_path)  # torch.load(weights_only=True)
    for rank in range(2):
        set_rng_state(own_rng_state(loaded, Runtime(torch.device("cpu"), rank=rank, world=2), "ckpt"))
        draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
        assert loaded["rng"][rank]["python"] == states[rank]["python"]
        seed_all(10 + rank)
        assert draws == (random.random(), float(np.random.rand()), torch.rand(1).item())
    with pytest.raises(CheckpointError, match=r"ckpt was written by a run on world size 2 \(2 process\(es\)\); "
                                              r"this run has world size 1"):
        own_rng_state(loaded, Runtime(torch.device("cpu")), "ckpt")


def test_single_process_checkpoint_format_is_unchanged_and_refused_on_two_ranks():
    state = {"rng": _seeded_state(3)}  # a checkpoint written before world_size was recorded: one process
    assert own_rng_state(state, Runtime(torch.device("cpu")), "ckpt") is state["rng"]
    with pytest.raises(CheckpointError, match=r"world size 1 .* this run has world size 2"):
        own_rng_state(state, Runtime(torch.device("cpu"), rank=1, world=2), "ckpt")


def test_cuda_device_is_local_rank_modulo_visible_devices_and_bf16_warns_once(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts as support
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    monkeypatch.setattr(runtime_mod, "_bf16_warned", False)
    with pytest.warns(UserWarning, match=r"run.amp=bf16 on Tesla V100 \(compute capability 7.0\), which has no "
                                         r"native bf16"):
        rt = setup_runtime(device="cuda", amp="bf16")
    assert chosen == [1] and rt.device == torch.device("cuda", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_runtime(device="cuda", amp="auto")  # bf16 again: said once per process
        monkeypatch.setattr(runtime_mod, "_bf16_warned", False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
        assert setup_runtime(device="cuda", amp="bf16").amp == "bf16"  # native: nothing to say


class SignalDispositions(torch.utils.data.Dataset):
    """Each item: how the process that loads it handles USR2 and TERM (0 SIG_DFL, 1 SIG_IGN, -1 a Python handler)."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        code = {signal.SIG_DFL: 0, signal.SIG_IGN: 1}
        return torch.tensor([code.get(signal.getsignal(s), -1) for s in (signal.SIGUSR2, signal.SIGTERM)]), 0


def test_loader_workers_do_not_inherit_the_requeue_handlers():
    def requeue(signum, frame):  # stands for submitit's and harness.core.stages' handlers
        raise AssertionError("a requeue handler ran in the test process")

    old = {s: signal.signal(s, requeue) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        for train in (True, False):
            batches = list(data_mod.loader(SignalDispositions(), 1, train, 0 if train else None, num_workers=1))
            assert [b[0].tolist() for b in batches] == [[[1, 1]]] * 2, f"train={train}"
        assert signal.getsignal(signal.SIGUSR2) is requeue  # the main process keeps its handlers
    finally:
        for s, h in old.items():
            signal.signal(s, h)
