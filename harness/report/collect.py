"""Read a table's results tree (results/<table>/<profile>/) into pandas.

    >>> c = collect(Path("results/table2/tiny"))
    >>> c.cells      # one row per table cell (row, seed): its test top-1, its status, its cost, its fine-tune curve
    >>> c.stages     # one row per stage of the plan: status (with the reason), cost, provenance
    >>> summarize(c) # one row per table row: mean +- std over finished seeds, n, the paper's number, delta
    >>> c.warnings   # unreadable files and stray stage directories, each naming its path
    >>> c.epochs     # one row per stage and logged epoch: the losses and validation top-1 the figures draw
    >>> c.specs      # per row: the resolved specs (config.json) of its pre-train and fine-tune stages
    >>> export(c, d) # cells/stages/rows/epochs CSVs + run.json; load_export(d) gives the Collected back (no tree)

Every planned stage and cell appears with a status, never silently dropped:

    done         result.json is there and readable
    failed       error.json is there (the reason is its `error`)
    partial      running or interrupted: checkpoint-last.pth, log.jsonl or a submitted Slurm job (job.json) exists
    unreadable   result.json exists but cannot be read; the stage is skipped and the path is in `warnings`
    not started  none of the above

A cell's status is its evaluation's when that is done, else the worst status among the stages it depends on
(teacher stages included), so a cell blocked by a failed teacher says so.

A cell's number is its evaluation stage's `top1` (the test split). Fine-tuning logs VALIDATION top-1 per epoch
(`val_top1` in log.jsonl; `best_val_top1` / `last_val_top1` / `best_epoch` in its result.json), from a split carved
out of the training images; results written before that split existed (`top1`, `best_top1`, `last_top1`) are read
the same way. A fine-tune whose validation top-1 rose by >= 0.5 pp over its last epoch is flagged `still_rising`;
so is a row (summarize) whose finished seeds rose by >= 0.5 pp on average, i.e. whose mean curve did.

    python -m harness.report.collect results/table2/tiny [--csv out/]      # print the per-cell frame, export CSVs +
    run.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

import recipes

from harness.core.rundir import (CONFIG_FILE, DONE, ERROR_FILE, FAILED, JOB_FILE, LAST_CHECKPOINT, MANIFEST_FILE,
                                 PARTIAL, RESULT_FILE, FileHashes, broken_input, read_log, read_result, stage_status)
from harness.report.stats import RISING_PP, last_epoch_gain, metric_curve

PAPER_NUMBERS = recipes.path("paper-numbers.csv")
NOT_AVAILABLE = "not available"
NOT_IMAGENET = "n/a (not ImageNet)"
# worst first: a cell is as bad as the worst stage it needs
SEVERITY = ("failed", "unreadable", "stale", "partial", "not started", "done")
ROLES = ("teacher-pretrain", "teacher-finetune", "teacher-evaluate", "teacher-probe", "student-pretrain",
         "student-finetune", "evaluate", "student-probe")
# fine-tune result keys: the current name first, then the name in results written before the validation split
RESULT_ALIASES = {"best_val_top1": ("best_val_top1", "best_top1"), "last_val_top1": ("last_val_top1", "last_top1"),
                  "last_val_top5": ("last_val_top5", "last_top5")}


@dataclass
class Collected:
    """A table's results: from its tree (collect) or from the data a report keeps beside it (load_export)."""
    root: Path  # the results tree <...>/<table>/<profile>; for load_export, the folder the data was read from
    manifest: dict
    stages: pd.DataFrame
    cells: pd.DataFrame
    warnings: List[str] = field(default_factory=list)
    # per stage and logged epoch, what the figures draw (EPOCH_COLUMNS; from each stage's log.jsonl)
    epochs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EPOCH_COLUMNS))
    # row -> {"pretrain": spec, "finetune": spec}: the resolved stage specs (config.json) of the row's first cell
    specs: Dict[str, dict] = field(default_factory=dict)
    # row -> parameters and FLOPs per image (harness.report.artefacts.model_costs), when an export recorded them
    models: Dict[str, dict] = field(default_factory=dict)
    # the tree as a report names it, never this machine's path: results/<table>/<profile>
    results: str = ""
    _logs: Optional[Dict[str, List[dict]]] = field(default=None, repr=False, compare=False)

    @property
    def profile(self) -> str:
        return self.manifest.get("profile", self.root.name)

    @property
    def table(self) -> str:
        return self.manifest.get("table", self.root.parent.name)

    def log(self, stage_id: str) -> List[dict]:
        """A stage's per-epoch records as the figures read them (epoch, loss, loss_pix, loss_feat, val_top1; a key
        the stage did not log is absent), from `epochs`."""
        if self._logs is None:
            self._logs = {}
            for rec in self.epochs.to_dict("records"):
                self._logs.setdefault(rec["stage_id"], []).append(
                    {k: v for k, v in rec.items() if k != "stage_id" and not missing_num(v)})
        return self._logs.get(stage_id, [])


