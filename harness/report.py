"""The Markdown report of a table: results against the paper, the recipe's claims checked on paired seeds, expected
values, plots, cost, provenance.

    python -m harness.report table2 [--profile tiny] [--results-root results] [--reports-dir reports]
    python -m harness.report table2 --write-expected     # + recipes/expected/<table>.<profile>.csv from these results

writes <reports-dir>/<name>.md, its figures and CSVs (claims.csv among them) in <reports-dir>/<name>/ (linked
relatively), and the dashboard <reports-dir>/README.md. name is <table> for the profile the recipe's defaults list
names, <table>.<profile> for any other. `reproduce` calls write_report(results/<table>/<profile>, reports_dir) when a
run ends. Given the results tree the report is deterministic except for its "generated" line.

The report knows no recipe: the claims come from the run's manifest (the recipe's `claims:` section, resolved), and
are judged by harness.stats. Nothing under results/ is linked (results/ is not committed): stage ids and the
config/manifest paths are written as plain text.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
from omegaconf import OmegaConf

from .collect import (NOT_AVAILABLE, NOT_IMAGENET, Collected, collect, export, load_paper_numbers, row_costs,
                      summarize, teacher_results)
from .config import RECIPES_DIR
from .figures import make_figures
from .rundir import MANIFEST_FILE
from .stats import (DECIDED, NOT_APPLICABLE, RISING_PP, TOLERANCE_FLOOR, TOLERANCE_SE, LEVEL, expected_check,
                    judge)

PACKAGES = ("torch", "timm", "submitit", "pandas", "numpy", "scipy", "hydra-core", "matplotlib")
EXPECTED_DIR = RECIPES_DIR / "expected"
EXPECTED_COLUMNS = ["row", "mean", "std", "n", "tolerance", "commit", "note"]
TOLERANCE_RULE = (f"|Δ| ≤ max(tolerance, {TOLERANCE_SE:g}·std/√n_ours), Δ = ours − expected, std the expected "
                  f"row's seed std (tolerance alone when it has n < 2), n_ours our finished seeds")
CLAIM_COLUMNS = ["report", "table", "profile", "id", "text", "source", "test", "margin", "a", "b", "n", "mean", "sd",
                 "ci_lo", "ci_hi", "verdict", "seeds_needed", "paper_diff", "seeds"]


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, nd: int = 2) -> str:
    return "—" if missing(x) else f"{x:.{nd}f}"


def signed(x: float, nd: int = 2) -> str:
    """+1.23 / -1.23, and +0.00 rather than -0.00."""
    x = round(x, nd)
    return f"{x + 0.0:+.{nd}f}"


def md_table(headers: List[str], rows: List[list]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows])


def shown_path(p: Path) -> str:
    """A path as plain text: relative to the working directory when under it (results/table2/tiny/...)."""
    p = Path(p).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def reproduced(r: dict) -> str:
    if not r["n"]:
        return "no finished cell (n=0)"
    return f"{fmt(r['mean'])} ± {fmt(r['std'])} (n={r['n']})" if r["n"] >= 2 else f"{fmt(r['mean'])} (n=1)"


# ---------------------------------------------------------------------------------------------------- claims
def claims_of(c: Collected) -> Optional[List[dict]]:
    """The claims the run's manifest carries (resolved recipe config); None when it has no `claims` key."""
    cl = (c.manifest.get("config") or {}).get("claims")
    return None if cl is None else [dict(x) for x in cl]


def side(rows: List[str]) -> str:
    return f"`{rows[0]}`" if len(rows) == 1 else "mean(" + ", ".join(f"`{r}`" for r in rows) + ")"


def test_text(r: dict) -> str:
    # plain bars: md_table escapes them
    return f"a − b > {r['margin']:+.1f}" if r["test"] == "greater" else f"|a − b| < {r['margin']:.1f}"


