"""The report's figures (matplotlib, Agg canvas, no pyplot state): the claims as a forest plot (paired mean difference
with its 95% interval, the paper's difference and the claim's margin), test top-1 per row, the fine-tune validation
curves of every row on one axis, and training curves per row (pre-training loss and fine-tune validation top-1 per
epoch and seed, from each stage's log.jsonl).

No figure puts numbers of different datasets on two y-axes: the paper's ImageNet numbers appear only as differences
between rows, beside ours, in the forest plot.

A figure with nothing to plot is not written (and so not linked); make_figures removes its own stale PNGs first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .collect import Collected, val_curve
from .rundir import read_log

# top1_vs_mask.png: written by earlier versions (removed when figures are redrawn)
OUR_FIGURES = ("claims_forest.png", "top1_by_row.png", "val_curves.png", "curves-*.png", "top1_vs_mask.png")
METHOD_COLORS = {"mae": "tab:gray", "kd": "tab:orange", "dmae": "tab:blue", "scratch": "tab:brown"}


def _save(fig: Figure, path: Path, **margins) -> None:
    fig.subplots_adjust(**{"left": .1, "right": .9, "bottom": .13, "top": .9, **margins})  # fixed: cheaper than tight
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _fig_bars(c: Collected, summary: pd.DataFrame, path: Path) -> bool:
    if not (summary["n"] > 0).any():
        return False
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    xs = range(len(summary))
    colors = [METHOD_COLORS.get(m, "tab:green") for m in summary["method"]]
    ax.bar(xs, summary["mean"].fillna(0.0), yerr=summary["std"].fillna(0.0), color=colors, capsize=4)
    for x, vals in zip(xs, summary["seeds_top1"]):
        ax.scatter([x] * len(vals), vals, s=10, color="k", zorder=3)
    ax.set_xticks(list(xs), summary["row"], rotation=20, fontsize=8)
    for m, col in METHOD_COLORS.items():
        if m in set(summary["method"]):
            ax.bar([0], [0], color=col, label=f"method: {m}")
    ax.legend(fontsize=7)
    ax.set_ylabel(f"our test top-1 (%), profile {c.profile}")
    ax.set_title("Test top-1 per row (mean ± std over seeds; dots: seeds)")
    _save(fig, path, right=.97, bottom=.17)
    return True


def _fig_curves(c: Collected, title: str, pre: Dict[str, str], fin: Dict[str, str], path: Path) -> bool:
    """pre / fin: {legend label: stage id}; left panel pre-training loss, right panel fine-tune validation top-1."""
    logs = [{k: read_log(c.root / sid) for k, sid in d.items()} for d in (pre, fin)]
    if not any(any(v) for part in logs for v in part.values()):
        return False
    fig = Figure(figsize=(9, 3.4))
    for ax, part, key, ylabel in zip(fig.subplots(1, 2), logs, ("loss", "val_top1"),
                                     ("pre-training loss", "fine-tune validation top-1 (%)")):
        for label, recs in part.items():
            pts = val_curve(recs) if key == "val_top1" else [(r["epoch"], r[key]) for r in recs
                                                                if key in r and "epoch" in r]
            line, = ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", label=label)
            feat = [r for r in recs if r.get("loss_feat") is not None] if key == "loss" else []
            if feat:
                ax.plot([r["epoch"] for r in feat], [r["loss_feat"] for r in feat], ls="--", marker=".",
                        color=line.get_color(), label=f"{label} (feature part)")
        ax.set_xlabel("epoch")
        epochs = sorted({r["epoch"] for recs in part.values() for r in recs if "epoch" in r})
        if 0 < len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, left=.07, right=.98, bottom=.15, top=.86, wspace=.25)
    return True


def _fig_val_curves(c: Collected, path: Path) -> bool:
    """Every row's fine-tune validation top-1 per epoch (mean over the seeds that logged that epoch), one colour per
    row; the teacher's fine-tune dashed."""
    series = []
    for row, g in c.cells.groupby("row", sort=False):
        per_epoch: Dict[int, List[float]] = {}
        for sid in dict.fromkeys(g["finetune_id"]):
            for e, v in val_curve(read_log(c.root / sid)):
                per_epoch.setdefault(e, []).append(v)
        if per_epoch:
            eps = sorted(per_epoch)
            series.append((row, eps, [float(np.mean(per_epoch[e])) for e in eps],
                           max(len(v) for v in per_epoch.values())))
    teacher = c.stages.loc[c.stages["role"] == "teacher-finetune", "stage_id"].tolist()
    t_curves = [(sid, val_curve(read_log(c.root / sid))) for sid in teacher]
    t_curves = [(sid, pts) for sid, pts in t_curves if pts]
    if not series and not t_curves:
        return False
    fig = Figure(figsize=(7.2, 4.4))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(series))]
    for (row, eps, vals, n), col in zip(series, colors):
        ax.plot(eps, vals, marker="o", ms=3, color=col, label=f"{row} (≤{n} seed{'s' if n > 1 else ''})")
    for sid, pts in t_curves:
        ax.plot([e for e, _ in pts], [v for _, v in pts], ls="--", color="k", lw=1, label="teacher")
    epochs = sorted({e for s in series for e in s[1]} | {e for _, pts in t_curves for e, _ in pts})
    if 0 < len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("fine-tune epoch")
    ax.set_ylabel(f"validation top-1 (%), profile {c.profile}")
    ax.set_title("Fine-tune validation top-1 per row (mean over seeds)")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path, right=.97)
    return True


