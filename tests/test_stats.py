"""harness.report.stats and the claims schema: paired intervals against hand-computed values, the pooled two-way noise
against a hand-computed fit, every verdict state of both tests (bound, paper-size effect, gate), seeds at 80% power,
the convergence flag, the expected-value tolerance, and claims parsed / refused in a recipe.
Fast: no training, no results tree."""
import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import stats as st

from harness.plan.config import ConfigError, validate_claims
from harness.plan.schema import TableConfig
from harness.report.stats import (BELOW_BOUND, DECIDED, FAILS, HOLDS, NO_DATA, NOT_APPLICABLE, NOT_TESTABLE,
                                  PAPER_EXCLUDED, UNSURE, Noise, boundary_distance, expected_check, gate_verdict,
                                  group_values, judge, last_epoch_gain, paired, seeds_for_power, seeds_needed,
                                  still_rising, t_crit, tolerance, two_way_noise, verdict)

T2 = 4.302653  # t(0.975, 2)


# ---------------------------------------------------------------------------------------------------- intervals
def test_paired_interval_by_hand():
    p = paired([1.0, 2.0, 3.0], seeds=[0, 1, 2])
    assert p.n == 3 and p.mean == 2.0 and math.isclose(p.sd, 1.0) and p.seeds == (0, 1, 2)
    assert math.isclose(t_crit(3), T2, abs_tol=1e-6)
    hw = T2 * 1.0 / math.sqrt(3)  # 2.4841
    assert math.isclose(hw, 2.4841, abs_tol=1e-4)
    assert math.isclose(p.lo, 2.0 - hw, abs_tol=1e-5) and math.isclose(p.hi, 2.0 + hw, abs_tol=1e-5)
    # two seeds: t(0.975, 1) = 12.7062; diffs [1, 3]: mean 2, sd sqrt(2), hw = 12.7062 * sqrt(2) / sqrt(2)
    p2 = paired([1.0, 3.0])
    assert math.isclose(p2.hi - p2.mean, 12.7062, abs_tol=1e-4)


def test_fewer_than_two_seeds_and_zero_spread():
    assert paired([]).n == 0 and paired([]).mean is None
    one = paired([1.5])
    assert one.n == 1 and one.mean == 1.5 and one.lo is None and verdict(one, "greater", 0.0) == NO_DATA
    assert verdict(paired([]), "within", 1.0) == NO_DATA
    flat = paired([2.0, 2.0, 2.0])
    assert flat.sd == 0.0 and flat.lo == flat.hi == 2.0  # the interval is the point
    assert verdict(flat, "greater", 1.0) == HOLDS and verdict(flat, "greater", 3.0) == FAILS
    assert verdict(flat, "greater", 2.0) == UNSURE  # on the boundary: neither strictly above nor below
    assert seeds_needed(2.0, 0.0, "greater", 2.0) == "cannot be decided"


@pytest.mark.parametrize("diffs, margin, expected", [
    ([1.0, 1.1, 0.9], 0.0, HOLDS),  # CI about [0.75, 1.25] > 0
    ([-1.0, -1.1, -0.9], 0.0, FAILS),  # CI < 0
    ([1.0, 2.0, 3.0], 0.0, UNSURE),  # CI [-0.48, 4.48] straddles 0
    ([-2.0, -2.1, -1.9], -3.0, HOLDS),  # "at most 3 pp below": -2 > -3, clear
    ([1.0], 0.0, NO_DATA),
])
def test_greater_verdicts(diffs, margin, expected):
    assert verdict(paired(diffs), "greater", margin) == expected


@pytest.mark.parametrize("diffs, expected", [
    ([0.1, 0.2, 0.0], HOLDS),  # CI about [-0.15, 0.35] inside (-1, 1)
    ([3.0, 3.1, 2.9], FAILS),  # entirely above +1
    ([-3.0, -3.1, -2.9], FAILS),  # entirely below -1
    ([0.5, 1.5, 1.0], UNSURE),  # CI 1 +- 1.24 straddles +1
    ([-0.5, 0.5, 0.0, 0.1, -0.1, 0.9, -0.9], HOLDS),
    ([], NO_DATA),
])
def test_within_verdicts(diffs, expected):
    assert verdict(paired(diffs), "within", 1.0) == expected


