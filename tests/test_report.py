"""harness.report (collect, export, markdown and its sections, claims, expected, dashboard, cli): the results frame,
the report, its claims, expected values, figures, warnings and the reports dashboard.

Fast tests build a results tree of the smoke plan with made-up results (no training: `fake_tree`), so the numbers
behind each verdict are known. One session fixture runs the smoke table for real (2 seeds, ~1 min on 2 CPU cores);
each slow test copies that tree and mutates the copy (edits result.json, deletes it, writes error.json, corrupts a
file). Set DMAE_SMOKE_TREE to an existing results/table2/smoke tree to copy it instead of running (a development
shortcut).
"""
import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.report.claims import check_claims, claims_of, report_noise
from harness.report.cli import main
from harness.report.collect import NOT_AVAILABLE, NOT_IMAGENET, collect, delta_text, load_paper_numbers, paper_number, \
    summarize
from harness.report.dashboard import write_index
from harness.report.export import export
from harness.report.markdown import report_name, write_report

ROWS = ["mae", "kd_finetuned_teacher", "dmae_75", "dmae_95", "dmae_98", "scratch"]
CLAIM_IDS = ["dmae_beats_mae", "dmae_beats_kd", "mask95_within_1pp_of_75", "mask98_at_most_3pp_below_75"]
GEN = re.compile(r"^- Report generated: .*$", re.M)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    """A real results/table2/smoke tree made by the main command, with two seeds."""
    given = os.environ.get("DMAE_SMOKE_TREE")
    if given:
        return Path(given)
    from harness.run.cli import run_table
    results = tmp_path_factory.mktemp("smoke") / "results"
    code = run_table("table2", ["profile=smoke", "launcher=debug", "report=false", f"results_root={results}",
                                "seeds=2"])
    assert code == 0
    return results / "table2" / "smoke"


def _copy_stub(src, dst):
    """Checkpoints are hard-linked, not copied (a stage is done only while its model file has the sha256 its result
    records, so an empty stand-in would make it stale)."""
    if src.endswith(".pth"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


@pytest.fixture
def tree(smoke, tmp_path) -> Path:
    root = tmp_path / "results" / "table2" / "smoke"
    shutil.copytree(smoke, root, copy_function=_copy_stub, ignore=shutil.ignore_patterns(".*"))
    return root


def has_val_curves(root: Path) -> bool:
    """Whether any fine-tune of the tree logged validation top-1 (the smoke profile may hold out no images)."""
    from harness.report.stage_records import val_curve
    from harness.core.rundir import read_log
    c = collect(root)
    return any(val_curve(read_log(root / s)) for s in c.stages.loc[c.stages["kind"] == "finetune",
                                                                                 "stage_id"])


def cells_of(root: Path, row: str):
    return [c for c in json.loads((root / "manifest.json").read_text())["cells"] if c["row"] == row]


def set_top1(root: Path, row: str, values):
    for cell, v in zip(cells_of(root, row), values):
        path = root / cell["evaluate"] / "result.json"
        res = json.loads(path.read_text())
        res["top1"] = v
        path.write_text(json.dumps(res))


def report(root: Path, tmp_path: Path, figures: bool = False, expected_dir: Path = None) -> str:
    """The report's text; figures (the slow part) only where a test looks at them. Expected values from a tmp dir
    (none by default), never the committed recipes/expected/."""
    return write_report(root, tmp_path / "reports", figures=figures,
                        expected_dir=expected_dir or tmp_path / "no-expected").read_text()


def claim_lines(text: str):
    """{claim id: verdict} from the numbered claim notes (a decided verdict in bold, others plain)."""
    return {m.group(1): m.group(3) or m.group(4) for m in re.finditer(
        r"^\d+\. `([a-z0-9_.-]+)` — .*?: (\*\*([^*]+)\*\*|([a-z][a-z ()<,_-]*))\. ", text, re.M)}


def links(text: str):
    return re.findall(r"\]\(([^)\s]+)\)", text)


def fake_tree(tmp_path: Path, top1, table: str = "table2", seeds: int = 3, val=None, overrides=(),
              teacher_top1: float = 88.5, real_specs: bool = False, times: bool = False) -> Path:
    """A results tree of the smoke plan with made-up results: every stage done; evaluate top1 = top1(row, seed) (a
    scratch row that `top1` does not know: 10 pp below the MAE row, so the gates pass); fine-tune logs val_top1 per
    epoch = val(row, seed) (default: flat, converged); probes: 60 for students, 80 for the teacher (gate ii passes);
    a teacher-evaluate stage (added to the manifest when the plan has none) with test top-1 `teacher_top1`.
    real_specs: each stage's config.json holds its planned spec (else an empty one: no model sizes, no ablation
    axes); times: stage i (in plan order) finished at 2026-01-01 00:00:00 + i s (each ran wall_s = 1 s)."""
    given = top1

    def top1(row, seed):
        try:
            return given(row, seed)
        except KeyError:
            if row.startswith("scratch"):
                return given("mae", seed) - 10.0
            raise
    from harness.plan.config import load_config
    from harness.plan.graph import build_plan, mark_overridden, write_manifest
    from harness.core.rundir import write_json
    given_overrides = ["profile=smoke", f"results_root={tmp_path / 'results'}", f"seeds={seeds}", *overrides]
    cfg = load_config(table, given_overrides)
    plan = build_plan(cfg)
    mark_overridden(plan, cfg, given_overrides)
    write_manifest(plan, cfg, "test", [])
    val = val or (lambda row, seed: [40.0, 44.0, 44.2])
    base = {"status": "done", "wall_s": 1.0, "device_hours": 1 / 3600, "images_per_s": 100.0, "device": "cpu",
            "device_name": "x86_64", "world_size": 1, "host": "test", "git_commit": "abc1234"}
    stages = {sid: (st.kind, st.role, st.cells, st.spec.name) for sid, st in plan.stages.items()}
    manifest = json.loads((plan.root / "manifest.json").read_text())
    ft = next((sid for sid, (_, role, _, _) in stages.items() if role == "teacher-finetune"), None)
    if ft and not any(role == "teacher-evaluate" for _, role, _, _ in stages.values()):
        sid = "teacher-evaluate-fake-0000000000"
        stages[sid] = ("evaluate", "teacher-evaluate", [], "teacher-evaluate-fake")
        manifest["stages"][sid] = {"kind": "evaluate", "role": "teacher-evaluate", "name": "teacher-evaluate-fake",
                                   "inputs": {"model": ft}, "cells": []}
        (plan.root / "manifest.json").write_text(json.dumps(manifest))
    from harness.core.spec import spec_dict
    for i, (sid, (kind, role, cells, name)) in enumerate(stages.items()):
        d = plan.root / sid
        d.mkdir(parents=True)
        res = dict(base, stage_id=sid, kind=kind, name=name)
        if times:
            res["finished_at"] = f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}"
        if kind == "evaluate":
            v = teacher_top1 if role == "teacher-evaluate" else top1(*cells[0])
            res.update(top1=v, top5=99.0, n_eval=256, split="test")
        elif kind == "probe":
            res.update(top1=80.0 if role == "teacher-probe" else 60.0, n_eval=256, split="test", block=1)
        elif kind == "finetune":
            curve = val(*cells[0]) if role == "student-finetune" else [70.0, 80.0, 80.1]
            with (d / "log.jsonl").open("w") as f:
                for e, v in enumerate(curve, 1):
                    f.write(json.dumps({"epoch": e, "loss": 1.0 / e, "val_top1": v, "val_top5": 99.0}) + "\n")
            best = max(range(len(curve)), key=lambda i: curve[i])
            res.update(best_val_top1=curve[best], best_epoch=best + 1, last_val_top1=curve[-1], last_val_top5=99.0,
                       final_loss=1.0)
        else:
            res.update(final_loss=1.0)
            (d / "log.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")
        write_json(res, d / "result.json")
        spec = spec_dict(plan.stages[sid].spec) if real_specs and sid in plan.stages else {}
        write_json({"stage_id": sid, "spec": spec}, d / "config.json")
    return plan.root


OFFSET = {"mae": 50.0, "kd_finetuned_teacher": 51.0, "dmae_75": 52.0, "dmae_95": 51.5, "dmae_98": 50.5, "scratch": 45.0}


