"""Read a table's results tree (results/<table>/<profile>/) into pandas.

    >>> c = collect(Path("results/table2/tiny"))
    >>> c.cells      # one row per table cell (row, seed): its test top-1, its status, its cost, its fine-tune curve
    >>> c.stages     # one row per stage of the plan: status (with the reason), cost, provenance
    >>> summarize(c) # one row per table row: mean +- std over finished seeds, n, the paper's number, delta
    >>> c.warnings   # unreadable files and stray stage directories, each naming its path
    >>> c.epochs     # one row per stage and logged epoch: the losses and validation top-1 the figures draw
    >>> c.specs      # per row: the resolved specs (config.json) of its pre-train and fine-tune stages

The stage directories are read by harness.report.stage_records; harness.report.export writes a Collected's frames and
run.json beside a report (export) and gives it back from them without the tree (load_export).

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

    python -m harness.report.collect results/table2/tiny [--csv out/]   # print the per-cell frame (+ export there)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

import recipes

from harness.core.rundir import MANIFEST_FILE, RESULT_FILE, file_of_ref, load_json
from harness.report.stage_records import (EPOCH_COLUMNS, LOG_KEY, STAGE_COLUMNS, epoch_rows, mark_stale, read_stage,
                                          row_specs)
from harness.report.stats import RISING_PP
from harness.core.lazy import lazy

report_export = lazy("harness.report.export")  # the --csv export, which imports this module

PAPER_NUMBERS = recipes.path("paper-numbers.csv")
NOT_AVAILABLE = "not available"
NOT_IMAGENET = "n/a (not ImageNet)"
# worst first: a cell is as bad as the worst stage it needs
SEVERITY = ("failed", "unreadable", "stale", "partial", "not started", "done")
ROLES = ("teacher-pretrain", "teacher-finetune", "teacher-evaluate", "teacher-probe", "student-pretrain",
         "student-finetune", "evaluate", "student-probe")


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


def collect(root: Path) -> Collected:
    root = Path(root).resolve()
    if not (root / MANIFEST_FILE).exists():
        raise FileNotFoundError(f"{root / 'manifest.json'} not found: is {root} a results/<table>/<profile> tree?")
    manifest = load_json(root / MANIFEST_FILE)
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
        epochs += epoch_rows(sid, rec.pop(LOG_KEY))
        rec.update(stage_id=sid, kind=st["kind"], role=st["role"],
                   serves=", ".join(f"{r}/s{s}" for r, s in st.get("cells", [])))
        recs.append(rec)
    mark_stale(root, manifest, recs)
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
                     epochs=pd.DataFrame(epochs, columns=EPOCH_COLUMNS), specs=row_specs(root, manifest),
                     results=f"results/{root.parent.name}/{root.name}")


def _deps(manifest: dict, sid: str) -> List[str]:
    """sid and every stage it needs, transitively."""
    out, todo = [], [sid]
    while todo:
        s = todo.pop()
        if s in out or s not in manifest["stages"]:
            continue
        out.append(s)
        todo.extend(r for r in manifest["stages"][s]["inputs"].values() if file_of_ref(r) is None)
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
        for path in report_export.export(c, args.csv):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