def test_unknown_test_is_refused():
    with pytest.raises(ValueError, match="greater, within"):
        verdict(paired([1.0, 2.0]), "bigger", 0.0)


# ---------------------------------------------------------------------------------------------------- seeds needed
def test_seeds_for_power_by_hand():
    # the rule, iterated here with scipy's t quantiles: smallest n >= 2 with (t(.975, n-1) + t(.8, n-1)) sd/sqrt(n) <= d
    def by_hand(delta, sd):
        n = 2
        while (st.t.ppf(0.975, n - 1) + st.t.ppf(0.8, n - 1)) * sd / math.sqrt(n) > abs(delta):
            n += 1
        return n
    assert seeds_for_power(0.7, 1.3) == by_hand(0.7, 1.3) == seeds_for_power(-0.7, 1.3)
    # known value: delta = sd = 1 -> n = 10 (n=9: (2.3060 + 0.8889) / 3 = 1.065 > 1; n=10: (2.2622 + 0.8834) / 3.1623
    # = 0.995 <= 1)
    assert seeds_for_power(1.0, 1.0) == 10
    assert (st.t.ppf(.975, 8) + st.t.ppf(.8, 8)) / 3 > 1.0 >= (st.t.ppf(.975, 9) + st.t.ppf(.8, 9)) / math.sqrt(10)
    assert seeds_for_power(2.0, 1.0) == 5 and seeds_for_power(1.0, 0.0) == 2
    assert seeds_for_power(0.0, 1.0) == "cannot be decided" and seeds_for_power(0.001, 10.0) == "> 1000"
    # power 0.5: t(0.5, .) = 0, the n at which the expected interval just clears the boundary
    assert seeds_for_power(1.0, 1.0, power=0.5) == 7
    assert t_crit(6) / math.sqrt(6) >= 1.0 > t_crit(7) / math.sqrt(7)


def test_seeds_needed_by_hand():
    # seeds_needed = seeds_for_power at the distance from the observed mean to the boundary it must clear
    assert seeds_needed(1.0, 1.0, "greater", 0.0) == 10 and seeds_needed(1.0, 1.0, "greater", 0.0, power=0.5) == 7
    p = paired([1.0, 2.0, 3.0])  # mean 2, sd 1, inconclusive at n=3
    assert seeds_needed(p.mean, p.sd, "greater", 0.0) == 5 and seeds_needed(p.mean, p.sd, "greater", 0.0,
                                                                            power=0.5) == 4
    # within: the nearest boundary counts; 0.8 in (-1, 1) is 0.2 from +1, as `greater` with margin 1 is
    assert seeds_needed(0.8, 1.0, "within", 1.0) == seeds_needed(0.8, 1.0, "greater", 1.0) == seeds_for_power(
        0.2, 1.0) > 10
    assert seeds_needed(-0.8, 1.0, "within", 1.0) == seeds_needed(0.8, 1.0, "within", 1.0)
    assert seeds_needed(0.001, 10.0, "greater", 0.0) == "> 1000"
    assert seeds_needed(1.0, 1.0, "within", 1.0) == "cannot be decided"  # on the boundary


def test_a_bound_makes_every_mean_decidable():
    # greater with a bound: the interval must clear the farther of margin and margin + bound (either decides)
    assert boundary_distance(0.1, "greater", 0.0, 0.5) == pytest.approx(0.4)  # to end below the bound
    assert boundary_distance(0.4, "greater", 0.0, 0.5) == pytest.approx(0.4)  # to hold
    assert boundary_distance(0.25, "greater", 0.0, 0.5) == pytest.approx(0.25)  # the least: bound / 2
    assert boundary_distance(-1.0, "greater", 0.0, 0.5) == pytest.approx(1.5)
    assert boundary_distance(0.0, "greater", 0.0) == 0.0 and seeds_needed(0.0, 1.0, "greater", 0.0) == \
        "cannot be decided"
    assert seeds_needed(0.0, 1.0, "greater", 0.0, 0.5) == seeds_for_power(0.5, 1.0)


