"""The Markdown report of a table: a summary block, the gates, results against the paper, the recipe's claims checked
on paired seeds, expected values, plots, cost (with the rows' model sizes and FLOPs), provenance.

    python -m harness.report table2 [--profile tiny] [--results-root results] [--reports-dir reports]
    python -m harness.report table2 --write-expected     # + recipes/expected/<table>.<profile>.csv from these results
    python -m harness.report table2 --from-reports       # from the data kept in reports/<name>/, no results tree

writes <reports-dir>/<name>.md, its figures and data in <reports-dir>/<name>/ (linked relatively), and the dashboard
<reports-dir>/README.md. name is <table> for the profile the recipe's defaults list names, <table>.<profile> for any
other. `reproduce` calls write_report(results/<table>/<profile>, reports_dir) when a run ends.

The data kept beside a report: cells.csv, stages.csv, epochs.csv (what the figures draw of each stage's log.jsonl)
and run.json (the run's manifest, the warnings, the rows' resolved stage specs, their model sizes and FLOPs), written
by harness.report.collect.export, from which the report is then drawn (render_report); rows.csv, claims.csv and
summary.json
(the report's numbers for machines: rows, claims, gates, provenance) are drawn with it. So a clone, which has no
results/, gets the same report back from the committed data (`--from-reports`, or by default when
<results-root>/<table> has no results): the same inputs give the same bytes, except the "Report generated" line
(SOURCE_DATE_EPOCH fixes it) and, in the provenance, the versions and git state of the code writing the report.

The report knows no recipe: the claims come from the run's manifest (the recipe's `claims:` section, resolved), and
are judged by harness.report.stats; the setting a table's rows vary (drawn as top-1 against it) is found from their
resolved
specs (harness.report.ablation). Nothing under results/ is linked (results/ is not committed): stage ids and the
config/manifest paths are written as plain text, from results/<table>/<profile> on, never as this machine's path.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import math
import os
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd
from omegaconf import OmegaConf

import recipes

from harness.report.ablation import ablation_axes, row_settings
from harness.report.artefacts import jsonable, model_costs, write_json, writer_state
from harness.report.collect import (NOT_AVAILABLE, NOT_IMAGENET, RUN_FILE, Collected, collect, export, load_export,
                                    load_paper_numbers, overridden_text, row_costs, summarize, teacher_results)
from harness.plan.config import CONTROL_METHOD, RECIPES_DIR, GateConfig
from harness.report.figures import make_figures
from harness.report.gates import Gate, check_gates, not_passed
from harness.core.rundir import MANIFEST_FILE
from harness.report.stats import (BELOW_BOUND, DECIDED, FAILS, HOLDS, LEVEL, MIN_OWN_DOF, NO_DATA, NOT_APPLICABLE,
                                  NOT_TESTABLE, PAPER_EXCLUDED, RISING_PP, TOLERANCE_FLOOR, TOLERANCE_SE, UNSURE, USER,
                                  Noise, boundary_distance, expected_check, gate_verdict, judge, paired, two_way_noise)

PACKAGES = ("torch", "timm", "submitit", "pandas", "numpy", "scipy", "hydra-core", "matplotlib")
EXPECTED_DIR = None  # the expected/ folder beside the table's recipe (recipes.table_dir): a user's table keeps its own
EXPECTED_COLUMNS = ["row", "mean", "std", "n", "tolerance", "commit", "note"]
TOLERANCE_RULE = (f"|Δ| ≤ max(tolerance, {TOLERANCE_SE:g}·std/√n_ours), Δ = ours − expected, std the expected "
                  f"row's seed std (tolerance alone when it has n < 2), n_ours our finished seeds")
CLAIM_COLUMNS = ["report", "table", "profile", "id", "text", "source", "test", "margin", "a", "b", "n", "mean", "sd",
                 "ci_lo", "ci_hi", "verdict", "seeds_needed", "paper_diff", "seeds",
                 # added with the pooled noise (claims.csv files written before lack them)
                 "bound", "sd_pooled", "sd_used", "sd_source", "dof", "noise_sd", "noise_dof", "seeds_paper",
                 "paper_powered", "paper_outside", "a_stages", "b_stages"]


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
    """A path of a results tree as plain text, never the computing machine's absolute path: from the results root on
    (results/<table>/<profile>/..., the tree a run leaves, wherever its root was)."""
    parts = Path(p).resolve().parts
    for i in range(len(parts) - 1, -1, -1):
        if (Path(*parts[:i + 1]) / "manifest.json").is_file():  # <root>/<table>/<profile>
            return Path("results", *parts[i - 1:]).as_posix()
    return Path(p).name


def recipe_path(p: Path) -> str:
    """A file of the package's recipes as the repository names it (recipes/expected/...); a user's recipe file by
    its full path; elsewhere, its name."""
    if not recipes.is_packaged(p) and any(Path(p).resolve().is_relative_to(d) for d in recipes.user_dirs()):
        return Path(p).resolve().as_posix()
    try:
        return "recipes/" + Path(p).resolve().relative_to(Path(RECIPES_DIR).resolve()).as_posix()
    except ValueError:
        return Path(p).name


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
    if r["test"] == "within":
        return f"|a − b| < {r['margin']:.1f}"
    bound = r.get("bound")
    return f"a − b > {r['margin']:+.1f}" + ("" if bound is None else f", bound {bound:g}")


def _paper_diff(a: List[str], b: List[str], by: Dict[str, dict]) -> Tuple[Optional[float], str]:
    """(paper_value, paper_text): the mean of a's paper numbers − the mean of b's, where every row of both sides has
    one; (None, "not available (...)") otherwise."""
    lacking = [x for x in a + b if x not in by or missing(by[x]["paper_value"])]
    if lacking:
        return None, f"{NOT_AVAILABLE} (no paper number for " + ", ".join(f"`{x}`" for x in lacking) + ")"
    pa = [by[x]["paper_value"] for x in a]
    pb = [by[x]["paper_value"] for x in b]
    value = round(sum(pa) / len(pa) - sum(pb) / len(pb), 3)
    return value, (" − ".join(by[x]["paper_text"] for x in a + b) if len(pa) == len(pb) == 1
                   else "mean − mean") + f" = {value:+g}"


def distinct_rows(cells: pd.DataFrame) -> Tuple[List[str], Dict[str, str]]:
    """The rows whose seed noise is independent and alike, for the pooled noise: in table order, a row is left out
    when one of its pre-train stages (collect's `pretrain_id`) belongs to a row already kept (the KD row fine-tunes
    the MAE row's pre-train), and a scratch row (the positive control: a fine-tune from random initialisation has
    noise of its own, and no claim compares it) is left out too. Returns (kept rows, {left-out row: why})."""
    kept: List[str] = []
    owner: Dict[str, str] = {}
    left: Dict[str, str] = {}
    if not len(cells):
        return kept, left
    for row, g in cells.groupby("row", sort=False):
        if "method" in g and (g["method"] == CONTROL_METHOD).all():
            left[str(row)] = "the positive control, fine-tuned from random initialisation"
            continue
        ids = {p for p in g.get("pretrain_id", pd.Series(dtype=object)) if isinstance(p, str) and p}
        shared = [owner[p] for p in sorted(ids) if p in owner]
        if shared:
            left[str(row)] = f"shares a pre-train with `{shared[0]}`"
            continue
        kept.append(str(row))
        owner.update({p: str(row) for p in ids})
    return kept, left


def report_noise(cells: pd.DataFrame) -> Tuple[Noise, Dict[str, str]]:
    """The whole report's noise (harness.report.stats.two_way_noise over its distinct rows) and the rows left out."""
    kept, left = distinct_rows(cells)
    return two_way_noise(cells, kept), left


