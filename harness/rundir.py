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
from pathlib import Path
from typing import Callable, Dict, Optional

MODEL_FILE = "model.pth"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
CONFIG_FILE = "config.json"
STALE_DIR = ".stale"  # <results root>/.stale/<stage id>.<time>: stale stages moved aside, never deleted


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


def read_result(run_dir: str | Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def broken_input(result: dict, inputs: Dict[str, str], status_of: Callable[[str], str],
                 result_of: Callable[[str], Optional[dict]], file_sha: Callable[[str], Optional[str]]) -> Optional[str]:
    """Why the finished stage with this result is stale, or None while it is valid.

    inputs: the stage's planned inputs, {role: upstream stage id | "file:<path>"}; status_of / result_of: an upstream
    stage's status ("done" when it is done *and valid*) and result. A result written before inputs were recorded has
    no `inputs` and is trusted only as far as its upstream stages are done."""
    used = result.get("inputs") if isinstance(result.get("inputs"), dict) else {}
    for role, ref in inputs.items():
        was = (used.get(role) or {}).get("sha256") if isinstance(used.get(role), dict) else None
        if ref.startswith("file:"):
            path = ref[len("file:"):]
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