# ---------------------------------------------------------------------------------------------------- pairing, judge
def cells(values):
    """{(row, seed): top1 or None (not done)} -> collect-like cell frame."""
    return pd.DataFrame([{"row": r, "seed": s, "status": "done" if v is not None else "failed", "top1": v}
                         for (r, s), v in values.items()])


def test_groups_and_pairing_use_common_seeds_only():
    c = cells({("x", 0): 10.0, ("x", 1): 12.0, ("x", 2): 11.0, ("y", 0): 20.0, ("y", 1): 22.0, ("y", 2): None,
               ("b", 0): 14.0, ("b", 1): 15.0, ("b", 3): 9.0})
    g = group_values(c, ["x", "y"])
    assert list(g.index) == [0, 1] and list(g) == [15.0, 17.0]  # seed 2: y not done -> no group value
    r = judge({"id": "g", "text": "group beats b", "a": ["x", "y"], "b": ["b"], "test": "greater", "margin": 0.0}, c)
    assert r["n"] == 2 and r["seeds"] == (0, 1) and r["mean"] == 1.5 and r["sd"] == pytest.approx(math.sqrt(0.5))
    assert r["unpaired"] == "seed 3 only in b"
    assert r["verdict"] == UNSURE and isinstance(r["seeds_needed"], int)


def test_judge_is_paired_not_pooled():
    # big seed-to-seed spread, constant per-seed difference: pooled means would be noise, the paired test is clear
    c = cells({("a", s): 50.0 + 10 * s + 1.0 for s in range(3)} | {("b", s): 50.0 + 10 * s for s in range(3)})
    r = judge({"id": "p", "text": "a beats b", "a": ["a"], "b": ["b"], "test": "greater", "margin": 0.0}, c)
    assert r["verdict"] == HOLDS and r["lo"] == r["hi"] == 1.0 and r["seeds_needed"] == ""


def test_judge_absent_row_is_not_applicable():
    r = judge({"id": "z", "text": "t", "a": ["a"], "b": ["gone"], "test": "within", "margin": 1.0},
              cells({("a", 0): 1.0}))
    assert r["verdict"] == NOT_APPLICABLE and r["missing_rows"] == ["gone"]


# ---------------------------------------------------------------------------------------------------- pooled noise
# 3 rows x 4 seeds, not additive (row-seed noise on top of row and seed effects)
TABLE = {"r1": [80.0, 81.2, 79.5, 80.6], "r2": [81.1, 81.9, 80.9, 81.0], "r3": [79.0, 80.5, 78.2, 79.9]}


def table_cells(table=TABLE, drop=()):
    return cells({(r, s): v for r, vals in table.items() for s, v in enumerate(vals) if (r, s) not in drop})


def test_two_way_noise_against_a_hand_computed_fit():
    y = np.array(list(TABLE.values()))  # rows x seeds
    # complete table: the least-squares fit of row + seed is row mean + seed mean - grand mean
    fitted = y.mean(axis=1, keepdims=True) + y.mean(axis=0, keepdims=True) - y.mean()
    rss = float(((y - fitted) ** 2).sum())
    dof = 12 - 3 - 4 + 1
    noise = two_way_noise(table_cells(), ["r1", "r2", "r3"])
    assert noise == Noise(pytest.approx(math.sqrt(rss / dof)), 6, 3, 4, 12, ("r1", "r2", "r3"))
    # the same with numpy's lstsq on the dummy design (intercept, rows 2-3, seeds 1-3)
    x = np.array([[1.0] + [float(r == i) for i in (1, 2)] + [float(s == j) for j in (1, 2, 3)]
                  for r in range(3) for s in range(4)])
    coef = np.linalg.lstsq(x, y.ravel(), rcond=None)[0]
    assert noise.sd == pytest.approx(math.sqrt(((y.ravel() - x @ coef) ** 2).sum() / 6))
    # an incomplete table (r3 seed 0 failed): the fit uses what is there, dof 11 - 3 - 4 + 1 = 5
    part = two_way_noise(table_cells(drop=[("r3", 0)]), ["r1", "r2", "r3"])
    keep = [i for i in range(12) if i != 8]
    coef = np.linalg.lstsq(x[keep], y.ravel()[keep], rcond=None)[0]
    assert part.dof == 5 and part.n_obs == 11 and part.sd == pytest.approx(
        math.sqrt(((y.ravel()[keep] - x[keep] @ coef) ** 2).sum() / 5))
    # only the rows asked for; no data or no dof: no sd
    assert two_way_noise(table_cells(), ["r1", "r2"]).rows == ("r1", "r2")
    assert two_way_noise(table_cells(), ["gone"]).sd is None
    one_seed = two_way_noise(cells({("a", 0): 1.0, ("b", 0): 2.0}), ["a", "b"])
    assert one_seed.sd is None and one_seed.dof == 0


