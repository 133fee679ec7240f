"""The one training loop. MAE, DMAE, fine-tuning and KD are objectives that plug into `fit`.

Per epoch it appends a line to `log.jsonl` and writes `checkpoint-last.pth` atomically (model, optimizer, scaler,
epoch, every rank's RNG states, history, the stage's config hash); on start it resumes from it, refusing a checkpoint
written for another config or another world size. Rank 0 also writes TensorBoard curves to `tb/` (harness.core.tblog:
the loss terms, lr and img/s every run.tb_every steps, the log line per epoch). Schedules are per iteration: linear
warmup, then half-cosine to min_lr (MAE's lr_sched formula, set where the official engine sets it, see lr_at).

Across ranks every decision to stop is taken together: each step the ranks exchange a status (loss finite, step
raised) before the backward pass, so a NaN or an exception on one rank stops (or, with run.nan_restarts, restarts)
every rank at the same step, naming the failing rank, instead of leaving the others waiting in the next gradient
all-reduce until the collective timeout.

    lr = blr * effective_batch / 256,   effective_batch = batch_size * accum_iter * world_size
    e.g. paper pre-training: 128 * 4 * 8 GPUs = 4096 -> lr = 1.5e-4 * 4096 / 256 = 2.4e-3
"""
from __future__ import annotations

import atexit
import json
import math
import os
import random
import resource
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness.core.build import optimizer as build_optimizer
from harness.core.checkpoints import CheckpointError, load_last, save_last
from harness.core.data import loader
from harness.core.rundir import LOG_FILE
from harness.core.spec import Schedule, StageRuntime
from harness.core.tblog import TBLog


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN/inf; the message names the epoch, step and loss terms (and the rank, on several ranks)."""


class RankFailed(RuntimeError):
    """A rank of a multi-process stage raised (in its training step, or while writing the epoch's log line and
    checkpoint); every rank raises this together, naming the failing rank(s) and the first one's error."""


@dataclass
class Runtime:
    device: torch.device
    amp: str = "none"  # none | bf16 | fp16
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    log_every: int = 20
    num_workers: int = 0
    owns_process_group: bool = False  # setup_runtime started torch.distributed: close() ends it
    tensorboard: bool = False  # rank 0 writes <run_dir>/tb/ (harness.core.tblog); a bare Runtime writes none
    tb_every: int = 0  # steps between per-step TensorBoard points (0: per-epoch points only)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def close(self) -> None:
        """End torch.distributed when setup_runtime started it (a group the caller started is left to the caller).
        Every rank must be done with collectives: destroying a group with one in flight can hang (NCCL). A later
        setup_runtime starts a new group from the same env:// variables."""
        if self.owns_process_group:
            end_process_group()
            self.owns_process_group = False

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def end_process_group() -> None:
    """End torch.distributed if it is running (once a job's last stage is done: its stages share one group)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_bf16_warned = False


def _warn_without_native_bf16(dev: torch.device, rank: int) -> None:
    """bf16 autocast on a GPU without native bf16 (compute capability below 8.0: V100, T4, ...) is emulated, many
    times slower, or fails in some kernels: say so once per process (rank 0), with what to use instead."""
    global _bf16_warned
    if _bf16_warned or rank != 0:
        return
    cap = torch.cuda.get_device_capability(dev)
    if torch.cuda.is_bf16_supported() and tuple(cap) >= (8, 0):
        return
    _bf16_warned = True
    msg = (f"WARNING: run.amp=bf16 on {torch.cuda.get_device_name(dev)} (compute capability {cap[0]}.{cap[1]}), "
           "which has no native bf16 (needs 8.0+, e.g. A100, H100): autocast emulates it, slowly, or fails; "
           "use run.amp=fp16 (loss scaling) or run.amp=none on this GPU")
    warnings.warn(msg)
    print(msg, flush=True)


def setup_runtime(device: str = "auto", amp: str = "auto", threads: int = 0, log_every: int = 20,
                  num_workers: int = 0, tensorboard: bool = StageRuntime.tensorboard,
                  tb_every: int = StageRuntime.tb_every) -> Runtime:
    """Device, precision and torch.distributed from the environment (torchrun's env:// variables, or those that
    submitit.helpers.TorchDistributedEnvironment().export() sets inside a Slurm job)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        # modulo: sites that bind one GPU per task (CUDA_VISIBLE_DEVICES of one device) still give LOCAL_RANK 0..n-1
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        owns = True
        # a process that ends without Runtime.close() (an exception, the last stage of a job) still ends the group
        # cleanly; every rank stopped together (fit), so no collective is left in flight
        atexit.register(end_process_group)
    if amp == "auto":
        amp = "bf16" if dev.type == "cuda" else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"run.amp must be auto|none|bf16|fp16, got {amp!r}")
    if amp == "bf16" and dev.type == "cuda":
        _warn_without_native_bf16(dev, rank)
    return Runtime(dev, amp, rank, world, local_rank, log_every, num_workers, owns_process_group=owns,
                   tensorboard=tensorboard, tb_every=tb_every)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_rng_state(rt: Runtime):
    """What a checkpoint stores under "rng": this process's state on one process (the single-process format), or
    every rank's, a list indexed by rank (each rank draws its own augmentation, Mixup and masks, and must resume its
    own streams). A collective on several ranks: every rank calls it."""
    own = rng_state()
    if not rt.distributed:
        return own
    states = [None] * rt.world
    dist.all_gather_object(states, own)
    return states


