"""Where a stage's training starts: `resume` restores model, optimizer, scaler and every rank's random streams from
checkpoint-last.pth (refusing one written for another config or another world size), or seeds a fresh start and says
so, loudly when the run directory shows an earlier attempt whose progress is lost. Also the random streams a
checkpoint stores (python, numpy, torch, CUDA; one set per rank) and `FitResult`, what the training loop returns."""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness.core.checkpoints import CheckpointError, load_last
from harness.core.rundir import LOG_FILE
from harness.core.runtime import Runtime


@dataclass
class FitResult:
    history: List[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    train_seconds: float = 0.0  # all attempts: earlier ones up to their last checkpoint, plus this one
    images_per_s: float = 0.0
    earlier_seconds: float = 0.0  # training time of earlier attempts, from the checkpoint resumed
    step_s: float = 0.0  # median seconds per step (one batch per device) of this attempt, its first step left out
    steps: int = 0  # steps this attempt ran


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