def noise_text(noise: Optional[Noise], left: Optional[Dict[str, str]] = None) -> str:
    if noise is None:
        return ""
    fit = f"two-way row + seed fit over {noise.n_rows} distinct rows × {noise.n_seeds} seeds"
    if noise.sd is not None:
        out = f"Noise from the whole report: residual sd σ = {noise.sd:.2f} pp ({fit}, dof {noise.dof})"
    elif noise.n_obs:
        out = f"Noise from the whole report: not estimable ({fit} leaves dof {noise.dof})"
    else:
        out = "Noise from the whole report: not estimable (no finished cell)"
    if left:
        out += "; left out: " + ", ".join(f"`{r}` ({why})" for r, why in left.items())
    return out + "."


def check_claims(claims: List[dict], cells: pd.DataFrame, summary: pd.DataFrame,
                 noise: Optional[Noise] = None) -> List[dict]:
    """Each claim judged on paired seeds (harness.report.stats.judge; with `noise`, the report's pooled noise where the
    claim's own sd has too few degrees of freedom) against the paper's difference where both sides have paper
    numbers (paper_value, paper_text)."""
    by = {r["row"]: r for r in summary.to_dict("records")}
    out = []
    for cl in claims:
        if cl.get("source") == USER:  # a user's own hypothesis is never set against a paper number
            value, text = None, "— (user's claim)"
        else:
            value, text = _paper_diff([str(x) for x in cl["a"]], [str(x) for x in cl["b"]], by)
        over = {x: by[x]["overridden"] for x in [str(x) for x in cl["a"]] + [str(x) for x in cl["b"]]
                if x in by and by[x].get("overridden")}
        if over:  # the command line changed a row the claim is about: the claim is not about this run
            value, text = None, overridden_text("; ".join(f"{x}: {w}" for x, w in over.items()))
        r = judge(cl, cells, noise, paper=value)
        r.update(paper_value=value, paper_text=text, overridden=over)
        if over and r["verdict"] != NOT_APPLICABLE:
            r.update(verdict_unoverridden=r["verdict"], verdict=NOT_APPLICABLE)
        out.append(r)
    return out


def verdict_text(r: dict) -> str:
    """A claim's verdict as a report shows it: "not applicable (overridden: <row>: <settings>)" for a claim on a
    row the command line changed."""
    if r["verdict"] == NOT_APPLICABLE and r.get("overridden"):
        return overridden_text("; ".join(f"{x}: {w}" for x, w in r["overridden"].items()))
    return r["verdict"]


def verdict_md(v: str) -> str:
    return f"**{v}**" if v in DECIDED else v


def ours_text(r: dict) -> str:
    return "—" if r["mean"] is None else signed(r["mean"])


def ci_text(r: dict) -> str:
    return "—" if r["lo"] is None else f"[{signed(r['lo'])}, {signed(r['hi'])}]"


def used_text(r: dict) -> str:
    """The sd behind the interval: '0.28 (pooled, 6 dof)'."""
    return "—" if r.get("sd_used") is None else f"{r['sd_used']:.2f} ({r['sd_source']}, {r['dof']} dof)"


def needed_text(r: dict, key: str = "seeds_needed") -> str:
    """Seeds for 80% power: 'N seeds', '> 1000', 'cannot be decided', or '' when not computed."""
    n = r.get(key, "")
    return "" if n == "" else (f"{n} seeds" if isinstance(n, int) else str(n))


def paper_seeds_text(r: dict) -> str:
    """Seeds for 80% power were the true difference the paper's, and whether the paired seeds run reach them."""
    if r.get("paper_value") is None:
        return NOT_AVAILABLE
    if r.get("seeds_paper", "") == "":
        return "—"
    if not isinstance(r["seeds_paper"], int):
        return str(r["seeds_paper"])
    return needed_text(r, "seeds_paper") + ("; reached" if r["paper_powered"] else f"; not reached at n={r['n']}")


RULES = (
    "Rules. Seeds are paired: the same seed gives the same student initialisation, data order and masks in every row, "
    "so a claim is judged on the per-seed differences d_s = a_s − b_s of the evaluation's test top-1 over the seeds "
    "both sides have finished (a group's value at a seed is the mean of its rows, at seeds where every one of them "
    "has finished); n is the number of paired seeds. The interval is mean ± t(0.975, dof)·sd/√n. With n − 1 ≥ "
    f"{MIN_OWN_DOF} the sd is the claim's own (*own*: the sd of the d_s; the textbook t(0.975, n−1)·sd/√n). With fewer "
    "it is the whole report's (*pooled*, when that has more dof): σ·√(1/|a| + 1/|b|) with σ and its dof from the "
    "line above (a least-squares fit of top-1 ~ row + seed over the rows that do not share a pre-train), which "
    "assumes every row has the same seed noise around an additive row + seed structure; both sds are shown. "
    "`greater` (a − b > margin) holds when the lower limit is above the margin and does not hold when the upper "
    "limit is below it; with a bound (the smallest effect the claim cares about) it also ends as \"does not hold "
    "(effect < bound)\" when the upper limit is below margin + bound. `within` (|a − b| < margin) holds when the "
    "interval lies inside (−margin, margin) and does not hold when it lies entirely outside it. Anything else is "
    "inconclusive, or \"paper-size effect excluded\" when the interval leaves out the paper's own a − b (paper "
    "points: ImageNet-1K, a scale reference only on other profiles). Seeds for 80% power: the smallest n with "
    "(t(0.975, n−1) + t(0.8, n−1))·sd/√n ≤ δ, δ the distance from the observed mean (or the paper's a − b) to the "
    "boundary the interval must clear (sd as used, taken as known: an approximation). Fewer than 2 paired seeds: "
    "not enough data (no interval). A paper claim on a profile whose gate failed is \"not testable at this "
    "profile\" (its numbers kept). Only a decided verdict is in bold (holds, does not hold, does not hold (effect < "
    "bound), paper-size effect excluded). Margins and bounds are top-1 points of this profile's own dataset. Source "
    "*paper*: the paper says it (the note says where). Source *official default*: the paper's ablation table is not "
    "available, so the claim is only that the official code's default choice is at least as good as the "
    "alternative; a negative margin m in such a `greater` claim reads \"not worse than the alternative by more than "
    "|m| pp\". Source *user*: a user's own hypothesis, judged the same way, never set against a paper number. "
    "A claim naming a row this run does not have is not applicable. The paper's differences are "
    "ImageNet-1K points, shown for direction only.")


