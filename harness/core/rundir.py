"""What a stage directory holds, and whether a finished stage is still valid (standard library only: the planner,
the collector and the report use it without importing torch).

A stage's result.json records what it consumed: the sha256 of every input file it read (`inputs`), and what it
produced (`model_sha256`). A finished stage stays valid only while each stage it read from is done and still holds
the weights it read then; a `file:` input (a user's checkpoint) must still have the same bytes. Everything computed
from an upstream stage that failed, is unfinished, or was recomputed with other weights is *stale*: the driver moves
it aside and recomputes it, and the report never shows a number from it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

MODEL_FILE = "model.pth"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"  # one JSON line per epoch
JOB_FILE = "job.json"  # the job that runs the stage (Slurm job id / local controller pid, its chain)
LAST_CHECKPOINT, PREV_CHECKPOINT = "checkpoint-last.pth", "checkpoint-prev.pth"
LOCK_FILE = ".stage.lock"
DRIVER_LOCK_FILE = ".driver.lock"  # <results root>/<table>/<profile>/.driver.lock
MANIFEST_FILE = "manifest.json"  # <results root>/<table>/<profile>/manifest.json: the plan
STALE_DIR = ".stale"  # <results root>/.stale/<stage id>.<time>: stale stages moved aside, never deleted


# result.json fields that describe the attempt which computed a stage (time, place, memory, what a resumed attempt
# itself ran), not what it computed: two runs of one stage, interrupted or not, differ only in these
ATTEMPT_FIELDS = ("epoch_s", "images_per_s", "train_s", "wall_s", "device_hours", "finished_at", "resumed_from_epoch",
                  "host", "device_name", "git_commit", "step_s", "steps", "peak_mem_mb", "peak_mem_kind",
                  "kd_cache_hits", "kd_cache_misses")


def spec_hash(spec: dict) -> str:
    """The hash in a stage id: over the whole resolved spec, inputs' stage ids included."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def write_json(obj, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_stage_config(run_dir: str | Path, stage_id: str, spec: dict, inputs: Dict[str, str], runtime: dict) -> None:
    """config.json: everything a stage runs from (its spec, input paths, runtime settings) and the spec's hash. The
    stage writes it when it starts; an sbatch script's stage, before submission (`python -m harness.core.stages <dir>`
    reads it back)."""
    write_json({"stage_id": stage_id, "spec": spec, "inputs": inputs, "runtime": runtime,
                "spec_hash": spec_hash(spec)}, Path(run_dir) / CONFIG_FILE)


def tmp_path(path: str | Path) -> Path:
    """The temporary file an atomic write of `path` goes through (.<name>.tmp-<pid>), renamed over it when complete;
    one left by a killed process is removed when its stage starts again (stale_tmp_files)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stale_tmp_files(run_dir: str | Path, pattern: str = "*") -> List[Path]:
    """Temporary files of other (killed) processes in run_dir whose target name matches `pattern`."""
    return sorted(p for p in Path(run_dir).glob(f".{pattern}.tmp-*") if not p.name.endswith(f".tmp-{os.getpid()}"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it: a reader sees the old file or the new one."""
    tmp = tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ `file:` input references
# A stage input is another stage's id, or "file:<absolute path>" for a checkpoint the user provides.
FILE_REF = "file:"


def file_ref(path: str | Path) -> str:
    return f"{FILE_REF}{os.path.abspath(path)}"


def file_of_ref(ref: str) -> Optional[str]:
    """The path of a `file:` input reference; None for a stage id."""
    return ref[len(FILE_REF):] if ref.startswith(FILE_REF) else None


# ------------------------------------------------------------------------------------------------ stage-file readers
def read_json(path: str | Path) -> Optional[dict]:
    """A JSON object file of a stage or a plan; None when it is missing, unreadable or not an object (a reader that
    must tell those apart calls load_json)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def load_json(path: str | Path) -> dict:
    """A JSON object file; OSError / ValueError (naming the file) when it is missing, damaged or not an object."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


def read_error(run_dir: str | Path) -> Optional[dict]:
    return read_json(Path(run_dir) / ERROR_FILE)


def read_job(run_dir: str | Path) -> Optional[dict]:
    return read_json(Path(run_dir) / JOB_FILE)


def read_config(run_dir: str | Path) -> Optional[dict]:
    return read_json(Path(run_dir) / CONFIG_FILE)


def read_manifest(plan_root: str | Path) -> Optional[dict]:
    """<results root>/<table>/<profile>/manifest.json: the plan the driver wrote."""
    return read_json(Path(plan_root) / MANIFEST_FILE)


