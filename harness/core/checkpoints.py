"""Checkpoints: safe loading of official MAE files and our own, atomic saving, and the stable `checkpoint-last`.

Every load goes through torch.load(weights_only=True): a file whose unpickling would run code is refused.
Official layout (facebookresearch/mae): {'model': state_dict, ...} with timm ViT keys; see dmae-spec.md.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from harness.core.rundir import LAST_CHECKPOINT as LAST, PREV_CHECKPOINT as PREV, tmp_path
DECODER_KEYS = ("decoder_", "mask_token")
STUDENT_ONLY_KEYS = ("distill_proj.",)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


def safe_load(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (legacy format: a pickle, which starts with the PROTO opcode 0x80)
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
        raise CheckpointError(f"cannot read checkpoint {p}: not a torch checkpoint (neither a zip archive nor a "
                              f"pickle; {'empty file' if not head else f'starts with {head!r}'})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {p}: it is not a plain tensor checkpoint (torch.load(weights_only=True) rejected it; "
            f"unpickling it could run code). Detail: {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated / corrupt zip, wrong format
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def state_dict_of(obj: dict) -> Dict[str, torch.Tensor]:
    """The model weights in an official or harness checkpoint ({'model': sd}), or a bare state dict."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"no model weights in checkpoint (top-level keys: {sorted(obj)[:10]})")


def resample_pos_embed(sd: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Interpolate an absolute position embedding (class token kept) when the image size differs: bicubic,
    align_corners=False, no antialiasing, as MAE's util/pos_embed.interpolate_pos_embed."""
    for key, n_prefix in (("pos_embed", 1), ("decoder_pos_embed", 1)):
        if key not in sd or not hasattr(model, key):
            continue
        target = getattr(model, key)
        if sd[key].shape == target.shape:
            continue
        old = int(round((sd[key].shape[1] - n_prefix) ** 0.5))
        new = int(round((target.shape[1] - n_prefix) ** 0.5))
        if old * old + n_prefix != sd[key].shape[1] or sd[key].shape[-1] != target.shape[-1]:
            continue  # left for the shape check to report
        sd[key] = resample_abs_pos_embed(sd[key], new_size=(new, new), old_size=(old, old), num_prefix_tokens=n_prefix,
                                         antialias=False)


def load_weights(model: nn.Module, sd: Dict[str, torch.Tensor], *, source: str = "checkpoint",
                 ignore_prefixes: Iterable[str] = (), allow_missing: Iterable[str] = ()) -> None:
    """Strict load with a readable error naming missing/unexpected keys and shape mismatches.

    ignore_prefixes: checkpoint keys to drop (e.g. the decoder when only the encoder is wanted).
    allow_missing: model key prefixes the checkpoint need not provide (e.g. a fresh classification head).
    """
    ignore, allowed = tuple(ignore_prefixes), tuple(allow_missing)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)} if ignore else dict(sd)
    resample_pos_embed(sd, model)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(allowed)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:5])}")
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(parts))
    model.load_state_dict(sd, strict=False)


def encoder_to_classifier(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Pre-trained MAE/DMAE weights -> fine-tuning classifier: drop decoder, mask token, distillation heads and the
    final norm (global-pool fine-tuning uses fc_norm instead, as MAE does); head and fc_norm start fresh."""
    drop = DECODER_KEYS + STUDENT_ONLY_KEYS + ("norm.", "head.", "fc_norm.")
    return {k: v for k, v in sd.items() if not k.startswith(drop)}


# Signals that end or requeue a run (scheduler time limit/preemption: USR2 via submitit, TERM, Ctrl-C). Their Python
# handlers run between any two bytecodes; submitit's exits the process (sys.exit) after requeueing, and a SystemExit
# raised inside torch.save's zip writer turns into a RuntimeError ("unexpected pos"), failing the job instead of
# requeueing it. Checkpoint writes therefore hold them back and deliver them once the files are in place.
DEFERRED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


@contextmanager
def signals_deferred(sigs=DEFERRED_SIGNALS):
    """Hold back `sigs` (Python-level handlers, main thread only) for the duration of the block, then re-raise each
    one that arrived, once, with the original handlers back in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    old = {}
    for sig in sigs:
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError, TypeError):  # not settable here: left as it is
            continue
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    tmp = tmp_path(path)
    with signals_deferred():
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_last(state: dict, run_dir: Path) -> None:
    """Rotate checkpoint-last -> checkpoint-prev, then write the new checkpoint-last atomically. Between the two
    renames only checkpoint-prev exists, and load_last() falls back to it."""
    run_dir = Path(run_dir)
    tmp = tmp_path(run_dir / LAST)
    with signals_deferred():  # a requeue signal waits until both renames are done
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if (run_dir / LAST).exists():
            os.replace(run_dir / LAST, run_dir / PREV)
        os.replace(tmp, run_dir / LAST)
        _fsync_dir(run_dir)


def load_last(run_dir: Path, log=print, quarantine: bool = False) -> Optional[dict]:
    """The newest readable of checkpoint-last / checkpoint-prev, or None when neither exists. A corrupt or missing
    checkpoint-last is reported (warning) and checkpoint-prev used; raises if checkpoints exist but none can be read
    (never a silent restart). quarantine=True (the writing rank): an unreadable checkpoint-last is renamed to
    checkpoint-last.pth.corrupt, so the next save_last() does not rotate it over the good checkpoint-prev."""
    run_dir = Path(run_dir)
    errors = []
    if not (run_dir / LAST).exists() and (run_dir / PREV).exists():
        errors.append(f"{run_dir / LAST} is missing (a run stopped between the two renames of save_last)")
    for name in (LAST, PREV):
        p = run_dir / name
        if not p.exists():
            continue
        try:
            state = safe_load(p)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            if quarantine and name == PREV and (run_dir / LAST).exists():
                try:
                    os.replace(run_dir / LAST, run_dir / (LAST + ".corrupt"))
                    errors[-1] += f" (moved aside to {LAST}.corrupt)"
                except OSError:
                    pass
            msg = f"WARNING: {'; '.join(errors)}; resuming from {p} instead"
            warnings.warn(msg)
            log(msg)
        return state
    if errors:
        raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(errors) +
                              ". Delete the files to restart this stage from scratch.")
    return None
