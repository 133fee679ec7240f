"""Every recipe (the paper's other tables and ablations) plans on every profile and runs end to end on smoke."""
import json

import pytest

from harness.plan.config import load_config
from recipes import tables
from harness.plan.graph import build_plan
from harness.run.cli import run_table

RECIPES = ["aligned_layer", "distance", "masking", "projection", "schedule", "student_size", "table2", "target",
           "teacher"]
PAPER = ["profile=paper", "data.root=/data/imagenet", "teacher.pretrained_ckpt=/ckpt/mae_visualize_vit_large.pth",
         "teacher.finetuned_ckpt=/ckpt/mae_finetuned_vit_large.pth",
         "checkpoints.base_pretrained=/ckpt/mae_visualize_vit_base.pth"]


def test_catalogue():
    assert tables() == RECIPES


@pytest.mark.parametrize("table", RECIPES)
@pytest.mark.parametrize("profile", ["smoke", "tiny", "paper"])
def test_recipe_plans(table, profile, tmp_path):
    args = PAPER if profile == "paper" else [f"profile={profile}"]
    plan = build_plan(load_config(table, args + [f"results_root={tmp_path}"]))
    assert plan.cells and all(c.evaluate in plan.stages for c in plan.cells)
    if profile == "paper":  # the paper profile trains no teacher: official checkpoints are inputs (and probed)
        assert not [s for s in plan.stages.values() if s.role.startswith("teacher")
                    and s.role not in ("teacher-probe", "teacher-evaluate")]
        # a provided fine-tuned teacher is evaluated from its file (its official top-1 checked), never trained
        assert all(all(str(v).startswith("file:") for v in s.inputs.values())
                   for s in plan.stages.values() if s.role == "teacher-evaluate")
        assert all(s.inputs["encoder"].startswith("file:") for s in plan.stages.values() if s.role == "teacher-probe")
    assert [c for c in plan.cells if c.method == "scratch"]  # every recipe has its positive control


def test_paper_profile_resolves_sizes_and_alignment(tmp_path):
    plan = build_plan(load_config("student_size", PAPER + [f"results_root={tmp_path}"]))
    dmae = {c.row: plan.stages[c.pretrain] for c in plan.cells if c.method == "dmae"}
    s = dmae["dmae_b_to_s"].spec
    assert s.model.preset == "vit_small" and s.teacher_model.preset == "vit_base"
    assert s.distill.pairs == [[8, 8]]  # 3/4 depth of two 12-block ViTs
    assert dmae["dmae_b_to_s"].inputs["teacher"] == "file:/ckpt/mae_visualize_vit_base.pth"
    plan = build_plan(load_config("aligned_layer", PAPER + [f"results_root={tmp_path}"]))
    pairs = {c.row: plan.stages[c.pretrain].spec.distill.pairs for c in plan.cells if c.method == "dmae"}
    assert pairs == {"align_half": [[5, 11]], "align_three_quarters": [[8, 17]], "align_last": [[11, 23]],
                     "align_multi": [[5, 11], [8, 17], [11, 23]]}
    plan = build_plan(load_config("schedule", PAPER + [f"results_root={tmp_path}"]))
    epochs = {c.row: plan.stages[c.pretrain].spec.pretrain.epochs for c in plan.cells if c.pretrain}
    assert epochs == {"dmae_25": 25, "dmae_50": 50, "dmae_100": 100, "mae_25": 25, "mae_100": 100}


@pytest.mark.slow
@pytest.mark.parametrize("table", [t for t in RECIPES if t != "table2"])  # table2: tests/test_reproduce.py
def test_recipe_runs_on_smoke(table, tmp_path):
    args = ["profile=smoke", "launcher=debug", f"results_root={tmp_path / 'results'}",
            f"reports_dir={tmp_path / 'reports'}"]
    assert run_table(table, args) == 0
    plan = build_plan(load_config(table, args))
    for c in plan.cells:
        res = json.loads((plan.dir(c.evaluate) / "result.json").read_text())
        assert 0.0 <= res["top1"] <= 100.0
    report = (tmp_path / "reports" / f"{table}.smoke.md").read_text()
    assert all(c.label in report for c in plan.cells)
    assert f"[{table}.smoke]" in (tmp_path / "reports" / "README.md").read_text()
