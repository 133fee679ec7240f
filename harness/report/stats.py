"""Statistics behind the report's verdicts: paired seed differences, the whole report's noise, claim tests, seeds at
80% power, convergence, and the expected-value tolerance. Pure numpy / pandas / scipy; no knowledge of any recipe.

Seeds are paired: the same seed gives the same student initialisation, data order and masks in every row, so two
rows (or two groups of rows) are compared on their per-seed differences d_s = a_s - b_s over the seeds both have
finished. A group's value at a seed is the mean of its rows at that seed, taken only at seeds where every row of the
group has finished (a mean over a subset of the group would not be the group's value).

    >>> p = paired([1.0, 2.0, 3.0])          # mean 2, sd 1, n 3
    >>> round(p.lo, 4), round(p.hi, 4)        # 2 -/+ t(0.975, 2) * 1 / sqrt(3)
    (-0.4841, 4.4841)
    >>> verdict(p, "greater", 0.0)
    'inconclusive'
    >>> seeds_for_power(2.0, 1.0)             # (t(0.975, 4) + t(0.8, 4)) / sqrt(5) = 1.66 <= 2; n = 4: 2.08
    5

The noise of the whole report (two_way_noise): a claim's own sd of the d_s has only n - 1 degrees of freedom (2 with
three seeds), so its interval is wide mostly because the sd itself is uncertain. Every row of a report sees the same
seeds, so the report's top-1 table is fitted by least squares as value ~ row + seed (an effect per row, an effect per
seed, nothing else); the residual sd sigma of that fit, with dof = n_obs - rank (n_obs - n_rows - n_seeds + 1 for a
connected table), estimates the seed-to-seed noise of any one row around the additive structure. Under that model a
group of |a| rows has noise sigma / sqrt(|a|) at a seed, so a paired difference has sd sigma * sqrt(1/|a| + 1/|b|).
Rows that share a pre-train (the KD row fine-tunes the MAE row's pre-train) do not have independent noise; the
caller passes one of them only.

Which sd a claim uses (judge): its own when it has >= MIN_OWN_DOF (6) degrees of freedom; otherwise the pooled one
when a noise estimate is given and has more degrees of freedom than the claim's own; t's degrees of freedom follow
the sd. The interval is mean +- t(0.975, dof) sd / sqrt(n); with the own sd that is t(0.975, n-1) sd / sqrt(n).

Claim tests (margins and bounds in top-1 points of the profile's dataset):

    greater  a - b > margin    holds: lower limit > margin;   does not hold: upper limit < margin;
                               with a bound (smallest effect of interest, >= 0): "does not hold (effect < bound)"
                               when the upper limit < margin + bound (and it neither holds nor plainly fails)
    within   |a - b| < margin  holds: interval inside (-margin, margin);
                               does not hold: interval entirely outside it (lower >= margin or upper <= -margin)

anything else is "inconclusive", or "paper-size effect excluded" when the interval leaves out the paper's own a - b
(holds / does not hold take precedence; a decided claim whose interval leaves out the paper's a - b says so in
`paper_outside`). Fewer than two paired seeds is "not enough data" (no interval); a claim naming a row the run does
not have is "not applicable". With zero spread and n >= 2 the interval is the point itself. gate_verdict turns a
paper claim into "not testable at this profile (gate ... did not pass)" when a check of the profile did not pass.

A bound makes a `greater` claim decidable at every observed mean: the interval has to clear only the farther of the
margin and margin + bound, which are `bound` apart (boundary_distance). Without it a mean on the margin needs
infinitely many seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from scipy import stats as _st

LEVEL = 0.95
POWER = 0.8
TESTS = ("greater", "within")
# where a claim comes from: the paper | the official code's default (at least as good as the alternative) | the
# user's own hypothesis. Only a paper claim is set against the paper's a - b and turned "not testable" by a failed gate
SOURCES = ("paper", "official-default", "user")
USER = "user"
HOLDS, FAILS, UNSURE, NO_DATA, NOT_APPLICABLE = "holds", "does not hold", "inconclusive", "not enough data", \
    "not applicable"
BELOW_BOUND = "does not hold (effect < bound)"
PAPER_EXCLUDED = "paper-size effect excluded"
NOT_TESTABLE = "not testable at this profile"  # gate_verdict: f"{NOT_TESTABLE} (gate ... did not pass)"
DECIDED = (HOLDS, FAILS, BELOW_BOUND, PAPER_EXCLUDED)
MIN_OWN_DOF = 6  # a claim's own sd is used from n - 1 >= 6 degrees of freedom on
SEEDS_CAP = 1000  # seeds-needed search stops here ("> 1000")
RISING_PP = 0.5  # a fine-tune whose validation top-1 rose by at least this much in its last epoch is still rising
TOLERANCE_FLOOR = 0.5  # expected values: |ours - expected| <= max(floor, 3 std_ref / sqrt(n_ours))
TOLERANCE_SE = 3.0


def t_crit(n: int, level: float = LEVEL) -> float:
    """Two-sided critical value of Student's t with n - 1 degrees of freedom (n >= 2)."""
    return t_quantile(n - 1, level)


