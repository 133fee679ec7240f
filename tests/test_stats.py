"""harness.stats and the claims schema: paired intervals against hand-computed values, every verdict state of both
tests, seeds needed, the convergence flag, the expected-value tolerance, and claims parsed / refused in a recipe.
Fast: no training, no results tree."""
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from harness.config import ConfigError, TableConfig, validate_claims
from harness.stats import (FAILS, HOLDS, NO_DATA, NOT_APPLICABLE, UNSURE, expected_check, group_values, judge,
                           last_epoch_gain, paired, seeds_needed, still_rising, t_crit, tolerance, verdict)

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
def test_seeds_needed_by_hand():
    # mean 1, sd 1, greater 0: t(0.975, n-1)/sqrt(n) < 1 first at n = 7 (n=6: 2.5706/2.4495 = 1.049; n=7: 0.925)
    assert seeds_needed(1.0, 1.0, "greater", 0.0) == 7
    assert t_crit(6) / math.sqrt(6) >= 1.0 > t_crit(7) / math.sqrt(7)
    # mean 2, sd 1 ([1, 2, 3], inconclusive at n=3): n = 4 (3.1824 / 2 = 1.59 < 2)
    p = paired([1.0, 2.0, 3.0])
    assert seeds_needed(p.mean, p.sd, "greater", 0.0) == 4
    # within: the nearest boundary counts; 0.8 in (-1, 1) is 0.2 from +1, as `greater` with margin 1 is
    assert seeds_needed(0.8, 1.0, "within", 1.0) == seeds_needed(0.8, 1.0, "greater", 1.0) > 7
    assert seeds_needed(-0.8, 1.0, "within", 1.0) == seeds_needed(0.8, 1.0, "within", 1.0)
    assert seeds_needed(0.001, 10.0, "greater", 0.0) == "> 1000"
    assert seeds_needed(1.0, 1.0, "within", 1.0) == "cannot be decided"  # on the boundary


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
    from harness.config import load_config
    cfg = load_config("table2", ["profile=smoke"])
    by = {c.id: c for c in cfg.claims}
    assert list(by) == ["dmae_beats_mae", "dmae_beats_kd", "mask95_within_1pp_of_75", "mask98_at_most_3pp_below_75"]
    assert list(by["dmae_beats_kd"].b) == ["kd_finetuned_teacher"] and by["dmae_beats_kd"].source == "paper"
    assert by["mask95_within_1pp_of_75"].test == "within" and by["mask95_within_1pp_of_75"].margin == 1.0
    assert by["mask98_at_most_3pp_below_75"].margin == -3.0
    # every recipe's claims validate (and name only its rows)
    from harness.config import tables
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
                                            "source": "official-default"}]))


def test_unknown_row_through_load_config_is_a_config_error():
    from harness.config import load_config
    with pytest.raises(ConfigError, match=r"table 'table2' claims\[0\] \(id 'dmae_beats_mae'\): a names unknown row"):
        load_config("table2", ["profile=smoke", "claims.0.a=[dmae_99]"])
    # a row removed on the command line keeps its claims (the report calls them not applicable)
    assert len(load_config("table2", ["profile=smoke", "~rows.mae"]).claims) == 4