def _read_json(path: Path):
    obj = json.loads(path.read_text())
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def val_curve(records: List[dict]) -> List[tuple]:
    """(epoch, validation top-1) of a fine-tune log: `val_top1`, or `top1` in logs written before the split."""
    return metric_curve(records)


def read_stage(d: Path, warnings: List[str]) -> dict:
    """Status (rundir.stage_status, "todo" shown as "not started"), reason and result fields of one stage directory
    (+ the validation top-1 change over its last logged epoch, from log.jsonl)."""
    log = read_log(d, warnings)
    status = stage_status(d)
    rec: Dict[str, object] = {"status": "not started", "reason": "", "config_path": str(d / CONFIG_FILE),
                              "epochs_logged": len(log), "val_last_gain": last_epoch_gain(log), LOG_KEY: log}
    if status == DONE:
        try:
            res = _read_json(d / RESULT_FILE)
        except (OSError, ValueError) as e:
            warnings.append(f"{d / RESULT_FILE}: unreadable result file ({type(e).__name__}: {e}); stage skipped")
            rec.update(status="unreadable", reason=f"unreadable {RESULT_FILE}")
            return rec
        rec.update({k: v for k, v in res.items() if not isinstance(v, (dict, list))})
        for new, keys in RESULT_ALIASES.items():
            rec[new] = next((res[k] for k in keys if res.get(k) is not None), None)
        rec["status"] = res.get("status", "done")
    elif status == FAILED:
        try:
            reason = str(_read_json(d / ERROR_FILE).get("error", "unknown error"))
        except (OSError, ValueError) as e:
            warnings.append(f"{d / ERROR_FILE}: unreadable error file ({type(e).__name__}: {e})")
            reason = f"unreadable {ERROR_FILE}"
        rec.update(status="failed", reason=reason)
    elif status == PARTIAL:
        bits = [f"{rec['epochs_logged']} epoch(s) logged"]
        if (d / LAST_CHECKPOINT).exists():
            bits.append("checkpoint-last exists")
        if (d / JOB_FILE).exists():
            bits.append("a job was submitted")
        rec.update(status="partial", reason="running or interrupted: " + ", ".join(bits))
    return rec


STAGE_COLUMNS = ["stage_id", "kind", "role", "serves", "status", "reason", "epochs_logged", "top1", "top5", "n_eval",
                 "best_val_top1", "best_epoch", "last_val_top1", "last_val_top5", "val_last_gain", "final_loss",
                 "final_loss_pix", "final_loss_feat", "block", "split",
                 "wall_s", "device_hours", "images_per_s", "device", "device_name", "world_size", "host", "torch",
                 "python", "git_commit", "finished_at", "config_path",
                 # added later (stages.csv files written before lack them); git_dirty: where a result records it
                 "git_dirty"]
# epochs.csv: what the figures draw of each stage's log.jsonl (val_top1: `top1` in logs written before the split;
# losses to 6 significant digits)
EPOCH_COLUMNS = ["stage_id", "epoch", "loss", "loss_pix", "loss_feat", "val_top1"]
LOG_KEY = "_log"  # read_stage's records of log.jsonl, taken out by collect


