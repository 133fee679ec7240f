"""The one training loop. MAE, DMAE, fine-tuning and KD are objectives that plug into `fit`.

Per epoch it appends a line to `log.jsonl` and writes `checkpoint-last.pth` atomically (model, optimizer, scaler,
epoch, every rank's RNG states, history, the stage's config hash); on start it resumes from it (harness.core.resume),
refusing a checkpoint written for another config or another world size. Rank 0 also writes TensorBoard curves to
`tb/` (harness.core.tblog: the loss terms, lr and img/s every run.tb_every steps, the log line per epoch). Schedules
are per iteration: linear warmup, then half-cosine to min_lr (MAE's lr_sched formula, set where the official engine
sets it, see lr_at). Also the classifier evaluation (top-1/top-5 over a split).

Across ranks every decision to stop is taken together (harness.core.rank_status.stop_together): each step the ranks
exchange a status (loss finite, step raised) before the backward pass, so a NaN or an exception on one rank stops (or,
with run.nan_restarts, restarts) every rank at the same step, naming the failing rank, instead of leaving the others
waiting in the next gradient all-reduce until the collective timeout. Device, precision and the process group:
harness.core.runtime.

    lr = blr * effective_batch / 256,   effective_batch = batch_size * accum_iter * world_size
    e.g. paper pre-training: 128 * 4 * 8 GPUs = 4096 -> lr = 1.5e-4 * 4096 / 256 = 2.4e-3
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness.core.build import optimizer as build_optimizer
from harness.core.checkpoints import save_last
from harness.core.data import loader
from harness.core.rank_status import mean_over_ranks, nonfinite_loss, stop_together
from harness.core.resume import FitResult, checkpoint_rng_state, resume
from harness.core.rundir import LOG_FILE
from harness.core.runtime import Runtime, autocast
from harness.core.spec import Schedule
from harness.core.tblog import TBLog


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
            with autocast(rt.device, rt.amp):
                loss, terms = objective(train_model, imgs, labels)
            if not torch.isfinite(loss):
                failure = nonfinite_loss(loss, terms, epoch, step, name)
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
    means = mean_over_ranks({k: v / max(1, n_steps) for k, v in sums.items()}, rt)
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


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, batch_size: int, rt: Runtime) -> Dict[str, float]:
    """Top-1/top-5 (%) over a whole split; each rank takes every world-th image, counts are summed."""
    model.eval()
    dl = loader(dataset, batch_size, False, None, rt.num_workers, rt.rank, rt.world)
    counts = torch.zeros(3, dtype=torch.float64)
    for imgs, labels in dl:
        imgs, labels = imgs.to(rt.device), labels.to(rt.device)
        with autocast(rt.device, rt.amp):
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
