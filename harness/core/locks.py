"""Locks on the results tree (standard library only): one driver per results root, one runner per stage. An flock
is released by the kernel when its process dies, so a killed run never leaves a stale lock."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

LOCK_FILE = ".stage.lock"
DRIVER_LOCK_FILE = ".driver.lock"  # <results root>/<table>/<profile>/.driver.lock


class StageLocked(RuntimeError):
    """Another process is running this stage (it holds <run_dir>/.stage.lock)."""

    def __init__(self, message: str, stage_id: str = "", holder: str = ""):
        super().__init__(message)
        self.stage_id, self.holder = stage_id, holder


class DriverLocked(RuntimeError):
    """Another `reproduce` driver holds the results root."""


def _read_holder(f) -> str:
    f.seek(0)
    return f.read().strip()


@contextmanager
def _held(path: Path, wait_s: float, busy: Callable[[str], Exception]):
    """Exclusive flock on `path` while the block runs, the holder ("pid N on host since T") written into it;
    released by the kernel when the process dies, so a killed run never leaves a stale lock. Retries for wait_s,
    then raises busy(holder)."""
    f = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _read_holder(f)
                f.close()
                raise busy(holder) from None
            time.sleep(0.05)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def stage_lock(run_dir: Path, stage_id: str, wait_s: float = 1.0):
    """Held on <run_dir>/.stage.lock for as long as the stage runs. A brief retry (wait_s) absorbs a driver's probe
    (lock_holder); then StageLocked names the holder."""
    path = Path(run_dir) / LOCK_FILE
    return _held(path, wait_s, lambda holder: StageLocked(
        f"stage {stage_id} is already being run by {holder or 'another process'} (it holds {path}); refusing to run "
        "it twice at once. Wait for that run to end, or stop it first.", stage_id, holder or "another process"))


def driver_lock(root: Path):
    """One driver per results root (<root>/.driver.lock): a second `reproduce` on the same root stops with a clear
    error instead of running the same stages twice at once. Taken once per run, by run.cli.run_plan, around the
    manifest and execute()."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return _held(root / DRIVER_LOCK_FILE, 0.0, lambda holder: DriverLocked(
        f"another reproduce driver ({holder or 'unknown pid'}) is running on {root}; wait for it or stop it first"))


def lock_holder(run_dir: str | Path) -> Optional[str]:
    """Who runs the stage in run_dir now ('pid N on host since ...'), or None when nobody holds its lock."""
    path = Path(run_dir) / LOCK_FILE
    try:
        f = open(path, "r")
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(f) or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