def table2_top1(row, seed):
    """Seed-to-seed spread of 3 pp shared by every row (paired), tiny row-seed noise on top."""
    return OFFSET[row] + 3.0 * seed + 0.05 * ((seed * 7 + len(row)) % 3)


# ------------------------------------------------------------------------------------------ fast, no results tree
def test_paper_numbers_resolve_and_na_is_not_available():
    papers = load_paper_numbers()
    assert paper_number("headline/DMAE ViT-L->ViT-B", papers)["value"] == 84.0
    assert paper_number("masking_ratio/DMAE 98% masking (4 visible patches per paper; code int() gives 3)",
                        papers)["value"] == 82.4
    assert paper_number("Tab.10/DINO with/without DMAE", papers) is None  # NA in the CSV
    assert paper_number(None, papers) is None and paper_number("nope/none", papers) is None
    assert delta_text(80.0, None, "paper") == NOT_AVAILABLE
    assert delta_text(80.0, {"value": 84.0}, "tiny") == NOT_IMAGENET
    assert delta_text(80.0, {"value": 84.0}, "paper") == "-4.00"


def test_every_recipe_paper_key_is_in_the_csv():
    from omegaconf import OmegaConf
    papers = load_paper_numbers()
    for recipe in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"):
        for key, row in (OmegaConf.load(recipe).get("rows") or {}).items():
            assert row.get("paper") is None or row["paper"] in papers, f"{recipe.name}: rows.{key}.paper"


def test_report_name_rule_reads_the_recipe_default_profile():
    assert report_name("table2", "tiny") == "table2"  # recipes/table2.yaml's defaults list names profile tiny
    assert report_name("table2", "smoke") == "table2.smoke" and report_name("masking", "paper") == "masking.paper"
    assert report_name("user_table_without_recipe", "tiny") == "user_table_without_recipe.tiny"


def test_report_holds_no_recipe_knowledge():
    # every module of harness/report but figures.py, whose colours are keyed by method ("mae", "scratch"), not by row
    modules = [p for p in sorted((Path(__file__).resolve().parents[1] / "harness" / "report").glob("*.py"))
               if p.name != "figures.py"]
    assert any(p.name == "markdown.py" for p in modules)
    for path in modules:
        src = path.read_text()
        for name in ROWS + ["dmae_pretrained_teacher", "tiny"]:  # row keys and profile names, quoted
            assert f'"{name}"' not in src and f"'{name}'" not in src, (path.name, name)
        assert "CLAIMS" not in src and "DEFAULT_PROFILE" not in src, path.name


# ------------------------------------------------------------------------------------------ made-up results, fast
def test_claims_come_from_the_manifest_and_are_judged_on_paired_seeds(tmp_path):
    root = fake_tree(tmp_path, table2_top1)
    c = collect(root)
    claims = claims_of(c)
    assert [cl["id"] for cl in claims] == CLAIM_IDS
    noise, left = report_noise(c.cells)  # as write_report does
    # kd shares mae's pre-train and scratch is the control: both left out; every other row is distinct, 3 seeds
    # each: dof = 3 rows - rows - 3 + 1
    assert left == {"kd_finetuned_teacher": "shares a pre-train with `mae`",
                    "scratch": "the positive control, fine-tuned from random initialisation"}
    assert "kd_finetuned_teacher" not in noise.rows and "scratch" not in noise.rows
    assert {"mae", "dmae_75", "dmae_95", "dmae_98"} <= set(noise.rows) and noise.dof == 2 * noise.n_rows - 2
    res = {r["id"]: r for r in check_claims(claims, c.cells, summarize(c), noise)}
    # per-seed differences are constant up to the 0.05 noise: every interval is narrow although rows spread 6 pp
    assert res["dmae_beats_mae"]["verdict"] == "holds" and res["dmae_beats_mae"]["n"] == 3
    assert res["dmae_beats_kd"]["verdict"] == "holds" and res["dmae_beats_kd"]["paper_value"] == 1.2
    assert res["mask95_within_1pp_of_75"]["verdict"] == "holds"  # -0.5 inside (-1, 1)
    assert res["mask98_at_most_3pp_below_75"]["verdict"] == "holds"  # -1.5 > -3
    text = report(root, tmp_path)
    assert claim_lines(text) == {i: "holds" for i in CLAIM_IDS}
    line = next(x for x in text.splitlines() if x.startswith("| DMAE (75% masking) beats KD"))
    assert "| paper |" in line and "| 3 | **holds** |" in line and "84.0 − 82.8 = +1.2" in line
    assert "|a − b| < 1" in text.replace("\\|", "|")
    assert "t(0.975, n−1)·sd/√n" in text and "Only a decided verdict is in bold" in text
    assert "(t(0.975, n−1) + t(0.8, n−1))·sd/√n" in text
    # the whole report's noise, over the distinct rows (kd shares mae's pre-train) x 3 seeds
    assert re.search(rf"^Noise from the whole report: residual sd σ = {noise.sd:.2f} pp \(two-way row \+ seed fit over "
                     rf"{noise.n_rows} distinct rows × 3 seeds, dof {noise.dof}\); left out: `kd_finetuned_teacher` "
                     r"\(shares a pre-train with `mae`\), `scratch` \(the positive control, fine-tuned from random "
                     r"initialisation\)\.$", text, re.M)
    assert f"(pooled, {noise.dof} dof)" in line and "paired seeds run reach it" in text
    # claims.csv beside the report, and the dashboard line per claim
    csv = pd.read_csv(tmp_path / "reports" / "table2.smoke" / "claims.csv")
    assert list(csv["id"]) == CLAIM_IDS and set(csv["verdict"]) == {"holds"} and (csv["n"] == 3).all()
    d = res["dmae_beats_mae"]
    assert math.isclose(csv.loc[0, "ci_lo"], d["lo"]) and math.isclose(csv.loc[0, "mean"], d["mean"])
    assert list(csv.columns[:19]) == ["report", "table", "profile", "id", "text", "source", "test", "margin", "a", "b",
                                      "n", "mean", "sd", "ci_lo", "ci_hi", "verdict", "seeds_needed", "paper_diff",
                                      "seeds"]  # the columns of earlier reports come first, unchanged
    assert set(csv["sd_source"]) == {"pooled"} and (csv["dof"] == noise.dof).all() and csv.loc[1, "bound"] == 0.5
    assert math.isclose(csv.loc[0, "sd_used"], d["sd_pooled"]) and math.isclose(csv.loc[0, "sd"], d["sd"])
    assert csv.loc[0, "a_stages"].count("evaluate-") == 3 and "-s0-" in csv.loc[0, "b_stages"]
    index = (tmp_path / "reports" / "README.md").read_text()
    assert index.count("[table2.smoke](table2.smoke.md)") == 4 + 1  # four claims, one report link
    assert "`dmae_beats_kd` DMAE (75% masking) beats KD from the fine-tuned teacher | paper | **holds** |" in index


def test_inconclusive_claim_gives_seeds_needed_and_no_bold(tmp_path):
    def top1(row, seed):  # dmae_75 - mae differs by seed: +1, +3, -0.5 -> mean 1.17, wide interval
        return table2_top1(row, seed) + ({0: -1.0, 1: 1.0, 2: -2.5}[seed] if row == "dmae_75" else 0.0)
    text = report(fake_tree(tmp_path, top1), tmp_path)
    assert claim_lines(text)["dmae_beats_mae"] == "inconclusive"
    line = next(x for x in text.splitlines() if x.startswith("| DMAE (75% masking) beats the MAE"))
    assert "| inconclusive |" in line and "**inconclusive**" not in text and re.search(r"\| \d+ seeds \|", line)
    assert re.search(r"Seeds for 80% power at the observed mean \(\d\.\d\d pp from the boundary it must clear\): "
                     r"\d+ seeds\.", text)
    assert "| not available | not available (no paper number for `mae`) |" in line  # no paper-size effect
    kd = next(x for x in text.splitlines() if x.startswith("| DMAE (75% masking) beats KD"))
    assert re.search(r"\| \d+ seeds; not reached at n=3 \| 84.0 − 82.8 = \+1.2 \|$", kd)


def test_too_few_seeds_is_not_enough_data(tmp_path):
    text = report(fake_tree(tmp_path, table2_top1, seeds=1), tmp_path)
    assert set(claim_lines(text).values()) == {"not enough data"} and "**not enough data**" not in text