def _paper_diff(r: dict, by: Dict[str, dict]) -> None:
    """paper_value (mean of a's paper numbers − mean of b's) where every row of both sides has one."""
    lacking = [x for x in r["a"] + r["b"] if x not in by or missing(by[x]["paper_value"])]
    if lacking:
        r["paper_value"], r["paper_text"] = None, f"{NOT_AVAILABLE} (no paper number for " + ", ".join(
            f"`{x}`" for x in lacking) + ")"
        return
    pa = [by[x]["paper_value"] for x in r["a"]]
    pb = [by[x]["paper_value"] for x in r["b"]]
    r["paper_value"] = round(sum(pa) / len(pa) - sum(pb) / len(pb), 3)
    r["paper_text"] = (" − ".join(by[x]["paper_text"] for x in r["a"] + r["b"]) if len(pa) == len(pb) == 1
                       else "mean − mean") + f" = {r['paper_value']:+g}"


def check_claims(claims: List[dict], cells: pd.DataFrame, summary: pd.DataFrame) -> List[dict]:
    """Each claim judged on paired seeds (harness.stats.judge) + the paper's difference where both sides have paper
    numbers."""
    by = {r["row"]: r for r in summary.to_dict("records")}
    out = []
    for cl in claims:
        r = judge(cl, cells)
        _paper_diff(r, by)
        out.append(r)
    return out


def verdict_md(v: str) -> str:
    return f"**{v}**" if v in DECIDED else v


def ours_text(r: dict) -> str:
    return "—" if r["mean"] is None else signed(r["mean"])


def ci_text(r: dict) -> str:
    return "—" if r["lo"] is None else f"[{signed(r['lo'])}, {signed(r['hi'])}]"


def needed_text(r: dict) -> str:
    n = r["seeds_needed"]
    return "" if n == "" else (f"{n} seeds" if isinstance(n, int) else str(n))


def _claims(res: Optional[List[dict]]) -> List[str]:
    if res is None:
        return ["This run's manifest carries no claims: its recipe has no `claims:` section, or the run was planned "
                "before claims were part of recipes. Re-plan it (`python -m harness.reproduce <table>` skips finished "
                "stages) to check them."]
    if not res:
        return ["The recipe's `claims:` section is empty."]
    rows = [[f"{r['text']} ({side(r['a'])} vs {side(r['b'])}; `{r['id']}`)",
             "official default" if r["source"] == "official-default" else r["source"], test_text(r), ours_text(r),
             ci_text(r), r["n"], verdict_md(r["verdict"]), needed_text(r), r["paper_text"]] for r in res]
    out = [md_table(["claim (a vs b)", "source", "test", "ours: paired mean a − b (pp)", f"{LEVEL:.0%} CI", "n",
                     "verdict", "seeds to decide", "paper a − b"], rows), ""]
    out += ["Rules. Seeds are paired: the same seed gives the same student initialisation, data order and masks in "
            "every row, so a claim is judged on the per-seed differences d_s = a_s − b_s of the evaluation's test "
            "top-1 over the seeds both sides have finished (a group's value at a seed is the mean of its rows, at "
            "seeds where every one of them has finished). n is the number of paired seeds; the interval is "
            "mean ± t(0.975, n−1)·sd/√n (the point itself when sd = 0). `greater` (a − b > margin) holds when the "
            "lower bound is above the margin and does not hold when the upper bound is below it; `within` "
            "(|a − b| < margin) holds when the interval lies inside (−margin, margin) and does not hold when it lies "
            "entirely outside it; anything else is inconclusive, and \"seeds to decide\" gives the smallest n with "
            "t(0.975, n−1)·sd/√n < |mean − nearest boundary|, i.e. the paired seeds that would decide it if the "
            "observed mean and spread held. Fewer than 2 paired seeds: not enough data (no interval). Only a "
            "decided verdict is in bold. Margins are top-1 points of this profile's own dataset. Source *paper*: the "
            "paper says it (the note says where). Source *official default*: the paper's ablation table is not "
            "available, so the claim is only that the official code's default choice is at least as good as the "
            "alternative; a negative margin m in such a `greater` claim reads \"not worse than the alternative by "
            "more than |m| pp\". A claim naming a row this run does not have is not applicable. The paper's "
            "differences are ImageNet-1K points, shown for direction only.", ""]
    for i, r in enumerate(res, 1):
        bits = [f"{i}. `{r['id']}` — {r['text']}: {verdict_md(r['verdict'])}."]
        if r["source"] == "official-default":
            bits.append("Official default, not a paper result: the paper's ablation is not available; this checks "
                        "that the official code's default is at least as good as the alternative.")
        if r["note"]:
            bits.append(f"Note: {r['note'].rstrip('.')}.")
        if r["verdict"] == NOT_APPLICABLE:
            bits.append(f"This run has no row {', '.join(f'`{x}`' for x in r['missing_rows'])}.")
        elif r["n"]:
            bits.append(f"Paired seeds: {', '.join(str(s) for s in r['seeds'])}" + (
                f" (sd of the differences {r['sd']:.2f} pp)." if r["sd"] is not None else "."))
        else:
            bits.append("No seed finished on both sides.")
        if r["unpaired"]:
            bits.append(f"Left out, unpaired: {r['unpaired']}.")
        if r["seeds_needed"] != "":
            bits.append(f"Seeds to decide at the observed spread: {needed_text(r)}.")
        out.append(" ".join(bits))
    return out