def t_quantile(dof: float, level: float = LEVEL) -> float:
    """Two-sided critical value of Student's t with `dof` degrees of freedom: t(0.5 + level / 2, dof)."""
    return float(_st.t.ppf(0.5 + level / 2, dof))


@dataclass(frozen=True)
class Paired:
    """Mean, sd (ddof=1) and t-interval of paired differences; mean/sd/lo/hi are None when n < 2 (mean: n < 1)."""
    n: int
    mean: Optional[float]
    sd: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    seeds: Tuple[int, ...] = ()

    @property
    def half_width(self) -> Optional[float]:
        return None if self.lo is None else (self.hi - self.lo) / 2


def paired(diffs: Iterable[float], seeds: Sequence[int] = (), level: float = LEVEL) -> Paired:
    d = np.asarray([float(x) for x in diffs], dtype=float)
    n = len(d)
    seeds = tuple(int(s) for s in seeds)
    if n == 0:
        return Paired(0, None, None, None, None, seeds)
    mean = float(d.mean())
    if n < 2:
        return Paired(n, mean, None, None, None, seeds)
    sd = float(d.std(ddof=1))
    hw = t_crit(n, level) * sd / math.sqrt(n)
    return Paired(n, mean, sd, mean - hw, mean + hw, seeds)


def group_values(cells: pd.DataFrame, rows: Sequence[str], value: str = "top1") -> pd.Series:
    """Per seed (index, sorted): the mean of `value` over `rows`, at seeds where every row of the group is done with a
    finite value. `cells` is collect's per-cell frame (columns row, seed, status, value)."""
    ok = _finished(cells, rows, value)
    if ok.empty:
        return pd.Series(dtype=float, name=value)
    piv = ok.pivot_table(index="seed", columns="row", values=value, aggfunc="mean")
    piv = piv.reindex(columns=list(rows)).dropna()
    return piv.mean(axis=1).sort_index().rename(value)


def _finished(cells: pd.DataFrame, rows: Sequence[str], value: str) -> pd.DataFrame:
    """The cells of `rows` that are done with a finite `value` (as float)."""
    if not len(cells):
        return pd.DataFrame(columns=["row", "seed", value])
    ok = cells[(cells["status"] == "done") & cells["row"].isin(list(rows))].copy()
    ok[value] = pd.to_numeric(ok[value], errors="coerce")
    return ok[np.isfinite(ok[value].astype(float))]


def paired_diffs(a: pd.Series, b: pd.Series) -> pd.Series:
    """a_s - b_s over the seeds both have (sorted by seed)."""
    common = sorted(set(a.index) & set(b.index))
    return (a.reindex(common) - b.reindex(common)).astype(float)


# ---------------------------------------------------------------------------------------------------- pooled noise
@dataclass(frozen=True)
class Noise:
    """The residual sd of the two-way fit value ~ row + seed over a report's distinct rows (two_way_noise). sd is
    None when the fit leaves no degrees of freedom."""
    sd: Optional[float]
    dof: int
    n_rows: int
    n_seeds: int
    n_obs: int = 0
    rows: Tuple[str, ...] = ()

    def pair_sd(self, n_a: int, n_b: int) -> Optional[float]:
        """sd of (mean of n_a rows) - (mean of n_b rows) at one seed: sigma * sqrt(1/n_a + 1/n_b)."""
        return None if self.sd is None else self.sd * math.sqrt(1 / n_a + 1 / n_b)