def test_a_row_whose_seeds_still_rise_on_average_is_flagged(tmp_path):
    def val(row, seed):  # dmae_95: +0.3, +1.0, +0.3 over the last epoch: mean +0.53 >= 0.5
        return [40.0, 44.0, 45.0] if (row, seed) == ("dmae_95", 1) else [40.0, 44.0, 44.3]
    text = report(fake_tree(tmp_path, table2_top1, val=val), tmp_path)
    results = text.split("## Results", 1)[1].split("## Claims", 1)[0]
    assert "still rising at its last fine-tune epoch" in results
    assert "| `dmae_95` | 3 | +0.53 | +0.30, +1.00, +0.30 | **still rising** |" in results
    assert "| `dmae_75` | 3 | +0.30 | +0.30, +0.30, +0.30 | flat |" in results
    assert "1 of 6 row(s) still rising." in results
    assert "`dmae_95` seed 1 (+1.00, stage `" in results and "`dmae_95` seed 0 (" not in results
    assert results.count("(still rising)") == 1  # the per-seed table marks the single fine-tune
    c = collect(fake_tree(tmp_path / "again", table2_top1, val=val))
    assert c.cells["still_rising"].sum() == 1
    s = summarize(c).set_index("row")
    assert s["still_rising"].tolist() == [False, False, False, True, False, False]
    assert s.at["dmae_95", "val_last_gain_mean"] == pytest.approx(1.6 / 3)


def test_one_rising_seed_does_not_flag_its_row(tmp_path):
    def val(row, seed):  # dmae_98: +0.6 for seed 2, -0.1 for the others: mean +0.13
        return [40.0, 44.0, 44.6] if (row, seed) == ("dmae_98", 2) else [40.0, 44.0, 43.9]
    text = report(fake_tree(tmp_path, table2_top1, val=val), tmp_path)
    results = text.split("## Results", 1)[1].split("## Claims", 1)[0]
    assert "| `dmae_98` | 3 | +0.13 | -0.10, -0.10, +0.60 | flat |" in results
    assert "No row still rising (6 checked)." in results and "**still rising**" not in results
    assert re.search(r"the sd of all 18 last-epoch changes is 0\.\d\d pp\): `dmae_98` seed 2 \(\+0\.60", results)


def test_teacher_test_top1_is_shown(tmp_path):
    text = report(fake_tree(tmp_path, table2_top1, teacher_top1=88.25), tmp_path)
    results = text.split("## Results", 1)[1].split("## Claims", 1)[0]
    assert "Teacher (fine-tuned) test top-1: **88.25**" in results and "256 test images" in results
    assert "Teacher fine-tune validation top-1: last epoch 80.10, best 80.10" in results


def test_a_provided_teacher_is_set_beside_its_official_release():
    from types import SimpleNamespace

    from harness.report.sections import teacher_lines
    st = pd.DataFrame([{"stage_id": "teacher-evaluate-provided-vit_large-p16-0123456789", "role": "teacher-evaluate",
                        "status": "done", "reason": "", "top1": 85.5, "top5": 97.5, "n_eval": 50000,
                        "best_val_top1": None, "last_val_top1": None, "val_last_gain": None}])
    line = teacher_lines(SimpleNamespace(profile="paper", stages=st))[0]
    assert "**85.50**" in line and "reports 85.95" in line and "ours − official -0.45" in line, line
    assert "official" not in teacher_lines(SimpleNamespace(profile="smoke", stages=st))[0]


def test_old_results_keys_are_read(tmp_path):
    """Results written before the validation split: fine-tune logs `top1`, result best_top1 / last_top1."""
    root = fake_tree(tmp_path, table2_top1)
    for d in (d for d in root.iterdir() if d.is_dir()):
        res_path = d / "result.json"
        res = json.loads(res_path.read_text())
        if res["kind"] == "finetune":
            res = {("best_top1" if k == "best_val_top1" else "last_top1" if k == "last_val_top1" else k): v
                   for k, v in res.items()}
            res_path.write_text(json.dumps(res))
            recs = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
            (d / "log.jsonl").write_text("".join(json.dumps({"epoch": r["epoch"], "top1": r["val_top1"]}) + "\n"
                                                 for r in recs))
    c = collect(root)
    assert (c.cells["val_top1_last"] == 44.2).all() and (c.cells["val_top1_best_epoch"] == 3).all()
    assert c.cells["val_last_gain"].round(6).eq(0.2).all()


def test_a_user_recipe_claim_is_judged_with_no_code_change(tmp_path, monkeypatch):
    """A recipe added by a user, with a group claim and a within claim: planned, made-up results, judged."""
    recipes = tmp_path / "my-recipes"  # the user's folder holds only the table: the profile comes from the package
    recipes.mkdir()
    (recipes / "mine.yaml").write_text("""
defaults:
  - table_schema
  - _self_
  - launcher: local
  - profile: tiny
table: mine
title: "A user's table"
rows:
  base: {label: "MAE", method: mae}
  d1: {label: "DMAE 75", method: dmae}
  d2: {label: "DMAE 90", method: dmae, pretrain: {mask_ratio: 0.9}}
  control: {label: "from random init", method: scratch}
gates: {mae_row: base, scratch_row: control}
claims:
  - {id: dmae_group_beats_mae, text: "DMAE rows on average beat MAE", a: [d1, d2], b: [base], test: greater,
     margin: 0.5, source: paper, note: "a user's claim"}
  - {id: ratio_does_not_matter, text: "90% within 0.3 pp of 75%", a: [d2], b: [d1], test: within, margin: 0.3,
     source: official-default}
""")
    monkeypatch.setenv("HARNESS_RECIPE_PATH", str(recipes))
    vals = {"base": 60.0, "d1": 62.0, "d2": 61.0, "control": 50.0}
    root = fake_tree(tmp_path, lambda row, seed: vals[row] + seed + 0.01 * seed * len(row), table="mine")
    text = report(root, tmp_path)
    assert claim_lines(text) == {"dmae_group_beats_mae": "holds", "ratio_does_not_matter": "does not hold"}
    assert "DMAE rows on average beat MAE (mean(`d1`, `d2`) vs `base`; `dmae_group_beats_mae`)" in text
    assert "| official default |" in text and "Official default, not a paper result" in text
    assert (tmp_path / "reports" / "mine.smoke" / "claims.csv").is_file()
    assert "[mine.smoke](mine.smoke.md)" in (tmp_path / "reports" / "README.md").read_text()


def test_manifest_without_claims_says_so(tmp_path):
    root = fake_tree(tmp_path, table2_top1)
    m = json.loads((root / "manifest.json").read_text())
    del m["config"]["claims"]
    (root / "manifest.json").write_text(json.dumps(m))
    text = report(root, tmp_path)
    assert "This run's manifest carries no claims" in text
    assert pd.read_csv(tmp_path / "reports" / "table2.smoke" / "claims.csv").empty


def test_removed_row_makes_its_claims_not_applicable(tmp_path):
    text = report(fake_tree(tmp_path, table2_top1, overrides=["~rows.mae"]), tmp_path)
    assert claim_lines(text)["dmae_beats_mae"] == "not applicable" and "This run has no row `mae`." in text
    # without its MAE row the profile's positive control cannot be checked: the paper claims are not testable
    assert claim_lines(text)["dmae_beats_kd"] == "not testable at this profile (gate i, ii did not pass)"
    assert "| i | MAE pre-training beats scratch" in text and "no row `mae` in this run" in text


def test_an_overridden_row_is_labelled_and_its_paper_number_and_claims_are_not_applicable(tmp_path):
    root = fake_tree(tmp_path, table2_top1, overrides=["rows.dmae_95.pretrain.mask_ratio=0.9", "launcher=local"])
    text = report(root, tmp_path)
    over = "not applicable (overridden: dmae_95: pretrain.mask_ratio=0.9)"
    assert re.search(r"^\d+\. `mask95_within_1pp_of_75` — .*?: " + re.escape(over) + r"\..*? The command line changed "
                     r"`dmae_95` \(pretrain.mask_ratio=0.9\), so this run does not test the claim", text, re.M)
    assert claim_lines(text)["dmae_beats_mae"] == "holds"  # claims on untouched rows are judged as before
    assert "DMAE, 95% masking [pretrain.mask_ratio=0.9]" in text and "`dmae_95` DMAE, 95% masking |" not in text
    assert "not applicable (overridden: pretrain.mask_ratio=0.9)" in text  # its paper number
    assert "Rows the command line changed against the recipe (`dmae_95` (pretrain.mask_ratio=0.9))" in text
    rows = pd.read_csv(tmp_path / "reports" / "table2.smoke" / "rows.csv").set_index("row")
    assert rows.at["dmae_95", "overridden"] == "pretrain.mask_ratio=0.9" and pd.isna(rows.at["dmae_75", "overridden"])
    claims = pd.read_csv(tmp_path / "reports" / "table2.smoke" / "claims.csv").set_index("id")
    assert claims.at["mask95_within_1pp_of_75", "verdict"] == "not applicable"


