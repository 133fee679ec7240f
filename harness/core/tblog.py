"""TensorBoard curves of a training stage: rank 0 writes `<stage dir>/tb/` (torch.utils.tensorboard.SummaryWriter), one
event file per attempt; `tensorboard --logdir results/` shows every stage of every table.

Tags, at global step g = epoch x steps_per_epoch + step (0-based), so a resumed stage continues its curve:

    train/loss, train/<term>   every run.tb_every steps (and at each epoch's last step): the mean over the steps since
                               the previous point of the total loss and of each term the objective returns -- loss_pix,
                               loss_feat and loss_feat_<k> per aligned pair (the official `distillation_loss/<pair>`),
                               loss_ce, loss_kd ...; with run.tb_every=1 the official per-step `train_loss`
    train/lr                   the lr set at that step, the largest over parameter groups (the official `lr`)
    train/images_per_s         images per second over those steps, all ranks (data loading included)
    epoch/<key>                the epoch's log.jsonl line (mean loss terms over every rank, lr, epoch_s,
                               images_per_s), at the epoch's last step
    val/top1, val/top5         fine-tuning's validation top-1 / top-5 of the epoch, at its last step

The values logged are the ones the loop already reads each step for its epoch means (no extra device sync). A resumed
attempt opens a new event file in the same folder with purge_step = its first step: TensorBoard drops the points of
earlier attempts from that step on (they ran past the checkpoint this attempt resumes from) and keeps the rest.
Writing the curves never stops a stage: the first failure (no `tensorboard` package, an unwritable folder, a full
disk) is warned once and the stage goes on without them.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Dict, Mapping

from harness.core.lazy import lazy

# TensorBoard (~0.5 s) only where a stage writes curves
summary_pb2 = lazy("tensorboard.compat.proto.summary_pb2")
torch_tensorboard = lazy("torch.utils.tensorboard")

TB_DIR = "tb"  # inside the stage directory


def _after_earlier_files(folder: Path) -> None:
    """TensorBoard reads a folder's event files in the order of their names, events.out.tfevents.<unix seconds>.
    <host>.<pid>.<n>: an attempt's file must sort after the earlier attempts' files, which a restart in the same
    second of the same process (run.nan_restarts) does not guarantee (n is not zero-padded): in that second, wait
    for the next one."""
    latest = 0
    for p in folder.glob("events.out.tfevents.*") if folder.is_dir() else ():
        try:
            latest = max(latest, int(p.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while latest and int(time.time()) == latest:
        time.sleep(0.05)


class TBLog:
    """One fit() attempt's TensorBoard writer. On a rank other than 0, or with rt.tensorboard false, it writes
    nothing (and imports nothing); `active` says whether it writes."""

    def __init__(self, run_dir: Path | str, rt, steps_per_epoch: int, start_epoch: int = 0, name: str = "stage"):
        self.dir = Path(run_dir) / TB_DIR
        self.name = name
        self.every = max(0, int(getattr(rt, "tb_every", 0) or 0))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.world = int(getattr(rt, "world", 1))
        self.writer = None
        self.warned = False
        self._log = getattr(rt, "log", print)
        self._reset()
        if not (getattr(rt, "is_main", False) and getattr(rt, "tensorboard", False)):
            return
        try:
            Summary = summary_pb2.Summary  # imported here, only where it writes (~0.5 s)
            self._summary, self._value = Summary, Summary.Value
            _after_earlier_files(self.dir)
            # purge_step: points of earlier attempts at this step and later are dropped by TensorBoard's readers
            self.writer = torch_tensorboard.SummaryWriter(str(self.dir), purge_step=start_epoch * self.steps_per_epoch)
        except Exception as e:  # whatever it is, the stage goes on
            self._fail("opening", e)

    @property
    def active(self) -> bool:
        return self.writer is not None

    @property
    def per_step(self) -> bool:
        """Whether train_one_epoch should hand it every step's values."""
        return self.writer is not None and self.every > 0

    def _reset(self) -> None:
        self._sums: Dict[str, float] = {}
        self._n, self._images, self._seconds = 0, 0, 0.0

    def step(self, epoch: int, step: int, values: Mapping[str, float], images: int, seconds: float,
             optimizer=None) -> None:
        """One training step (0-based `step` of `epoch`): its loss values (python floats), images on this rank and
        seconds. Every `every` steps, and at the epoch's last step, writes the means since the previous point."""
        if self.writer is None or not self.every:
            return
        sums = self._sums
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        self._n += 1
        self._images += images
        self._seconds += seconds
        if (step + 1) % self.every and step != self.steps_per_epoch - 1:
            return
        scalars = {f"train/{k}": v / self._n for k, v in sums.items()}
        if optimizer is not None:
            scalars["train/lr"] = max(g["lr"] for g in optimizer.param_groups)
        if self._seconds > 0:
            scalars["train/images_per_s"] = self._images * self.world / self._seconds
        self._reset()
        self.write(scalars, epoch * self.steps_per_epoch + step)

    def epoch(self, epoch: int, row: Mapping[str, object]) -> None:
        """The epoch's log.jsonl line (0-based `epoch`), at its last step; then the file is flushed, so a stage
        stopped later keeps its curve up to its last checkpoint."""
        scalars = {}
        for k, v in row.items():
            if k == "epoch" or k.startswith("n_") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            scalars[f"val/{k[4:]}" if k.startswith("val_") else f"epoch/{k}"] = float(v)
        self.write(scalars, (epoch + 1) * self.steps_per_epoch - 1)
        self.flush()

    def write(self, scalars: Mapping[str, float], global_step: int) -> None:
        """The scalars as one event (one record, one checksum: a third of the CPU time of one add_scalar each,
        tensorboard's checksum being pure Python), through the SummaryWriter's file writer; the same values that
        add_scalar writes (simple_value)."""
        if self.writer is None or not scalars:
            return
        try:
            file_writer = getattr(self.writer, "file_writer", None)
            if file_writer is None:  # not the SummaryWriter this was written for: its public API
                for tag, v in scalars.items():
                    self.writer.add_scalar(tag, v, global_step)
                return
            file_writer.add_summary(self._summary(value=[self._value(tag=tag, simple_value=float(v))
                                                         for tag, v in scalars.items()]), global_step)
        except Exception as e:
            self._fail("writing to", e)

    def flush(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except Exception as e:
            self._fail("writing to", e)

    def close(self) -> None:
        w, self.writer = self.writer, None
        if w is None:
            return
        try:
            w.close()
        except Exception as e:
            self._fail("closing", e)

    def _fail(self, what: str, e: BaseException) -> None:
        """Warn once, and write nothing more in this attempt."""
        w, self.writer = self.writer, None
        if w is not None:
            try:
                w.close()
            except Exception:  # the writer is broken already
                pass
        if self.warned:
            return
        self.warned = True
        msg = (f"WARNING: [{self.name}] TensorBoard: {what} {self.dir} failed ({type(e).__name__}: {e}); the stage "
               "goes on without its TensorBoard curves (run.tensorboard=false turns them off)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self._log(msg)

    def __enter__(self) -> "TBLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