def two_way_noise(cells: pd.DataFrame, rows: Sequence[str], value: str = "top1") -> Noise:
    """Least-squares fit of value ~ row + seed (an intercept, a dummy per row but the first, a dummy per seed but the
    first) to the finished cells of `rows` with a finite value; the table may be incomplete. dof = n_obs - rank of the
    design, which is n_obs - n_rows - n_seeds + 1 when the table is connected (every row shares a seed with another);
    sigma = sqrt(residual sum of squares / dof), None when dof < 1. Duplicate (row, seed) cells are averaged."""
    rows = list(dict.fromkeys(str(r) for r in rows))
    ok = _finished(cells, rows, value)
    if ok.empty:
        return Noise(None, 0, 0, 0, 0, ())
    ok = ok.assign(row=ok["row"].astype(str)).groupby(["row", "seed"], as_index=False)[value].mean()
    used = tuple(r for r in rows if r in set(ok["row"]))
    seeds = sorted(set(ok["seed"]))
    x = np.column_stack([np.ones(len(ok))]
                        + [(ok["row"] == r).to_numpy(float) for r in used[1:]]
                        + [(ok["seed"] == s).to_numpy(float) for s in seeds[1:]])
    y = ok[value].to_numpy(float)
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(y) - int(rank)
    rss = float(np.sum((y - x @ coef) ** 2))
    sd = math.sqrt(rss / dof) if dof >= 1 else None
    return Noise(sd, dof, len(used), len(seeds), len(y), used)


# ---------------------------------------------------------------------------------------------------- verdicts
def verdict(p: Paired, test: str, margin: float, bound: Optional[float] = None) -> str:
    """The claim's verdict from its interval (see the module docstring); `bound` only for `greater`."""
    if test not in TESTS:
        raise ValueError(f"test {test!r}: must be one of {', '.join(TESTS)}")
    if p.n < 2 or p.lo is None:
        return NO_DATA
    if test == "greater":
        if p.lo > margin:
            return HOLDS
        if p.hi < margin:
            return FAILS
        return BELOW_BOUND if bound is not None and p.hi < margin + bound else UNSURE
    if -margin < p.lo and p.hi < margin:
        return HOLDS
    return FAILS if (p.lo >= margin or p.hi <= -margin) else UNSURE


def boundary_distance(mean: float, test: str, margin: float, bound: Optional[float] = None) -> float:
    """How far the interval's half-width may reach for a claim with this mean to be decided. greater: |mean - margin|;
    with a bound the farther of mean - margin (to hold) and margin + bound - mean (to end below the bound), as either
    decides it; within: |mean - the nearer of -margin, +margin|."""
    if test == "greater":
        if bound is not None:
            return max(mean - margin, margin + bound - mean)
        return abs(mean - margin)
    return min(abs(mean - margin), abs(mean + margin))


def seeds_for_power(delta: float, sd: float, power: float = POWER, level: float = LEVEL,
                    cap: int = SEEDS_CAP) -> Union[int, str]:
    """The smallest number of paired seeds n >= 2 with

        (t(1 - alpha/2, n-1) + t(power, n-1)) * sd / sqrt(n) <= |delta|,      alpha = 1 - level,

    the usual sample-size rule: if the true difference is |delta| from the boundary the interval must clear, the
    interval (half-width t(1 - alpha/2, n-1) sd / sqrt(n)) clears it with probability about `power` (the sd taken as
    known; the exact answer uses the non-central t and is a seed or so larger at small n). power = 0.5 gives
    t(0.5, .) = 0: the n at which the expected interval just clears the boundary. "> cap" beyond the cap;
    "cannot be decided" when delta is 0 or not finite (nothing to detect); 2 when sd is 0."""
    if not math.isfinite(delta) or delta == 0 or sd is None or not math.isfinite(sd):
        return "cannot be decided"
    n = np.arange(2, cap + 1)
    need = (_st.t.ppf(0.5 + level / 2, n - 1) + _st.t.ppf(power, n - 1)) * float(sd) / np.sqrt(n)
    hit = np.flatnonzero(need <= abs(delta))
    return int(n[hit[0]]) if len(hit) else f"> {cap}"


def seeds_needed(mean: float, sd: float, test: str, margin: float, bound: Optional[float] = None,
                 power: float = POWER, cap: int = SEEDS_CAP) -> Union[int, str]:
    """seeds_for_power for the distance from `mean` to the boundary the interval must clear (boundary_distance): the
    paired seeds that would decide the claim with probability `power` if the true difference were `mean`."""
    return seeds_for_power(boundary_distance(mean, test, margin, bound), sd, power, cap=cap)