def git_commit() -> Optional[str]:
    """The code version a result was computed with (None outside a git checkout)."""
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


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


def find_finished(stage_id: str, profile: str, roots: Sequence[Path], not_at: Path) -> Optional[Path]:
    """A finished directory of this stage, <root>/<any table>/<profile>/<stage id>/ under one of `roots`, other than
    `not_at`. A stage id hashes the whole spec and its inputs' ids, so such a directory is the same computation."""
    for root in roots:
        for res in sorted(Path(root).glob(f"*/{profile}/{stage_id}/{RESULT_FILE}")):
            if res.parent.resolve() != Path(not_at).resolve():
                return res.parent
    return None


def link_stage_dir(src: Path, dst: Path) -> None:
    """Put a finished stage directory in place at dst: hard links (no copy of large checkpoints) where the
    filesystem allows, else a copy. Whatever dst held (an unfinished attempt) is replaced."""
    if dst.exists():
        shutil.rmtree(dst)
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class FileHashes:
    """sha256 of files, computed once per (path, size, mtime): a user's 1 GB checkpoint is read once per plan."""

    def __init__(self):
        self._seen: Dict[tuple, str] = {}

    def __call__(self, path: str | Path) -> Optional[str]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._seen:
            self._seen[key] = sha256_file(path)
        return self._seen[key]


def input_record(inputs: Dict[str, str]) -> Dict[str, dict]:
    """What a stage writes into its result about the files it read: {role: {path, sha256}}."""
    return {role: {"path": str(p), "sha256": sha256_file(p)} for role, p in inputs.items()}


# ---------------------------------------------------------------------------------------------------- stage status
# What a stage directory's files say, the one definition the planner, launcher, estimator and collector read (the
# driver's own states, "submitted", "blocked", ..., are its view of the jobs, not of the files).
DONE, FAILED, PARTIAL, TODO = "done", "failed", "partial", "todo"


def stage_status(run_dir: str | Path) -> str:
    """done: result.json written; failed: error.json; partial: started and unfinished (checkpoint-last, a logged
    epoch or a submitted job); todo: nothing yet."""
    d = Path(run_dir)
    if (d / RESULT_FILE).exists():
        return DONE
    if (d / ERROR_FILE).exists():
        return FAILED
    if (d / LAST_CHECKPOINT).exists() or (d / JOB_FILE).exists() or epochs_logged(d):
        return PARTIAL
    return TODO


def read_log(run_dir: str | Path, warnings: Optional[List[str]] = None) -> List[dict]:
    """The per-epoch records of a stage's log.jsonl, in order; a line that is not a JSON record (one being written
    right now, or damaged) is skipped and, when `warnings` is given, named there."""
    path = Path(run_dir) / LOG_FILE
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif warnings is not None:
            warnings.append(f"{path}: line {i} is not a JSON record; skipped")
    return out


def epochs_logged(run_dir: str | Path) -> int:
    """Epochs a stage has finished: the complete records of its log.jsonl."""
    return len(read_log(run_dir))


def read_result(run_dir: str | Path) -> Optional[dict]:
    return read_json(Path(run_dir) / RESULT_FILE)


def broken_input(result: dict, inputs: Dict[str, str], status_of: Callable[[str], str],
                 result_of: Callable[[str], Optional[dict]], file_sha: Callable[[str], Optional[str]]) -> Optional[str]:
    """Why the finished stage with this result is stale, or None while it is valid.

    inputs: the stage's planned inputs, {role: upstream stage id | "file:<path>"}; status_of / result_of: an upstream
    stage's status ("done" when it is done *and valid*) and result. A result written before inputs were recorded has
    no `inputs` and is trusted only as far as its upstream stages are done."""
    used = result.get("inputs") if isinstance(result.get("inputs"), dict) else {}
    for role, ref in inputs.items():
        was = (used.get(role) or {}).get("sha256") if isinstance(used.get(role), dict) else None
        path = file_of_ref(ref)
        if path is not None:
            now = file_sha(path)
            if now is None:
                return f"its input {role} ({path}) is missing"
            if was and now != was:
                return f"its input {role} ({path}) changed since it was read (sha256 {was[:12]} -> {now[:12]})"
            continue
        status = status_of(ref)
        if status != "done":
            return f"its input {role} {ref} is {status}"
        now = (result_of(ref) or {}).get("model_sha256")
        if was and now and now != was:
            return f"its input {role} {ref} was recomputed with other weights (sha256 {was[:12]} -> {now[:12]})"
    return None
