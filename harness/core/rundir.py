"""What a stage directory holds, and whether a finished stage is still valid (standard library only: the planner,
the collector and the report use it without importing torch).

A stage's result.json records what it consumed: the sha256 of every input file it read (`inputs`), and what it
produced (`model_sha256`). A finished stage stays valid only while each stage it read from is done and still holds
the weights it read then; a `file:` input (a user's checkpoint) must still have the same bytes. Everything computed
from an upstream stage that failed, is unfinished, or was recomputed with other weights is *stale*: the driver moves
it aside and recomputes it, and the report never shows a number from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from harness.core.locks import lock_holder

MODEL_FILE = "model.pth"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"  # one JSON line per epoch
JOB_FILE = "job.json"  # the job that runs the stage (Slurm job id / local controller pid, its chain)
LAST_CHECKPOINT, PREV_CHECKPOINT = "checkpoint-last.pth", "checkpoint-prev.pth"
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


def results_root_of(plan_root: str | Path) -> Path:
    """The results root a plan's tables share: <results_root>, two levels above <results_root>/<table>/<profile>."""
    return Path(plan_root).parent.parent


def find_finished(stage_id: str, profile: str, roots: Sequence[Path], not_at: Path) -> Optional[Path]:
    """A finished, intact directory of this stage, <root>/<any table>/<profile>/<stage id>/ under one of `roots`,
    other than `not_at`. A stage id hashes the whole spec and its inputs' ids, so such a directory is the same
    computation; one whose model file no longer matches its result (damaged) is never taken."""
    for root in roots:
        for res in sorted(Path(root).glob(f"*/{profile}/{stage_id}/{RESULT_FILE}")):
            if res.parent.resolve() != Path(not_at).resolve() and damaged(res.parent) is None:
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


FILE_HASHES = FileHashes()  # one per process: a driver hashes each artefact once per (size, mtime)


def damaged(run_dir: str | Path, hashes: Callable[[str | Path], Optional[str]] = FILE_HASHES) -> Optional[str]:
    """Why a finished stage's artefact is not what its result records, or None while it is (or the stage is not
    finished, or its result records no artefact). A stage is done only when its model file still has the sha256
    its result.json recorded: a truncated or replaced model.pth makes it not done."""
    res = read_result(run_dir)
    want = res.get("model_sha256") if res else None
    if not want:
        return None
    path = Path(run_dir) / MODEL_FILE
    now = hashes(path)
    if now is None:
        return f"its model file {path} is missing (its {RESULT_FILE} records sha256 {want[:12]})"
    if now != want:
        return (f"its model file {path} is damaged: sha256 {now[:12]} where its {RESULT_FILE} records "
                f"{want[:12]}")
    return None


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


# ----------------------------------------------------------------------------------------------- a plan's stage tree
class RunTree:
    """The stage directories of one plan, <root> = <results root>/<table>/<profile>/<stage id>/: which stages are
    done and still valid, moving stale ones aside, and linking in stages finished elsewhere. The plan (the graph)
    stays a plain value; this is the live state of its files.

    inputs: {stage id: {role: upstream stage id | "file:<path>"}} in dependency order (RunTree.of(plan))."""

    def __init__(self, root: Path, profile: str, inputs: Dict[str, Dict[str, str]]):
        self.root, self.profile, self.inputs = Path(root), profile, inputs

    @classmethod
    def of(cls, plan) -> "RunTree":
        return cls(plan.root, plan.profile, {sid: dict(st.inputs) for sid, st in plan.stages.items()})

    def dir(self, stage_id: str) -> Path:
        return self.root / stage_id

    def status(self, stage_id: str) -> str:
        return stage_status(self.dir(stage_id))

    def stale(self) -> Dict[str, str]:
        """{stage id: why} for every finished stage that is no longer valid: its model file does not match its
        result (damaged), or an input it consumed is not done or not the file it read then (broken_input). In
        dependency order; a stage computed from a stale one is stale too."""
        out: Dict[str, str] = {}
        checked: set = set()

        def status(sid: str) -> str:  # a stage's status once it and its own inputs are checked (upstream first)
            if sid in self.inputs and sid not in checked:
                checked.add(sid)
                res = read_result(self.dir(sid))
                if res is not None:
                    why = damaged(self.dir(sid)) or broken_input(res, self.inputs[sid], status,
                                                                 lambda ref: read_result(self.dir(ref)), FILE_HASHES)
                    if why:
                        out[sid] = why
            return "stale" if sid in out else self.status(sid)

        for sid in self.inputs:
            status(sid)
        return {sid: out[sid] for sid in self.inputs if sid in out}

    def set_aside_stale(self, log=print) -> Dict[str, str]:
        """Move every stale stage's directory to <root>/.stale/<stage id>.<time> (with a stale.json saying why), so
        it is recomputed; nothing is deleted. Returns {stage id: why}."""
        stale = self.stale()
        for sid, why in stale.items():
            dest = self.root / STALE_DIR / f"{sid}.{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.dir(sid), dest)
            write_json({"stage_id": sid, "why": why, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, dest / "stale.json")
            log(f"[reproduce] {sid}: stale, {why}; moved aside to {dest}, recomputing")
        return stale

    def finished_elsewhere(self, stage_id: str, roots: Sequence[Path] = ()) -> Optional[Path]:
        """Where this not-yet-done stage is already finished: in another table of this results root (the teacher,
        the rows table2 and masking share) or under `roots` (a sweep's other points)."""
        if self.status(stage_id) == DONE:
            return None
        return find_finished(stage_id, self.profile, [results_root_of(self.root), *roots], self.dir(stage_id))

    def reuse_finished(self, roots: Sequence[Path] = (), log=lambda msg: print(msg, flush=True)) -> List[str]:
        """Link in every stage finished elsewhere (finished_elsewhere) instead of running it again; a stage being
        run right now is left alone. Returns the stage ids linked."""
        reused = []
        for sid in self.inputs:
            src = self.finished_elsewhere(sid, roots)
            if src is None or lock_holder(self.dir(sid)):
                continue
            link_stage_dir(src, self.dir(sid))
            log(f"[reproduce] {sid}: reused from {src}")
            reused.append(sid)
        return reused