def test_pooled_interval_by_hand():
    noise = two_way_noise(table_cells(), ["r1", "r2", "r3"])
    sigma, t6 = noise.sd, st.t.ppf(0.975, 6)
    claim = {"id": "c", "text": "r2 beats r1", "a": ["r2"], "b": ["r1"], "test": "greater", "margin": 0.0}
    own = judge(claim, table_cells())
    d = np.array(TABLE["r2"]) - np.array(TABLE["r1"])
    assert own["sd_source"] == "own" and own["dof"] == 3 and own["sd"] == pytest.approx(d.std(ddof=1))
    assert own["lo"] == pytest.approx(d.mean() - st.t.ppf(0.975, 3) * d.std(ddof=1) / 2)
    r = judge(claim, table_cells(), noise)  # own dof 3 < 6 and the noise has 6: pooled
    sd = sigma * math.sqrt(2)
    assert r["sd_source"] == "pooled" and r["dof"] == 6 and r["sd_used"] == pytest.approx(sd)
    assert r["sd"] == pytest.approx(d.std(ddof=1)) and r["sd_pooled"] == pytest.approx(sd)  # both shown
    assert r["lo"] == pytest.approx(d.mean() - t6 * sd / 2) and r["hi"] == pytest.approx(d.mean() + t6 * sd / 2)
    # a group of two rows: sigma * sqrt(1/2 + 1/1)
    g = judge(claim | {"a": ["r2", "r3"]}, table_cells(), noise)
    assert g["sd_used"] == pytest.approx(sigma * math.sqrt(1.5))
    # the noise's dof must exceed the claim's own
    thin = Noise(0.1, 3, 3, 4, 12)
    assert judge(claim, table_cells(), thin)["sd_source"] == "own"
    # 7 paired seeds (6 dof): the claim's own sd, whatever the noise
    seven = cells({(r, s): 50.0 + s + (1.0 + 0.1 * (s % 3) if r == "a" else 0.0) for r in "ab" for s in range(7)})
    r7 = judge(claim | {"a": ["a"], "b": ["b"]}, seven, Noise(5.0, 100, 2, 7, 14))
    assert r7["sd_source"] == "own" and r7["dof"] == 6 and r7["sd_used"] == r7["sd"]


# ---------------------------------------------------------------------------------------------------- verdict states
def pair_claim(diffs, margin=0.0, bound=None, test="greater"):
    c = cells({("a", s): 50.0 + d for s, d in enumerate(diffs)} | {("b", s): 50.0 for s in range(len(diffs))})
    return {"id": "x", "text": "a beats b", "a": ["a"], "b": ["b"], "test": test, "margin": margin,
            "bound": bound, "source": "paper"}, c


@pytest.mark.parametrize("diffs, bound, paper, expected", [
    ([1.0, 1.1, 0.9], 0.5, None, HOLDS),  # [0.75, 1.25] > 0
    ([-1.0, -1.1, -0.9], 0.5, None, FAILS),  # < 0: plain does not hold, before the bound
    ([0.1, 0.2, 0.0], 0.5, None, BELOW_BOUND),  # [-0.15, 0.35]: straddles 0, below 0 + 0.5
    ([0.1, 0.2, 0.0], None, None, UNSURE),  # the same without a bound
    ([0.1, 0.2, 0.0], None, 1.2, PAPER_EXCLUDED),  # ... whose interval leaves out the paper's +1.2
    ([0.1, 0.2, 0.0], None, 0.3, UNSURE),  # ... but not the paper's +0.3
    ([0.1, 0.2, 0.0], 0.5, 1.2, BELOW_BOUND),  # a decided verdict takes precedence
    ([1.0, 1.1, 0.9], None, 3.0, HOLDS),  # holds, and says the paper's +3 lies outside
])
def test_decided_and_undecided_states(diffs, bound, paper, expected):
    claim, c = pair_claim(diffs, bound=bound)
    r = judge(claim, c, paper=paper)
    assert r["verdict"] == expected and (expected in DECIDED) == (expected not in (UNSURE,))
    assert r["paper_outside"] is (None if paper is None else not (r["lo"] <= paper <= r["hi"]))
    if expected in (UNSURE, PAPER_EXCLUDED):
        assert isinstance(r["seeds_needed"], int)
    else:
        assert r["seeds_needed"] == ""


