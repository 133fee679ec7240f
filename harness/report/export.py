"""The data a report keeps beside it, <reports-dir>/<name>/: export writes a Collected's frames (cells.csv,
stages.csv, rows.csv, epochs.csv, plus .parquet when pyarrow is importable) and run.json (the manifest, the warnings,
the rows' resolved stage specs and model costs), every path under the results tree written from
results/<table>/<profile> on; load_export gives the Collected back from them, without the results tree, so a clone's
committed data draws the same report (harness.report.markdown.render_report)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from harness.core.rundir import MANIFEST_FILE, load_json
from harness.report.collect import Collected, summarize
from harness.report.stage_records import EPOCH_COLUMNS, STAGE_COLUMNS

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
        run = load_json(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no readable report data ({type(e).__name__}: {e}); export writes it") \
            from None
    if run.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {run.get('format')!r}, this code reads {EXPORT_FORMAT}")
    stages = _read_csv(folder / "stages.csv").reindex(columns=STAGE_COLUMNS)
    return Collected(folder, run["manifest"], stages, _read_csv(folder / "cells.csv"), list(run.get("warnings", [])),
                     epochs=_read_csv(folder / "epochs.csv", EPOCH_COLUMNS), specs=run.get("specs") or {},
                     models=run.get("models") or {}, results=run.get("results", ""))