def choose_sd(own: Paired, n_a: int, n_b: int, noise: Optional[Noise]) -> Tuple[Optional[float], int, str]:
    """(sd, dof, source) for a claim's interval: its own sd with n - 1 dof when n - 1 >= MIN_OWN_DOF; else the pooled
    sigma * sqrt(1/n_a + 1/n_b) with the noise's dof when that has more dof than the claim's own; else its own."""
    own_dof = max(own.n - 1, 0)
    if own_dof < MIN_OWN_DOF and noise is not None and noise.sd is not None and noise.dof > own_dof:
        return noise.pair_sd(n_a, n_b), noise.dof, "pooled"
    return own.sd, own_dof, "own"


def interval(p: Paired, sd: Optional[float], dof: int, level: float = LEVEL) -> Paired:
    """p with the interval mean +- t(0.5 + level/2, dof) sd / sqrt(n) (sd the one used); unchanged when n < 2."""
    if p.n < 2 or sd is None or dof < 1:
        return p
    hw = t_quantile(dof, level) * sd / math.sqrt(p.n)
    return Paired(p.n, p.mean, sd, p.mean - hw, p.mean + hw, p.seeds)


def judge(claim: Mapping, cells: pd.DataFrame, noise: Optional[Noise] = None, paper: Optional[float] = None,
          value: str = "top1") -> dict:
    """One claim (a dict with id, text, a, b, test, margin, bound, source, note) against collect's cell frame: the
    paired statistics, the sd it uses (its own or the pooled one, choose_sd), the interval and the verdict; for an
    undecided claim the seeds for 80% power at the observed mean (seeds_needed). `paper`, the paper's a - b when
    known, turns an inconclusive verdict whose interval leaves it out into "paper-size effect excluded" and gives the
    seeds for 80% power were the true difference the paper's (seeds_paper; paper_powered: whether n reaches them).
    A user's claim (source `user`) is never set against a paper number: `paper` is ignored for it (paper_value None).

    Keys: id text source note a b test margin bound | n mean seeds unpaired missing_rows | sd (the claim's own, ddof 1)
    sd_pooled (sigma * sqrt(1/|a| + 1/|b|); None without noise) noise_sd noise_dof | sd_used dof sd_source (own |
    pooled) lo hi (the interval used) | verdict seeds_needed | paper_value paper_outside seeds_paper paper_powered
    below_bound (holds, but the upper limit is below margin + bound)."""
    a, b = [str(r) for r in claim["a"]], [str(r) for r in claim["b"]]
    test, margin = claim["test"], float(claim["margin"])
    bound = claim.get("bound")
    bound = None if bound is None or (isinstance(bound, float) and math.isnan(bound)) else float(bound)
    if claim.get("source") == USER:
        paper = None
    out = {"id": claim.get("id", ""), "text": claim.get("text", ""), "source": claim.get("source", "paper"),
           "note": claim.get("note") or "", "a": a, "b": b, "test": test, "margin": margin, "bound": bound,
           "n": 0, "mean": None, "sd": None, "sd_pooled": None, "sd_used": None, "dof": None, "sd_source": "",
           "noise_sd": noise.sd if noise else None, "noise_dof": noise.dof if noise else None,
           "lo": None, "hi": None, "seeds": (), "seeds_needed": "", "paper_value": paper, "paper_outside": None,
           "seeds_paper": "", "paper_powered": None, "below_bound": False, "unpaired": "", "missing_rows": []}
    present = set(cells["row"]) if len(cells) else set()
    out["missing_rows"] = [r for r in a + b if r not in present]
    if out["missing_rows"]:
        out["verdict"] = NOT_APPLICABLE
        return out
    va, vb = group_values(cells, a, value), group_values(cells, b, value)
    d = paired_diffs(va, vb)
    own = paired(d.values, d.index)
    only = [(f"seed {s} only in {side}") for side, v, w in (("a", va, vb), ("b", vb, va))
            for s in sorted(set(v.index) - set(w.index))]
    sd, dof, source = choose_sd(own, len(a), len(b), noise)
    p = interval(own, sd, dof)
    out.update(n=p.n, mean=p.mean, sd=own.sd, sd_pooled=noise.pair_sd(len(a), len(b)) if noise else None,
               lo=p.lo, hi=p.hi, seeds=p.seeds, unpaired="; ".join(only), verdict=verdict(p, test, margin, bound))
    if p.lo is None:
        return out
    out.update(sd_used=sd, dof=dof, sd_source=source,
               below_bound=bool(out["verdict"] == HOLDS and bound is not None and p.hi < margin + bound))
    if out["verdict"] == UNSURE:
        out["seeds_needed"] = seeds_needed(p.mean, sd, test, margin, bound)
    if paper is not None:
        _against_paper(out, float(paper), p, sd, test, margin, bound)
    return out