def _epoch_rows(sid: str, log: List[dict]) -> List[dict]:
    val = dict(val_curve(log))
    out = []
    for r in log:
        try:
            epoch = int(r["epoch"])
        except (KeyError, TypeError, ValueError):
            continue
        rec = {"stage_id": sid, "epoch": epoch, "val_top1": val.get(epoch)}
        for k in ("loss", "loss_pix", "loss_feat"):
            v = r.get(k)
            # 6 significant digits: what a curve needs, and half the bytes of a kept epochs.csv
            rec[k] = float(f"{v:.6g}") if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) \
                else None
        out.append(rec)
    return out


def _row_specs(root: Path, manifest: dict) -> Dict[str, dict]:
    """row -> {"pretrain": spec, "finetune": spec} from the config.json of the row's first cell that has one (None
    for a stage the row does not have or that never started)."""
    out: Dict[str, dict] = {}
    for cell in manifest["cells"]:
        got = out.setdefault(cell["row"], {"pretrain": None, "finetune": None})
        for stage in ("pretrain", "finetune"):
            sid = cell.get(stage)
            if got[stage] is None and sid:
                try:
                    spec = _read_json(root / sid / CONFIG_FILE).get("spec")
                except (OSError, ValueError):
                    continue
                got[stage] = spec if isinstance(spec, dict) else None
    return out


