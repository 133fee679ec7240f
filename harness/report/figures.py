"""The report's figures (matplotlib, Agg canvas, no pyplot state): the claims as a forest plot (paired mean difference
with its 95% interval, the paper's difference and the claim's margin), test top-1 per row as dots and intervals on a
zoomed axis (the row's expected value and the teacher marked), top-1 against the setting the rows vary
(harness.report.ablation: a mask ratio, the pre-training epochs, alpha), the fine-tune validation curves of every row
on one
axis, and training curves per row (pre-training pixel loss, the feature (distillation) loss on its own axes, and
fine-tune validation top-1 per epoch and seed).

Every figure is drawn from a Collected (its `log` per stage: the epochs.csv a report keeps), so a report's figures
come back from its committed data without the results tree. No figure puts numbers of different datasets on one
axis: the paper's ImageNet numbers appear only as differences between rows, beside ours, in the forest plot.

A figure with nothing to plot is not written (and so not linked); make_figures removes its own stale PNGs first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.report.ablation import Axis, ablation_axes, row_settings
from harness.report.collect import Collected, summarize
from harness.report.stage_records import val_curve
from harness.report.stats import paired

# top1_vs_*.png: the ablation axes (top1_vs_mask.png: written by earlier versions; removed when figures are redrawn)
OUR_FIGURES = ("claims_forest.png", "top1_by_row.png", "val_curves.png", "curves-*.png", "top1_vs_*.png")
METHOD_COLORS = {"mae": "tab:gray", "kd": "tab:orange", "dmae": "tab:blue", "scratch": "tab:brown"}
OTHER_COLOR = "tab:green"


def _save(fig: Figure, path: Path, **margins) -> None:
    fig.subplots_adjust(**{"left": .1, "right": .9, "bottom": .13, "top": .9, **margins})  # fixed: cheaper than tight
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _zoom(ax, values: Sequence[float]) -> None:
    """y-limits around the values (not from 0: the differences the claims are about are a few points of ~70)."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    pad = max(0.5, 0.08 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)


def _interval(values: Sequence[float]):
    """(mean, lo, hi) of the values: the mean's 95% t-interval over seeds (harness.report.stats.paired); lo/hi None for
    n < 2."""
    p = paired(values)
    return p.mean, p.lo, p.hi


def _jitter(n: int) -> np.ndarray:
    return np.linspace(-0.12, 0.12, n) if n > 1 else np.zeros(n)


def top1_figure(summary: pd.DataFrame, profile: str, teacher: Optional[float] = None,
                expected: Optional[Mapping[str, float]] = None) -> Optional[Figure]:
    """Per row: its seeds (small dots), their mean and the mean's 95% t-interval (a larger dot coloured by method,
    an open one for a single seed), the row's expected mean (a red bar beside it, where the report checks one) and the
    teacher's test top-1 (a dashed line), on a y-axis zoomed to them. None when no row has a finished seed."""
    if not len(summary) or not (summary["n"] > 0).any():
        return None
    expected = expected or {}
    fig = Figure(figsize=(7.2, 4.4))
    ax = fig.add_subplot()
    shown, seen, ticks = [], set(), []

    def once(label):
        if label in seen:
            return None
        seen.add(label)
        return label

    for x, r in enumerate(summary.to_dict("records")):
        vals = [float(v) for v in r["seeds_top1"]]
        ticks.append(f"{r['row']}\nn={len(vals)}")
        color = METHOD_COLORS.get(r["method"], OTHER_COLOR)
        if vals:
            ax.scatter(x + _jitter(len(vals)), vals, s=10, color="0.35", zorder=3, label=once("seeds"))
            mean, lo, hi = _interval(vals)
            if lo is not None:
                ax.errorbar([x + 0.25], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", ms=7, color=color,
                            capsize=4, lw=1.6, zorder=4, label=once(f"method {r['method']}: mean, 95% t-interval"))
                shown += [lo, hi]
            else:
                ax.plot([x + 0.25], [mean], "o", ms=7, mfc="none", color=color, zorder=4,
                        label=once(f"method {r['method']}: one seed, no interval"))
            shown += vals
        exp = expected.get(r["row"])
        if exp is not None and np.isfinite(exp):
            ax.hlines(exp, x + 0.34, x + 0.48, color="tab:red", lw=2.2, zorder=5,
                      label=once("expected mean (recipes/expected)"))
            shown.append(exp)
    if teacher is not None and np.isfinite(teacher):
        ax.axhline(teacher, ls="--", color="k", lw=1, label=f"teacher (fine-tuned) test top-1 {teacher:.2f}")
        shown.append(teacher)
    _zoom(ax, shown)
    ax.set_xticks(list(range(len(summary))), ticks, rotation=20, fontsize=7)
    ax.set_xlim(-0.6, len(summary) - 0.4)
    ax.grid(axis="y", color="0.9", lw=.6)
    ax.set_ylabel(f"test top-1 (%), profile {profile}; axis zoomed")
    ax.set_title("Test top-1 per row: seeds, mean and its 95% t-interval", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=.1, right=.97, bottom=.2, top=.92)
    return fig