def claims_frame(res: Optional[List[dict]], c: Collected, name: str) -> pd.DataFrame:
    recs = [{"report": name, "table": c.table, "profile": c.profile, "id": r["id"], "text": r["text"],
             "source": r["source"], "test": r["test"], "margin": r["margin"], "a": " ".join(r["a"]),
             "b": " ".join(r["b"]), "n": r["n"], "mean": r["mean"], "sd": r["sd"], "ci_lo": r["lo"], "ci_hi": r["hi"],
             "verdict": r["verdict"], "seeds_needed": r["seeds_needed"], "paper_diff": r["paper_value"],
             "seeds": " ".join(str(s) for s in r["seeds"])} for r in (res or [])]
    return pd.DataFrame(recs, columns=CLAIM_COLUMNS)


# ---------------------------------------------------------------------------------------------------- expected values
def expected_path(table: str, profile: str, expected_dir: Path = EXPECTED_DIR) -> Path:
    return Path(expected_dir) / f"{table}.{profile}.csv"


def read_expected(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"row": str, "commit": str, "note": str}, keep_default_na=False,
                     na_values={"mean": [""], "std": [""], "n": [""], "tolerance": [""]})
    for col in ("mean", "std", "n", "tolerance"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def _commit(c: Collected) -> str:
    commits = c.stages.loc[c.stages["status"] == "done", "git_commit"].dropna()
    return str(commits.mode().iloc[0]) if len(commits) else str(c.manifest.get("git_commit") or "")


def write_expected(root: Path, expected_dir: Path = EXPECTED_DIR, tolerance: float = TOLERANCE_FLOOR) -> Path:
    """recipes/expected/<table>.<profile>.csv from the finished seeds of results/<table>/<profile> (rows with no
    finished seed are left out). The committed file is the reference later runs are checked against."""
    c = collect(Path(root))
    summary = summarize(c)
    commit = _commit(c)
    note = f"written by python -m harness.report --write-expected; rule: {TOLERANCE_RULE}"
    recs = [{"row": r["row"], "mean": round(r["mean"], 4), "std": "" if missing(r["std"]) else round(r["std"], 4),
             "n": r["n"], "tolerance": tolerance, "commit": commit, "note": note}
            for r in summary.to_dict("records") if r["n"]]
    path = expected_path(c.table, c.profile, expected_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(recs, columns=EXPECTED_COLUMNS).to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return path


def check_expected(summary: pd.DataFrame, expected: pd.DataFrame) -> List[dict]:
    ours = {r["row"]: r for r in summary.to_dict("records")}
    out = []
    for e in expected.to_dict("records"):
        o = ours.get(e["row"])
        n = int(o["n"]) if o else 0
        chk = expected_check(e["mean"], None if missing(e["std"]) else e["std"], e["tolerance"],
                             o["mean"] if o else None, n)
        out.append({**e, "ours_mean": o["mean"] if o else None, "ours_std": o["std"] if o else None, "ours_n": n,
                    "in_table": o is not None, **chk})
    return out


def _expected(c: Collected, summary: pd.DataFrame, expected_dir: Path) -> List[str]:
    path = expected_path(c.table, c.profile, expected_dir)
    if not path.is_file():
        return [f"No expected values for `{c.table}` / `{c.profile}`: {shown_path(path)} does not exist. Write it "
                f"from these results with `python -m harness.report {c.table} --profile {c.profile} "
                "--write-expected` and commit it; later reports are then checked against it."]
    res = check_expected(summary, read_expected(path))
    rows = []
    for r in res:
        exp = f"{fmt(r['mean'])} ± {fmt(r['std'])} (n={int(r['n']) if not missing(r['n']) else '?'})"
        if not r["in_table"]:
            ours, delta, ok = "row not in this run", "—", "—"
        elif r["within"] is None:
            ours, delta, ok = "no finished cell (n=0)", "—", "—"
        else:
            ours = f"{fmt(r['ours_mean'])}" + (f" ± {fmt(r['ours_std'])}" if r["ours_n"] >= 2 else "") + \
                f" (n={r['ours_n']})"
            delta, ok = signed(r["delta"]), ("yes" if r["within"] else "**no**") + f" (±{r['tolerance']:.2f})"
        rows.append([f"`{r['row']}`", exp, ours, delta, ok])
    commits = sorted({str(r["commit"]) for r in res if r["commit"]})
    return [f"Expected values: {shown_path(path)} (commit {', '.join(commits) or 'not recorded'}). Tolerance rule: "
            f"{TOLERANCE_RULE}.", "",
            md_table(["row", "expected (mean ± std, n)", "ours", "Δ", "within tolerance?"], rows)]


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


def _teacher(c: Collected) -> List[str]:
    res = teacher_results(c)
    if not res:
        return ["Teacher: no teacher stages in this plan (provided checkpoints)."]
    out = []
    ev = [r for r in res if r["role"] == "teacher-evaluate"]
    for r in ev:
        out.append(f"Teacher (fine-tuned) test top-1: **{fmt(r['top1'])}** (top-5 {fmt(r['top5'])}, "
                   f"{fmt(r['n_eval'], 0)} test images; stage `{r['stage_id']}`)" if r["status"] == "done" else
                   f"Teacher (fine-tuned) test top-1: not available — stage `{r['stage_id']}` is {r['status']}"
                   + (f": {str(r['reason'])[:160]}" if r["reason"] else ""))
    if not ev:
        out.append("Teacher (fine-tuned) test top-1: not available — this plan has no `teacher-evaluate` stage.")
    for r in res:
        if r["role"] == "teacher-finetune" and not missing(r["val_top1_last"]):
            out.append(f"Teacher fine-tune validation top-1: last epoch {fmt(r['val_top1_last'])}, best "
                       f"{fmt(r['val_top1_best'])} (stage `{r['stage_id']}`)")
    return [x + "  " for x in out]


def _convergence(summary: pd.DataFrame, c: Collected) -> List[str]:
    """Per row: the finished seeds' mean last-epoch change of validation top-1 (the change of the row's mean curve),
    flagged at >= RISING_PP; single fine-tunes at or above it and the spread of those changes, for scale."""
    head = (f"Convergence check, per row (as the claims compare rows): a row whose finished fine-tunes rose by ≥ "
            f"{RISING_PP:g} pp of validation top-1 over their last epoch, on average over its seeds, is **still rising "
            "at its last fine-tune epoch**: its number would likely move with a longer schedule.")
    cells = c.cells
    checked = summary[summary["n_gain"] > 0]
    teacher = [f"- teacher: validation top-1 {r['val_last_gain']:+.2f} pp over its last fine-tune epoch (stage "
               f"`{r['stage_id']}`): **still rising**" for r in teacher_results(c) if r["still_rising"]]
    if checked.empty:
        return [head + " Not checked: no finished fine-tune logged validation top-1 for two or more epochs."] + teacher
    rows = []
    for r in checked.to_dict("records"):
        seeds = cells[(cells["row"] == r["row"]) & (cells["status"] == "done")].dropna(subset=["val_last_gain"])
        rows.append([f"`{r['row']}`", r["n_gain"], f"{r['val_last_gain_mean']:+.2f}",
                     ", ".join(f"{g:+.2f}" for g in seeds["val_last_gain"]),
                     "**still rising**" if r["still_rising"] else "flat"])
    out = [head, "", md_table(["row", "seeds", "mean Δ last epoch (pp)", "per seed", "verdict"], rows)]
    flagged = summary["still_rising"].sum()
    out += ["", f"{flagged} of {len(checked)} row(s) still rising." if flagged else
            f"No row still rising ({len(checked)} checked)."] + teacher
    gains = cells.loc[cells["status"] == "done", "val_last_gain"].dropna()
    single = cells[cells["still_rising"]]
    if len(single):
        spread = (f"; the sd of all {len(gains)} last-epoch changes is {gains.std(ddof=1):.2f} pp"
                  if len(gains) > 1 else "")
        each = ", ".join(f"`{x['row']}` seed {x['seed']} ({x['val_last_gain']:+.2f}, stage `{x['finetune_id']}`)"
                         for x in single.to_dict("records"))
        out += ["", f"Single fine-tunes that rose by ≥ {RISING_PP:g} pp over their last epoch (one seed's change on "
                f"the validation split{spread}): {each}."]
    return out


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
    out = ["Reproduced = the evaluation stage's TEST top-1 (the whole test split); fine-tuning monitors a validation "
           "split carved out of the training images, never the test split.", "",
           md_table(["row", "paper", "reproduced test top-1 (mean ± std, n)", "Δ", "status"], rows), ""]
    out += _teacher(c) + [""]
    out += ["Paper sources (recipes/paper-numbers.csv):"] + [f"[{i}] {s}  " for i, s in enumerate(sources, 1)] + [""]
    out += ["Per seed (test top-1 of the evaluation stage; fine-tune validation best/last from its result and log):",
            ""]
    out.append(md_table(["row", "seed", "test top-1", "val best (epoch)", "val last", "val Δ last epoch",
                         "test top-5", "status"], [
        [r["row"], r["seed"], fmt(r["top1"]), f"{fmt(r['val_top1_best'])} ({fmt(r['val_top1_best_epoch'], 0)})",
         fmt(r["val_top1_last"]), "—" if missing(r["val_last_gain"]) else f"{r['val_last_gain']:+.2f}"
         + (" (still rising)" if r["still_rising"] else ""), fmt(r["top5"]),
         r["status"] + (f": {r['reason'][:160]}" if r["reason"] else "")] for r in c.cells.to_dict("records")]))
    out += [""] + _convergence(summary, c)
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
            ""]
    per = costs.set_index("row")["device_hours"]
    kd_rows = summary.loc[summary["method"] == "kd", "row"].tolist()
    dmae_rows = summary.loc[summary["method"] == "dmae", "row"].tolist()
    if kd_rows and dmae_rows:
        out += ["**DMAE against the KD baseline** (device-hours per seed, teacher stages excluded on both sides):", ""]
        for row in dmae_rows:
            for kd_row in kd_rows:
                ours, kd = per.get(row), per.get(kd_row)
                out.append(f"- `{row}` vs `{kd_row}`: " + (
                    f"{fmt(ours, 4)} vs {fmt(kd, 4)} → {100 * (ours - kd) / kd:+.1f}%"
                    if not (missing(ours) or missing(kd) or kd == 0) else "not enough data"))
        cost = [p for p in papers.values() if p["table"] == "training_cost_ICLR_version"]
        out += [""] + [f"- paper ({p['masking_ratio']} masking): {p['metric']} = {p['text']} — {p['source']}"
                       for p in cost]
        out += ["", "A row's cost includes its own pre-training: DMAE's pays the teacher's forward pass, the KD row's "
                "fine-tuning pays it every step. On a CPU profile (one thread per stage, tiny models, no data-loading "
                "workers) these ratios say little about the paper's 8-GPU ImageNet claim."]
    return out


def _stages(c: Collected) -> List[str]:
    rows = []
    for r in c.stages.to_dict("records"):
        rows.append([f"`{r['stage_id']}`", r["role"], r["status"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4),
                     fmt(r["images_per_s"], 0), r["device_name"] if isinstance(r["device_name"], str) else "—",
                     (r["reason"] or "")[:200]])
    return [f"Each stage's merged spec is <stage>/config.json under {shown_path(c.root)} (results/ is not committed, "
            "so nothing there is linked).", "",
            md_table(["stage", "role", "status", "wall (s)", "device-h", "images/s", "device", "reason"], rows)]


def _provenance(c: Collected) -> List[str]:
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
           f"- Resolved config: {shown_path(c.root / 'config.yaml')} and {shown_path(c.root / 'manifest.json')} "
           "(not linked: results/ is not committed), so the key values are embedded here:", "", "```"]
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


