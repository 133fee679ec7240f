"""The Markdown report of a table: results against the paper, the paper's claims checked, plots, cost, provenance.

    python -m harness.report table2 [--profile tiny] [--results-root results] [--reports-dir reports]

writes <reports-dir>/<table>.md, its figures and CSVs in <reports-dir>/<table>/ (linked relatively). `reproduce`
calls write_report(results/<table>/<profile>, reports_dir) when a run ends. Given the results tree the report is
deterministic except for its "generated" line.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from .collect import (NOT_AVAILABLE, NOT_IMAGENET, Collected, collect, export, load_paper_numbers, row_costs,
                      summarize)
from .figures import make_figures

NOISE_SE = 2.0  # a verdict whose mean difference is nearer than this many standard errors to its threshold is noisy
PACKAGES = ("torch", "timm", "submitit", "pandas", "hydra-core", "matplotlib", "numpy")


@dataclass(frozen=True)
class Claim:
    text: str
    a: str  # the claim is about mean(a) - mean(b), in top-1 points
    b: str
    threshold: float
    strict: bool  # holds iff diff > threshold (strict) or diff >= threshold

    @property
    def rule(self) -> str:
        return f"mean({self.a}) − mean({self.b}) {'>' if self.strict else '≥'} {self.threshold:+.1f} pp"


CLAIMS = (
    Claim("DMAE (75% masking) beats the MAE baseline", "dmae_75", "mae", 0.0, True),
    Claim("DMAE beats KD from the fine-tuned teacher", "dmae_75", "kd_finetuned_teacher", 0.0, True),
    Claim("DMAE at 95% masking stays within 1.0 pp of 75%", "dmae_95", "dmae_75", -1.0, False),
    # graceful: at most 3.0 pp below 75%, about twice the drop the paper reports at 98%
    Claim("DMAE at 98% masking degrades gracefully (at most 3.0 pp below 75%)", "dmae_98", "dmae_75", -3.0, False),
    # the `teacher` recipe: the paper's central claim that pre-trained teachers distil better
    Claim("DMAE from the pre-trained teacher beats DMAE from the fine-tuned teacher", "dmae_pretrained_teacher",
          "dmae_finetuned_teacher", 0.0, True),
    Claim("DMAE from the pre-trained teacher beats KD from the fine-tuned teacher", "dmae_pretrained_teacher",
          "kd_finetuned_teacher", 0.0, True),
)


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, nd: int = 2) -> str:
    return "—" if missing(x) else f"{x:.{nd}f}"


def md_table(headers: List[str], rows: List[list]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows])


def reproduced(r: dict) -> str:
    if not r["n"]:
        return "no finished cell (n=0)"
    return f"{fmt(r['mean'])} ± {fmt(r['std'])} (n={r['n']})" if r["n"] >= 2 else f"{fmt(r['mean'])} (n=1)"


def check_claims(summary: pd.DataFrame) -> List[dict]:
    """Each claim: verdict (holds / does not hold / not enough data / not applicable) and the numbers behind it."""
    by = {r["row"]: r for r in summary.to_dict("records")}
    out = []
    for cl in CLAIMS:
        if cl.a not in by:
            continue  # a claim about another table's rows (its subject row is not in this table)
        res = {"claim": cl, "ours": "", "paper": NOT_AVAILABLE, "noise": "", "diff": None}
        out.append(res)
        absent = [k for k in (cl.a, cl.b) if k not in by]
        if absent:
            res.update(verdict="not applicable", ours=f"this table has no row {', '.join(absent)}")
            continue
        a, b = by[cl.a], by[cl.b]
        if not missing(a["paper_value"]) and not missing(b["paper_value"]):
            res["paper"] = f"{a['paper_text']} − {b['paper_text']} = {round(a['paper_value'] - b['paper_value'], 3):+g}"
        else:
            res["paper"] = f"{NOT_AVAILABLE} (no paper number for " + ", ".join(
                f"`{r['row']}`" for r in (a, b) if missing(r["paper_value"])) + ")"
        empty = [r["row"] for r in (a, b) if not r["n"]]
        if empty:
            res.update(verdict="not enough data", ours=f"no finished cell in {', '.join(empty)}")
            continue
        diff = a["mean"] - b["mean"]
        holds = diff > cl.threshold if cl.strict else diff >= cl.threshold
        res.update(verdict="holds" if holds else "does not hold", diff=diff,
                   ours=f"{fmt(a['mean'])} (n={a['n']}) − {fmt(b['mean'])} (n={b['n']}) = {diff:+.2f} pp")
        if a["n"] >= 2 and b["n"] >= 2:
            sp = math.sqrt(((a["n"] - 1) * a["std"] ** 2 + (b["n"] - 1) * b["std"] ** 2) / (a["n"] + b["n"] - 2))
            se = sp * math.sqrt(1 / a["n"] + 1 / b["n"])
            dist = abs(diff - cl.threshold) / se if se > 0 else math.inf
            res["noise"] = (f"SE of the difference {se:.2f} pp; it lies {dist:.1f} SE from the threshold: "
                            + ("clear of seed noise" if dist >= NOISE_SE else "within seed noise"))
        else:
            res["noise"] = "n < 2 in a compared row: no estimate of seed noise"
    return out


# ---------------------------------------------------------------------------------------------------- sections
def _banner(c: Collected) -> List[str]:
    m = c.manifest
    lines = [f"> **Profile: `{c.profile}`.** {m.get('profile_note', '')}", ">"]
    if c.profile == "paper":
        lines.append("> Δ = ours − paper, in ImageNet-1K top-1 points.")
    else:
        lines.append(f"> **These are not ImageNet numbers** and must not be compared with the paper's. Δ against the "
                     f"paper is therefore shown as \"{NOT_IMAGENET}\", not as a subtraction; the paper's "
                     "numbers are listed for reference only. Only comparisons between rows of this run (the claims "
                     "below) are meaningful, and only as far as the profile allows.")
    return lines


def _results(summary: pd.DataFrame, c: Collected) -> List[str]:
    sources: List[str] = []
    rows = []
    for r in summary.to_dict("records"):
        paper = r["paper_text"]
        if isinstance(r["paper_source"], str):
            if r["paper_source"] not in sources:
                sources.append(r["paper_source"])
            paper = f"{paper} [{sources.index(r['paper_source']) + 1}]"
        rows.append([f"`{r['row']}` {r['label']}", paper, reproduced(r), r["delta_text"], r["status"]])
    out = [md_table(["row", "paper", "reproduced (mean ± std, n)", "Δ", "status"], rows), ""]
    out += ["Paper sources (recipes/paper-numbers.csv):"] + [f"[{i}] {s}  " for i, s in enumerate(sources, 1)] + [""]
    out += ["Per seed (top-1 of the evaluation stage; fine-tune best/last from its log):", ""]
    out.append(md_table(["row", "seed", "top-1", "fine-tune best (epoch)", "fine-tune last", "top-5", "status"], [
        [r["row"], r["seed"], fmt(r["top1"]), f"{fmt(r['top1_best'])} ({fmt(r['top1_best_epoch'], 0)})",
         fmt(r["top1_last"]), fmt(r["top5"]), r["status"] + (f": {r['reason'][:160]}" if r["reason"] else "")]
        for r in c.cells.to_dict("records")]))
    return out


def _claims(summary: pd.DataFrame) -> List[str]:
    res = check_claims(summary)
    out = [md_table(["claim", "verdict", "ours", "paper"],
                    [[r["claim"].text, f"**{r['verdict']}**", r["ours"], r["paper"]] for r in res]), ""]
    out += ["Rules. Each verdict compares means of the evaluation top-1 over the finished seeds of a row; a row "
            "without a finished cell gives \"not enough data\", a table without the row \"not applicable\". Margins "
            "are top-1 points of the profile's own dataset; \"gracefully\" at 98% means at most 3.0 pp below 75%, "
            "about twice the paper's drop. When both rows have n ≥ 2 the note gives the standard error of the "
            "difference, SE = s_p·√(1/n_a + 1/n_b) with s_p the pooled seed std; a difference nearer than "
            f"{NOISE_SE:g} SE to the threshold is marked \"within seed noise\": the verdict still follows the means "
            "but is not evidence either way.", ""]
    for i, r in enumerate(res, 1):
        out += [f"{i}. **{r['claim'].text}: {r['verdict']}**. Rule: {r['claim'].rule}. Ours: {r['ours']}. "
                f"Paper: {r['paper']}." + (f" Seed noise: {r['noise']}." if r["noise"] else "")]
    return out


def _cost(c: Collected, summary: pd.DataFrame, papers: Dict[str, dict]) -> List[str]:
    costs, st = row_costs(c), c.stages
    out = ["A row's cost is its pre-train + fine-tune + evaluate stages per seed (mean over finished seeds); device-"
           "hours = wall time × world size. Teacher stages, shared by every row, are listed separately.", "",
           md_table(["row", "finished seeds", "wall per seed (s)", "device-h per seed", "device-h all seeds", "note"],
                    [[r["row"], r["finished"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4),
                      fmt(r["device_hours_total"], 4), r["note"]] for r in costs.to_dict("records")]), ""]
    teach = st[st["role"].str.startswith("teacher")]
    out += [md_table(["teacher stage", "status", "wall (s)", "device-h"],
                     [[f"`{r['stage_id']}`", r["status"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4)]
                      for r in teach.to_dict("records")]) if len(teach) else "No teacher stages (checkpoints given).",
            "", "**DMAE against the KD baseline** (device-hours per seed, teacher stages excluded on both sides):", ""]
    per = costs.set_index("row")["device_hours"]
    kd = per.get("kd_finetuned_teacher")
    for row in summary.loc[summary["method"] == "dmae", "row"]:
        ours = per.get(row)
        out.append(f"- `{row}`: " + (f"{fmt(ours, 4)} vs {fmt(kd, 4)} → {100 * (ours - kd) / kd:+.1f}% against KD"
                                     if not (missing(ours) or missing(kd) or kd == 0) else "not enough data"))
    cost = [p for p in papers.values() if p["table"] == "training_cost_ICLR_version"]
    out += [""] + [f"- paper ({p['masking_ratio']} masking): {p['metric']} = {p['text']} — {p['source']}" for p in cost]
    out += ["", "On CPU profiles wall time is dominated by start-up and data loading, so these ratios say little about "
            "the paper's 8-GPU ImageNet claim; DMAE's pre-training also pays the teacher's forward pass."]
    return out


def _stages(c: Collected, rel) -> List[str]:
    rows = []
    for r in c.stages.to_dict("records"):
        sid = f"`{r['stage_id']}`"
        if Path(r["config_path"]).exists():
            sid = f"[{sid}]({rel(r['config_path'])})"
        rows.append([sid, r["role"], r["status"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4),
                     fmt(r["images_per_s"], 0), r["device_name"] if isinstance(r["device_name"], str) else "—",
                     (r["reason"] or "")[:200]])
    return [md_table(["stage (→ config.json)", "role", "status", "wall (s)", "device-h", "images/s", "device",
                      "reason"], rows)]


def _provenance(c: Collected, rel) -> List[str]:
    m, cfg, st = c.manifest, c.manifest.get("config", {}), c.stages
    commits = st["git_commit"].dropna().value_counts().sort_index()
    key = {"profile": cfg.get("profile"), "data": cfg.get("data"), "teacher": {k: v for k, v in cfg.get(
        "teacher", {}).items() if k in ("model", "train", "pretrained_ckpt", "finetuned_ckpt")},
           "student": cfg.get("student"), "pretrain": cfg.get("pretrain"), "distill": cfg.get("distill"),
           "finetune": cfg.get("finetune"), "kd": cfg.get("kd"), "seed": cfg.get("seed"), "seeds": cfg.get("seeds"),
           "launcher": (cfg.get("launcher") or {}).get("name"), "run": cfg.get("run")}
    hw = st[st["status"] == "done"].fillna({"device_name": "?", "host": "?"}).groupby(
        ["device", "device_name", "world_size", "host"], dropna=False)["device_hours"].agg(["count", "sum"])
    versions = []
    for p in PACKAGES:
        try:
            versions.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{p} (not installed)")
    fin = st["finished_at"].dropna()
    out = [f"- Command: `{m.get('command') or '(not recorded: run from Python)'}`",
           f"- Overrides: `{' '.join(m.get('overrides', [])) or '(none)'}`",
           f"- Git commit at launch: `{m.get('git_commit')}`; in stage results: "
           + (", ".join(f"`{k}` ({v} stages)" for k, v in commits.items()) or "none"),
           f"- Resolved config: [config.yaml]({rel(c.root / 'config.yaml')}), "
           f"[manifest.json]({rel(c.root / 'manifest.json')}); per-stage config.json linked in the stages table. "
           "results/ is not committed, so the key values are embedded here:", "", "```"]
    out += [f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in key.items()] + ["```", ""]
    out.append("- Hardware (finished stages): " + ("; ".join(
        f"{d} {n} ×{int(w) if w == w else '?'} on {h}: {int(r['count'])} stages, {r['sum']:.4f} device-h"
        for (d, n, w, h), r in hw.iterrows()) or "none"))
    out.append("- Runs used torch " + ", ".join(sorted(st["torch"].dropna().unique())) + ", python "
               + ", ".join(sorted(st["python"].dropna().unique())))
    out.append("- Packages where this report was written: " + ", ".join(versions))
    out.append(f"- Stages finished between {fin.min() if len(fin) else '—'} and {fin.max() if len(fin) else '—'}")
    out.append(f"- Report generated: {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return out


DEFAULT_PROFILE = "tiny"  # the embedded default's reports are <table>.md; other profiles' <table>.<profile>.md


def report_name(table: str, profile: str) -> str:
    return table if profile == DEFAULT_PROFILE else f"{table}.{profile}"


def write_index(reports_dir: Path) -> Path:
    """reports/README.md: one line per report, with its title."""
    lines = ["# Reports", "", "Generated by `python -m harness.reproduce <table>` (or `python -m harness.report "
             "<table>`) from real runs. `<table>.md` comes from the embedded default (tiny profile: Fashion-MNIST "
             "on CPU, not ImageNet numbers); `<table>.<profile>.md` from other profiles.", ""]
    for md in sorted(reports_dir.glob("*.md")):
        if md.name != "README.md":
            title = md.read_text().split("\n", 1)[0].lstrip("# ").strip()
            lines.append(f"- [{md.stem}]({md.name}): {title}")
    out = reports_dir / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def write_report(root: Path, reports_dir: str | Path, figures: bool = True) -> Path:
    """results/<table>/<profile> -> <reports_dir>/<name>.md (+ figures and CSVs in <reports_dir>/<name>/), where
    name = report_name(table, profile). figures=False skips drawing (the slow part), for tests of the text."""
    c = collect(Path(root))
    papers = load_paper_numbers()
    summary = summarize(c, papers)
    reports_dir = Path(reports_dir)
    name = report_name(c.table, c.profile)
    fig_dir = reports_dir / name
    fig_dir.mkdir(parents=True, exist_ok=True)
    drawn = make_figures(c, summary, fig_dir) if figures else []
    data = export(c, fig_dir, summary)
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), reports_dir.resolve())).as_posix()  # noqa: E731
    warn = [f"- {w}" for w in c.warnings] or ["None."]
    parts = [[f"# {c.table}: {c.manifest.get('title', '')}", ""], _banner(c),
             ["", "Statuses: done · failed (reason from error.json) · partial (running or interrupted) · unreadable "
              "(result file could not be read; skipped) · not started.", "", "## Warnings", ""], warn,
             ["", "## Results", ""], _results(summary, c), ["", "## Claims", ""], _claims(summary),
             ["", "## Figures", ""],
             [f"![{cap}]({name}/{png})" for cap, png in drawn]
             or ["No finished cell to plot." if figures else "Figures not drawn (write_report(figures=False))."],
             ["", "Data: " + ", ".join(f"[{p.name}]({name}/{p.name})" for p in data), "", "## Cost", ""],
             _cost(c, summary, papers), ["", "## Stages", ""], _stages(c, rel), ["", "## Provenance", ""],
             _provenance(c, rel)]
    out = reports_dir / f"{name}.md"
    out.write_text("\n".join(line for part in parts for line in part) + "\n")
    write_index(reports_dir)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    p.add_argument("table")
    p.add_argument("--profile", default=None, help="default: the single profile with results")
    p.add_argument("--results-root", default="results")
    p.add_argument("--reports-dir", default="reports")
    args = p.parse_args(argv)
    base = Path(args.results_root) / args.table
    found = sorted(d.name for d in base.iterdir() if (d / "manifest.json").exists()) if base.is_dir() else []
    profile = args.profile
    if profile is None and len(found) != 1:
        p.error(f"{base}: {'several profiles' if found else 'no results'} ({', '.join(found) or 'none'}); "
                "choose one with --profile")
    if profile is not None and profile not in found:
        p.error(f"{base / profile}: no manifest.json; profiles with results: {', '.join(found) or 'none'}")
    print(write_report(base / (profile or found[0]), args.reports_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
