"""A stage running elsewhere: another process runs it, so the driver waits for it and never starts it twice.

One type, RunningElsewhere, for the three ways the driver learns of such a run:
- the stage's lock is held (harness.core.locks.lock_holder): a job left behind by a killed driver, or any runner;
- the local job its job.json names is alive: a chain of a killed driver, still importing before it takes the lock,
  or between two of its stages, when no lock is held;
- a job of this driver found the stage locked as it started: StageJob returns a RunningElsewhere, not a result.
The driver keeps one with its jobs: it answers done() / result() / cancel() as a job does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from harness.core.locks import lock_holder
from harness.core.rundir import read_job
from harness.plan.graph import Plan


@dataclass
class RunningElsewhere:
    """Stage `stage_id`, run by `holder` ("pid N on host since T", "local job N"), and the stages after it in the
    same job (`then`), waited for too: between two stages of a chain no lock is held, and a second runner must not
    step in there. Over while the local job `pid` (if any) is gone and no stage of `run_dirs` is locked."""
    stage_id: str
    holder: str
    then: List[str] = field(default_factory=list)
    run_dirs: List[Path] = field(default_factory=list)
    pid: Optional[int] = None
    paths = None  # no submitit log of ours

    @property
    def job_id(self) -> str:
        return self.holder

    def done(self) -> bool:
        if self.pid is not None and _alive(self.pid):
            return False
        return all(lock_holder(d) is None for d in self.run_dirs)

    def result(self):
        raise RuntimeError(f"the run by {self.holder} ended without a result")

    def cancel(self, check: bool = False) -> None:
        """Not ours to stop."""


def running_elsewhere(plan: Plan, sid: str, state: Dict[str, str], busy: set,
                      local: bool) -> Optional[RunningElsewhere]:
    """The run of stage `sid` by another process, if there is one now: its lock holder, or (local launcher) the live
    local job its job.json names; with that job's stages after `sid` that are still to do and not in `busy`."""
    holder = lock_holder(plan.dir(sid))
    chain, pid = _live_local_chain(plan, sid) if local else ([], None)
    if not holder and pid is None:
        return None
    then = [m for m in chain[chain.index(sid) + 1:] if m in plan.stages and state.get(m) != "done"
            and m not in busy] if pid is not None else []
    return RunningElsewhere(sid, holder or f"local job {pid}", then, [plan.dir(m) for m in (sid, *then)], pid)


def _live_local_chain(plan: Plan, sid: str) -> Tuple[List[str], Optional[int]]:
    """(the chain of stage ids of the local job in sid's job.json, that job's pid: a local job's id is its
    controller's process id), or ([], None) when there is none, it does not run `sid`, or it is gone."""
    info = read_job(plan.dir(sid)) or {}
    chain = info.get("chain")
    try:
        pid = int(info["job_id"])
    except (KeyError, TypeError, ValueError):
        return [], None
    if not isinstance(chain, list) or sid not in chain or not _alive(pid) or not _is_submitit(pid):
        return [], None
    return chain, pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_submitit(pid: int) -> bool:
    """Whether process `pid` is a submitit local job controller (a recycled pid is not our job); True where /proc
    cannot tell."""
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists()
