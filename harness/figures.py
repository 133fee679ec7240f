"""The report's figures (matplotlib, Agg canvas, no pyplot state): top-1 against masking ratio, top-1 per row, and
training curves per row (pre-training loss and fine-tune top-1 per epoch, from each stage's log.jsonl).

A figure with nothing to plot is not written (and so not linked); make_figures removes its own stale PNGs first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .collect import Collected, read_log

OUR_FIGURES = ("top1_vs_mask.png", "top1_by_row.png", "curves-*.png")
METHOD_COLORS = {"mae": "tab:gray", "kd": "tab:orange", "dmae": "tab:blue"}


def _save(fig: Figure, path: Path, **margins) -> None:
    fig.subplots_adjust(**{"left": .1, "right": .9, "bottom": .13, "top": .9, **margins})  # fixed: cheaper than tight
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _fig_mask(c: Collected, summary: pd.DataFrame, path: Path) -> bool:
    done = summary[summary["n"] > 0]
    dm = done[done["method"] == "dmae"].sort_values("mask_ratio")
    if dm.empty:
        return False
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.errorbar(dm["mask_ratio"] * 100, dm["mean"], yerr=dm["std"].fillna(0.0), marker="o", capsize=4,
                color="tab:blue", label="ours: DMAE (mean ± std over seeds)")
    for _, r in dm.iterrows():
        ax.scatter([r["mask_ratio"] * 100] * len(r["seeds_top1"]), r["seeds_top1"], s=10, color="tab:blue", alpha=.4)
    for _, r in done[done["method"] != "dmae"].iterrows():
        ax.axhline(r["mean"], ls="--", lw=1, color=METHOD_COLORS.get(r["method"], "k"), label=f"ours: {r['row']}")
    ax.set_xlabel("pre-training masking ratio (%)")
    ax.set_ylabel(f"our top-1 (%), profile {c.profile}")
    pp = summary[summary["paper_value"].notna()]
    if not pp.empty:
        pax = ax if c.profile == "paper" else ax.twinx()
        pd_ = pp[pp["method"] == "dmae"].sort_values("mask_ratio")
        what = "paper (ImageNet-1K)" + ("" if pax is ax else ", right axis")
        pax.plot(pd_["mask_ratio"] * 100, pd_["paper_value"], "s:", color="tab:red", label=f"{what}: DMAE")
        for _, r in pp[pp["method"] != "dmae"].iterrows():
            pax.axhline(r["paper_value"], ls=":", lw=1, color="tab:red", label=f"{what}: {r['row']}")
        if pax is not ax:
            pax.set_ylabel("paper top-1 (%), ImageNet-1K", color="tab:red")
    fig.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 0), bbox_transform=ax.transAxes)
    ax.set_title("Top-1 against masking ratio")
    _save(fig, path)
    return True


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
    ax.set_ylabel(f"our top-1 (%), profile {c.profile}")
    ax.set_title("Top-1 per row (mean ± std over seeds; dots: seeds)")
    _save(fig, path, right=.97, bottom=.17)
    return True


def _fig_curves(c: Collected, title: str, pre: Dict[str, str], fin: Dict[str, str], path: Path) -> bool:
    """pre / fin: {legend label: stage id}; left panel pre-training loss, right panel fine-tune top-1."""
    logs = [{k: read_log(c.root / sid / "log.jsonl") for k, sid in d.items()} for d in (pre, fin)]
    if not any(any(v) for part in logs for v in part.values()):
        return False
    fig = Figure(figsize=(9, 3.4))
    for ax, part, key, ylabel in zip(fig.subplots(1, 2), logs, ("loss", "top1"),
                                     ("pre-training loss", "fine-tune top-1 (%)")):
        for label, recs in part.items():
            recs = [r for r in recs if key in r]
            line, = ax.plot([r["epoch"] for r in recs], [r[key] for r in recs], marker="o", label=label)
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


def make_figures(c: Collected, summary: pd.DataFrame, fig_dir: Path) -> List[tuple]:
    """Write the PNGs; returns [(caption, file name)] of those written."""
    for pattern in OUR_FIGURES:
        for old in fig_dir.glob(pattern):
            old.unlink()
    out = []
    if _fig_mask(c, summary, fig_dir / OUR_FIGURES[0]):
        out.append(("Top-1 against masking ratio (DMAE rows; baselines as lines)", OUR_FIGURES[0]))
    if _fig_bars(c, summary, fig_dir / OUR_FIGURES[1]):
        out.append(("Top-1 per row, coloured by method", OUR_FIGURES[1]))
    st = c.stages
    teacher = {r: st.loc[st["role"] == f"teacher-{r}", "stage_id"].tolist() for r in ("pretrain", "finetune")}
    if _fig_curves(c, "teacher", {"teacher": s for s in teacher["pretrain"]},
                   {"teacher": s for s in teacher["finetune"]}, fig_dir / "curves-teacher.png"):
        out.append(("Training curves: teacher", "curves-teacher.png"))
    for row, g in c.cells.groupby("row", sort=False):
        name = f"curves-{row}.png"
        if _fig_curves(c, f"{row}: {g['label'].iloc[0]}", dict(zip("s" + g["seed"].astype(str), g["pretrain_id"])),
                       dict(zip("s" + g["seed"].astype(str), g["finetune_id"])), fig_dir / name):
            out.append((f"Training curves: {row}", name))
    return out