def _fig_forest(c: Collected, claims: Sequence[dict], path: Path) -> bool:
    """One line per claim: our paired mean difference a - b with its 95% interval (an open point without one: one
    paired seed), the paper's difference (a diamond, where both paper numbers exist) and the claim's margin
    (a vertical tick for `greater`, a shaded band (-margin, margin) for `within`)."""
    claims = [r for r in claims if r.get("mean") is not None or r.get("paper_value") is not None]
    if not claims:
        return False
    fig = Figure(figsize=(7.6, 1.2 + 0.42 * len(claims)))
    ax = fig.add_subplot()
    ys = np.arange(len(claims))[::-1]
    labels = []
    shown = set()

    def once(name):
        if name in shown:
            return None
        shown.add(name)
        return name

    for y, r in zip(ys, claims):
        labels.append(r["id"])
        m = r["margin"]
        if r["test"] == "within":
            ax.fill_betweenx([y - .38, y + .38], -m, m, color="tab:green", alpha=.15, lw=0,
                             label=once("margin band (within)"))
        else:
            ax.vlines(m, y - .38, y + .38, color="tab:green", lw=2, label=once("margin (greater: a − b > margin)"))
        if r.get("mean") is not None:
            if r.get("lo") is not None:
                ax.errorbar([r["mean"]], [y], xerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="o",
                            color="tab:blue", capsize=3, label=once("ours: paired mean, 95% CI"))
            else:
                ax.plot([r["mean"]], [y], "o", mfc="none", color="tab:blue", label=once("ours: n < 2, no interval"))
        if r.get("paper_value") is not None:
            ax.plot([r["paper_value"]], [y], "D", color="tab:red", ms=5, label=once("paper (ImageNet-1K)"))
    ax.axvline(0, color="0.6", lw=.8, ls=":")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_ylim(-.7, len(claims) - .3)
    ax.set_xlabel(f"a − b, top-1 points (ours: profile {c.profile}; paper: ImageNet-1K)")
    ax.set_title("Claims: paired differences against their margins")
    ax.legend(fontsize=7, loc="best")
    _save(fig, path, left=.3, right=.97, bottom=max(.08, .55 / (1.2 + .42 * len(claims))), top=.92)
    return True


def make_figures(c: Collected, summary: pd.DataFrame, fig_dir: Path,
                 claims: Optional[Sequence[dict]] = None) -> List[tuple]:
    """Write the PNGs; returns [(caption, file name)] of those written. `claims`: the report's judged claims
    (harness.stats.judge results with paper_value)."""
    for pattern in OUR_FIGURES:
        for old in fig_dir.glob(pattern):
            old.unlink()
    out = []
    if _fig_forest(c, claims or [], fig_dir / "claims_forest.png"):
        out.append(("Claims: our paired mean difference with its 95% interval, the paper's difference and the "
                    "claim's margin", "claims_forest.png"))
    if _fig_bars(c, summary, fig_dir / "top1_by_row.png"):
        out.append(("Test top-1 per row, coloured by method", "top1_by_row.png"))
    if _fig_val_curves(c, fig_dir / "val_curves.png"):
        out.append(("Fine-tune validation top-1 per epoch, every row (mean over seeds)", "val_curves.png"))
    st = c.stages
    teacher = {r: st.loc[st["role"] == f"teacher-{r}", "stage_id"].tolist() for r in ("pretrain", "finetune")}
    if _fig_curves(c, "teacher", {"teacher": s for s in teacher["pretrain"]},
                   {"teacher": s for s in teacher["finetune"]}, fig_dir / "curves-teacher.png"):
        out.append(("Training curves: teacher", "curves-teacher.png"))
    for row, g in c.cells.groupby("row", sort=False):
        name = f"curves-{row}.png"
        seeds = "s" + g["seed"].astype(str)
        pre = {k: v for k, v in zip(seeds, g["pretrain_id"]) if isinstance(v, str)}  # none for a scratch row
        if _fig_curves(c, f"{row}: {g['label'].iloc[0]}", pre, dict(zip(seeds, g["finetune_id"])), fig_dir / name):
            out.append((f"Training curves: {row}", name))
    return out
