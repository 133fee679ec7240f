"""harness.report.gates: the positive controls a report checks before judging any paper claim (pre-training beats
scratch
by a decided margin, the teacher's probe beats the student's, no row still rising), and what a failed gate does to
a paper claim. Fast: frames built by hand, no results tree."""
import pandas as pd

from harness.report.gates import check_gates, convergence_gate, not_passed, pretraining_gate, probe_gate
from harness.report.stats import HOLDS, NOT_TESTABLE, gate_verdict

GATES = {"mae_row": "mae", "scratch_row": "scratch", "min_pretraining_gain": 2.0, "min_teacher_probe_gap": 5.0}


def cells(gap: float, spread: float = 0.1):
    recs = []
    for s, noise in enumerate((0.0, spread, -spread, 2 * spread, -2 * spread)):
        recs.append({"row": "scratch", "seed": s, "status": "done", "top1": 50.0 + noise})
        recs.append({"row": "mae", "seed": s, "status": "done", "top1": 50.0 + gap - noise})
    return pd.DataFrame(recs)


def summary(mae_probe=62.0, teacher_probe=70.0, rising=()):
    return pd.DataFrame([{"row": r, "probe_mean": mae_probe if r == "mae" else 57.0, "n_probe": 5,
                          "teacher_probe": teacher_probe, "n_gain": 5, "still_rising": r in rising}
                         for r in ("mae", "scratch", "dmae_75")])


def test_pretraining_gate_needs_a_decided_margin():
    g = pretraining_gate(cells(gap=10.0), GATES)
    assert g.passed and g.state == "passes" and "+10.00" in g.value
    # a mean above 2 pp whose interval reaches below it is not a decided margin
    assert pretraining_gate(cells(gap=2.5, spread=1.0), GATES).passed is False
    assert pretraining_gate(cells(gap=0.8), GATES).passed is False
    no_scratch = pretraining_gate(cells(10.0)[lambda d: d["row"] != "scratch"], GATES)
    assert no_scratch.passed is None and no_scratch.state == "not checked" and "`scratch`" in no_scratch.detail


def test_probe_gate_compares_the_teacher_with_the_mae_student():
    assert probe_gate(summary(62.0, 70.0), GATES).passed  # 8 pp
    assert probe_gate(summary(62.0, 66.0), GATES).passed is False  # 4 pp
    none = probe_gate(summary(62.0, None), GATES)
    assert none.passed is None and "teacher probe" in none.detail


def test_convergence_gate_names_the_rising_rows():
    g = convergence_gate(summary(rising=("dmae_75",)))
    assert g.passed is False and "`dmae_75`" in g.value
    assert convergence_gate(summary()).passed


def test_a_failed_gate_makes_paper_claims_not_testable():
    gates = check_gates(cells(gap=0.8), summary(), GATES)
    assert not_passed(gates) == ["i"]
    r = {"verdict": HOLDS, "source": "paper", "mean": 1.0}
    out = gate_verdict(r, not_passed(gates))
    assert out["verdict"].startswith(NOT_TESTABLE) and "gate i did not pass" in out["verdict"] and out["mean"] == 1.0
    assert gate_verdict({"verdict": HOLDS, "source": "official-default"}, ["i"])["verdict"] == HOLDS
    assert not not_passed(check_gates(cells(gap=10.0), summary(), GATES))