def _sd_sentence(r: dict) -> str:
    own = f"own sd of the differences {r['sd']:.2f} pp, {r['n'] - 1} dof"
    pooled = "" if r.get("sd_pooled") is None else f"; pooled {r['sd_pooled']:.2f} pp, {r['noise_dof']} dof"
    return f"{own}{pooled}; the interval uses the {r['sd_source'] or 'own'} one"


def _detail(i: int, r: dict) -> str:
    """The numbered line under the claims table."""
    bits = [f"{i}. `{r['id']}` — {r['text']}: {verdict_md(verdict_text(r))}."]
    if r.get("verdict_ungated"):
        bits.append(f"On its statistics alone: {r['verdict_ungated']}.")
    if r["source"] == "official-default":
        bits.append("Official default, not a paper result: the paper's ablation is not available; this checks "
                    "that the official code's default is at least as good as the alternative.")
    if r["source"] == USER:
        bits.append("The user's own hypothesis, not a paper result: judged on the paired seeds, never against a "
                    "paper number.")
    if r["note"]:
        bits.append(f"Note: {r['note'].rstrip('.')}.")
    if r["verdict"] == NOT_APPLICABLE and r.get("overridden"):
        bits.append("The command line changed " + ", ".join(f"`{x}` ({w})" for x, w in r["overridden"].items())
                    + ", so this run does not test the claim as stated; its statistics are shown for what was run.")
    elif r["verdict"] == NOT_APPLICABLE:
        bits.append(f"This run has no row {', '.join(f'`{x}`' for x in r['missing_rows'])}.")
        return " ".join(bits)
    if r["n"]:
        bits.append(f"Paired seeds: {', '.join(str(s) for s in r['seeds'])}" + (
            f" ({_sd_sentence(r)})." if r["sd"] is not None else "."))
    else:
        bits.append("No seed finished on both sides.")
    if r["unpaired"]:
        bits.append(f"Left out, unpaired: {r['unpaired']}.")
    if r.get("below_bound"):
        bits.append(f"The effect is positive but below the bound: upper limit {signed(r['hi'])} < margin + bound "
                    f"= {signed(r['margin'] + r['bound'])}.")
    pv = r.get("paper_value")
    if r.get("paper_outside"):
        bits.append(f"The paper's a − b ({signed(pv)} paper points) lies outside our interval {ci_text(r)}.")
    if r["seeds_needed"] != "":
        dist = boundary_distance(r["mean"], r["test"], r["margin"], r.get("bound"))
        bits.append(f"Seeds for 80% power at the observed mean ({dist:.2f} pp from the boundary it must clear): "
                    f"{needed_text(r)}.")
    if r.get("seeds_paper", "") != "":
        dist = boundary_distance(pv, r["test"], r["margin"], r.get("bound"))
        reach = "" if not isinstance(r["seeds_paper"], int) else f": the {r['n']} paired seeds run " + (
            "reach it" if r["paper_powered"] else "do not reach it")
        bits.append(f"Were the true difference the paper's ({signed(pv)} paper points, {dist:.2f} from the boundary), "
                    f"80% power would need {needed_text(r, 'seeds_paper')}{reach}.")
    elif pv is None and r["seeds_needed"] != "":
        bits.append("Seeds for a paper-size effect: not available (no paper a − b).")
    return " ".join(bits)


def _claims(res: Optional[List[dict]], noise: Optional[Noise] = None,
            left: Optional[Dict[str, str]] = None) -> List[str]:
    if res is None:
        return ["This run's manifest carries no claims: its recipe has no `claims:` section, or the run was planned "
                "before claims were part of recipes. Re-plan it (`python -m harness.reproduce <table>` skips finished "
                "stages) to check them."]
    if not res:
        return ["The recipe's `claims:` section is empty."]
    rows = [[f"{r['text']} ({side(r['a'])} vs {side(r['b'])}; `{r['id']}`)",
             "official default" if r["source"] == "official-default" else r["source"], test_text(r), ours_text(r),
             ci_text(r), r["n"], verdict_md(verdict_text(r)), fmt(r["sd"]), used_text(r), needed_text(r),
             paper_seeds_text(r), r["paper_text"]] for r in res]
    out = ([noise_text(noise, left), ""] if noise is not None else [])
    out += [md_table(["claim (a vs b)", "source", "test", "ours: paired mean a − b (pp)", f"{LEVEL:.0%} CI", "n",
                      "verdict", "own sd", "sd used", "seeds for 80% power", "seeds for a paper-size effect",
                      "paper a − b"], rows), "", RULES, ""]
    out += [_detail(i, r) for i, r in enumerate(res, 1)]
    return out


def _stage_ids(cells: pd.DataFrame, rows: List[str]) -> str:
    """The evaluate stage ids behind a side of a claim (every planned cell of its rows), sorted: the comparison's
    identity across reports (recipes share stages)."""
    if not len(cells) or "evaluate_id" not in cells.columns:
        return ""
    return " ".join(sorted(str(x) for x in cells.loc[cells["row"].isin(rows), "evaluate_id"].dropna()))


def claims_frame(res: Optional[List[dict]], c: Collected, name: str) -> pd.DataFrame:
    """claims.csv: one row per claim. The columns up to `seeds` are those of earlier reports (ci_lo / ci_hi: the
    interval used, sd: the claim's own, seeds_needed: now at 80% power); the rest were added with the pooled noise."""
    recs = [{"report": name, "table": c.table, "profile": c.profile, "id": r["id"], "text": r["text"],
             "source": r["source"], "test": r["test"], "margin": r["margin"], "a": " ".join(r["a"]),
             "b": " ".join(r["b"]), "n": r["n"], "mean": r["mean"], "sd": r["sd"], "ci_lo": r["lo"], "ci_hi": r["hi"],
             "verdict": r["verdict"], "seeds_needed": r["seeds_needed"], "paper_diff": r["paper_value"],
             "seeds": " ".join(str(s) for s in r["seeds"]), "bound": r.get("bound"), "sd_pooled": r.get("sd_pooled"),
             "sd_used": r.get("sd_used"), "sd_source": r.get("sd_source", ""), "dof": r.get("dof"),
             "noise_sd": r.get("noise_sd"), "noise_dof": r.get("noise_dof"), "seeds_paper": r.get("seeds_paper", ""),
             "paper_powered": r.get("paper_powered"), "paper_outside": r.get("paper_outside"),
             "a_stages": _stage_ids(c.cells, r["a"]), "b_stages": _stage_ids(c.cells, r["b"])}
            for r in (res or [])]
    return pd.DataFrame(recs, columns=CLAIM_COLUMNS)


# ---------------------------------------------------------------------------------------------------- expected values
def expected_path(table: str, profile: str, expected_dir: Optional[Path] = EXPECTED_DIR) -> Path:
    """<expected_dir>/<table>.<profile>.csv; by default in the expected/ folder beside the table's recipe."""
    if expected_dir is None:
        expected_dir = (recipes.table_dir(table) or RECIPES_DIR) / "expected"
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


