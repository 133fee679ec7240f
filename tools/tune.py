"""Tuning runs that can only see the validation split.

    python -m tools.tune table2 --record recipes/profile/tiny-tuning.csv --trial ft-lr2e-3 \
        profile=tiny '~rows.dmae_95' finetune.blr=2e-3

runs the table's pre-training and fine-tuning stages in this process (launcher=debug semantics, results under
results_root=results/tuning unless given) and never its evaluation stages: the test split is not read. Its probe
stages run on the validation split instead of the test split. Each fine-tune's validation top-1 (the `holdout`
images carved out of the training set) and each probe's are printed and appended to the record (a CSV committed
next to the profile: what was tried, what it gave, what it cost), so the choice of a profile's hyper-parameters can
be retraced.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from harness.plan.config import load_config
from harness.plan.resolve import runtime_of
from harness.plan.graph import build_plan
from harness.core.rundir import git_commit, read_log, read_result
from harness.report.stats import last_epoch_gain

RECORD_COLUMNS = ["when", "trial", "overrides", "stage", "role", "row_seed", "epochs", "train_images",
                  "last_val_top1", "best_val_top1", "last_epoch_gain", "val_curve", "train_s", "git_commit"]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.tune", description=__doc__.split("\n")[0])
    p.add_argument("table")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--trial", required=True, help="a name for this trial in the record")
    p.add_argument("--record", required=True, help="CSV the trial's validation numbers are appended to")
    p.add_argument("--only", choices=["teacher"],
                   help="run only the teacher's pre-training and fine-tuning (the teacher is tuned once, alone)")
    args = p.parse_intermixed_args(argv)
    # local: torch, submitit; --help and argument errors answer without loading them
    from harness.core.stages import run_stage

    overrides = list(args.overrides)
    if not any(o.startswith("results_root=") for o in overrides):
        overrides.append("results_root=results/tuning")
    cfg = load_config(args.table, overrides)
    if not cfg.data.holdout:
        p.error("data.holdout is 0: there is no validation split to tune on")
    plan = build_plan(cfg)
    record = Path(args.record)
    record.parent.mkdir(parents=True, exist_ok=True)
    for sid, stage in plan.stages.items():
        if stage.kind == "evaluate":
            continue  # the test split is read by the final evaluation only
        if args.only and not stage.role.startswith(args.only):
            continue
        if stage.kind == "probe":  # on the validation split: a stage of its own, beside the test-split one
            spec = replace(stage.spec, split="val", name=f"{stage.spec.name}-val")
            res = run_stage(spec, plan.dir(f"{sid}-val"), plan.input_paths(stage), runtime_of(cfg), f"{sid}-val")
            _append(record, {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "trial": args.trial,
                             "overrides": " ".join(args.overrides), "stage": spec.name, "role": stage.role,
                             "row_seed": " ".join(f"{r}/s{s}" for r, s in stage.cells), "epochs": "",
                             "train_images": res["bank_images"], "last_val_top1": round(res["top1"], 2),
                             "best_val_top1": "", "last_epoch_gain": "", "val_curve": "",
                             "train_s": round(res["wall_s"], 1), "git_commit": (git_commit() or "")[:10]})
            print(f"[tune {args.trial}] {spec.name}: kNN probe val top-1 {res['top1']:.2f}", flush=True)
            continue
        res = run_stage(stage.spec, plan.dir(sid), plan.input_paths(stage), runtime_of(cfg), sid)
        if stage.kind != "finetune":
            continue
        log = read_log(plan.dir(sid))
        gain = last_epoch_gain(log) or 0.0
        row = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "trial": args.trial, "overrides": " ".join(args.overrides),
               "stage": stage.spec.name, "role": stage.role,
               "row_seed": " ".join(f"{r}/s{s}" for r, s in stage.cells), "epochs": res["epochs"],
               "train_images": res["train_images"], "last_val_top1": round(res["last_val_top1"], 2),
               "best_val_top1": round(res["best_val_top1"], 2), "last_epoch_gain": round(gain, 2),
               "val_curve": " ".join(f"{r['val_top1']:.1f}" for r in log),
               "train_s": round(read_result(plan.dir(sid))["wall_s"], 1),
               "git_commit": (git_commit() or "")[:10]}
        _append(record, row)
        print(f"[tune {args.trial}] {stage.spec.name}: val top-1 last {res['last_val_top1']:.2f} "
              f"best {res['best_val_top1']:.2f} (last-epoch gain {gain:+.2f}); curve "
              f"{row['val_curve']}", flush=True)
    return 0


def _append(record: Path, row: dict) -> None:
    """Each stage's row as soon as it is done: a stopped trial keeps its rows."""
    new = not record.exists()
    with open(record, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RECORD_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


if __name__ == "__main__":
    sys.exit(main())
