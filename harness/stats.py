"""Statistics behind the report's verdicts: paired seed differences, claim tests, seeds needed, convergence, and the
expected-value tolerance. Pure numpy / pandas / scipy; no knowledge of any recipe.

Seeds are paired: the same seed gives the same student initialisation, data order and masks in every row, so two
rows (or two groups of rows) are compared on their per-seed differences d_s = a_s - b_s over the seeds both have
finished. A group's value at a seed is the mean of its rows at that seed, taken only at seeds where every row of the
group has finished (a mean over a subset of the group would not be the group's value).

    >>> p = paired([1.0, 2.0, 3.0])          # mean 2, sd 1, n 3
    >>> round(p.lo, 4), round(p.hi, 4)        # 2 -/+ t(0.975, 2) * 1 / sqrt(3)
    (-0.4841, 4.4841)
    >>> verdict(p, "greater", 0.0)
    'inconclusive'
    >>> seeds_needed(p.mean, p.sd, "greater", 0.0)   # t(0.975, 3) / sqrt(4) = 1.59 < 2
    4

Claim tests (margins in top-1 points of the profile's dataset; the 95% interval is mean +- t(0.975, n-1) sd / sqrt(n)):

    greater  a - b > margin    holds: lower bound > margin;   does not hold: upper bound < margin
    within   |a - b| < margin  holds: interval inside (-margin, margin);
                               does not hold: interval entirely outside it (lower >= margin or upper <= -margin)

anything else is "inconclusive"; fewer than two paired seeds is "not enough data" (no interval). With zero spread
and n >= 2 the interval is the point itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from scipy import stats as _st

LEVEL = 0.95
TESTS = ("greater", "within")
SOURCES = ("paper", "official-default")
HOLDS, FAILS, UNSURE, NO_DATA, NOT_APPLICABLE = "holds", "does not hold", "inconclusive", "not enough data", \
    "not applicable"
DECIDED = (HOLDS, FAILS)
SEEDS_CAP = 1000  # seeds-needed search stops here ("> 1000")
RISING_PP = 0.5  # a fine-tune whose validation top-1 rose by at least this much in its last epoch is still rising
TOLERANCE_FLOOR = 0.5  # expected values: |ours - expected| <= max(floor, 3 std_ref / sqrt(n_ours))
TOLERANCE_SE = 3.0


def t_crit(n: int, level: float = LEVEL) -> float:
    """Two-sided critical value of Student's t with n - 1 degrees of freedom (n >= 2)."""
    return float(_st.t.ppf(0.5 + level / 2, n - 1))


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
    ok = cells[(cells["status"] == "done") & cells["row"].isin(list(rows))]
    ok = ok[pd.to_numeric(ok[value], errors="coerce").notna()]
    if ok.empty:
        return pd.Series(dtype=float, name=value)
    piv = ok.pivot_table(index="seed", columns="row", values=value, aggfunc="mean")
    piv = piv.reindex(columns=list(rows)).dropna()
    return piv.mean(axis=1).sort_index().rename(value)


def paired_diffs(a: pd.Series, b: pd.Series) -> pd.Series:
    """a_s - b_s over the seeds both have (sorted by seed)."""
    common = sorted(set(a.index) & set(b.index))
    return (a.reindex(common) - b.reindex(common)).astype(float)


def verdict(p: Paired, test: str, margin: float) -> str:
    if test not in TESTS:
        raise ValueError(f"test {test!r}: must be one of {', '.join(TESTS)}")
    if p.n < 2:
        return NO_DATA
    if test == "greater":
        return HOLDS if p.lo > margin else FAILS if p.hi < margin else UNSURE
    if -margin < p.lo and p.hi < margin:
        return HOLDS
    return FAILS if (p.lo >= margin or p.hi <= -margin) else UNSURE


def boundary_distance(mean: float, test: str, margin: float) -> float:
    """|mean - the decision boundary nearest to it| (greater: margin; within: -margin or +margin)."""
    if test == "greater":
        return abs(mean - margin)
    return min(abs(mean - margin), abs(mean + margin))


def seeds_needed(mean: float, sd: float, test: str, margin: float, cap: int = SEEDS_CAP) -> Union[int, str]:
    """The smallest number of paired seeds n >= 2 with t(0.975, n-1) sd / sqrt(n) < |mean - nearest boundary|, i.e.
    the seeds that would decide the claim if further seeds kept the observed mean and spread. "> cap" beyond the
    cap; "cannot be decided" when the mean sits exactly on the boundary (no n makes the interval clear it)."""
    dist = boundary_distance(mean, test, margin)
    if dist == 0 or not math.isfinite(dist):
        return "cannot be decided"
    for n in range(2, cap + 1):
        if t_crit(n) * sd / math.sqrt(n) < dist:
            return n
    return f"> {cap}"


def judge(claim: Mapping, cells: pd.DataFrame, value: str = "top1") -> dict:
    """One claim (a dict with id, text, a, b, test, margin, source, note) against collect's cell frame: the paired
    statistics, the verdict and, when inconclusive, the seeds that would decide it."""
    a, b = [str(r) for r in claim["a"]], [str(r) for r in claim["b"]]
    test, margin = claim["test"], float(claim["margin"])
    out = {"id": claim.get("id", ""), "text": claim.get("text", ""), "source": claim.get("source", "paper"),
           "note": claim.get("note") or "", "a": a, "b": b, "test": test, "margin": margin,
           "n": 0, "mean": None, "sd": None, "lo": None, "hi": None, "seeds": (), "seeds_needed": "",
           "unpaired": "", "missing_rows": []}
    present = set(cells["row"]) if len(cells) else set()
    out["missing_rows"] = [r for r in a + b if r not in present]
    if out["missing_rows"]:
        out["verdict"] = NOT_APPLICABLE
        return out
    va, vb = group_values(cells, a, value), group_values(cells, b, value)
    d = paired_diffs(va, vb)
    p = paired(d.values, d.index)
    only = [(f"seed {s} only in {side}") for side, v, w in (("a", va, vb), ("b", vb, va))
            for s in sorted(set(v.index) - set(w.index))]
    out.update(n=p.n, mean=p.mean, sd=p.sd, lo=p.lo, hi=p.hi, seeds=p.seeds, unpaired="; ".join(only),
               verdict=verdict(p, test, margin))
    if out["verdict"] == UNSURE:
        out["seeds_needed"] = seeds_needed(p.mean, p.sd, test, margin)
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