def _against_paper(out: dict, paper: float, p: Paired, sd: float, test: str, margin: float,
                   bound: Optional[float]) -> None:
    """The paper's a - b against our interval: paper_outside, the paper-size-excluded verdict, seeds_paper (80% power
    if the true difference were the paper's) and paper_powered (n >= seeds_paper)."""
    out["paper_outside"] = bool(paper < p.lo or paper > p.hi)
    if out["verdict"] == UNSURE and out["paper_outside"]:
        out["verdict"] = PAPER_EXCLUDED
    need = seeds_for_power(boundary_distance(paper, test, margin, bound), sd)
    out["seeds_paper"] = need
    out["paper_powered"] = isinstance(need, int) and p.n >= need


def gate_verdict(result: Mapping, failed_gates: Sequence[str]) -> dict:
    """A judged claim (judge's dict) under the profile's gates: when any gate did not pass and the claim's source is
    `paper`, its verdict becomes f"{NOT_TESTABLE} (gate <names> did not pass)" (not decided; the statistics are
    kept, the verdict it had is in `verdict_ungated`). A claim with no interval to judge ("not enough data", "not
    applicable") keeps that more basic state. Otherwise the claim unchanged (a copy)."""
    out = dict(result)
    failed = [str(g) for g in failed_gates if g]
    if failed and out.get("source", "paper") == "paper" and out.get("verdict") not in (NO_DATA, NOT_APPLICABLE):
        out["verdict_ungated"] = out.get("verdict")
        out["gates_failed"] = failed
        out["verdict"] = f"{NOT_TESTABLE} (gate {', '.join(failed)} did not pass)"
    return out


# ---------------------------------------------------------------------------------------------------- convergence
def metric_curve(records: Iterable[Mapping], keys: Sequence[str] = ("val_top1", "top1")) -> List[Tuple[int, float]]:
    """(epoch, value) of the first key present in the records (val_top1; top1 in results written before the
    validation split), sorted by epoch."""
    records = [r for r in records if isinstance(r, Mapping)]
    for key in keys:
        pts = [(int(r["epoch"]), float(r[key])) for r in records
               if "epoch" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            return sorted(pts)
    return []


def last_epoch_gain(records: Iterable[Mapping]) -> Optional[float]:
    """The validation top-1 change over the last epoch (last - previous); None with fewer than two epochs."""
    pts = metric_curve(records)
    return pts[-1][1] - pts[-2][1] if len(pts) >= 2 else None


def still_rising(records: Iterable[Mapping], threshold: float = RISING_PP) -> bool:
    gain = last_epoch_gain(records)
    return gain is not None and gain >= threshold


# ---------------------------------------------------------------------------------------------------- expected values
def tolerance(floor: float, std_ref: Optional[float], n_ours: int) -> float:
    """max(floor, 3 std_ref / sqrt(n_ours)); the floor alone when std_ref is unknown (n_ref < 2)."""
    floor = TOLERANCE_FLOOR if floor is None or not math.isfinite(floor) else float(floor)
    if std_ref is None or not math.isfinite(std_ref) or n_ours < 1:
        return floor
    return max(floor, TOLERANCE_SE * float(std_ref) / math.sqrt(n_ours))


def expected_check(exp_mean: float, exp_std: Optional[float], floor: float, ours_mean: Optional[float],
                   n_ours: int) -> dict:
    """{delta, tolerance, within} of ours against an expected value; within is None without a number of ours."""
    tol = tolerance(floor, exp_std, n_ours)
    if ours_mean is None or not n_ours or not math.isfinite(ours_mean):
        return {"delta": None, "tolerance": tol, "within": None}
    delta = float(ours_mean) - float(exp_mean)
    return {"delta": delta, "tolerance": tol, "within": abs(delta) <= tol}