def test_neutral_overrides_keep_the_recipe_rows(tmp_path):
    root = fake_tree(tmp_path, table2_top1, overrides=["rows.dmae_95.pretrain.mask_ratio=0.95", "launcher=local",
                                                       "run.threads=1", "seed=0"])
    text = report(root, tmp_path)
    assert "overridden" not in text and "`dmae_95` DMAE, 95% masking |" in text
    assert claim_lines(text)["mask95_within_1pp_of_75"] != "not applicable"


def test_expected_values_within_and_outside_tolerance(tmp_path, capsys):
    root = fake_tree(tmp_path, table2_top1)
    exp_dir = tmp_path / "expected"
    text = report(root, tmp_path, expected_dir=exp_dir)
    assert "No expected values for `table2` / `smoke`" in text and "--write-expected" in text
    # the CLI writes recipes/expected/<table>.<profile>.csv (here: a tmp dir) and the report checks against it
    assert main(["table2", "--results-root", str(root.parent.parent), "--reports-dir", str(tmp_path / "reports"),
                 "--write-expected", "--expected-dir", str(exp_dir)]) == 0
    path = exp_dir / "table2.smoke.csv"
    exp = pd.read_csv(path)
    assert list(exp.columns) == ["row", "mean", "std", "n", "tolerance", "commit", "note"]
    assert list(exp["row"]) == ROWS and (exp["n"] == 3).all() and (exp["tolerance"] == 0.5).all()
    assert set(exp["commit"]) == {"abc1234"} and "max(tolerance, 3·std/√n_ours)" in exp["note"][0]
    text = report(root, tmp_path, expected_dir=exp_dir)
    section = text.split("## Expected values", 1)[1].split("## Figures", 1)[0]
    assert "| row | expected (mean ± std, n) | ours | Δ | within tolerance? |" in section
    assert section.count("| yes (±") == 6 and "**no**" not in section
    # mae drifts by +0.4 at every seed: 3·std/√3 ≈ 5.2 is the tolerance (std over seeds 3 pp) -> still within;
    # a tight reference (std 0.01) makes the floor 0.5 the tolerance -> +0.6 is outside
    exp.loc[exp["row"] == "mae", "std"] = 0.01
    exp.to_csv(path, index=False)
    set_top1(root, "mae", [table2_top1("mae", s) + 0.6 for s in range(3)])
    section = report(root, tmp_path, expected_dir=exp_dir).split("## Expected values", 1)[1].split("## Figures")[0]
    line = next(x for x in section.splitlines() if x.startswith("| `mae` |"))
    assert "| +0.60 | **no** (±0.50) |" in line and section.count("| yes (±") == 5


def test_report_links_nothing_under_results(tmp_path):
    root = fake_tree(tmp_path, table2_top1)
    text = report(root, tmp_path)
    for link in links(text):
        assert "results" not in link and not link.startswith("/") and ".." not in link, link
        assert (tmp_path / "reports" / link).is_file(), link
    assert "config.yaml" in text and "manifest.json" in text  # named as plain text
    index = (tmp_path / "reports" / "README.md").read_text()
    assert all("results" not in link for link in links(index))


def test_dashboard_lists_claims_of_every_report(tmp_path):
    report(fake_tree(tmp_path / "a", table2_top1), tmp_path)
    report(fake_tree(tmp_path / "b", lambda r, s: 40.0 if r == "scratch" else 50.0, table="teacher", seeds=2),
           tmp_path)
    (tmp_path / "reports" / "old.md").write_text("# old: a report from before claims.csv\n")
    index = write_index(tmp_path / "reports").read_text()
    assert index.count("[table2.smoke](table2.smoke.md)") == 5 and index.count("[teacher.smoke](teacher.smoke.md)") == 4
    # equal rows, zero spread: the interval is the point 0, below margin 0 + bound 0.5 of the teacher claims
    assert "`pretrained_beats_kd`" in index and "| **does not hold (effect < bound)** |" in index
    assert "| does not hold |" not in index and "| **holds** |" in index
    assert "Reports without a claims.csv" in index and "[old](old.md)" in index


def test_distinct_rows_leave_out_a_shared_pretrain_and_the_control():
    from harness.report.claims import distinct_rows
    cells = pd.DataFrame([{"row": r, "seed": s, "pretrain_id": p(s), "method": m} for r, p, m in [
        ("mae", lambda s: f"pt-mae-s{s}", "mae"), ("kd", lambda s: f"pt-mae-s{s}", "kd"),
        ("dmae", lambda s: f"pt-dmae-s{s}", "dmae"), ("scratch", lambda s: None, "scratch"),
        ("other", lambda s: "", "mae")] for s in range(2)])
    assert distinct_rows(cells) == (["mae", "dmae", "other"], {
        "kd": "shares a pre-train with `mae`",
        "scratch": "the positive control, fine-tuned from random initialisation"})


def test_dashboard_counts_a_comparison_shared_by_recipes_once(tmp_path):
    """table2 and masking share the MAE, DMAE 75/95/98 stages: their common claims are one comparison each."""
    def top1(row, seed):
        return 50.0 + 3.0 * seed + 0.3 * len(row) + 0.05 * ((seed * 7 + len(row)) % 3) - 10.0 * (row == "scratch")
    report(fake_tree(tmp_path / "a", top1), tmp_path)
    report(fake_tree(tmp_path / "b", top1, table="masking"), tmp_path)
    t2 = pd.read_csv(tmp_path / "reports" / "table2.smoke" / "claims.csv").set_index("id")
    mk = pd.read_csv(tmp_path / "reports" / "masking.smoke" / "claims.csv").set_index("id")
    assert t2.at["dmae_beats_mae", "a_stages"] == mk.at["dmae_75_beats_mae", "a_stages"]  # the same stages
    index = write_index(tmp_path / "reports").read_text()
    # 4 + 8 claim lines, 3 shared (beats MAE at 75%, 95% within 1 pp, 98% at most 3 pp below): 9 comparisons, all
    # paper claims; chance alone decides about 5% of the 9 tested
    assert "### Paper claims (the primary set)" in index and "### Official-default claims" not in index
    assert "9 distinct comparisons behind 12 claim lines; 9 tested" in index
    assert "about 0.5 of these 9 decided verdicts are expected with no real effect anywhere" in index
    line = next(x for x in index.splitlines() if "[table2.smoke](table2.smoke.md) `dmae_beats_mae`" in x)
    assert "[masking.smoke](masking.smoke.md) `dmae_75_beats_mae`" in line
    assert sum("`dmae_75_beats_mae`" in x for x in index.splitlines()) == 1
    assert index.count("[table2.smoke](table2.smoke.md)") == 4 + 1  # each alias once, and the report's link
    # the lead alias (its verdict counts) is the one with the most dof (masking pools more rows), the first on ties
    dof_t2, dof_mk = t2.at["dmae_beats_mae", "dof"], mk.at["dmae_75_beats_mae", "dof"]
    lead = "dmae_75_beats_mae" if dof_mk >= dof_t2 else "dmae_beats_mae"
    assert line.startswith(f"| `{lead}` ") and f"(pooled, {max(dof_mk, dof_t2)} dof)" in line
    # paper claims first: the official-default ones of another report come after, counted apart
    report(fake_tree(tmp_path / "c", lambda r, s: 50.0 + s, table="projection", seeds=2), tmp_path)
    index = write_index(tmp_path / "reports").read_text()
    assert index.index("### Paper claims (the primary set)") < index.index("### Official-default claims") \
        < index.index("`linear_vs_mlp`")
    assert "1 distinct comparisons behind 1 claim lines; 1 tested" in index


