"""Positive controls: can this profile see an effect of the kind the paper claims? Checked before any paper claim is
judged (harness.report.markdown), from the recipe's `gates` section (harness.plan.schema.GateConfig):

    (i)   pre-training matters: the MAE baseline beats the same student fine-tuned from random initialisation
          (`scratch`) by at least `min_pretraining_gain` pp of test top-1: the paired interval's lower bound is above
          it (harness.report.stats.judge, a `greater` claim with that margin, on its own paired sd: the report's pooled
          noise leaves the scratch row out, as its noise is its own)
    (ii)  the teacher has something to give: the kNN probe of the teacher's aligned block beats the probe of the MAE
          student's last block by at least `min_teacher_probe_gap` pp (mean over the student's seeds)
    (iii) the fine-tunes have converged: no row is still rising (harness.report.stats.RISING_PP)

A gate passes, fails, or is not checked (its rows or probes are missing); a paper claim on a profile where any gate
did not pass reads "not testable at this profile (gate … did not pass)" (harness.report.stats.gate_verdict), with its
numbers
kept. Pure pandas, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional

import pandas as pd

from harness.report.stats import HOLDS, judge


@dataclass(frozen=True)
class Gate:
    key: str  # i | ii | iii
    text: str  # what it asks
    passed: Optional[bool]  # None: not checked
    value: str  # what was measured
    detail: str = ""

    @property
    def state(self) -> str:
        return "not checked" if self.passed is None else "passes" if self.passed else "fails"


def pretraining_gate(cells: pd.DataFrame, g: Mapping) -> Gate:
    text = f"MAE pre-training beats scratch by ≥ {g['min_pretraining_gain']:g} pp (paired, decided)"
    rows = set(cells["row"]) if len(cells) else set()
    missing = [r for r in (g["mae_row"], g["scratch_row"]) if r not in rows]
    if missing:
        return Gate("i", text, None, "—", f"no row {', '.join(f'`{r}`' for r in missing)} in this run")
    r = judge({"id": "gate_i", "a": [g["mae_row"]], "b": [g["scratch_row"]], "test": "greater",
               "margin": float(g["min_pretraining_gain"])}, cells)
    if r["lo"] is None:
        return Gate("i", text, None, "—", f"{r['n']} paired seed(s): not enough data")
    value = (f"{r['mean']:+.2f} pp [{r['lo']:+.2f}, {r['hi']:+.2f}] (`{g['mae_row']}` − `{g['scratch_row']}`, "
             f"n={r['n']})")
    return Gate("i", text, r["verdict"] == HOLDS, value, f"verdict of the gate's own test: {r['verdict']}")


def probe_gate(summary: pd.DataFrame, g: Mapping) -> Gate:
    text = f"the teacher's aligned block probes ≥ {g['min_teacher_probe_gap']:g} pp above the MAE student's last block"
    by = {r["row"]: r for r in summary.to_dict("records")} if len(summary) else {}
    mae = by.get(g["mae_row"])
    teacher = next((r["teacher_probe"] for r in by.values() if _num(r.get("teacher_probe")) is not None), None)
    if mae is None or _num(mae.get("probe_mean")) is None or teacher is None:
        what = "the MAE row's probe" if mae is None or _num(mae.get("probe_mean")) is None else "a teacher probe"
        return Gate("ii", text, None, "—", f"this run has no {what} (probe.enabled=false, or the row is missing)")
    gap = teacher - mae["probe_mean"]
    value = (f"{gap:+.2f} pp (teacher {teacher:.2f} − `{g['mae_row']}` {mae['probe_mean']:.2f}, mean of "
             f"{mae['n_probe']} seed(s); kNN top-1 on the test split)")
    return Gate("ii", text, gap >= g["min_teacher_probe_gap"], value)


def convergence_gate(summary: pd.DataFrame) -> Gate:
    text = "no row is still rising in its last fine-tuning epoch"
    if not len(summary) or not summary["n_gain"].sum():
        return Gate("iii", text, None, "—", "no finished fine-tune logged validation accuracy")
    rising = [r["row"] for r in summary.to_dict("records") if r["still_rising"]]
    return Gate("iii", text, not rising, f"{len(rising)} of {len(summary)} rows still rising"
                + (": " + ", ".join(f"`{r}`" for r in rising) if rising else ""))


def check_gates(cells: pd.DataFrame, summary: pd.DataFrame, gates: Mapping) -> List[Gate]:
    return [pretraining_gate(cells, gates), probe_gate(summary, gates), convergence_gate(summary)]


def not_passed(gates: List[Gate]) -> List[str]:
    """The keys of the gates that did not pass (failed or not checked)."""
    return [g.key for g in gates if not g.passed]


def _num(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None
