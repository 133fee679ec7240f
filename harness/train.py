"""The one training loop. MAE, DMAE, fine-tuning and KD are objectives that plug into `fit`.

Per epoch it appends a line to `log.jsonl` and writes `checkpoint-last.pth` atomically (model, optimizer, scaler,
epoch, RNG states, history, the stage's config hash); on start it resumes from it, refusing a checkpoint written
for another config. Schedules are per iteration: linear warmup, then half-cosine to min_lr (MAE's lr_sched formula, set
where the official engine sets it, see lr_at).

    lr = blr * effective_batch / 256,   effective_batch = batch_size * accum_iter * world_size
    e.g. paper pre-training: 128 * 4 * 8 GPUs = 4096 -> lr = 1.5e-4 * 4096 / 256 = 2.4e-3
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .build import optimizer as build_optimizer
from .checkpoints import CheckpointError, load_last, save_last
from .data import loader
from .rundir import LOG_FILE
from .spec import Schedule


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN/inf; the message names the epoch, step and loss terms."""


@dataclass
class Runtime:
    device: torch.device
    amp: str = "none"  # none | bf16 | fp16
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    log_every: int = 20
    num_workers: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


def setup_runtime(device: str = "auto", amp: str = "auto", threads: int = 0, log_every: int = 20,
                  num_workers: int = 0) -> Runtime:
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
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    if amp == "auto":
        amp = "bf16" if dev.type == "cuda" else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"run.amp must be auto|none|bf16|fp16, got {amp!r}")
    return Runtime(dev, amp, rank, world, local_rank, log_every, num_workers)


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
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
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


def train_one_epoch(train_model: nn.Module, model: nn.Module, objective: Callable, optimizer, scaler, data,
                    schedule: Schedule, lr: float, epoch: int, steps_per_epoch: int, rt: Runtime, name: str) -> dict:
    """One pass over `data` (MAE's engine_*.train_one_epoch): per-step lr, autocast, the non-finite check, gradient
    accumulation, clipping and the (scaled) optimizer step. Returns the epoch's mean loss terms, images seen and
    seconds."""
    train_model.train()
    sums: Dict[str, float] = {}
    n_steps, seen, step_s = 0, 0, []
    t0 = t_step = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step, (imgs, labels) in enumerate(data):
        if step % schedule.accum_iter == 0:
            set_lr(optimizer, lr_at(schedule, lr, epoch, step, steps_per_epoch))
        imgs = imgs.to(rt.device, non_blocking=True)
        labels = labels.to(rt.device, non_blocking=True)
        with _autocast(rt):
            loss, terms = objective(train_model, imgs, labels)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            if terms and all(torch.isfinite(v).all() for v in terms.values()):
                detail += "; every term is finite, so a weight combining them is not (e.g. distill.alpha)"
            raise NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch} step {step} (0-based; {detail}) "
                                f"in {name}")
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
        sums["loss"] = sums.get("loss", 0.0) + loss.item()  # .item() waits for the device: the step is done
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        step_s.append(time.perf_counter() - t_step)  # data loading included, as a run pays it
        t_step = time.perf_counter()
        if rt.log_every and (step + 1) % rt.log_every == 0:
            ips = seen * rt.world / (time.perf_counter() - t0)
            rt.log(f"[{name}] epoch {epoch + 1}/{schedule.epochs} step {step + 1}/{steps_per_epoch} "
                   f"loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} {ips:.0f} img/s")
    return {"means": {k: v / max(1, n_steps) for k, v in sums.items()}, "seen": seen,
            "seconds": time.perf_counter() - t0, "step_s": step_s}


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

    t_start = time.perf_counter()
    throughputs, step_s = [], []
    for epoch in range(result.resumed_from_epoch, schedule.epochs):
        data = loader(dataset, schedule.batch_size, True, epoch, rt.num_workers, rt.rank, rt.world, seed=seed)
        ep = train_one_epoch(train_model, model, objective, optimizer, scaler, data, schedule, lr, epoch,
                             steps_per_epoch, rt, name)
        epoch_s = ep["seconds"]
        step_s += ep["step_s"]
        throughputs.append(ep["seen"] * rt.world / epoch_s)
        row = {"epoch": epoch + 1, **ep["means"],
               "lr": optimizer.param_groups[0]["lr"], "epoch_s": epoch_s, "images_per_s": throughputs[-1]}
        if eval_fn is not None:
            row.update(eval_fn(model))
        result.history.append(row)
        if rt.is_main:
            with open(run_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            save_last({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng_state(),
                       "history": result.history, "spec_hash": spec_hash,
                       "train_seconds": prior_seconds + time.perf_counter() - t_start}, run_dir)
        if rt.distributed:
            dist.barrier()
        extra = "".join(f" {k} {v:.2f}" for k, v in row.items() if k.startswith("top"))
        rt.log(f"[{name}] epoch {epoch + 1}/{schedule.epochs} done: loss {row.get('loss', float('nan')):.4f}"
               f"{extra} ({epoch_s:.1f} s, {throughputs[-1]:.0f} img/s)")
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

