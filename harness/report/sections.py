"""The report's sections on what the run measured: the profile banner (what its numbers may be compared with), the
gates (gates_section, from harness.report.gates), the results against the paper per row and per seed with the
teacher's numbers (results_section), and the convergence check."""
from __future__ import annotations

from typing import List, Optional

import pandas as pd

from harness.plan.schema import GateConfig
from harness.report.collect import NOT_IMAGENET, Collected, load_paper_numbers, teacher_results
from harness.report.formatting import fmt, md_table, missing
from harness.report.gates import Gate, not_passed
from harness.report.stats import DECIDED, NOT_TESTABLE, RISING_PP


def reproduced(r: dict) -> str:
    """A row's reproduced test top-1: 'mean ± std (n=3)', 'mean (n=1)', or that no cell finished."""
    if not r["n"]:
        return "no finished cell (n=0)"
    return f"{fmt(r['mean'])} ± {fmt(r['std'])} (n={r['n']})" if r["n"] >= 2 else f"{fmt(r['mean'])} (n=1)"


def profile_banner(c: Collected) -> List[str]:
    """The profile's note, and what its numbers may be compared with (the paper's only on the paper profile)."""
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


def gates_section(gates: Optional[List[Gate]], res: Optional[List[dict]]) -> List[str]:
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


def teacher_lines(c: Collected) -> List[str]:
    """The teacher's numbers under the results table: its test top-1 (on the paper profile, beside its official
    release's), its kNN probe and its fine-tune's validation top-1, or why each is not available."""
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


def convergence_section(summary: pd.DataFrame, c: Collected) -> List[str]:
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


def results_section(summary: pd.DataFrame, c: Collected) -> List[str]:
    """The Results section: per row against the paper, the teacher, the paper's sources, per seed, convergence."""
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
    out += teacher_lines(c) + [""]
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
    out += [""] + convergence_section(summary, c)
    return out