def test_holds_below_the_bound_and_paper_power():
    claim, c = pair_claim([0.3, 0.31, 0.29], bound=0.5)  # [0.275, 0.325]: holds, effect below the bound
    r = judge(claim, c)
    assert r["verdict"] == HOLDS and r["below_bound"]
    # the paper's a - b -> seeds for 80% power were it the truth, and whether the n run reaches them
    claim, c = pair_claim([1.0, 3.0, -0.5])
    r = judge(claim, c, paper=1.2)
    assert r["verdict"] == UNSURE and r["seeds_paper"] == seeds_for_power(1.2, r["sd_used"])
    assert r["seeds_paper"] > 3 and r["paper_powered"] is False
    r = judge(*pair_claim([1.0, 1.2, 0.8]), paper=1.2)  # sd 0.2: n = 3 gives (4.303 + 1.061) 0.2 / sqrt(3) = 0.62
    assert r["seeds_paper"] == 3 and r["paper_powered"] is True
    # within: paper-size excluded works the same way
    claim, c = pair_claim([0.6, 0.8, 1.3], margin=1.0, test="within")  # about [0.01, 1.79]: straddles +1
    assert judge(claim, c, paper=-0.4)["verdict"] == PAPER_EXCLUDED
    assert judge(claim, c)["verdict"] == UNSURE


def test_gate_verdict_replaces_a_paper_verdict_and_keeps_the_numbers():
    claim, c = pair_claim([1.0, 1.1, 0.9])
    r = judge(claim, c)
    g = gate_verdict(r, ["mae_vs_scratch", "teacher_probe"])
    assert g["verdict"] == f"{NOT_TESTABLE} (gate mae_vs_scratch, teacher_probe did not pass)"
    assert g["verdict"].startswith(NOT_TESTABLE) and g["verdict"] not in DECIDED
    assert g["verdict_ungated"] == HOLDS and (g["lo"], g["hi"], g["n"]) == (r["lo"], r["hi"], r["n"])
    assert r["verdict"] == HOLDS  # the input is not changed
    assert gate_verdict(r, []) == r  # no gate failed
    assert gate_verdict(r | {"source": "official-default"}, ["mae_vs_scratch"])["verdict"] == HOLDS


# ---------------------------------------------------------------------------------------------------- convergence
def test_still_rising_on_the_last_epoch():
    log = [{"epoch": 1, "loss": 2.0, "val_top1": 40.0}, {"epoch": 2, "val_top1": 45.0}, {"epoch": 3, "val_top1": 45.5}]
    assert last_epoch_gain(log) == pytest.approx(0.5) and still_rising(log)  # >= 0.5 pp: flagged
    log[-1]["val_top1"] = 45.4
    assert not still_rising(log)
    assert not still_rising([{"epoch": 1, "val_top1": 45.0}, {"epoch": 2, "val_top1": 40.0}])  # falling
    assert last_epoch_gain([{"epoch": 1, "val_top1": 10.0}]) is None and not still_rising([{"epoch": 1}])
    # results written before the validation split: `top1` per epoch, same rule; records out of order are sorted
    assert still_rising([{"epoch": 2, "top1": 51.0}, {"epoch": 1, "top1": 49.0}])


