"""The dashboard, <reports-dir>/README.md (write_index): every distinct comparison of the reports' claims once, from
each report's claims.csv (recipes share stages, so one comparison recurs under several claim ids), the paper claims
apart from the official-default ones, with the decided verdicts chance alone would give; then a link to each report."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pandas as pd

from harness.report.claims import verdict_md
from harness.report.formatting import md_table
from harness.report.stats import DECIDED, LEVEL, NOT_TESTABLE


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
