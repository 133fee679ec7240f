"""The ranks of a multi-process stage decide together: at each decision point of the training loop (every step,
before the backward pass; after each epoch's checkpoint) every rank reports its status (`stop_together`), so a
non-finite loss or an exception on one rank stops (or, with run.nan_restarts, restarts) every rank at the same
point, naming the failing rank, instead of leaving the others waiting in the next collective until its timeout.
Also the failures raised there (`NonFiniteLoss`, `RankFailed`) and the epoch's loss terms averaged over ranks."""
from __future__ import annotations

import traceback
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from harness.core.runtime import Runtime


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN/inf; the message names the epoch, step and loss terms (and the rank, on several ranks)."""


class RankFailed(RuntimeError):
    """A rank of a multi-process stage raised (in its training step, or while writing the epoch's log line and
    checkpoint); every rank raises this together, naming the failing rank(s) and the first one's error."""


def nonfinite_loss(loss: torch.Tensor, terms: Dict[str, torch.Tensor], epoch: int, step: int, name: str
                   ) -> NonFiniteLoss:
    """The error of a non-finite loss at (epoch, step), naming every loss term's value."""
    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
    if terms and all(torch.isfinite(v).all() for v in terms.values()):
        detail += "; every term is finite, so a weight combining them is not (e.g. distill.alpha)"
    return NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch} step {step} (0-based; {detail}) in {name}")


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


def mean_over_ranks(means: Dict[str, float], rt: Runtime) -> Dict[str, float]:
    """The epoch's mean loss terms over every rank (each rank runs the same number of steps), not rank 0's alone."""
    if not rt.distributed or not means:
        return means
    t = torch.tensor(list(means.values()), dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return dict(zip(means, (t / rt.world).tolist()))