# ---------------------------------------------------------------------------------------------------- expected values
def test_expected_tolerance_within_and_outside():
    assert tolerance(0.5, 1.0, 4) == pytest.approx(1.5)  # 3 * 1 / sqrt(4)
    assert tolerance(0.5, 0.1, 4) == 0.5 and tolerance(0.5, None, 3) == 0.5  # floor
    assert expected_check(50.0, 1.0, 0.5, 51.4, 4) == {"delta": pytest.approx(1.4), "tolerance": 1.5, "within": True}
    assert expected_check(50.0, 1.0, 0.5, 51.6, 4)["within"] is False
    assert expected_check(50.0, None, 0.5, 49.6, 1)["within"] is True
    assert expected_check(50.0, 1.0, 0.5, None, 0)["within"] is None


# ---------------------------------------------------------------------------------------------------- claims schema
def cfg_with(claims, rows=("r1", "r2", "r3"), table="usertable"):
    base = OmegaConf.structured(TableConfig)
    return OmegaConf.merge(base, {"table": table, "profile": "smoke",
                                  "rows": {r: {"label": r, "method": "mae"} for r in rows}, "claims": claims})


GOOD = {"id": "c1", "text": "r1 beats r2", "a": ["r1"], "b": ["r2"], "test": "greater", "margin": 0.0}


def test_claims_are_parsed_from_a_recipe():
    from harness.plan.config import load_config
    cfg = load_config("table2", ["profile=smoke"])
    by = {c.id: c for c in cfg.claims}
    assert list(by) == ["dmae_beats_mae", "dmae_beats_kd", "mask95_within_1pp_of_75", "mask98_at_most_3pp_below_75"]
    assert list(by["dmae_beats_kd"].b) == ["kd_finetuned_teacher"] and by["dmae_beats_kd"].source == "paper"
    assert by["mask95_within_1pp_of_75"].test == "within" and by["mask95_within_1pp_of_75"].margin == 1.0
    assert by["mask98_at_most_3pp_below_75"].margin == -3.0
    assert by["dmae_beats_kd"].bound == 0.5 and by["mask98_at_most_3pp_below_75"].bound is None
    # every recipe's claims validate (and name only its rows)
    from recipes import tables
    for t in tables():
        assert load_config(t, ["profile=smoke"]).claims, t


@pytest.mark.parametrize("bad, message", [
    ({"a": ["nope"]}, "a names unknown row(s) 'nope'"),
    ({"b": ["r1"]}, "on both sides"),
    ({"test": "bigger"}, "test='bigger' must be one of greater, within"),
    ({"margin": None}, "margin is missing"),
    ({"test": "within", "margin": 0.0}, "must be > 0 for test within"),
    ({"source": "blog"}, "source='blog' must be one of paper, official-default"),
    ({"b": []}, "b is empty"),
    ({"text": ""}, "text is empty"),
    ({"bound": -0.1}, "bound=-0.1 must be a finite number >= 0"),
    ({"bound": float("inf")}, "must be a finite number >= 0"),
    ({"test": "within", "margin": 1.0, "bound": 0.5}, "bound=0.5 is for test greater only"),
])
def test_bad_claims_name_the_table_and_the_claim(bad, message):
    with pytest.raises(ConfigError) as e:
        validate_claims(cfg_with([GOOD | {"id": "c2"}, GOOD | bad]))
    assert "table 'usertable' claims[1] (id 'c1')" in str(e.value) and message in str(e.value)


def test_duplicate_and_unnamed_claims_are_refused():
    with pytest.raises(ConfigError, match=r"claims\[1\] \(id 'c1'\): id used twice"):
        validate_claims(cfg_with([GOOD, GOOD]))
    with pytest.raises(ConfigError, match=r"table 'usertable' claims\[0\]: id=''"):
        validate_claims(cfg_with([GOOD | {"id": ""}]))
    validate_claims(cfg_with([GOOD, GOOD | {"id": "c2", "a": ["r1", "r3"], "test": "within", "margin": 0.5,
                                            "source": "official-default"}, GOOD | {"id": "c3", "bound": 0.0}]))


def test_unknown_row_through_load_config_is_a_config_error():
    from harness.plan.config import load_config
    with pytest.raises(ConfigError, match=r"table 'table2' claims\[0\] \(id 'dmae_beats_mae'\): a names unknown row"):
        load_config("table2", ["profile=smoke", "claims.0.a=[dmae_99]"])
    # a row removed on the command line keeps its claims (the report calls them not applicable)
    assert len(load_config("table2", ["profile=smoke", "~rows.mae"]).claims) == 4