def write_expected(root: Path | Collected, expected_dir: Optional[Path] = EXPECTED_DIR,
                   tolerance: float = TOLERANCE_FLOOR) -> Path:
    """recipes/expected/<table>.<profile>.csv from the finished seeds of results/<table>/<profile> (or of a
    Collected: a report's kept data) (rows with no finished seed are left out). The committed file is the reference
    later runs are checked against."""
    c = root if isinstance(root, Collected) else collect(Path(root))
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


def expected_results(c: Collected, summary: pd.DataFrame, expected_dir: Path) -> Tuple[Path, Optional[List[dict]]]:
    """(the expected-values file, check_expected's results or None when the file does not exist)."""
    path = expected_path(c.table, c.profile, expected_dir)
    return path, (check_expected(summary, read_expected(path)) if path.is_file() else None)


def _expected(c: Collected, path: Path, res: Optional[List[dict]]) -> List[str]:
    if res is None:
        return [f"No expected values for `{c.table}` / `{c.profile}`: {shown_path(path)} does not exist. Write it "
                f"from these results with `python -m harness.report {c.table} --profile {c.profile} "
                "--write-expected` and commit it; later reports are then checked against it."]
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


def gates_of(c: Collected) -> dict:
    """The run's gate settings (recipe `gates:`), the defaults for a run planned before gates existed."""
    return {**GateConfig().__dict__, **((c.manifest.get("config") or {}).get("gates") or {})}


def _gates(gates: Optional[List[Gate]], res: Optional[List[dict]]) -> List[str]:
    """The positive controls first: can this profile see an effect of the kind the paper claims at all?"""
    if gates is None:
        return ["**Gates are off for this run** (`gates.enabled=false`): no positive control was checked, so a "
                "verdict below says nothing about whether this profile could have seen the paper's effect."]
    failed = not_passed(gates)
    paper = [r for r in (res or []) if r["source"] == "paper"]
    decided = [r for r in (res or []) if r["verdict"] in DECIDED]
    head = ("**All gates pass**: this profile can see an effect of the kind the paper claims, so its paper claims "
            "are judged below." if not failed else
            f"**Gate{'s' if len(failed) > 1 else ''} {', '.join(failed)} did not pass**: the paper claims below read "
            f"\"{NOT_TESTABLE}\" (their numbers are kept, for the record); claims about the official code's defaults "
            "are judged as usual.")
    rows = [[g.key, g.text, g.value, f"**{g.state}**" if g.passed else g.state, g.detail] for g in gates]
    return [head, "", md_table(["gate", "asks", "measured", "state", "detail"], rows), "",
            f"Claims: {len(decided)} of {len(res or [])} decided ({len(paper)} from the paper). Gates "
            "(harness/report/gates.py, the recipe's `gates:`): (i) the MAE row against the same student fine-tuned "
            "from random initialisation, paired (its own sd), interval's lower bound above the threshold; (ii) kNN "
            "probes (frozen features, test split) of the teacher's aligned block against the MAE student's last "
            "block; (iii) the convergence check below. "
            "A gate whose rows or probes are missing is not checked, and counts as not passed."]


# paper profile: the provided fine-tuned teacher's measured top-1 is set beside what its release reports
OFFICIAL_TEACHER = "context_not_paper/MAE official fine-tuned ViT-L (candidate fine-tuned teacher; unverified)"