def collect(root: Path) -> Collected:
    root = Path(root).resolve()
    if not (root / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{root / 'manifest.json'} not found: is {root} a results/<table>/<profile> tree?")
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    warnings: List[str] = []
    recs = []
    cell_order = {(c["row"], c["seed"]): i for i, c in enumerate(manifest["cells"])}

    def order(item):  # dependency order (teachers first), then the table's row order
        sid, st = item
        served = [cell_order.get(tuple(x), len(cell_order)) for x in st.get("cells", [])]
        return ROLES.index(st["role"]) if st["role"] in ROLES else len(ROLES), min(served, default=0), sid

    epochs: List[dict] = []
    for sid, st in sorted(manifest["stages"].items(), key=order):
        rec = read_stage(root / sid, warnings)
        epochs += _epoch_rows(sid, rec.pop(LOG_KEY))
        rec.update(stage_id=sid, kind=st["kind"], role=st["role"],
                   serves=", ".join(f"{r}/s{s}" for r, s in st.get("cells", [])))
        recs.append(rec)
    _mark_stale(root, manifest, recs)
    stages = pd.DataFrame(recs).reindex(columns=STAGE_COLUMNS)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name not in manifest["stages"]:
            warnings.append(f"{d}: stage directory not in the manifest (left from an earlier plan?); ignored")
    cells = _cells(manifest, stages.set_index("stage_id", drop=False))
    bad = (cells["status"] == "done") & cells["top1"].isna()
    for ev in cells.loc[bad, "evaluate_id"]:
        warnings.append(f"{root / ev / RESULT_FILE}: no numeric top1; cell skipped")
    cells.loc[bad, ["status", "reason"]] = ["unreadable", f"{RESULT_FILE} has no numeric top1"]
    return Collected(root, manifest, stages, cells, warnings,
                     epochs=pd.DataFrame(epochs, columns=EPOCH_COLUMNS), specs=_row_specs(root, manifest),
                     results=f"results/{root.parent.name}/{root.name}")


def _mark_stale(root: Path, manifest: dict, recs: List[dict]) -> None:
    """A finished stage computed from an input that is no longer what it read (rundir.broken_input) is `stale`: its
    numbers are not shown, and the reason names the stage that broke the chain."""
    by_id = {r["stage_id"]: r for r in recs}
    hashes = FileHashes()
    checked: set = set()

    def status(sid: str) -> str:  # a stage's status once its own inputs are checked (upstream first)
        rec = by_id.get(sid)
        if rec is None:
            return "not started"
        if sid not in checked:
            checked.add(sid)
            if rec["status"] == "done":
                why = broken_input(read_result(root / sid) or {}, manifest["stages"][sid].get("inputs", {}),
                                   status, lambda ref: read_result(root / ref), hashes)
                if why:
                    rec.update(status="stale", reason=f"stale: {why}")
        return rec["status"]

    for sid in by_id:
        status(sid)


def _deps(manifest: dict, sid: str) -> List[str]:
    """sid and every stage it needs, transitively."""
    out, todo = [], [sid]
    while todo:
        s = todo.pop()
        if s in out or s not in manifest["stages"]:
            continue
        out.append(s)
        todo.extend(r for r in manifest["stages"][s]["inputs"].values() if not r.startswith("file:"))
    return out


def _num(st: pd.DataFrame, sid: str, col: str):
    v = st.at[sid, col] if sid in st.index else None
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _done_num(st: pd.DataFrame, sid: Optional[str], col: str):
    """A finished stage's number (None when there is no such stage or it is not done, e.g. stale)."""
    return _num(st, sid, col) if sid and sid in st.index and st.at[sid, "status"] == "done" else None


def _cells(manifest: dict, st: pd.DataFrame) -> pd.DataFrame:
    recs = []
    for c in manifest["cells"]:
        info, ev, ft, pt, pr = c.get("info", {}), c["evaluate"], c["finetune"], c["pretrain"], c.get("probe")
        tpr = (c.get("teacher") or {}).get("probe")
        status, reason = "done", ""
        if st.at[ev, "status"] != "done":
            deps = _deps(manifest, ev)
            # the worst status; among equals the most upstream stage (where a chain broke)
            worst = min(deps, key=lambda s: (SEVERITY.index(st.at[s, "status"]), -deps.index(s)))
            status = st.at[worst, "status"]
            if status == "done":  # every input done, the evaluation not yet run
                status, worst = "not started", ev
            reason = f"{st.at[worst, 'role']} {worst}: {st.at[worst, 'reason'] or status}"
        own = [s for s in (pt, ft, ev) if s]  # a scratch row has no pre-train
        done = all(st.at[s, "status"] == "done" for s in own)
        recs.append({
            "row": c["row"], "label": c["label"], "method": c["method"], "paper": c.get("paper"),
            "overridden": "; ".join(c.get("overridden") or []),
            "teacher": info.get("teacher"), "student": info.get("student"), "mask_ratio": info.get("mask_ratio"),
            "pretrain_epochs": info.get("pretrain_epochs"), "finetune_epochs": info.get("finetune_epochs"),
            "kd": info.get("kd"), "seed": c["seed"], "status": status, "reason": reason,
            "top1": _num(st, ev, "top1") if status == "done" else None,
            "top5": _num(st, ev, "top5") if status == "done" else None,
            "val_top1_best": _num(st, ft, "best_val_top1"), "val_top1_best_epoch": _num(st, ft, "best_epoch"),
            "val_top1_last": _num(st, ft, "last_val_top1"), "val_last_gain": _num(st, ft, "val_last_gain"),
            "still_rising": bool(st.at[ft, "status"] == "done" and (_num(st, ft, "val_last_gain") or 0.0) >= RISING_PP),
            "pretrain_final_loss": _num(st, pt, "final_loss") if pt else None,
            # kNN probe top-1 (test split) of the row's encoder before fine-tuning, and of its teacher's aligned block
            "probe_top1": _done_num(st, pr, "top1"), "teacher_probe_top1": _done_num(st, tpr, "top1"),
            "wall_s": sum(_num(st, s, "wall_s") or 0.0 for s in own) if done else None,
            "device_hours": sum(_num(st, s, "device_hours") or 0.0 for s in own) if done else None,
            "pretrain_images_per_s": _num(st, pt, "images_per_s") if pt else None,
            "finetune_images_per_s": _num(st, ft, "images_per_s"),
            "pretrain_id": pt, "finetune_id": ft, "evaluate_id": ev, "probe_id": pr,
            "config_path": st.at[ev, "config_path"], "git_commit": _num(st, ev, "git_commit"),
        })
    df = pd.DataFrame(recs)
    for col in ("top1", "top5", "val_top1_best", "val_top1_last", "val_last_gain", "wall_s", "device_hours",
                "probe_top1", "teacher_probe_top1"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def teacher_results(c: Collected) -> List[dict]:
    """The teacher's stages that say how good it is: its fine-tune (validation top-1, best and last) and its
    `teacher-evaluate` stage (TEST top-1, the number to quote), each with status; [] when the plan has none."""
    st = c.stages
    out = []
    for r in st[st["role"].isin(["teacher-finetune", "teacher-evaluate"])].to_dict("records"):
        done = r["status"] == "done"
        out.append({"stage_id": r["stage_id"], "role": r["role"], "status": r["status"], "reason": r["reason"],
                    "top1": r["top1"] if done else None, "top5": r["top5"] if done else None,
                    "n_eval": r["n_eval"] if done else None, "val_top1_best": r["best_val_top1"],
                    "val_top1_last": r["last_val_top1"], "val_last_gain": r["val_last_gain"],
                    "still_rising": bool(done and r["role"] == "teacher-finetune" and not missing_num(
                        r["val_last_gain"]) and r["val_last_gain"] >= RISING_PP)})
    return out


def missing_num(x) -> bool:
    return x is None or (isinstance(x, float) and np.isnan(x))


def load_paper_numbers(path: Path = PAPER_NUMBERS) -> Dict[str, dict]:
    """{'<table>/<row_label>': {value (float or None), text, source, metric}} from recipes/paper-numbers.csv."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = {}
    for r in df.to_dict("records"):
        val = pd.to_numeric(r["value"], errors="coerce")
        out[f"{r['table']}/{r['row_label']}"] = {
            "value": None if pd.isna(val) else float(val), "text": r["value"], "source": r["source"],
            "metric": r["metric"], "masking_ratio": r["masking_ratio"], "table": r["table"],
            "row_label": r["row_label"]}
    return out


def paper_number(key: Optional[str], papers: Dict[str, dict]) -> Optional[dict]:
    """The paper's number for a row's `paper` key, or None when the key is null, unknown or its value is NA."""
    p = papers.get(key) if key else None
    return p if p and p["value"] is not None else None


def delta_text(mean: Optional[float], paper: Optional[dict], profile: str) -> str:
    """ours - paper, only where both exist and the profile is the paper's (ImageNet) setting."""
    if paper is None:
        return NOT_AVAILABLE
    if profile != "paper":
        return NOT_IMAGENET
    if mean is None or np.isnan(mean):
        return "—"
    return f"{mean - paper['value']:+.2f}"


def overridden_text(changed: str) -> str:
    """What a row's paper number (and each claim on it) reads when the command line changed the row."""
    return f"not applicable (overridden: {changed})"


def summarize(c: Collected, papers: Optional[Dict[str, dict]] = None) -> pd.DataFrame:
    """Per table row (manifest order): n finished, mean and std (ddof=1) of top-1 over seeds, paper number, delta,
    and the finished seeds' mean last-epoch change of validation top-1 (`still_rising` when >= RISING_PP)."""
    papers = load_paper_numbers() if papers is None else papers
    recs = []
    for row, g in c.cells.groupby("row", sort=False):
        vals = g.loc[g["status"] == "done", "top1"].dropna()
        n = len(vals)
        mean = float(vals.mean()) if n else None
        std = float(vals.std(ddof=1)) if n >= 2 else None
        key = g["paper"].iloc[0]
        key = key if isinstance(key, str) else None
        over = g["overridden"].iloc[0] if "overridden" in g else ""
        over = over if isinstance(over, str) else ""
        p = None if over else paper_number(key, papers)  # an overridden row is not the paper's row
        gains = g.loc[g["status"] == "done", "val_last_gain"].dropna()  # the finished seeds' last-epoch changes
        probes, tprobes = g["probe_top1"].dropna(), g["teacher_probe_top1"].dropna()
        counts = g["status"].value_counts()
        status = "; ".join(f"{counts[s]}/{len(g)} {s}" for s in SEVERITY[::-1] if s in counts)
        recs.append({"row": row, "label": g["label"].iloc[0], "method": g["method"].iloc[0],
                     "mask_ratio": g["mask_ratio"].iloc[0], "n": n, "n_planned": len(g), "mean": mean, "std": std,
                     "seeds_top1": list(vals), "paper_key": key, "paper_value": p["value"] if p else None,
                     "paper_text": p["text"] if p else overridden_text(over) if over else NOT_AVAILABLE,
                     "paper_source": p["source"] if p else None, "overridden": over,
                     "delta": (mean - p["value"]) if (p and mean is not None and c.profile == "paper") else None,
                     "delta_text": delta_text(mean, p, c.profile), "status": status,
                     "val_last_gain_mean": float(gains.mean()) if len(gains) else None, "n_gain": len(gains),
                     "still_rising": bool(len(gains) and gains.mean() >= RISING_PP),
                     "probe_mean": float(probes.mean()) if len(probes) else None, "n_probe": len(probes),
                     "probe_std": float(probes.std(ddof=1)) if len(probes) >= 2 else None,
                     "teacher_probe": float(tprobes.iloc[0]) if len(tprobes) else None})
    return pd.DataFrame(recs)


def row_costs(c: Collected) -> pd.DataFrame:
    """Per row: finished seeds, mean wall time and device-hours per seed (its own pre-train + fine-tune + evaluate),
    device-hours over all finished seeds, and which rows share its pre-training (mae and kd do)."""
    cells, recs = c.cells, []
    shared = cells.groupby("pretrain_id")["row"].unique()
    for row, g in cells.groupby("row", sort=False):
        done = g[g["status"] == "done"]
        others = sorted({o for p in g["pretrain_id"] for o in shared.get(p, []) if o != row})
        recs.append({"row": row, "finished": len(done),
                     "wall_s": done["wall_s"].mean() if len(done) else None,
                     "device_hours": done["device_hours"].mean() if len(done) else None,
                     "device_hours_total": done["device_hours"].sum() if len(done) else None,
                     "note": f"pre-train shared with {', '.join(others)}" if others else ""})
    return pd.DataFrame(recs)


EXPORT_FORMAT = 1
RUN_FILE = "run.json"  # beside the CSVs: the manifest, warnings, row specs and model costs (load_export reads it)
# how load_export types the CSV columns (everything else: text, an empty field read as None)
FLOAT_COLUMNS = {"mask_ratio", "pretrain_epochs", "finetune_epochs", "top1", "top5", "val_top1_best",
                 "val_top1_best_epoch", "val_top1_last", "val_last_gain", "pretrain_final_loss", "probe_top1",
                 "teacher_probe_top1", "wall_s", "device_hours", "pretrain_images_per_s", "finetune_images_per_s",
                 "epochs_logged", "n_eval", "best_val_top1", "best_epoch", "last_val_top1", "last_val_top5",
                 "final_loss", "final_loss_pix", "final_loss_feat", "block", "images_per_s", "world_size", "loss",
                 "loss_pix", "loss_feat", "val_top1"}
INT_COLUMNS = {"seed", "epoch"}
BOOL_COLUMNS = {"still_rising"}
TEXT_COLUMNS = {"status", "reason", "overridden"}  # an empty field stays ""


def _relative(obj, root: Path, shown: str):
    """obj with every string that names a path under the results tree `root` rewritten from `shown` on
    (results/<table>/<profile>/...), and one naming its results root as `results`: what a report keeps holds no
    path of the machine that computed it."""
    if isinstance(obj, str):
        base = str(root.parent.parent)
        out = obj.replace(str(root), shown)
        return "results" if out == base else out.replace(base + "/", "results/")
    if isinstance(obj, list):
        return [_relative(x, root, shown) for x in obj]
    if isinstance(obj, dict):
        return {k: _relative(v, root, shown) for k, v in obj.items()}
    return obj


def export(c: Collected, out_dir: Path, summary: Optional[pd.DataFrame] = None, rows: bool = True,
           models: Optional[Dict[str, dict]] = None) -> List[Path]:
    """cells.csv, stages.csv, rows.csv (rows=False: not), epochs.csv (plus .parquet when pyarrow is importable) and
    run.json (the manifest, the warnings, the rows' stage specs and `models`) into out_dir: everything a report is
    drawn from, so that load_export gives the report back without the results tree. Paths under the results tree
    are written from results/<table>/<profile> on."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = c.results or f"results/{c.root.parent.name}/{c.root.name}"
    # paths relative to the results root (<table>/<profile>/<stage>/config.json): a clone cannot follow this machine's
    local = {"config_path": lambda df: df["config_path"].map(
        lambda p: Path(p).relative_to(c.root.parent.parent).as_posix()
        if isinstance(p, str) and p and Path(p).is_absolute() else p)}
    frames = {"cells": c.cells.assign(**local), "stages": c.stages.assign(**local)}
    if rows:
        summary = summarize(c) if summary is None else summary
        frames["rows"] = summary.drop(columns=["seeds_top1"])
    frames["epochs"] = c.epochs.reindex(columns=EPOCH_COLUMNS)
    try:
        import pyarrow  # noqa: F401  (local: optional dependency, probed for the .parquet exports)
        parquet = True
    except ImportError:
        parquet = False
    paths = []
    for name, df in frames.items():
        paths.append(out_dir / f"{name}.csv")
        df.to_csv(paths[-1], index=False)
        if parquet:
            paths.append(out_dir / f"{name}.parquet")
            df.to_parquet(paths[-1], index=False)
    run = {"format": EXPORT_FORMAT, "results": shown, "manifest": c.manifest, "warnings": c.warnings,
           "specs": c.specs, "models": models if models is not None else c.models}
    if c.root.is_absolute() and (c.root / MANIFEST_FILE).exists():
        run = _relative(run, c.root, shown)
    paths.append(out_dir / RUN_FILE)
    # NaN stays NaN (Python's JSON token): a spec may hold one (a failed run's distill.alpha=nan), and the report
    # rebuilt from this file must read what the results tree said
    paths[-1].write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
    return paths


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    def num(kind):
        def conv(x: str):
            if x == "":
                return None if kind is not float else np.nan
            try:
                return kind(float(x)) if kind is int else float(x)
            except ValueError:
                return np.nan if kind is float else None
        return conv
    out = {}
    for col in df.columns:
        s = df[col]
        if col in FLOAT_COLUMNS:
            out[col] = s.map(num(float)).astype(float)
        elif col in INT_COLUMNS:
            vals = s.map(num(int))
            out[col] = vals.astype(int) if vals.notna().all() else vals
        elif col in BOOL_COLUMNS:
            out[col] = s.map(lambda x: x == "True").astype(bool)
        elif col in TEXT_COLUMNS:
            out[col] = s
        else:
            out[col] = s.map(lambda x: None if x == "" else x).astype(object)
    return pd.DataFrame(out, columns=df.columns)


def _read_csv(path: Path, columns: Optional[List[str]] = None) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame(
        columns=columns or [], dtype=str)
    return _typed(df.reindex(columns=columns) if columns else df)


def load_export(folder: Path) -> Collected:
    """A Collected from the files export wrote (run.json, cells.csv, stages.csv, epochs.csv): the same frames the
    results tree gave, as far as a CSV keeps them (numbers exactly; an empty text field comes back as None). The
    report is drawn from this both after a run and from a clone's committed data, so the two are identical."""
    folder = Path(folder)
    path = folder / RUN_FILE
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no readable report data ({type(e).__name__}: {e}); export writes it") \
            from None
    if run.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {run.get('format')!r}, this code reads {EXPORT_FORMAT}")
    stages = _read_csv(folder / "stages.csv").reindex(columns=STAGE_COLUMNS)
    return Collected(folder, run["manifest"], stages, _read_csv(folder / "cells.csv"), list(run.get("warnings", [])),
                     epochs=_read_csv(folder / "epochs.csv", EPOCH_COLUMNS), specs=run.get("specs") or {},
                     models=run.get("models") or {}, results=run.get("results", ""))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report.collect", description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="results/<table>/<profile>")
    p.add_argument("--csv", type=Path, default=None, help="also write cells/stages/rows CSVs into this folder")
    args = p.parse_args(argv)
    c = collect(args.root)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(c.cells[["row", "seed", "status", "top1", "val_top1_best", "top5", "wall_s", "device_hours"]])
        print(summarize(c)[["row", "n", "mean", "std", "paper_text", "delta_text", "status"]])
    for w in c.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.csv:
        for path in export(c, args.csv):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