def own_rng_state(state: dict, rt: Runtime, where) -> dict:
    """This rank's RNG state from a checkpoint; one written at another world size is refused (its ranks' streams,
    and the effective batch and lr, belong to that many processes)."""
    rng = state["rng"]
    saved = int(state.get("world_size", len(rng) if isinstance(rng, list) else 1))
    if saved != rt.world or (isinstance(rng, list) and len(rng) != saved):
        raise CheckpointError(f"{where} was written by a run on world size {saved} ({saved} process(es)); this run "
                              f"has world size {rt.world}: refusing to resume (each rank's random streams, the "
                              "effective batch and the lr belong to the world size that wrote it). Run the stage on "
                              f"{saved} process(es) again, or move the checkpoint away to restart it from scratch.")
    return rng[rt.rank] if isinstance(rng, list) else rng


def _autocast(rt: Runtime):
    if rt.amp == "none":
        return torch.autocast(device_type=rt.device.type, enabled=False)
    dtype = torch.bfloat16 if rt.amp == "bf16" else torch.float16
    return torch.autocast(device_type=rt.device.type, dtype=dtype)


def _to_python(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_python(v) for k, v in obj.items()}
    return obj


def lr_at(schedule: Schedule, base_lr: float, epoch: int, step: int, steps_per_epoch: int,
          placement: str = "official") -> float:
    """The lr set at `step` (0-based) of `epoch`, on steps where step % accum_iter == 0.

    Value: MAE's util/lr_sched.adjust_learning_rate at a fractional epoch t -- linear warmup from 0 over warmup_epochs,
    then half-cosine from base_lr to min_lr at `epochs`. Placement 'official' (DMAE's engine_distill):
    t = step / steps_per_epoch + epoch, the same arithmetic. 'updates' (this harness's earlier placement):
    update k = step // accum_iter of the epoch at t = epoch + k / (steps_per_epoch // accum_iter). Both agree when
    accum_iter divides steps_per_epoch; otherwise 'official' lags (the leftover steps of an epoch are part of it).
    """
    if placement == "official":
        t = step / steps_per_epoch + epoch
    elif placement == "updates":
        t = epoch + (step // schedule.accum_iter) / max(1, steps_per_epoch // schedule.accum_iter)
    else:
        raise ValueError(f"lr placement must be 'official' or 'updates', got {placement!r}")
    warmup, epochs, min_lr = schedule.warmup_epochs, schedule.epochs, schedule.min_lr
    if t < warmup:
        return base_lr * t / warmup
    return min_lr + (base_lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (t - warmup) / max(epochs - warmup, 1e-12)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets lr, times its lr_scale (layer-wise decay) when it has one -- as MAE's adjust_learning_rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def _stray_checkpoint_tmps(run_dir: Path) -> List[Path]:
    """Temporary checkpoint files of earlier (killed) processes: save_last writes .checkpoint-last.pth.tmp-<pid>."""
    return sorted(p for p in Path(run_dir).glob(".checkpoint-*.tmp-*") if not p.name.endswith(f"-{os.getpid()}"))


def _fresh_start_notice(run_dir: Path, rt: Runtime, name: str) -> None:
    """A stage never starts at epoch 0 silently: say so, and warn loudly when the run directory shows an earlier
    attempt (epochs in log.jsonl, an interrupted checkpoint write) whose progress is lost."""
    if not rt.is_main:
        return
    log = run_dir / LOG_FILE
    epochs = sum(1 for line in log.read_text(errors="replace").splitlines() if line.strip()) if log.exists() else 0
    stray = _stray_checkpoint_tmps(run_dir)
    if not epochs and not stray:
        rt.log(f"[{name}] starting from scratch (no checkpoint in {run_dir})")
        return
    found = []
    if epochs:
        found.append(f"log.jsonl records {epochs} epoch(s)")
    if stray:
        found.append(f"an interrupted checkpoint write left {', '.join(p.name for p in stray)}")
    msg = (f"WARNING: [{name}] {run_dir}: {' and '.join(found)}, but there is no complete checkpoint to resume from; "
           "starting from scratch at epoch 0 (log.jsonl is rewritten)")
    warnings.warn(msg)
    rt.log(msg)


@dataclass
class FitResult:
    history: List[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    train_seconds: float = 0.0  # all attempts: earlier ones up to their last checkpoint, plus this one
    images_per_s: float = 0.0
    earlier_seconds: float = 0.0  # training time of earlier attempts, from the checkpoint resumed
    step_s: float = 0.0  # median seconds per step (one batch per device) of this attempt, its first step left out
    steps: int = 0  # steps this attempt ran


def resume(run_dir: Path, spec_hash: str, model: nn.Module, optimizer, scaler, rt: Runtime, seed: int,
           epochs: int, name: str) -> FitResult:
    """Restore model, optimizer, scaler and RNG from run_dir/checkpoint-last.pth (a checkpoint of another spec is
    refused), or seed a fresh start and say so; then make log.jsonl the restored history and remove temporary files
    of interrupted checkpoint writes. Returns the history so far, the epoch to start from and earlier attempts' time."""
    result = FitResult()
    state = load_last(run_dir, log=rt.log, quarantine=rt.is_main)
    if state is not None:
        if state.get("spec_hash") != spec_hash:
            raise CheckpointError(f"{run_dir}/checkpoint-last.pth was written for another configuration "
                                  f"(hash {state.get('spec_hash')} vs {spec_hash}); refusing to resume. Move it away "
                                  "or use a fresh run directory.")
        rng = own_rng_state(state, rt, f"{run_dir}/checkpoint-last.pth")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(rng)
        result.resumed_from_epoch = int(state["epoch"])
        result.history = list(state.get("history", []))
        result.earlier_seconds = float(state.get("train_seconds", 0.0))
        rt.log(f"[{name}] resumed from checkpoint-last at epoch {result.resumed_from_epoch}/{epochs}")
    else:
        _fresh_start_notice(run_dir, rt, name)
        seed_all(seed * 1000 + rt.rank)
    if rt.is_main:
        for p in _stray_checkpoint_tmps(run_dir):
            p.unlink(missing_ok=True)
            rt.log(f"[{name}] removed {p.name}, left by an interrupted checkpoint write")
        # log.jsonl = the checkpoint's history: drop lines of epochs written after it (or after a fallback)
        tmp = run_dir / f".log.jsonl.tmp-{os.getpid()}"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in result.history))
        os.replace(tmp, run_dir / LOG_FILE)
    return result


# A rank's status at a decision point, exchanged by stop_together
_OK, _NONFINITE, _RAISED = 0, 1, 2


def _ranks(ranks: List[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _failure_report(failure: Optional[BaseException]) -> Optional[tuple]:
    """(message, traceback) of this rank's failure, for the other ranks: a non-finite loss by its message alone (it
    names the epoch, step and terms), an exception with its type."""
    if failure is None:
        return None
    text = str(failure) if isinstance(failure, NonFiniteLoss) else f"{type(failure).__name__}: {failure}"
    return text, "".join(traceback.format_exception(failure))


def stop_together(rt: Runtime, failure: Optional[BaseException], where: str, name: str) -> None:
    """The decision point of every rank: return when no rank failed, else raise on every rank.

    One process: raises `failure` as it is. Several: one all_reduce of a world-sized int tensor (rank r writes its
    status at r: a few bytes per step); when a rank failed, the failing ranks' messages follow (all_gather_object,
    on that path only) and every rank raises the same error: NonFiniteLoss when the only failures are non-finite
    losses (so run.nan_restarts restarts all ranks together), else RankFailed with the first raising rank's error
    (its traceback attached as a note)."""
    if not rt.distributed:
        if failure is not None:
            raise failure
        return
    status = torch.zeros(rt.world, dtype=torch.int32, device=rt.device)
    if failure is not None:
        status[rt.rank] = _NONFINITE if isinstance(failure, NonFiniteLoss) else _RAISED
    dist.all_reduce(status)
    codes = status.tolist()
    failed = [r for r, c in enumerate(codes) if c != _OK]
    if not failed:
        return
    reports: List[Optional[tuple]] = [None] * rt.world
    dist.all_gather_object(reports, _failure_report(failure))
    raised = [r for r in failed if codes[r] == _RAISED]
    if not raised:
        raise NonFiniteLoss(f"{reports[failed[0]][0]}, on {_ranks(failed)} of {rt.world}") from None
    first = raised[0]
    err = RankFailed(f"{_ranks(raised)} of {rt.world} failed {where} in {name}: {reports[first][0]}")
    if rt.rank != first:
        err.add_note(f"traceback on rank {first}:\n{reports[first][1].rstrip()}")
    raise err from (failure if rt.rank == first else None)


def _nonfinite(loss: torch.Tensor, terms: Dict[str, torch.Tensor], epoch: int, step: int, name: str) -> NonFiniteLoss:
    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
    if terms and all(torch.isfinite(v).all() for v in terms.values()):
        detail += "; every term is finite, so a weight combining them is not (e.g. distill.alpha)"
    return NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch} step {step} (0-based; {detail}) in {name}")


def _mean_over_ranks(means: Dict[str, float], rt: Runtime) -> Dict[str, float]:
    """The epoch's mean loss terms over every rank (each rank runs the same number of steps), not rank 0's alone."""
    if not rt.distributed or not means:
        return means
    t = torch.tensor(list(means.values()), dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return dict(zip(means, (t / rt.world).tolist()))


def train_one_epoch(train_model: nn.Module, model: nn.Module, objective: Callable, optimizer, scaler, data,
                    schedule: Schedule, lr: float, epoch: int, steps_per_epoch: int, rt: Runtime, name: str,
                    tb: Optional[TBLog] = None) -> dict:
    """One pass over `data` (MAE's engine_*.train_one_epoch): per-step lr, autocast, the non-finite check, gradient
    accumulation, clipping and the (scaled) optimizer step. Returns the epoch's mean loss terms (over every rank),
    images seen and seconds.

    Every rank runs exactly steps_per_epoch steps, and fetching the batch, the forward pass and the loss of each step
    end at stop_together (before the backward pass and its gradient all-reduce): a NaN or an exception on one rank
    stops every rank at that step. tb: the TensorBoard writer, handed each step's values (the floats read for the
    epoch means: no other device sync)."""
    tb_steps = tb is not None and tb.per_step
    train_model.train()
    sums: Dict[str, float] = {}
    n_steps, seen, step_s = 0, 0, []
    t0 = t_step = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    batches = None
    for step in range(steps_per_epoch):
        failure = None
        try:
            if batches is None:
                batches = iter(data)
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"the data of epoch {epoch} ended after {step} of {steps_per_epoch} batches")
            imgs, labels = batch
            if step % schedule.accum_iter == 0:
                set_lr(optimizer, lr_at(schedule, lr, epoch, step, steps_per_epoch))
            imgs = imgs.to(rt.device, non_blocking=True)
            labels = labels.to(rt.device, non_blocking=True)
            with _autocast(rt):
                loss, terms = objective(train_model, imgs, labels)
            if not torch.isfinite(loss):
                failure = _nonfinite(loss, terms, epoch, step, name)
        except Exception as e:
            if not rt.distributed:
                raise
            failure = e
        stop_together(rt, failure, f"at epoch {epoch} step {step} (0-based)", name)
        scaler.scale(loss / schedule.accum_iter).backward()
        if (step + 1) % schedule.accum_iter == 0:
            if schedule.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        n_steps += 1
        seen += imgs.shape[0]
        values = {"loss": loss.item()}  # .item() waits for the device: the step is done
        for k, v in terms.items():
            values[k] = v.item()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        step_s.append(time.perf_counter() - t_step)  # data loading included, as a run pays it
        t_step = time.perf_counter()
        if tb_steps:
            tb.step(epoch, step, values, imgs.shape[0], step_s[-1], optimizer)
        if rt.log_every and (step + 1) % rt.log_every == 0:
            ips = seen * rt.world / (time.perf_counter() - t0)
            rt.log(f"[{name}] epoch {epoch + 1}/{schedule.epochs} step {step + 1}/{steps_per_epoch} "
                   f"loss {values['loss']:.4f} lr {optimizer.param_groups[0]['lr']:.2e} {ips:.0f} img/s")
    means = _mean_over_ranks({k: v / max(1, n_steps) for k, v in sums.items()}, rt)
    return {"means": means, "seen": seen, "seconds": time.perf_counter() - t0, "step_s": step_s}


def fit(*, model: nn.Module, objective: Callable, param_groups: list, dataset, schedule: Schedule, run_dir: Path,
        spec_hash: str, seed: int, rt: Runtime, name: str = "stage",
        eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None) -> FitResult:
    """Train `model` with `objective` for schedule.epochs epochs, resuming from run_dir/checkpoint-last.pth: set-up,
    resume(), then per epoch train_one_epoch(), the validation eval_fn, the log line and checkpoint-last."""
    run_dir = Path(run_dir)
    model.to(rt.device)
    if getattr(objective, "teacher", None) is not None:
        objective.teacher.to(rt.device)
    eff_batch = schedule.batch_size * schedule.accum_iter * rt.world
    lr = schedule.blr * eff_batch / 256
    optimizer = build_optimizer(param_groups, lr, schedule.betas)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == "fp16")

    steps_per_epoch = len(loader(dataset, schedule.batch_size, True, 0, 0, rt.rank, rt.world, seed=seed))
    if steps_per_epoch == 0:
        raise ValueError(f"{name}: {len(dataset)} training images give no full batch of {schedule.batch_size} "
                         f"per device on {rt.world} device(s); lower the batch size or use more data")
    total_updates = steps_per_epoch // schedule.accum_iter * schedule.epochs
    rt.log(f"[{name}] base lr: {schedule.blr:.3e}  actual lr: {lr:.3e}  effective batch: {eff_batch} "
           f"(= {schedule.batch_size} per device x {schedule.accum_iter} accum x {rt.world} device(s))  "
           f"{steps_per_epoch} steps/epoch, {total_updates} updates, warmup {schedule.warmup_epochs} epochs")

    result = resume(run_dir, spec_hash, model, optimizer, scaler, rt, seed, schedule.epochs, name)
    prior_seconds = result.earlier_seconds

    train_model = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # rank 0's curves in <run_dir>/tb/: a new event file per attempt, continuing at this attempt's first step
    tb = TBLog(run_dir, rt, steps_per_epoch, result.resumed_from_epoch, name)
    t_start = time.perf_counter()
    throughputs, step_s = [], []
    try:
        for epoch in range(result.resumed_from_epoch, schedule.epochs):
            data = loader(dataset, schedule.batch_size, True, epoch, rt.num_workers, rt.rank, rt.world, seed=seed)
            ep = train_one_epoch(train_model, model, objective, optimizer, scaler, data, schedule, lr, epoch,
                                 steps_per_epoch, rt, name, tb)
            epoch_s = ep["seconds"]
            step_s += ep["step_s"]
            throughputs.append(ep["seen"] * rt.world / epoch_s)
            row = {"epoch": epoch + 1, **ep["means"],
                   "lr": optimizer.param_groups[0]["lr"], "epoch_s": epoch_s, "images_per_s": throughputs[-1]}
            if eval_fn is not None:
                row.update(eval_fn(model))
            result.history.append(row)
            rng = checkpoint_rng_state(rt)
            failure = None
            try:
                if rt.is_main:
                    with open(run_dir / LOG_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    save_last({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng, "world_size": rt.world,
                               "history": result.history, "spec_hash": spec_hash,
                               "train_seconds": prior_seconds + time.perf_counter() - t_start}, run_dir)
            except Exception as e:
                if not rt.distributed:
                    raise
                failure = e
            # instead of a barrier: the other ranks wait for the checkpoint, and stop with rank 0 if writing it failed
            stop_together(rt, failure, f"after epoch {epoch + 1} (writing its log line and checkpoint)", name)
            tb.epoch(epoch, row)
            extra = "".join(f" {k} {v:.2f}" for k, v in row.items() if k.startswith("top"))
            rt.log(f"[{name}] epoch {epoch + 1}/{schedule.epochs} done: loss {row.get('loss', float('nan')):.4f}"
                   f"{extra} ({epoch_s:.1f} s, {throughputs[-1]:.0f} img/s)")
    finally:
        tb.close()
    result.train_seconds = prior_seconds + time.perf_counter() - t_start
    result.earlier_seconds = prior_seconds
    result.images_per_s = float(np.median(throughputs)) if throughputs else 0.0
    result.steps = len(step_s)
    result.step_s = float(np.median(step_s[1:] if len(step_s) > 1 else step_s)) if step_s else 0.0
    return result


def reset_peak_memory(rt: Runtime) -> None:
    """Start a stage's peak-memory count: CUDA's allocator peak, or on CPU the process's peak resident set
    (VmHWM, reset by writing 5 to /proc/self/clear_refs, Linux)."""
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak since the process started


def peak_memory_mb(rt: Runtime) -> Dict[str, object]:
    """The stage's peak memory on its busiest rank (MiB): CUDA max allocated, or the CPU process's peak resident set."""
    if rt.device.type == "cuda":
        value, kind = torch.cuda.max_memory_allocated(rt.device) / 2 ** 20, "cuda max allocated"
    else:
        value, kind = 0.0, "cpu peak resident set"
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) / 1024
        except OSError:
            value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rt.distributed:
        t = torch.tensor([value], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = t.item()
    return {"peak_mem_mb": round(value, 1), "peak_mem_kind": kind}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, batch_size: int, rt: Runtime) -> Dict[str, float]:
    """Top-1/top-5 (%) over a whole split; each rank takes every world-th image, counts are summed."""
    model.eval()
    dl = loader(dataset, batch_size, False, None, rt.num_workers, rt.rank, rt.world)
    counts = torch.zeros(3, dtype=torch.float64)
    for imgs, labels in dl:
        imgs, labels = imgs.to(rt.device), labels.to(rt.device)
        with _autocast(rt):
            logits = model(imgs)
        k = min(5, logits.shape[-1])
        top = logits.float().topk(k, dim=-1).indices
        hit = top.eq(labels[:, None])
        counts += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), len(labels)],
                               dtype=torch.float64)
    if rt.distributed:
        counts = counts.to(rt.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    n = counts[2].item()
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n, "n_eval": int(n)}

