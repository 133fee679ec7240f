"""The report's Summary block (overview: claims, expected values, stages, gates in a few numbers; overview_lines) and
reports/<name>/summary.json (summary_json: the report's numbers for machines: rows, claims, gates, ablations,
provenance)."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import List, Optional

import pandas as pd

from harness.report.ablation import ablation_axes, row_settings
from harness.report.artefacts import jsonable
from harness.report.collect import Collected, teacher_results
from harness.report.formatting import missing, recipe_path
from harness.report.gates import Gate, not_passed
from harness.report.provenance import package_versions
from harness.report.stats import (BELOW_BOUND, DECIDED, FAILS, HOLDS, NO_DATA, NOT_APPLICABLE, NOT_TESTABLE,
                                  PAPER_EXCLUDED, UNSURE, paired)


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


def overview_lines(ov: dict) -> List[str]:
    """The Summary block's lines from overview's numbers."""
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
            "report_writer": writer, "packages": package_versions()}})