def test_dashboard_names_the_code_versions_of_its_reports(tmp_path):
    import pandas as pd
    report(fake_tree(tmp_path / "a", table2_top1), tmp_path)
    report(fake_tree(tmp_path / "b", lambda r, s: 40.0 if r == "scratch" else 50.0, table="teacher", seeds=2),
           tmp_path)
    stages = tmp_path / "reports" / "teacher.smoke" / "stages.csv"
    df = pd.read_csv(stages, dtype=str, keep_default_na=False)
    one = "a" * 40
    df["git_commit"] = one
    df.to_csv(stages, index=False)
    index = write_index(tmp_path / "reports").read_text()
    assert "[teacher.smoke](teacher.smoke.md): " in index and f"computed by {one[:7]}" in index
    other = tmp_path / "reports" / "table2.smoke" / "stages.csv"
    df.assign(git_commit="b" * 40).to_csv(other, index=False)
    assert "different versions of the code" in write_index(tmp_path / "reports").read_text()
    df.to_csv(other, index=False)
    assert "different versions of the code" not in write_index(tmp_path / "reports").read_text()


# ------------------------------------------------------------------------------------------ summary, artefacts, figures
def summary_block(text: str) -> list:
    return text.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0].splitlines()


def test_summary_block_counts_claims_expected_values_stages_and_gates(tmp_path):
    root = fake_tree(tmp_path, table2_top1, times=True)
    exp_dir = tmp_path / "expected"
    assert main(["table2", "--results-root", str(root.parent.parent), "--reports-dir", str(tmp_path / "reports"),
                 "--write-expected", "--expected-dir", str(exp_dir)]) == 0
    exp = pd.read_csv(exp_dir / "table2.smoke.csv")
    exp.loc[exp["row"] == "mae", "std"] = 0.01  # a tight reference: +0.6 pp is outside its 0.5 floor
    exp.to_csv(exp_dir / "table2.smoke.csv", index=False)
    set_top1(root, "mae", [table2_top1("mae", s) + 0.6 for s in range(3)])
    text = report(root, tmp_path, expected_dir=exp_dir)
    n = len(json.loads((root / "manifest.json").read_text())["stages"])  # each ran 1 s, one after the other
    assert 60 <= n < 120
    dur = f"1 min {n - 60:02d} s"
    assert text.index("## Summary") < text.index("**Profile:") < text.index("## Gates")
    assert summary_block(text) == [
        "- **Claims:** 4 of 4 decided — 4 hold, 0 do not hold, 0 paper-size effect excluded; 0 inconclusive, 0 not "
        "testable at this profile.",
        "- **Expected values:** 5 of 6 rows within tolerance (table2.smoke.csv); outside: `mae`.",
        f"- **Stages:** {n} of {n} done; {dur} of stage wall time summed, {dur} from the first start to the last "
        f"finish (2025-12-31T23:59:59 → 2026-01-01T00:{(n - 1) // 60:02d}:{(n - 1) % 60:02d}; a start is its "
        "stage's finish minus its wall time).",
        "- **Gates:** all pass."]
    # a removed MAE row: its claim is not applicable, the gates that need it do not pass, the paper claims are not
    # testable; no expected values for this profile
    text = report(fake_tree(tmp_path / "b", table2_top1, overrides=["~rows.mae"]), tmp_path / "b")
    lines = summary_block(text)
    assert lines[0] == ("- **Claims:** 0 of 4 decided — 0 hold, 0 do not hold, 0 paper-size effect excluded; 0 "
                        "inconclusive, 3 not testable at this profile, 1 not applicable.")
    assert lines[1] == "- **Expected values:** none for this profile (table2.smoke.csv does not exist)."
    n = len(json.loads((tmp_path / "b" / "results" / "table2" / "smoke" / "manifest.json").read_text())["stages"])
    assert lines[2] == f"- **Stages:** {n} of {n} done; 1 min {n - 60:02d} s of stage wall time summed."  # no times
    assert lines[3] == "- **Gates:** gates i, ii did not pass."