def ablation_figure(axis: Axis, top1: Mapping[str, Sequence[float]], profile: str) -> Optional[Figure]:
    """Test top-1 against the setting an axis varies: per series, its rows' mean and 95% t-interval over seeds
    (joined by a line), seeds as small dots, each point named by its row. None when no point has a finished seed."""
    if not any(top1.get(r) for r in axis.rows):
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    shown, xs_all = [], []
    span = max(x for s in axis.series for _, x in s.points) - min(x for s in axis.series for _, x in s.points)
    dx = 0.01 * (span or 1.0)
    for k, s in enumerate(axis.series):
        color = f"C{k % 10}"
        line = []
        for row, x in s.points:
            vals = [float(v) for v in top1.get(row, [])]
            xs_all.append(x)
            if not vals:
                continue
            ax.scatter(np.full(len(vals), x - 1.5 * dx) + dx * _jitter(len(vals)) * 4, vals, s=9, color="0.45",
                       zorder=3)  # just left of the interval
            mean, lo, hi = _interval(vals)
            if lo is not None:
                ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", ms=6, color=color, capsize=4,
                            zorder=4)
                shown += [lo, hi]
            else:
                ax.plot([x], [mean], "o", ms=6, mfc="none", color=color, zorder=4)
            ax.annotate(row, (x, mean), textcoords="offset points", xytext=(6, 4), fontsize=7, color=color)
            line.append((x, mean))
            shown += vals
        if line:
            ax.plot([p[0] for p in line], [p[1] for p in line], "-", lw=1, color=color,
                    label=f"{s.name}: mean, 95% t-interval")
    _zoom(ax, shown)
    ticks = sorted(set(xs_all))
    pad = 0.06 * (span or 1.0)
    ax.set_xlim(ticks[0] - pad, ticks[-1] + 2.5 * pad)  # room on the right for the last point's name
    if len(ticks) <= 12:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.grid(color="0.9", lw=.6)
    ax.set_xlabel(axis.label)
    ax.set_ylabel(f"test top-1 (%), profile {profile}; axis zoomed")
    ax.set_title(f"Test top-1 against {axis.label.split(' (')[0]} (seeds: grey dots)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=.12, right=.97, bottom=.13, top=.9)
    return fig


def _fig_curves(c: Collected, title: str, pre: Dict[str, str], fin: Dict[str, str], path: Path) -> bool:
    """pre / fin: {legend label: stage id}. Panels: the pre-training pixel loss (the total loss where the log has
    no pixel part), the feature (distillation) loss on its own axes where any pre-training logged one, and the
    fine-tune validation top-1."""
    logs = [{k: c.log(sid) for k, sid in d.items()} for d in (pre, fin)]
    if not any(any(v) for part in logs for v in part.values()):
        return False
    feat = any(r.get("loss_feat") is not None for recs in logs[0].values() for r in recs)
    pix = any(r.get("loss_pix") is not None for recs in logs[0].values() for r in recs)
    panels = [(logs[0], "loss_pix" if pix else "loss",
               "pre-training pixel loss" if pix else "pre-training loss")]
    if feat:
        panels.append((logs[0], "loss_feat", "pre-training feature (distillation) loss"))
    panels.append((logs[1], "val_top1", "fine-tune validation top-1 (%)"))
    fig = Figure(figsize=(4.5 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    for ax, (part, key, ylabel) in zip(axes, panels):
        for label, recs in part.items():
            pts = val_curve(recs) if key == "val_top1" else [(r["epoch"], r[key]) for r in recs
                                                                if r.get(key) is not None and "epoch" in r]
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
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
    _save(fig, path, left=.06 if len(panels) == 3 else .07, right=.98, bottom=.15, top=.86, wspace=.3)
    return True


def _fig_val_curves(c: Collected, path: Path) -> bool:
    """Every row's fine-tune validation top-1 per epoch (mean over the seeds that logged that epoch), one colour per
    row; the teacher's fine-tune dashed."""
    series = []
    for row, g in c.cells.groupby("row", sort=False):
        per_epoch: Dict[int, List[float]] = {}
        for sid in dict.fromkeys(g["finetune_id"]):
            for e, v in val_curve(c.log(sid)):
                per_epoch.setdefault(e, []).append(v)
        if per_epoch:
            eps = sorted(per_epoch)
            series.append((row, eps, [float(np.mean(per_epoch[e])) for e in eps],
                           max(len(v) for v in per_epoch.values())))
    teacher = c.stages.loc[c.stages["role"] == "teacher-finetune", "stage_id"].tolist()
    t_curves = [(sid, val_curve(c.log(sid))) for sid in teacher]
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


def make_figures(c: Collected, summary: pd.DataFrame, fig_dir: Path, claims: Optional[Sequence[dict]] = None,
                 expected: Optional[Mapping[str, float]] = None, teacher: Optional[float] = None) -> List[tuple]:
    """Write the PNGs; returns [(caption, file name)] of those written. `claims`: the report's judged claims
    (harness.report.stats.judge results with paper_value); `expected`: {row: expected mean} where the report checks
    expected
    values; `teacher`: the fine-tuned teacher's test top-1."""
    for pattern in OUR_FIGURES:
        for old in fig_dir.glob(pattern):
            old.unlink()
    out = []
    if _fig_forest(c, claims or [], fig_dir / "claims_forest.png"):
        out.append(("Claims: our paired mean difference with its 95% interval, the paper's difference and the "
                    "claim's margin", "claims_forest.png"))
    fig = top1_figure(summary, c.profile, teacher, expected)
    if fig is not None:
        _save_drawn(fig, fig_dir / "top1_by_row.png")
        out.append(("Test top-1 per row: seeds, mean and its 95% t-interval on a zoomed axis"
                    + (", the expected value" if expected else "") + (", the teacher" if teacher is not None else ""),
                    "top1_by_row.png"))
    for axis, name in ablation_files(c):
        fig = ablation_figure(axis, dict(zip(summary["row"], summary["seeds_top1"])), c.profile)
        if fig is not None:
            _save_drawn(fig, fig_dir / name)
            out.append((f"Test top-1 against {axis.label} (rows {', '.join(axis.rows)})", name))
    if _fig_val_curves(c, fig_dir / "val_curves.png"):
        out.append(("Fine-tune validation top-1 per epoch, every row (mean over seeds)", "val_curves.png"))
    st = c.stages
    teacher_ids = {r: st.loc[st["role"] == f"teacher-{r}", "stage_id"].tolist() for r in ("pretrain", "finetune")}
    if _fig_curves(c, "teacher", {"teacher": s for s in teacher_ids["pretrain"]},
                   {"teacher": s for s in teacher_ids["finetune"]}, fig_dir / "curves-teacher.png"):
        out.append(("Training curves: teacher", "curves-teacher.png"))
    for row, g in c.cells.groupby("row", sort=False):
        name = f"curves-{row}.png"
        seeds = "s" + g["seed"].astype(str)
        pre = {k: v for k, v in zip(seeds, g["pretrain_id"]) if isinstance(v, str)}  # none for a scratch row
        if _fig_curves(c, f"{row}: {g['label'].iloc[0]}", pre, dict(zip(seeds, g["finetune_id"])), fig_dir / name):
            out.append((f"Training curves: {row}", name))
    return out


def _save_drawn(fig: Figure, path: Path) -> None:
    """A figure that set its own margins."""
    fig.savefig(path, dpi=100, metadata={"Software": None})


def ablation_files(c: Collected) -> List[tuple]:
    """[(axis, PNG name)] of the table's ablation axes (harness.report.ablation, from the rows' resolved specs)."""
    methods = dict(zip(c.cells["row"], c.cells["method"])) if len(c.cells) else {}
    return _named(ablation_axes(row_settings(c.specs), methods))


def _named(axes: Sequence[Axis]) -> List[tuple]:
    out, used = [], set()
    for axis in axes:
        name = f"top1_vs_{axis.slug}.png"
        i = 1
        while name in used:
            i += 1
            name = f"top1_vs_{axis.slug}-{i}.png"
        used.add(name)
        out.append((axis, name))
    return out


def sweep_axes(points: Sequence[tuple]) -> tuple:
    """(axes, {row: seeds' top-1}, profiles) of a sweep. points: [(point name, Collected)], one per point. Each
    (row, point) is a row of its own, `<row> @ <point>`, with the row's resolved specs at that point;
    harness.report.ablation finds the setting they vary (the swept one, where it reaches the stage specs; a row the
    sweep
    does not touch is the same computation at every point and counts once) and names each series by its table
    row."""
    specs, methods, names, top1, profiles = {}, {}, {}, {}, []
    for point, c in points:
        profiles += [c.profile] if c.profile not in profiles else []
        by = {r["row"]: r for r in summarize(c).to_dict("records")}
        for row, spec in c.specs.items():
            key = f"{row} @ {point}"
            specs[key], names[key] = spec, row
            methods[key] = by.get(row, {}).get("method")
            top1[key] = list(by.get(row, {}).get("seeds_top1", []))
    return ablation_axes(row_settings(specs), methods, names), top1, profiles


def sweep_figures(points: Sequence[tuple], fig_dir: Path) -> List[tuple]:
    """A sweep's combined figures (harness/run/sweep.py's report): top-1 against the swept setting (sweep_axes),
    written as top1_vs_<setting>.png into fig_dir (earlier ones removed); returns [(caption, file name)]."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("top1_vs_*.png"):
        old.unlink()
    axes, top1, profiles = sweep_axes(points)
    out = []
    for axis, name in _named(axes):
        fig = ablation_figure(axis, top1, ", ".join(profiles))
        if fig is not None:
            _save_drawn(fig, fig_dir / name)
            out.append((f"Test top-1 against {axis.label}, every table row the sweep moves", name))
    return out