def _teacher(c: Collected) -> List[str]:
    res = teacher_results(c)
    st = c.stages
    if not res and not st["role"].astype(str).str.startswith("teacher").any():
        return ["Teacher: no teacher stages in this plan (provided checkpoints)."]
    out = []
    ev = [r for r in res if r["role"] == "teacher-evaluate"]
    official = load_paper_numbers().get(OFFICIAL_TEACHER) if c.profile == "paper" else None
    for r in ev:
        beside = ""
        if official and official["value"] is not None and "provided" in r["stage_id"] and r["status"] == "done":
            beside = (f"; the official MAE fine-tuned ViT-L release reports {official['value']:.2f} "
                      f"({official['source']}; context, not a paper number): ours − official "
                      f"{r['top1'] - official['value']:+.2f}")
        out.append(f"Teacher (fine-tuned) test top-1: **{fmt(r['top1'])}** (top-5 {fmt(r['top5'])}, "
                   f"{fmt(r['n_eval'], 0)} test images; stage `{r['stage_id']}`{beside})" if r["status"] == "done" else
                   f"Teacher (fine-tuned) test top-1: not available — stage `{r['stage_id']}` is {r['status']}"
                   + (f": {str(r['reason'])[:160]}" if r["reason"] else ""))
    if not ev:
        out.append("Teacher (fine-tuned) test top-1: not available — this plan has no `teacher-evaluate` stage "
                   "(its rows distil the pre-trained teacher and none needs the fine-tuned one).")
    for r in st[st["role"] == "teacher-probe"].to_dict("records"):
        out.append(f"Teacher kNN probe (block {fmt(r.get('block'), 0)}, frozen, test split): **{fmt(r['top1'])}** "
                   f"(stage `{r['stage_id']}`)" if r["status"] == "done" else
                   f"Teacher kNN probe: not available — stage `{r['stage_id']}` is {r['status']}")
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
        probe = "—" if missing(r.get("probe_mean")) else fmt(r["probe_mean"]) + (
            f" ± {fmt(r['probe_std'])}" if not missing(r.get("probe_std")) else "")
        rows.append([f"`{r['row']}` {r['label']}", paper, reproduced(r), probe, r["delta_text"], r["status"]])
    out = ["Reproduced = the evaluation stage's TEST top-1 (the whole test split); fine-tuning monitors a validation "
           "split carved out of the training images, never the test split. Probe = the kNN top-1 (k = 20, "
           "harness/core/probe.py) of the row's encoder before fine-tuning (its last block, frozen; the scratch row: "
           "its random initialisation), bank = the training images, queries = the test split: it shows what "
           "pre-training put into the features, which fine-tuning can wash out.", "",
           md_table(["row", "paper", "reproduced test top-1 (mean ± std, n)", "probe top-1 (mean ± std)", "Δ",
                     "status"], rows), ""]
    out += _teacher(c) + [""]
    out += ["Paper sources (recipes/paper-numbers.csv):"] + [f"[{i}] {s}  " for i, s in enumerate(sources, 1)] + [""]
    out += ["Per seed (test top-1 of the evaluation stage; fine-tune validation best/last from its result and log):",
            ""]
    out.append(md_table(["row", "seed", "test top-1", "probe top-1", "val best (epoch)", "val last",
                         "val Δ last epoch", "test top-5", "status"], [
        [r["row"], r["seed"], fmt(r["top1"]), fmt(r.get("probe_top1")),
         f"{fmt(r['val_top1_best'])} ({fmt(r['val_top1_best_epoch'], 0)})",
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
    return out + _model_sizes(c, summary)


def si(x, unit: str = "") -> str:
    """1234567 -> '1.23 M'; '—' when missing."""
    if missing(x):
        return "—"
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _model_sizes(c: Collected, summary: pd.DataFrame) -> List[str]:
    """Parameters and FLOPs per image of each row's models (harness.report.artefacts.model_costs, kept in run.json)."""
    if not c.models:
        return []
    rows = []
    for r in summary.to_dict("records"):
        m = c.models.get(r["row"], {})
        count = lambda k: "—" if missing(m.get(k)) else f"{int(m[k]):,}"  # noqa: E731
        rows.append([f"`{r['row']}`", count("params"), count("params_pretrain"),
                     si(m.get("pretrain_flops_per_image"), "FLOP"), si(m.get("finetune_flops_per_image"), "FLOP"),
                     si(m.get("eval_flops_per_image"), "FLOP"), m.get("error", "")])
    return ["", "Model size and compute per image, from each row's resolved stage specs (harness/report/artefacts.py): "
            "trainable parameters of the models built on the meta device; FLOPs per image counted by "
            "harness/bench/flops.py for the step the benchmark builds from the same specs (forward + backward for a "
            "training step, forward for the evaluation). A DMAE pre-training step includes the teacher's forward up to "
            "its aligned block; a KD fine-tuning step the teacher's forward (on CPU at 28 px the harness looks its "
            "logits up instead).", "",
            md_table(["row", "parameters: fine-tuned classifier", "parameters: pre-training model (encoder, decoder, "
                      "projection heads)", "pre-training step", "fine-tuning step", "evaluation", "note"], rows)]


def _stages(c: Collected) -> List[str]:
    rows = []
    for r in c.stages.to_dict("records"):
        rows.append([f"`{r['stage_id']}`", r["role"], r["status"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4),
                     fmt(r["images_per_s"], 0), r["device_name"] if isinstance(r["device_name"], str) else "—",
                     (r["reason"] or "")[:200]])
    return [f"Each stage's merged spec is <stage>/config.json under {c.results} (results/ is not committed, "
            "so nothing there is linked).", "",
            md_table(["stage", "role", "status", "wall (s)", "device-h", "images/s", "device", "reason"], rows)]


def _provenance(c: Collected, writer: dict) -> List[str]:
    m, cfg, st = c.manifest, c.manifest.get("config", {}), c.stages
    commits = st["git_commit"].dropna().value_counts().sort_index()
    dirty = st.loc[st["git_dirty"].map(lambda v: v is True or str(v) == "True"), "stage_id"] \
        if "git_dirty" in st else pd.Series(dtype=object)
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
           + (", ".join(f"`{k}` ({v} stages)" for k, v in commits.items()) or "none")
           + (f"; {len(dirty)} stage(s) computed from a working tree with uncommitted changes" if len(dirty) else ""),
           f"- Resolved config: {c.results}/config.yaml and {c.results}/{MANIFEST_FILE} "
           "(not linked: results/ is not committed), so the key values are embedded here:", "", "```"]
    out += [f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in key.items()] + ["```", ""]
    out.append("- Hardware (finished stages): " + ("; ".join(
        f"{d} {n} ×{int(w) if w == w else '?'} on {h}: {int(r['count'])} stages, {r['sum']:.4f} device-h"
        for (d, n, w, h), r in hw.iterrows()) or "none"))
    out.append("- Runs used torch " + ", ".join(sorted(st["torch"].dropna().unique())) + ", python "
               + ", ".join(sorted(st["python"].dropna().unique())))
    out.append("- Packages where this report was written: " + ", ".join(versions))
    out.append(f"- Written by {writer['package']} {writer['package_version']}, code at commit "
               f"`{writer['git_commit'] or 'unknown (not a git checkout)'}`" + (
                   "" if writer["git_dirty"] is None else
                   " with uncommitted changes (`git status --porcelain` lists files outside the reports folder)"
                   if writer["git_dirty"] else ", working tree clean"))
    out.append(f"- Stages finished between {fin.min() if len(fin) else '—'} and {fin.max() if len(fin) else '—'}")
    out.append(f"- Report generated: {generated_at()}")
    return out


def generated_at() -> str:
    """Now, or SOURCE_DATE_EPOCH (seconds, UTC) when set: a reproducible build of the report."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(epoch)))
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------------------------------- names, index
def default_profile(table: str, recipes_dir: Optional[Path] = None) -> Optional[str]:
    """The profile named in the defaults list of <table>.yaml (on the recipe search path, or in recipes_dir) (None
    without a recipe or a profile default)."""
    path = Path(recipes_dir) / f"{table}.yaml" if recipes_dir is not None else recipes.find(f"{table}.yaml")
    if path is None or not path.is_file():
        return None
    for d in OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []:
        if isinstance(d, dict) and "profile" in d:
            return str(d["profile"])
    return None


def report_name(table: str, profile: str) -> str:
    """<table> for the recipe's default profile (the report `make reproduce` writes), <table>.<profile> otherwise."""
    return table if profile == default_profile(table) else f"{table}.{profile}"


def comparison_key(r: dict) -> tuple:
    """One distinct comparison behind claim lines of claims.csv (recipes share stages, so one comparison recurs under
    several ids): the evaluate stages behind a and b with the test, margin and bound; for a claims.csv written before
    a_stages / b_stages, (a rows, b rows, profile) with the test, margin and bound."""
    def num(k):
        try:
            return float(r.get(k) or "")
        except ValueError:
            return r.get(k) or ""
    test = (r.get("test", ""), num("margin"), num("bound"))
    if r.get("a_stages") and r.get("b_stages"):
        return ("stages", r["a_stages"], r["b_stages"]) + test
    return ("rows", r.get("a", ""), r.get("b", ""), r.get("profile", "")) + test


def _dof(r: dict) -> float:
    """The dof behind a claim line's interval (n - 1 in a claims.csv without `dof`); -1 without an interval."""
    if r.get("ci_lo", "") == "":
        return -1.0
    try:
        return float(r.get("dof") or float(r["n"]) - 1)
    except ValueError:
        return -1.0


def _tested(r: dict) -> bool:
    """A claim line that ran a test: it has an interval and no failed gate replaced its verdict."""
    return r.get("ci_lo", "") != "" and not r["verdict"].startswith(NOT_TESTABLE)


def _comparisons(lines: List[dict]) -> List[dict]:
    """Claim lines grouped by comparison_key, in order of first appearance: {lead, aliases, paper}. The lead, whose
    verdict counts, is the alias with the most degrees of freedom behind its interval (reports pool their noise over
    different rows), the first on ties; paper: whether any alias is a paper claim."""
    groups: Dict[tuple, List[dict]] = {}
    for r in lines:
        groups.setdefault(comparison_key(r), []).append(r)
    out = []
    for aliases in groups.values():
        lead = max(aliases, key=_dof)  # max keeps the first of equals
        out.append({"lead": lead, "aliases": aliases, "paper": any(a["source"] == "paper" for a in aliases)})
    return out


def _comparison_row(g: dict) -> list:
    r = g["lead"]
    num = lambda k: float(r[k]) if r.get(k) not in (None, "") else None  # noqa: E731
    mean, lo, hi, used = num("mean"), num("ci_lo"), num("ci_hi"), num("sd_used")
    diff = "—" if mean is None else f"{mean:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else "")
    sd = "—" if used is None else f"{used:.2f} ({r.get('sd_source', '')}, {r.get('dof', '')} dof)"
    differ = len({a["verdict"] for a in g["aliases"]}) > 1
    where = "; ".join(f"[{a['report']}]({a['report']}.md) `{a['id']}`" + (f": {a['verdict']}" if differ else "")
                      for a in g["aliases"])
    return [f"`{r['id']}` {r['text']}", "official default" if r["source"] == "official-default" else r["source"],
            verdict_md(r["verdict"]), diff, sd, r["n"], where]


def _chance_text(groups: List[dict]) -> str:
    """How many distinct tests a set ran, how many it decided, and how many decided verdicts chance alone gives."""
    lines = sum(len(g["aliases"]) for g in groups)
    tested = [g for g in groups if _tested(g["lead"])]
    decided = [g["lead"]["verdict"] for g in tested if g["lead"]["verdict"] in DECIDED]
    counts = ", ".join(f"{decided.count(v)} {v}" for v in DECIDED if v in decided)
    return (f"{len(groups)} distinct comparisons behind {lines} claim lines; {len(tested)} tested (an "
            f"interval, no failed gate); {len(decided)} decided" + (f" ({counts})" if counts else "") +
            f". Chance alone: at {LEVEL:.0%} intervals a test whose true difference sits on its decision boundary "
            f"comes out decided about {1 - LEVEL:.0%} of the time, so about {(1 - LEVEL) * len(tested):.1f} of these "
            f"{len(tested)} decided verdicts are expected with no real effect anywhere (an expectation, not a bound; "
            "comparisons that share rows are not independent).")


def write_index(reports_dir: Path) -> Path:
    """reports/README.md, the dashboard: every distinct comparison once (from each report's claims.csv, so no results
    are re-read), its aliases across reports listed; the paper claims first (the primary set) and counted apart from
    the official-default ones, with the decided verdicts chance alone would give; then a link to each report."""
    reports_dir = Path(reports_dir)
    reports = sorted(md for md in reports_dir.glob("*.md") if md.name != "README.md")
    lines = ["# Reports", "", "Generated by `python -m harness.reproduce <table>` (or `python -m harness.report "
             "<table>`) from real runs. `<table>.md` comes from the recipe's default profile (tiny: Fashion-MNIST "
             "on CPU, not ImageNet numbers); `<table>.<profile>.md` from other profiles.", "", "## Claims", "",
             "Each claim is judged on paired seeds (test top-1, a − b in points of the report's own dataset, "
             f"{LEVEL:.0%} t-interval, the report's pooled noise where a claim's own sd has few degrees of freedom); "
             "the rules are in each report's Claims section. Recipes share stages, so one comparison (the same "
             "evaluate stages on both sides, the same test and margin) can appear under several claim ids: it is "
             "listed and counted once, its verdict taken from the alias with the most degrees of freedom, and every "
             "alias named (with its verdict, where they differ). Only decided verdicts are in bold.", ""]
    claim_lines, without = [], []
    for md in reports:
        path = reports_dir / md.stem / "claims.csv"
        if not path.is_file():
            without.append(md.stem)
            continue
        claim_lines += [dict(r, report=md.stem) for r in pd.read_csv(path, dtype=str, keep_default_na=False)
                        .to_dict("records")]
    groups = _comparisons(claim_lines)
    headers = ["claim", "source", "verdict", "a − b (95% CI)", "sd used", "n", "reports (claim ids)"]
    for paper, title in ((True, "Paper claims (the primary set)"), (False, "Official-default claims")):
        part = [g for g in groups if g["paper"] == paper]
        if part:
            lines += [f"### {title}", "", _chance_text(part), "",
                      md_table(headers, [_comparison_row(g) for g in part]), ""]
    if not groups:
        lines += ["No report records its claims yet.", ""]
    if without:
        lines += ["Reports without a claims.csv (written before claims were recorded; regenerate them with "
                  "`python -m harness.report <table>`): " + ", ".join(f"[{s}]({s}.md)" for s in without) + ".", ""]
    lines += ["## Reports", ""]
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


# ---------------------------------------------------------------------------------------------------- summary
def _duration(seconds: Optional[float]) -> str:
    """'42.3 s', '29 min 03 s', '2 h 01 min 39 s'; '—' when unknown."""
    if missing(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    return (f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s")


def _stage_times(st: pd.DataFrame) -> dict:
    """Finished stages: summed wall time, and the span from the first start (a stage's finish minus its wall time:
    results record when a stage finished and how long it ran) to the last finish."""
    done = st[st["status"] == "done"]
    wall = pd.to_numeric(done["wall_s"], errors="coerce")
    out = {"wall_s": float(wall.sum()) if wall.notna().any() else None, "first_start": None, "last_finish": None,
           "span_s": None}
    ends, starts = [], []
    for fin, w in zip(done["finished_at"], wall):
        try:
            end = datetime.fromisoformat(str(fin))
        except (TypeError, ValueError):
            continue
        ends.append(end)
        if not missing(w):
            starts.append(end - timedelta(seconds=float(w)))
    if ends and starts:
        first, last = min(starts), max(ends)
        out.update(first_start=first.isoformat(timespec="seconds"), last_finish=last.isoformat(timespec="seconds"),
                   span_s=(last - first).total_seconds())
    return out


def overview(c: Collected, res: Optional[List[dict]], gates: Optional[List[Gate]], exp_path: Path,
             exp_res: Optional[List[dict]]) -> dict:
    """The numbers of the report's summary block (and summary.json's `overview`)."""
    verdicts = [r["verdict"] for r in res or []]
    count = lambda v: sum(x == v for x in verdicts)  # noqa: E731
    claims = {"total": len(verdicts) if res is not None else None, "decided": sum(v in DECIDED for v in verdicts),
              "holds": count(HOLDS), "does_not_hold": count(FAILS) + count(BELOW_BOUND),
              "paper_size_effect_excluded": count(PAPER_EXCLUDED), "inconclusive": count(UNSURE),
              "not_testable": sum(v.startswith(NOT_TESTABLE) for v in verdicts), "not_enough_data": count(NO_DATA),
              "not_applicable": count(NOT_APPLICABLE)}
    expected = {"file": recipe_path(exp_path), "rows": None, "within": None, "outside": [], "unchecked": []}
    if exp_res is not None:
        expected.update(rows=len(exp_res), within=sum(r["within"] is True for r in exp_res),
                        outside=[r["row"] for r in exp_res if r["within"] is False],
                        unchecked=[r["row"] for r in exp_res if r["within"] is None])
    st = c.stages
    by_status = {str(k): int(v) for k, v in st["status"].value_counts().sort_index().items()}
    stages = {"total": len(st), "done": by_status.get("done", 0), "by_status": by_status, **_stage_times(st)}
    failed = not_passed(gates) if gates else []
    gate = {"enabled": gates is not None, "passed": None if gates is None else not failed, "not_passed": failed,
            "verdict": "off (gates.enabled=false)" if gates is None else "all pass" if not failed else
            f"gate{'s' if len(failed) > 1 else ''} {', '.join(failed)} did not pass"}
    return {"claims": claims, "expected": expected, "stages": stages, "gates": gate}


def _overview_lines(ov: dict) -> List[str]:
    cl, ex, st, g = ov["claims"], ov["expected"], ov["stages"], ov["gates"]
    if cl["total"] is None:
        claims = "none in this run's manifest"
    elif not cl["total"]:
        claims = "the recipe has none"
    else:
        claims = (f"{cl['decided']} of {cl['total']} decided — {cl['holds']} hold, {cl['does_not_hold']} do not hold, "
                  f"{cl['paper_size_effect_excluded']} paper-size effect excluded; {cl['inconclusive']} inconclusive, "
                  f"{cl['not_testable']} not testable at this profile")
        extra = [f"{cl[k]} {k.replace('_', ' ')}" for k in ("not_enough_data", "not_applicable") if cl[k]]
        claims += "".join(f", {x}" for x in extra)
    if ex["rows"] is None:
        expected = f"none for this profile ({ex['file']} does not exist)"
    else:
        expected = f"{ex['within']} of {ex['rows']} rows within tolerance ({ex['file']})"
        if ex["outside"]:
            expected += "; outside: " + ", ".join(f"`{r}`" for r in ex["outside"])
        if ex["unchecked"]:
            expected += "; no finished seed or not in this run: " + ", ".join(f"`{r}`" for r in ex["unchecked"])
    others = [f"{n} {s}" for s, n in st["by_status"].items() if s != "done"]
    stages = f"{st['done']} of {st['total']} done" + (f" ({', '.join(others)})" if others else "")
    if st["wall_s"] is not None:
        stages += f"; {_duration(st['wall_s'])} of stage wall time summed"
    if st["span_s"] is not None:
        stages += (f", {_duration(st['span_s'])} from the first start to the last finish ({st['first_start']} → "
                   f"{st['last_finish']}; a start is its stage's finish minus its wall time)")
    return [f"- **Claims:** {claims}.", f"- **Expected values:** {expected}.", f"- **Stages:** {stages}.",
            f"- **Gates:** {g['verdict']}."]


def _interval_of(values: List[float]) -> Optional[List[float]]:
    p = paired(values)
    return None if p.lo is None else [p.lo, p.hi]


def summary_json(c: Collected, name: str, summary: pd.DataFrame, res: Optional[List[dict]],
                 gates: Optional[List[Gate]], exp_res: Optional[List[dict]], ov: dict, writer: dict) -> dict:
    """reports/<name>/summary.json: the report's numbers for machines (no time of generation, so the same inputs
    give the same bytes)."""
    exp_by = {r["row"]: r for r in exp_res or []}
    cells = c.cells
    rows = []
    for r in summary.to_dict("records"):
        done = cells[(cells["row"] == r["row"]) & (cells["status"] == "done")].dropna(subset=["top1"])
        e = exp_by.get(r["row"])
        rows.append({
            "row": r["row"], "label": r["label"], "method": r["method"], "n": int(r["n"]),
            "n_planned": int(r["n_planned"]), "mean": r["mean"], "sd": r["std"],
            "ci": _interval_of(list(r["seeds_top1"])), "top1_per_seed": {str(s): v for s, v in zip(done["seed"],
                                                                                                   done["top1"])},
            "expected": None if e is None else {k: e.get(k) for k in ("mean", "std", "n", "tolerance", "delta",
                                                                     "within")},
            "paper": r["paper_value"], "paper_key": r["paper_key"], "probe_top1": r["probe_mean"],
            "probe_sd": r["probe_std"], "probe_n": int(r["n_probe"]), "still_rising": bool(r["still_rising"]),
            **{k: v for k, v in c.models.get(r["row"], {}).items()}})
    claims = [{"name": r["id"], "text": r["text"], "source": r["source"], "test": r["test"], "margin": r["margin"],
               "bound": r.get("bound"), "a": r["a"], "b": r["b"], "verdict": r["verdict"], "estimate": r["mean"],
               "interval": None if r["lo"] is None else [r["lo"], r["hi"]], "n": r["n"], "sd_used": r.get("sd_used"),
               "sd_source": r.get("sd_source"), "dof": r.get("dof"), "paper_diff": r.get("paper_value")}
              for r in res or []]
    teacher = next((t for t in teacher_results(c) if t["role"] == "teacher-evaluate"), None)
    tprobe = summary["teacher_probe"].dropna() if len(summary) else pd.Series(dtype=float)
    methods = dict(zip(cells["row"], cells["method"])) if len(cells) else {}
    axes = ablation_axes(row_settings(c.specs), methods)
    m, st = c.manifest, c.stages
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    fin = st["finished_at"].dropna()
    return jsonable({
        "table": c.table, "profile": c.profile, "report": name, "title": m.get("title", ""), "results": c.results,
        "overview": ov, "rows": rows,
        "teacher": {"top1": None if teacher is None else teacher["top1"],
                    "probe_top1": float(tprobe.iloc[0]) if len(tprobe) else None},
        "claims": None if res is None else claims,
        "gates": {**ov["gates"], "gates": [{"key": g.key, "asks": g.text, "state": g.state, "measured": g.value,
                                            "detail": g.detail} for g in gates or []]},
        "ablations": [{"setting": a.key, "label": a.label, "moves_with": list(a.keys[1:]),
                       "series": [{"name": s.name, "points": [{"row": r, "value": x} for r, x in s.points]}
                                  for s in a.series]} for a in axes],
        "provenance": {
            "command": m.get("command"), "overrides": m.get("overrides", []),
            "git_commit_at_launch": m.get("git_commit"),
            "stage_git_commits": {str(k): int(v) for k, v in st["git_commit"].dropna().value_counts()
                                  .sort_index().items()},
            "stages_finished": [fin.min(), fin.max()] if len(fin) else None,
            "runs_torch": sorted(st["torch"].dropna().unique()), "runs_python": sorted(st["python"].dropna().unique()),
            "report_writer": writer, "packages": versions}})


# ---------------------------------------------------------------------------------------------------- writing
def _data_files(fig_dir: Path) -> List[Path]:
    """The data kept beside a report, in a fixed order, those that exist."""
    names = [f"{base}.{ext}" for base in ("cells", "stages", "rows", "epochs") for ext in ("csv", "parquet")]
    names += [RUN_FILE, "claims.csv", "summary.json"]
    return [fig_dir / n for n in names if (fig_dir / n).is_file()]


def write_report(root: Path, reports_dir: str | Path, figures: bool = True,
                 expected_dir: Optional[Path] = EXPECTED_DIR, costs: bool = True) -> Path:
    """results/<table>/<profile> -> <reports_dir>/<name>.md (+ figures and data, in <reports_dir>/<name>/), where
    name = report_name(table, profile); then the dashboard <reports_dir>/README.md. The tree is first exported
    (harness.report.collect.export: cells, stages, epochs, run.json; with costs, the rows' parameters and FLOPs) and the
    report is drawn from that export (render_report), so a clone's committed data gives the same report back.
    figures=False skips drawing (the slow part), for tests of the text."""
    c = collect(Path(root))
    name = report_name(c.table, c.profile)
    export(c, Path(reports_dir) / name, rows=False, models=model_costs(c.specs) if costs else {})
    return render_report(reports_dir, name, figures=figures, expected_dir=expected_dir)


def render_report(reports_dir: str | Path, name: str, figures: bool = True,
                  expected_dir: Optional[Path] = EXPECTED_DIR) -> Path:
    """<reports_dir>/<name>.md, its figures, rows.csv, claims.csv and summary.json from the data kept in
    <reports_dir>/<name>/ (harness.report.collect.load_export: run.json, cells.csv, stages.csv, epochs.csv); then the
    dashboard. No results tree is read."""
    reports_dir = Path(reports_dir)
    fig_dir = reports_dir / name
    c = load_export(fig_dir)
    papers = load_paper_numbers()
    summary = summarize(c, papers)
    claims = claims_of(c)
    noise, left = report_noise(c.cells)
    res = check_claims(claims, c.cells, summary, noise) if claims is not None else None
    gates = check_gates(c.cells, summary, gates_of(c)) if gates_of(c)["enabled"] else None
    if res is not None and gates:  # a paper claim on a profile whose positive controls did not pass is not testable
        res = [gate_verdict(r, not_passed(gates)) for r in res]
    exp_path, exp_res = expected_results(c, summary, expected_dir)
    teacher = next((t["top1"] for t in teacher_results(c) if t["role"] == "teacher-evaluate"
                    and not missing(t["top1"])), None)
    expected = {r["row"]: r["mean"] for r in exp_res or [] if not missing(r["mean"])}
    drawn = make_figures(c, summary, fig_dir, res, expected=expected, teacher=teacher) if figures else []
    summary.drop(columns=["seeds_top1"]).to_csv(fig_dir / "rows.csv", index=False)
    claims_frame(res, c, name).to_csv(fig_dir / "claims.csv", index=False)
    writer = writer_state(exclude=[reports_dir])
    ov = overview(c, res, gates, exp_path, exp_res)
    write_json(summary_json(c, name, summary, res, gates, exp_res, ov, writer), fig_dir / "summary.json")
    data = _data_files(fig_dir)
    over = [f"`{r['row']}` ({r['overridden']})" for r in summary.to_dict("records") if r.get("overridden")]
    warn = [f"- {w}" for w in c.warnings] + ([
        f"- Rows the command line changed against the recipe ({'; '.join(over)}): each is labelled with the change; "
        "its paper number and every claim on it read \"not applicable (overridden: …)\". Neutral overrides (seeds, "
        "paths, launcher, run.*, provided checkpoints) do not count."] if over else []) or ["None."]
    parts = [[f"# {c.table}: {c.manifest.get('title', '')}", "", "## Summary", ""], _overview_lines(ov), [""],
             _banner(c), ["", "## Gates", ""], _gates(gates, res),
             ["", "Statuses: done · failed (reason from error.json) · partial (running or interrupted) · unreadable "
              "(result file could not be read; skipped) · stale (computed from an input that has since failed or "
              "changed; the reason names it; the next run moves it aside and recomputes it) · not started.", "",
              "## Warnings", ""], warn,
             ["", "## Results", ""], _results(summary, c), ["", "## Claims", ""], _claims(res, noise, left),
             ["", "## Expected values", ""], _expected(c, exp_path, exp_res),
             ["", "## Figures", ""],
             [f"![{cap}]({name}/{png})" for cap, png in drawn]
             or ["Nothing to plot." if figures else "Figures not drawn (write_report(figures=False))."],
             ["", "Data: " + ", ".join(f"[{p.name}]({name}/{p.name})" for p in data) + f". The report comes back "
              f"from these without the results tree: `python -m harness.report {c.table} --profile {c.profile} "
              "--from-reports`.", "", "## Cost", ""],
             _cost(c, summary, papers), ["", "## Stages", ""], _stages(c), ["", "## Provenance", ""],
             _provenance(c, writer)]
    out = reports_dir / f"{name}.md"
    out.write_text("\n".join(line for part in parts for line in part) + "\n")
    write_index(reports_dir)
    return out


def kept_reports(reports_dir: Path, table: str) -> Dict[str, str]:
    """{profile: report name} of the reports of `table` whose data is kept in <reports_dir>/<name>/ (run.json)."""
    out: Dict[str, str] = {}
    reports_dir = Path(reports_dir)
    if not reports_dir.is_dir():
        return out
    for d in sorted(reports_dir.iterdir()):
        if not (d.name == table or d.name.startswith(f"{table}.")) or not (d / RUN_FILE).is_file():
            continue
        try:
            m = json.loads((d / RUN_FILE).read_text()).get("manifest", {})
        except (OSError, ValueError):
            continue
        if m.get("table") == table and m.get("profile"):
            out[str(m["profile"])] = d.name
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    p.add_argument("table")
    p.add_argument("--profile", default=None, help="default: the single profile with results (without a results "
                   "tree: the single kept report, else the recipe's default profile's)")
    p.add_argument("--results-root", default="results")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--from-reports", action="store_true",
                   help="redraw the report from the data kept beside it (<reports-dir>/<name>/: run.json, cells.csv, "
                        "stages.csv, epochs.csv), not from a results tree; the default when <results-root>/<table> "
                        "has no results (a clone)")
    p.add_argument("--write-expected", action="store_true",
                   help="also write recipes/expected/<table>.<profile>.csv from these results (then commit it)")
    p.add_argument("--expected-dir", type=Path, default=EXPECTED_DIR, help=argparse.SUPPRESS)
    p.add_argument("--recipe-dir", action="append", default=[], metavar="DIR",
                   help="a folder of your own recipes, searched before the package's (repeatable; also "
                        f"${recipes.PATH_ENV}): its expected/ holds its tables' expected values")
    args = p.parse_args(argv)
    try:
        recipes.add_dirs(args.recipe_dir)
    except NotADirectoryError as e:
        p.error(str(e))
    base = Path(args.results_root) / args.table
    found = sorted(d.name for d in base.iterdir() if (d / MANIFEST_FILE).exists()) if base.is_dir() else []
    profile = args.profile
    if args.from_reports or not found:
        kept = kept_reports(Path(args.reports_dir), args.table)
        if profile is None:
            default = default_profile(args.table)
            profile = next(iter(kept)) if len(kept) == 1 else default if default in kept else None
            if profile is None:
                p.error(f"{base}: no results, and {args.reports_dir} keeps "
                        + (f"several reports of {args.table} ({', '.join(kept)}); choose one with --profile"
                           if kept else f"no report data of {args.table} ({args.reports_dir}/<name>/{RUN_FILE})"))
        if profile not in kept:
            p.error(f"{args.reports_dir}: no kept data for {args.table} / {profile} ({RUN_FILE}); kept: "
                    f"{', '.join(kept) or 'none'}")
        if args.write_expected:
            print(write_expected(load_export(Path(args.reports_dir) / kept[profile]), args.expected_dir))
        print(render_report(args.reports_dir, kept[profile], expected_dir=args.expected_dir))
        return 0
    if profile is None and len(found) != 1:
        p.error(f"{base}: several profiles ({', '.join(found)}); choose one with --profile")
    if profile is not None and profile not in found:
        p.error(f"{base / profile}: no manifest.json; profiles with results: {', '.join(found) or 'none'}")
    root = base / (profile or found[0])
    if args.write_expected:
        print(write_expected(root, args.expected_dir))
    print(write_report(root, args.reports_dir, expected_dir=args.expected_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