# ---------------------------------------------------------------------------------------------------- names, index
def default_profile(table: str, recipes_dir: Path = RECIPES_DIR) -> Optional[str]:
    """The profile named in recipes/<table>.yaml's defaults list (None without a recipe or a profile default)."""
    path = Path(recipes_dir) / f"{table}.yaml"
    if not path.is_file():
        return None
    for d in OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []:
        if isinstance(d, dict) and "profile" in d:
            return str(d["profile"])
    return None


def report_name(table: str, profile: str) -> str:
    """<table> for the recipe's default profile (the report `make reproduce` writes), <table>.<profile> otherwise."""
    return table if profile == default_profile(table) else f"{table}.{profile}"


def write_index(reports_dir: Path) -> Path:
    """reports/README.md, the dashboard: one line per claim across every report (from each report's claims.csv, so no
    results are re-read), then a link to each report."""
    reports_dir = Path(reports_dir)
    reports = sorted(md for md in reports_dir.glob("*.md") if md.name != "README.md")
    lines = ["# Reports", "", "Generated by `python -m harness.reproduce <table>` (or `python -m harness.report "
             "<table>`) from real runs. `<table>.md` comes from the recipe's default profile (tiny: Fashion-MNIST "
             "on CPU, not ImageNet numbers); `<table>.<profile>.md` from other profiles.", "", "## Claims", "",
             "Each claim is judged on paired seeds (test top-1, a − b in points of the report's own dataset, "
             f"{LEVEL:.0%} t-interval); the rules are in each report's Claims section. Only decided verdicts are in "
             "bold.", ""]
    rows, without = [], []
    for md in reports:
        path = reports_dir / md.stem / "claims.csv"
        if not path.is_file():
            without.append(md.stem)
            continue
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        for r in df.to_dict("records"):
            num = lambda k: float(r[k]) if r.get(k) not in (None, "") else None  # noqa: E731
            mean, lo, hi = num("mean"), num("ci_lo"), num("ci_hi")
            diff = "—" if mean is None else f"{mean:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else "")
            rows.append([f"[{md.stem}]({md.name})", r["table"], f"`{r['id']}` {r['text']}",
                         "official default" if r["source"] == "official-default" else r["source"],
                         verdict_md(r["verdict"]), diff, r["n"]])
    lines.append(md_table(["report", "recipe", "claim", "source", "verdict", "a − b (95% CI)", "n"], rows)
                 if rows else "No report records its claims yet.")
    if without:
        lines += ["", "Reports without a claims.csv (written before claims were recorded; regenerate them with "
                  "`python -m harness.report <table>`): " + ", ".join(f"[{s}]({s}.md)" for s in without) + "."]
    lines += ["", "## Reports", ""]
    versions = {}
    for md in reports:
        title = md.read_text().split("\n", 1)[0].lstrip("# ").strip()
        stages = reports_dir / md.stem / "stages.csv"
        commits = []
        if stages.is_file():
            col = pd.read_csv(stages, dtype=str, keep_default_na=False).get("git_commit", pd.Series(dtype=str))
            commits = sorted({c[:7] for c in col if c})
        versions[md.stem] = tuple(commits)
        lines.append(f"- [{md.stem}]({md.name}): {title}" + (f" — computed by {', '.join(commits)}" if commits else ""))
    if len(set(v for v in versions.values() if v)) > 1:
        lines += ["", "These reports were computed by different versions of the code (the commits above): a rerun "
                  "of the older ones with the current recipe may differ; compare reports of one version."]
    out = reports_dir / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def write_report(root: Path, reports_dir: str | Path, figures: bool = True,
                 expected_dir: Path = EXPECTED_DIR) -> Path:
    """results/<table>/<profile> -> <reports_dir>/<name>.md (+ figures and CSVs, claims.csv among them, in
    <reports_dir>/<name>/), where name = report_name(table, profile); then the dashboard <reports_dir>/README.md.
    figures=False skips drawing (the slow part), for tests of the text."""
    c = collect(Path(root))
    papers = load_paper_numbers()
    summary = summarize(c, papers)
    claims = claims_of(c)
    res = check_claims(claims, c.cells, summary) if claims is not None else None
    reports_dir = Path(reports_dir)
    name = report_name(c.table, c.profile)
    fig_dir = reports_dir / name
    fig_dir.mkdir(parents=True, exist_ok=True)
    drawn = make_figures(c, summary, fig_dir, res) if figures else []
    data = export(c, fig_dir, summary)
    claims_csv = fig_dir / "claims.csv"
    claims_frame(res, c, name).to_csv(claims_csv, index=False)
    data.append(claims_csv)
    warn = [f"- {w}" for w in c.warnings] or ["None."]
    parts = [[f"# {c.table}: {c.manifest.get('title', '')}", ""], _banner(c),
             ["", "Statuses: done · failed (reason from error.json) · partial (running or interrupted) · unreadable "
              "(result file could not be read; skipped) · stale (computed from an input that has since failed or "
              "changed; the reason names it; the next run moves it aside and recomputes it) · not started.", "",
              "## Warnings", ""], warn,
             ["", "## Results", ""], _results(summary, c), ["", "## Claims", ""], _claims(res),
             ["", "## Expected values", ""], _expected(c, summary, expected_dir),
             ["", "## Figures", ""],
             [f"![{cap}]({name}/{png})" for cap, png in drawn]
             or ["Nothing to plot." if figures else "Figures not drawn (write_report(figures=False))."],
             ["", "Data: " + ", ".join(f"[{p.name}]({name}/{p.name})" for p in data), "", "## Cost", ""],
             _cost(c, summary, papers), ["", "## Stages", ""], _stages(c), ["", "## Provenance", ""],
             _provenance(c)]
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
    p.add_argument("--write-expected", action="store_true",
                   help="also write recipes/expected/<table>.<profile>.csv from these results (then commit it)")
    p.add_argument("--expected-dir", type=Path, default=EXPECTED_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = Path(args.results_root) / args.table
    found = sorted(d.name for d in base.iterdir() if (d / MANIFEST_FILE).exists()) if base.is_dir() else []
    profile = args.profile
    if profile is None and len(found) != 1:
        p.error(f"{base}: {'several profiles' if found else 'no results'} ({', '.join(found) or 'none'}); "
                "choose one with --profile")
    if profile is not None and profile not in found:
        p.error(f"{base / profile}: no manifest.json; profiles with results: {', '.join(found) or 'none'}")
    root = base / (profile or found[0])
    if args.write_expected:
        print(write_expected(root, args.expected_dir))
    print(write_report(root, args.reports_dir, expected_dir=args.expected_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
