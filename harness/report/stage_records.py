"""A results tree's stage directories as the report reads them (harness.report.collect): one record per stage (its
status from rundir.stage_status, the reason, its result's fields, the change of validation top-1 over its last logged
epoch), its logged epochs as the figures draw them (epochs.csv), each row's resolved stage specs (config.json), and
the finished stages that are stale (computed from an input that is no longer what they read).

Fine-tuning logs VALIDATION top-1 per epoch (`val_top1` in log.jsonl; `best_val_top1` / `last_val_top1` /
`best_epoch` in its result.json); results written before that split existed (`top1`, `best_top1`, `last_top1`) are
read the same way (RESULT_ALIASES, val_curve).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from harness.core.rundir import (CONFIG_FILE, DONE, ERROR_FILE, FAILED, JOB_FILE, LAST_CHECKPOINT, PARTIAL, RESULT_FILE,
                                 RunTree, load_json, read_config, read_log, stage_status)
from harness.report.stats import last_epoch_gain, metric_curve

# fine-tune result keys: the current name first, then the name in results written before the validation split
RESULT_ALIASES = {"best_val_top1": ("best_val_top1", "best_top1"), "last_val_top1": ("last_val_top1", "last_top1"),
                  "last_val_top5": ("last_val_top5", "last_top5")}


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
            res = load_json(d / RESULT_FILE)
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
            reason = str(load_json(d / ERROR_FILE).get("error", "unknown error"))
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


def epoch_rows(sid: str, log: List[dict]) -> List[dict]:
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


def row_specs(root: Path, manifest: dict) -> Dict[str, dict]:
    """row -> {"pretrain": spec, "finetune": spec} from the config.json of the row's first cell that has one (None
    for a stage the row does not have or that never started)."""
    out: Dict[str, dict] = {}
    for cell in manifest["cells"]:
        got = out.setdefault(cell["row"], {"pretrain": None, "finetune": None})
        for stage in ("pretrain", "finetune"):
            sid = cell.get(stage)
            if got[stage] is None and sid:
                spec = (read_config(root / sid) or {}).get("spec")
                got[stage] = spec if isinstance(spec, dict) else None
    return out


def mark_stale(root: Path, manifest: dict, recs: List[dict]) -> None:
    """A finished stage whose model file no longer matches its result, or computed from an input that is no longer
    what it read, is `stale` (rundir.RunTree.stale, as the driver decides it): its numbers are not shown, and the
    reason names the damaged file or the stage that broke the chain."""
    inputs = {sid: dict(s.get("inputs") or {}) for sid, s in manifest["stages"].items()}
    stale = RunTree(root, str(manifest.get("profile", "")), inputs).stale()
    for rec in recs:
        why = stale.get(rec["stage_id"])
        if why and rec["status"] == "done":
            rec.update(status="stale", reason=f"stale: {why}")
