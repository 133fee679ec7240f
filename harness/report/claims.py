"""A report's claims: the recipe's `claims:` section (carried by the run's manifest) judged on paired seeds against
the paper's differences (check_claims; the whole report's pooled noise from its distinct rows, report_noise), the
Claims section of the report (claims_section: a table, the rules, a numbered line per claim) and claims.csv
(claims_frame)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pandas as pd

from harness.plan.schema import CONTROL_METHOD
from harness.report.collect import NOT_AVAILABLE, Collected, overridden_text
from harness.report.formatting import fmt, md_table, missing, signed
from harness.report.stats import (DECIDED, LEVEL, MIN_OWN_DOF, NOT_APPLICABLE, USER, Noise, boundary_distance, judge,
                                  two_way_noise)

CLAIM_COLUMNS = ["report", "table", "profile", "id", "text", "source", "test", "margin", "a", "b", "n", "mean", "sd",
                 "ci_lo", "ci_hi", "verdict", "seeds_needed", "paper_diff", "seeds",
                 # added with the pooled noise (claims.csv files written before lack them)
                 "bound", "sd_pooled", "sd_used", "sd_source", "dof", "noise_sd", "noise_dof", "seeds_paper",
                 "paper_powered", "paper_outside", "a_stages", "b_stages"]


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


def claims_section(res: Optional[List[dict]], noise: Optional[Noise] = None,
                   left: Optional[Dict[str, str]] = None) -> List[str]:
    """The Claims section: the report's noise, a table of the claims, the rules, then a numbered line per claim."""
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