def test_summary_json_holds_rows_claims_gates_and_provenance(tmp_path):
    import importlib.metadata
    import subprocess
    from harness.report.stats import paired
    root = fake_tree(tmp_path, table2_top1, real_specs=True)
    report(root, tmp_path)
    out = tmp_path / "reports" / "table2.smoke"
    js = json.loads((out / "summary.json").read_text())
    assert list(js) == ["table", "profile", "report", "title", "results", "overview", "rows", "teacher", "claims",
                        "gates", "ablations", "provenance"]
    assert (js["table"], js["profile"], js["report"], js["results"]) == ("table2", "smoke", "table2.smoke",
                                                                          "results/table2/smoke")
    rows = {r["row"]: r for r in js["rows"]}
    assert list(rows) == ROWS
    s = summarize(collect(root)).set_index("row")
    for row, r in rows.items():
        vals = [table2_top1(row, k) for k in range(3)]
        p = paired(vals)
        assert r["n"] == 3 and math.isclose(r["mean"], s.at[row, "mean"]) and math.isclose(r["sd"], s.at[row, "std"])
        assert r["ci"] == pytest.approx([p.lo, p.hi]) and r["top1_per_seed"] == {str(k): v for k, v in enumerate(vals)}
        assert r["probe_top1"] == 60.0 and r["expected"] is None  # no expected values in the tmp dir
        assert isinstance(r["params"], int) and r["params"] > 0 and r["finetune_flops_per_image"] > 0
    assert rows["dmae_75"]["paper"] == 84.0 and rows["mae"]["paper"] is None
    assert "params_pretrain" not in rows["scratch"] and rows["dmae_75"]["params_pretrain"] > rows["mae"][
        "params_pretrain"]  # + the projection head
    assert rows["dmae_75"]["pretrain_flops_per_image"] > rows["mae"]["pretrain_flops_per_image"]  # + the teacher
    assert js["teacher"] == {"top1": 88.5, "probe_top1": 80.0}
    csv = pd.read_csv(out / "claims.csv")
    assert [c["name"] for c in js["claims"]] == CLAIM_IDS == list(csv["id"])
    for c, (_, line) in zip(js["claims"], csv.iterrows()):
        assert c["verdict"] == line["verdict"] == "holds" and math.isclose(c["estimate"], line["mean"])
        assert c["interval"] == pytest.approx([line["ci_lo"], line["ci_hi"]]) and c["source"] == "paper"
    assert js["gates"]["verdict"] == "all pass" and [g["key"] for g in js["gates"]["gates"]] == ["i", "ii", "iii"]
    assert js["overview"]["claims"]["holds"] == 4 and js["overview"]["stages"]["done"] == js["overview"]["stages"][
        "total"]
    assert js["ablations"][0]["setting"] == "pretrain:pretrain.mask_ratio"
    prov = js["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    assert prov["report_writer"]["git_commit"] == head and isinstance(prov["report_writer"]["git_dirty"], bool)
    try:
        version = importlib.metadata.version("dmae-harness")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    assert prov["report_writer"]["package_version"] == version
    assert prov["stage_git_commits"] == {"abc1234": len(json.loads((root / "manifest.json").read_text())["stages"])}
    # the meta-device count is the real model's
    from harness.core.models import build_classifier, get_arch
    spec = json.loads((root / cells_of(root, "mae")[0]["finetune"] / "config.json").read_text())["spec"]
    model = build_classifier(get_arch(spec["model"]["preset"]), 10, spec["data"]["img_size"],
                             spec["model"]["patch_size"])
    assert rows["mae"]["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = (tmp_path / "reports" / "table2.smoke.md").read_text()
    assert f"| `mae` | {rows['mae']['params']:,} |" in text and "Written by dmae-harness" in text


def test_top1_figure_is_zoomed_and_marks_expected_and_teacher(tmp_path):
    from harness.report.figures import top1_figure
    summary = pd.DataFrame([{"row": r, "method": m, "n": 3, "seeds_top1": [v - 0.4, v, v + 0.5]}
                            for r, m, v in [("mae", "mae", 70.0), ("dmae", "dmae", 71.2), ("kd", "kd", 70.6)]])
    fig = top1_figure(summary, "tiny", teacher=74.0, expected={"mae": 70.3})
    lo, hi = fig.axes[0].get_ylim()
    assert 65 < lo < 69.6 and 74.0 < hi < 80  # not from 0: the differences stay visible
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "teacher (fine-tuned) test top-1 74.00" in labels and "expected mean (recipes/expected)" in labels
    assert "method dmae: mean, 95% t-interval" in labels and "seeds" in labels
    assert top1_figure(summary.assign(n=0, seeds_top1=[[]] * 3), "tiny") is None
    # in a report: written, linked, captioned
    text = report(fake_tree(tmp_path, table2_top1, real_specs=True), tmp_path, figures=True)
    assert "![Test top-1 per row: seeds, mean and its 95% t-interval on a zoomed axis, the teacher]" \
           "(table2.smoke/top1_by_row.png)" in text
    png = (tmp_path / "reports" / "table2.smoke" / "top1_by_row.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(table2.smoke/top1_vs_pretrain.mask_ratio.png)" in text
    assert (tmp_path / "reports" / "table2.smoke" / "top1_vs_pretrain.mask_ratio.png").is_file()


def test_training_curves_put_the_feature_loss_on_its_own_axes(tmp_path):
    root = fake_tree(tmp_path, table2_top1)
    for cell in cells_of(root, "dmae_75"):  # a DMAE pre-training logs its pixel and feature parts
        (root / cell["pretrain"] / "log.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "loss": 2.0 / e + 0.05 / e, "loss_pix": 2.0 / e, "loss_feat": 0.05 / e}) + "\n"
            for e in (1, 2, 3)))
    report(root, tmp_path, figures=True)

    def width(name):  # a PNG's width, from its IHDR chunk
        return int.from_bytes((tmp_path / "reports" / "table2.smoke" / name).read_bytes()[16:20], "big")
    assert width("curves-dmae_75.png") == 1350 and width("curves-mae.png") == 900  # 3 panels vs 2
    c = collect(root)
    assert [r.get("loss_feat") for r in c.log(cells_of(root, "dmae_75")[0]["pretrain"])] == [0.05, 0.025, 0.0166667]


def test_ablation_axis_is_the_one_setting_the_rows_vary():
    from harness.report.ablation import ablation_axes, row_settings
    base = {"objective": "dmae", "pretrain": {"mask_ratio": 0.75, "epochs": 8, "warmup_epochs": 1.0},
            "distill": {"alpha": 1.0, "distance": "l1", "pairs": [[2, 4]]}, "model": {"preset": "s"}}

    def spec(**changes):
        out = json.loads(json.dumps(base))
        for path, v in changes.items():
            sec, key = path.split("__")
            out[sec][key] = v
        return {"pretrain": dict(out, name="x", seed=0, inputs={"teacher": "t"}), "finetune": {"finetune": {"e": 3}}}
    specs = {"dmae_75": spec(), "dmae_90": spec(pretrain__mask_ratio=0.9), "dmae_95": spec(pretrain__mask_ratio=0.95),
             "mae": {"pretrain": {"objective": "mae", "pretrain": base["pretrain"], "model": base["model"]},
                     "finetune": {"finetune": {"e": 3}}},
             "two": spec(pretrain__mask_ratio=0.85, distill__alpha=2.0),  # two settings: in no series
             "scratch": {"pretrain": None, "finetune": {"finetune": {"e": 3}}}}
    methods = {"dmae_75": "dmae", "dmae_90": "dmae", "dmae_95": "dmae", "two": "dmae", "mae": "mae"}
    axes = ablation_axes(row_settings(specs), methods)
    assert len(axes) == 1 and axes[0].keys == ("pretrain:pretrain.mask_ratio",)
    assert axes[0].series[0].name == "dmae" and axes[0].series[0].points == (
        ("dmae_75", 0.75), ("dmae_90", 0.9), ("dmae_95", 0.95))
    assert axes[0].label == "pretrain.mask_ratio" and axes[0].slug == "pretrain.mask_ratio"
    # seed, name and inputs never make two rows different; a non-numeric setting is no axis
    assert ablation_axes(row_settings({"a": spec(), "b": spec(distill__distance="l2")})) == []
    # settings that move together (the warm-up scaled with the epochs) are one axis; a two-row series along the same
    # settings joins it
    sched = {f"d{e}": spec(pretrain__epochs=e, pretrain__warmup_epochs=e / 8) for e in (2, 4, 8)}
    sched.update({f"m{e}": {"pretrain": {"objective": "mae", "pretrain": dict(base["pretrain"], epochs=e,
                                                                              warmup_epochs=e / 8)}} for e in (2, 8)})
    axes = ablation_axes(row_settings(sched), {**{f"d{e}": "dmae" for e in (2, 4, 8)}, "m2": "mae", "m8": "mae"})
    assert [a.keys for a in axes] == [("pretrain:pretrain.epochs", "pretrain:pretrain.warmup_epochs")]
    assert [s.name for s in axes[0].series] == ["dmae", "mae"] and axes[0].rows == ["d2", "d4", "d8", "m2", "m8"]
    assert axes[0].label == "pretrain.epochs (with pretrain.warmup_epochs)"
    # two rows differing in two settings are not an axis
    assert ablation_axes(row_settings({"a": spec(), "b": spec(pretrain__mask_ratio=0.9, distill__alpha=2.0)})) == []


@pytest.mark.parametrize("table, key, rows", [
    ("masking", "pretrain:pretrain.mask_ratio", ["dmae_75", "dmae_80", "dmae_85", "dmae_90", "dmae_95", "dmae_98"]),
    ("schedule", "pretrain:pretrain.epochs", ["dmae_25", "dmae_50", "dmae_100", "mae_25", "mae_100"]),
    ("distance", "pretrain:distill.alpha", ["alpha_0p5", "l1_norm", "alpha_2"]),
    ("student_size", None, []), ("aligned_layer", None, [])])
def test_recipes_ablation_axes_come_from_their_resolved_specs(tmp_path, table, key, rows):
    from harness.report.figures import ablation_files
    # the smoke profile's single pre-training epoch scales to 1 at every schedule length: 8 here (warm-up 1)
    c = collect(fake_tree(tmp_path, lambda r, s: 50.0 + s, table=table, seeds=1, real_specs=True,
                          overrides=["pretrain.epochs=8", "pretrain.warmup_epochs=1"]))
    axes = [a for a, _ in ablation_files(c)]
    assert [a.key for a in axes] == ([key] if key else []) and (not key or axes[0].rows == rows)
    if table == "schedule":  # the warm-up is scaled with the epochs: one axis, both
        assert axes[0].keys == ("pretrain:pretrain.epochs", "pretrain:pretrain.warmup_epochs")
        assert [x for _, x in axes[0].series[0].points] == [2.0, 4.0, 8.0]


def test_sweep_figure_draws_top1_against_the_swept_value(tmp_path):
    from harness.report.figures import sweep_axes, sweep_figures
    points = [(f"m={m}", collect(fake_tree(tmp_path / m, table2_top1, seeds=2, real_specs=True,
                                           overrides=[f"rows.dmae_95.pretrain.mask_ratio={m}"])))
              for m in ("0.9", "0.95")]
    axes, top1, _ = sweep_axes(points)
    assert [a.key for a in axes] == ["pretrain:pretrain.mask_ratio"]
    # rows the swept key does not touch are one computation at both points: counted once
    assert axes[0].rows == ["dmae_75 @ m=0.9", "dmae_95 @ m=0.9", "dmae_95 @ m=0.95", "dmae_98 @ m=0.9"]
    assert [x for _, x in axes[0].series[0].points] == [0.75, 0.9, 0.95, 0.98]
    drawn = sweep_figures(points, tmp_path / "fig")
    assert [name for _, name in drawn] == ["top1_vs_pretrain.mask_ratio.png"]
    assert (tmp_path / "fig" / "top1_vs_pretrain.mask_ratio.png").is_file()


def test_git_state_dirty_flag(tmp_path):
    import subprocess
    from harness.report.artefacts import git_state
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_state(repo=repo) == {"commit": head, "dirty": False}
    (repo / "reports").mkdir()
    (repo / "reports" / "t.md").write_text("a report being written\n")
    assert git_state(repo=repo)["dirty"] is True  # an untracked file counts (git status --porcelain lists it)
    assert git_state([repo / "reports"], repo=repo)["dirty"] is False  # ... but not in the folder being written
    (repo / "code.py").write_text("x = 2\n")
    assert git_state([repo / "reports"], repo=repo) == {"commit": head, "dirty": True}
    assert git_state(repo=tmp_path / "nowhere") == {"commit": None, "dirty": None}


def test_report_comes_back_from_its_kept_data_byte_for_byte(tmp_path, monkeypatch):
    """A clone has the committed reports/<name>/ data and no results tree: the same report, figures and data."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    root = fake_tree(tmp_path, table2_top1, real_specs=True, times=True)
    set_top1(root, "dmae_95", [table2_top1("dmae_95", 0), "n/a", table2_top1("dmae_95", 2)])  # a warning, too
    results, reports = root.parent.parent, tmp_path / "reports"
    assert main(["table2", "--results-root", str(results), "--reports-dir", str(reports)]) == 0
    out = reports / "table2.smoke"
    first = {p.name: p.read_bytes() for p in out.iterdir()} | {"md": (reports / "table2.smoke.md").read_bytes()}
    assert {"cells.csv", "stages.csv", "epochs.csv", "run.json", "rows.csv", "claims.csv", "summary.json",
            "top1_by_row.png", "top1_vs_pretrain.mask_ratio.png", "curves-dmae_75.png"} <= set(first)
    assert "Report generated: 2026-01-01 00:00:00" in first["md"].decode()
    for name in ("md", "run.json", "summary.json", "cells.csv", "stages.csv", "epochs.csv"):
        assert str(tmp_path).encode() not in first[name], name  # no path of this machine
    assert b"- results/table2/smoke/evaluate-" in first["md"]  # the warning names the file from results/ on
    shutil.rmtree(results)
    for png in out.glob("*.png"):
        png.unlink()
    assert main(["table2", "--results-root", str(results), "--reports-dir", str(reports)]) == 0
    again = {p.name: p.read_bytes() for p in out.iterdir()} | {"md": (reports / "table2.smoke.md").read_bytes()}
    assert again.keys() == first.keys()
    assert [k for k in first if first[k] != again[k]] == []
    assert main(["table2", "--results-root", str(results), "--reports-dir", str(reports), "--from-reports",
                 "--profile", "smoke"]) == 0
    assert (reports / "table2.smoke.md").read_bytes() == first["md"]
    with pytest.raises(SystemExit):
        main(["table2", "--results-root", str(results), "--reports-dir", str(tmp_path / "empty")])


def test_load_export_gives_back_the_collected_frames(tmp_path):
    from harness.report.export import load_export
    root = fake_tree(tmp_path, table2_top1, real_specs=True)
    c = collect(root)
    export(c, tmp_path / "data")
    back = load_export(tmp_path / "data")
    for a, b in ((c.cells, back.cells), (c.stages, back.stages), (c.epochs, back.epochs)):
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for col in a.columns:
            x = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in a[col]]
            y = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in b[col]]
            if col == "config_path":
                x = [Path(v).relative_to(root.parent.parent).as_posix() if v else v for v in x]
            assert x == y or (col == "reason" and [v or "" for v in x] == [v or "" for v in y]), col
    assert back.specs == c.specs and back.results == "results/table2/smoke"
    # this machine's results root is written as `results`
    assert c.manifest["config"]["results_root"] == str(root.parent.parent)
    assert back.manifest == dict(c.manifest, config=dict(c.manifest["config"], results_root="results"))
    assert back.log(c.stages["stage_id"].iloc[1]) == c.log(c.stages["stage_id"].iloc[1])


# ------------------------------------------------------------------------------------------ on real smoke runs
@pytest.mark.slow
def test_collect_reads_every_stage_and_cell(smoke):
    c = collect(smoke)
    assert len(c.cells) == 12 and set(c.cells["status"]) == {"done"} and not c.warnings
    assert len(c.stages) == len(c.manifest["stages"]) and set(c.stages["status"]) == {"done"}
    assert list(c.stages["role"][:2]) == ["teacher-pretrain", "teacher-finetune"]
    for cell in c.manifest["cells"]:
        res = json.loads((smoke / cell["evaluate"] / "result.json").read_text())
        got = c.cells[(c.cells["row"] == cell["row"]) & (c.cells["seed"] == cell["seed"])].iloc[0]
        assert got["top1"] == res["top1"] and got["git_commit"] == res["git_commit"]
        assert got["wall_s"] > 0 and got["device_hours"] > 0 and Path(got["config_path"]).exists()
    s = summarize(c).set_index("row")
    assert list(s.index) == ROWS and (s["n"] == 2).all()
    vals = c.cells[c.cells["row"] == "dmae_75"]["top1"]
    assert math.isclose(s.at["dmae_75", "mean"], vals.mean()) and math.isclose(s.at["dmae_75", "std"], vals.std())
    assert s.at["dmae_75", "paper_text"] == "84.0" and s.at["kd_finetuned_teacher", "paper_text"] == "82.8"
    assert s.at["dmae_95", "paper_text"] == "83.6" and s.at["dmae_98", "paper_text"] == "82.4"
    assert s.at["mae", "paper_text"] == NOT_AVAILABLE and s.at["mae", "delta_text"] == NOT_AVAILABLE
    assert s.at["dmae_75", "delta_text"] == NOT_IMAGENET  # smoke numbers are not ImageNet numbers


@pytest.mark.slow
def test_report_table_banner_and_every_link_exists(tree, tmp_path):
    text = report(tree, tmp_path, figures=True)
    assert "**Profile: `smoke`.**" in text and "These are not ImageNet numbers" in text
    assert "| row | paper | reproduced test top-1 (mean ± std, n) | probe top-1 (mean ± std) | Δ | status |" in text
    assert "## Gates" in text.split("## Warnings")[0]  # the positive controls come first
    for row in ROWS:
        assert re.search(rf"^\| `{row}` .* \(n=2\) \| .* \| 2/2 done \|$", text, re.M), row
    assert "| `dmae_75` DMAE, 75% masking | 84.0 [" in text and NOT_IMAGENET in text
    found = links(text)
    figures = [f.split("/", 1)[1] for f in found if f.endswith(".png")]
    # top1_vs_<setting>: the rows dmae_75/95/98 differ in the mask ratio alone (harness.report.ablation)
    expected = ["claims_forest.png", "top1_by_row.png", "top1_vs_pretrain.mask_ratio.png"] \
        + (["val_curves.png"] if has_val_curves(tree) else []) + ["curves-teacher.png"] \
        + [f"curves-{r}.png" for r in ROWS]
    assert figures == expected and "top1_vs_mask.png" not in text  # the twin-axis plot is gone
    base = tmp_path / "reports"
    for link in found:
        assert (base / link).is_file(), link
        assert "results" not in link
    for fig in figures:
        assert (base / "table2.smoke" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for part in ("## Claims", "## Expected values", "## Cost", "## Provenance", "OpenReview 7QTldIMkkqX abstract",
                 "- Command:", "Git commit at launch", "torch 2", "hydra-core", "scipy", "config.yaml",
                 "Hardware (finished stages): cpu"):
        assert part in text


@pytest.mark.slow
def test_report_is_deterministic_apart_from_its_date(tree, tmp_path):
    first = report(tree, tmp_path, figures=True)
    pngs = {p.name: p.read_bytes() for p in (tmp_path / "reports" / "table2.smoke").glob("*.png")}
    assert len(pngs) == 4 + has_val_curves(tree) + len(ROWS)
    second = report(tree, tmp_path, figures=True)
    assert GEN.sub("", first) == GEN.sub("", second) and len(GEN.findall(first)) == 1
    assert pngs == {p.name: p.read_bytes() for p in (tmp_path / "reports" / "table2.smoke").glob("*.png")}


@pytest.mark.slow
def test_claims_hold_then_fail_when_top1_is_edited(tree, tmp_path):
    # seed 1 is 0.2 pp easier for every row: paired differences are constant, the intervals are points (the pooled
    # noise of an additive table is 0; a row absent from the plan, e.g. scratch, is skipped by set_top1)
    for row, vals in {"mae": [10.0, 10.2], "kd_finetuned_teacher": [11.0, 11.2], "dmae_75": [12.0, 12.2],
                      "dmae_95": [11.8, 12.0], "dmae_98": [10.0, 10.2], "scratch": [8.0, 8.2]}.items():
        set_top1(tree, row, vals)
    # a 1-epoch smoke run cannot pass the positive controls (no last-epoch change, probes of untrained encoders):
    # this test is about the claims' arithmetic, so its gates are off
    manifest = json.loads((tree / "manifest.json").read_text())
    manifest["config"]["gates"]["enabled"] = False
    (tree / "manifest.json").write_text(json.dumps(manifest))
    text = report(tree, tmp_path)
    assert "**Gates are off for this run**" in text
    assert claim_lines(text) == {i: "holds" for i in CLAIM_IDS}
    line = next(x for x in text.splitlines() if x.startswith("| DMAE (75% masking) beats KD"))
    assert "| +1.00 | [+1.00, +1.00] | 2 | **holds** |" in line and "84.0 − 82.8 = +1.2" in line
    set_top1(tree, "dmae_75", [9.0, 9.2])
    set_top1(tree, "dmae_98", [5.0, 5.2])
    verdicts = claim_lines(report(tree, tmp_path))
    assert verdicts == {i: "does not hold" for i in CLAIM_IDS}  # 95% is now +2.8 pp from 75%: outside (-1, 1)
    # differences to mae -0.2 and +0.7: the pooled noise over mae and dmae 75/95/98 alone (2 seeds, dof 3) is
    # sd 0.32, the interval +0.25 -/+ 3.18 * 0.32 * sqrt(2) / sqrt(2) = [-0.76, +1.26]: it straddles 0 and the bound
    set_top1(tree, "dmae_75", [9.8, 10.9])
    text = report(tree, tmp_path)
    assert claim_lines(text)["dmae_beats_mae"] == "inconclusive" and "Seeds for 80% power at the observed" in text
    assert re.search(r"\(pooled, \d+ dof\)", text)


@pytest.mark.slow
def test_missing_failed_and_partial_stages_are_shown_not_dropped(tree, tmp_path):
    for cell in cells_of(tree, "dmae_95"):  # never evaluated -> not enough data for the 95% claim
        (tree / cell["evaluate"] / "result.json").unlink()
    ev98 = tree / cells_of(tree, "dmae_98")[0]["evaluate"]
    (ev98 / "result.json").unlink()
    (ev98 / "error.json").write_text(json.dumps({"error": "RuntimeError: CUDA out of memory", "traceback": "",
                                                 "at": "2026-01-01T00:00:00"}))
    kd1 = cells_of(tree, "kd_finetuned_teacher")[1]  # fine-tune interrupted: checkpoint-last, no result
    (tree / kd1["finetune"] / "result.json").unlink()
    # as an interrupted run leaves it (a finished stage's checkpoints are deleted: run.keep_checkpoints is false)
    (tree / kd1["finetune"] / "checkpoint-last.pth").write_bytes(b"")
    (tree / kd1["evaluate"] / "result.json").unlink()
    c = collect(tree)
    st = c.cells.set_index(["row", "seed"])["status"]
    assert st["dmae_95", 0] == "not started" and st["dmae_98", 0] == "failed" and st["kd_finetuned_teacher", 1] == \
        "partial"
    text = report(tree, tmp_path)
    assert re.search(r"^\| `dmae_95` .* \| no finished cell \(n=0\) \| .* \| 2/2 not started \|$", text, re.M)
    assert re.search(r"^\| `dmae_98` .* \| \d+\.\d\d \(n=1\) \| .* \| 1/2 done; 1/2 failed \|$", text, re.M)
    assert "1/2 done; 1/2 partial" in text and "RuntimeError: CUDA out of memory" in text
    assert "checkpoint-last exists" in text
    verdicts = claim_lines(text)
    assert verdicts["mask95_within_1pp_of_75"] == "not enough data" and "No seed finished on both sides." in text
    # one seed of dmae_98 finished: n = 1 paired seed, no interval
    assert verdicts["mask98_at_most_3pp_below_75"] == "not enough data" and "Paired seeds: 1." in text
    assert verdicts["dmae_beats_kd"] == "not enough data"  # kd seed 1 partial


@pytest.mark.slow
def test_failed_teacher_blocks_every_row_and_report_still_renders(tree, tmp_path):
    for d in tree.iterdir():
        if (d / "result.json").exists():
            (d / "result.json").unlink()
    teacher = next(d for d in tree.iterdir() if d.name.startswith("teacher-pretrain"))
    (teacher / "error.json").write_text(json.dumps({"error": "ValueError: bad teacher"}))
    c = collect(tree)
    dm = c.cells[c.cells["method"] == "dmae"]
    assert set(dm["status"]) == {"failed"} and dm["reason"].str.contains("ValueError: bad teacher").all()
    text = report(tree, tmp_path, figures=True)
    assert set(claim_lines(text).values()) == {"not enough data"}
    assert "Nothing to plot" not in text  # the logs still give training curves
    assert "top1_by_row.png" not in text and "curves-dmae_75.png" in text
    for link in links(text):
        assert (tmp_path / "reports" / link).is_file(), link


@pytest.mark.slow
def test_corrupt_result_is_named_and_skipped(tree, tmp_path):
    bad = tree / cells_of(tree, "dmae_75")[0]["evaluate"] / "result.json"
    bad.write_text('{"status": "done", "top1": 9')
    (tree / "student-pretrain-stale-0000000000").mkdir()
    set_top1(tree, "mae", [12.5, "n/a"])  # readable, but no number
    log = tree / cells_of(tree, "dmae_75")[1]["pretrain"] / "log.jsonl"
    with log.open("a") as f:  # a second epoch, then a half-written line
        f.write(json.dumps({"epoch": 2, "loss": 1.0, "loss_pix": 0.9, "loss_feat": 0.1}) + '\n{"epoch": 3, "lo')
    text = report(tree, tmp_path, figures=True)
    warnings = text.split("## Warnings", 1)[1].split("## Results", 1)[0]
    shown = lambda p: "results/table2/smoke/" + p.relative_to(tree).as_posix()  # noqa: E731  (no machine path)
    assert f"- {shown(bad)}: unreadable result file" in warnings and "stage skipped" in warnings
    assert "- results/table2/smoke/student-pretrain-stale-0000000000: stage directory not in the manifest" in warnings
    assert f"{shown(log)}: line 3 is not a JSON record; skipped" in warnings
    assert "no numeric top1; cell skipped" in warnings and str(tree) not in text
    assert re.search(r"^\| `dmae_75` .* \(n=1\) \| .* \| 1/2 done; 1/2 unreadable \|$", text, re.M)
    assert re.search(r"^\| `mae` .* \| 12.50 \(n=1\) \| .* \| 1/2 done; 1/2 unreadable \|$", text, re.M)
    assert (tmp_path / "reports" / "table2.smoke" / "curves-dmae_75.png").is_file()


@pytest.mark.slow
def test_paper_profile_shows_delta_against_the_paper(tree, tmp_path):
    m = json.loads((tree / "manifest.json").read_text())
    m["profile"] = "paper"
    (tree / "manifest.json").write_text(json.dumps(m))
    s = summarize(collect(tree)).set_index("row")
    assert math.isclose(s.at["dmae_75", "delta"], s.at["dmae_75", "mean"] - 84.0)
    assert s.at["dmae_75", "delta_text"] == f"{s.at['dmae_75', 'mean'] - 84.0:+.2f}"
    assert s.at["mae", "delta_text"] == NOT_AVAILABLE
    assert "Δ = ours − paper" in report(tree, tmp_path)


@pytest.mark.slow
def test_cli_picks_the_single_profile_and_lists_several(tree, tmp_path, capsys):
    results, out = tree.parent.parent, tmp_path / "cli-reports"
    assert main(["table2", "--results-root", str(results), "--reports-dir", str(out)]) == 0
    assert (out / "table2.smoke.md").exists() and (out / "table2.smoke" / "top1_by_row.png").exists()
    assert (out / "table2.smoke" / "claims.csv").exists() and (out / "README.md").exists()
    shutil.copytree(tree, tree.parent / "tiny", ignore=shutil.ignore_patterns("*-s1-*"))
    with pytest.raises(SystemExit):
        main(["table2", "--results-root", str(results), "--reports-dir", str(out)])
    assert "smoke, tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table2", "--profile", "paper", "--results-root", str(results), "--reports-dir", str(out)])


@pytest.mark.slow
def test_csv_export(tree, tmp_path):
    c = collect(tree)
    paths = export(c, tmp_path / "csv")
    assert {p.name for p in paths} >= {"cells.csv", "stages.csv", "rows.csv"}
    cells = pd.read_csv(tmp_path / "csv" / "cells.csv")
    assert len(cells) == 12 and {"row", "seed", "top1", "val_top1_best", "val_top1_last", "val_last_gain",
                                 "still_rising", "top5", "wall_s", "device_hours", "status", "evaluate_id",
                                 "config_path", "git_commit"} <= set(cells.columns)
