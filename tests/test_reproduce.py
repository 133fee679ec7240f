"""The main command end to end on the smoke profile: local (submitit) and in-process launchers, reruns, preflight."""
import json

import pytest
import torch

from harness.plan.config import load_config
from harness.plan.graph import build_plan
from harness.run.cli import main, run_table
from harness.run.preflight import PreflightError
from harness.core.spec import spec_dict


def _results(root):
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("table2/smoke/*/result.json")}


@pytest.mark.slow
def test_smoke_table_local_launcher_then_rerun_does_nothing(tmp_path, capsys):
    args = ["profile=smoke", "launcher=local", f"results_root={tmp_path}", f"reports_dir={tmp_path / 'reports'}"]
    assert run_table("table2", args) == 0
    plan = build_plan(load_config("table2", args))
    done = _results(tmp_path)
    assert set(done) == set(plan.stages)
    for cell in plan.cells:
        res = json.loads((plan.dir(cell.evaluate) / "result.json").read_text())
        assert 0.0 <= res["top1"] <= 100.0 and res["n_eval"] == 256
    assert (plan.root / "manifest.json").exists() and (plan.root / "config.yaml").exists()
    # each stage directory holds the merged config it ran with
    spec = json.loads((plan.dir(plan.cells[0].pretrain) / "config.json").read_text())["spec"]
    assert spec == spec_dict(plan.stages[plan.cells[0].pretrain].spec)
    capsys.readouterr()
    assert run_table("table2", args) == 0
    out = capsys.readouterr().out
    assert ": running" not in out and ": submitted" not in out
    assert _results(tmp_path) == done  # nothing re-ran


@pytest.mark.slow
def test_failed_stage_is_reported_and_independent_stages_go_on(tmp_path, capsys):
    args = ["profile=smoke", "launcher=debug", "report=false", f"results_root={tmp_path}",
            "+rows.dmae_98.distill.alpha=nan"]
    assert run_table("table2", args) == 1
    plan = build_plan(load_config("table2", args))
    cells = {c.row: c for c in plan.cells}
    err = json.loads((plan.dir(cells["dmae_98"].pretrain) / "error.json").read_text())
    assert "NonFiniteLoss" in err["error"] and "step 0" in err["error"] and "loss_feat" in err["error"]
    assert not (plan.dir(cells["dmae_98"].evaluate) / "result.json").exists()
    for row in ("mae", "kd_finetuned_teacher", "dmae_75", "dmae_95"):
        assert (plan.dir(cells[row].evaluate) / "result.json").exists(), row
    out = capsys.readouterr().out
    assert "failed" in out and "blocked" in out


def test_missing_dataset_fails_before_anything_runs(tmp_path, capsys):
    code = main(["table2", "profile=smoke", f"results_root={tmp_path}", f"data.root={tmp_path / 'nowhere'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Nothing was submitted" in err
    assert not list(tmp_path.glob("table2/smoke/*/"))


def test_bad_teacher_checkpoint_fails_before_anything_runs(tmp_path):
    from harness.core.models import PRESETS, build_mae
    wrong = build_mae(PRESETS["vit_w32d2_dec32d1"], 28, 4)  # not the recipe's teacher (vit_w48d3_dec48d1)
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pth")
    base = ["profile=smoke", f"results_root={tmp_path}", "teacher.train=false",
            f"teacher.finetuned_ckpt={tmp_path / 'missing.pth'}"]
    with pytest.raises(PreflightError, match="shape mismatches"):
        run_table("table2", base + [f"teacher.pretrained_ckpt={tmp_path / 'wrong.pth'}"])
    torch.save({"model": build_mae(PRESETS["vit_w48d3_dec48d1"], 28, 4).state_dict()}, tmp_path / "right.pth")
    with pytest.raises(PreflightError, match="missing.pth"):
        run_table("table2", base + [f"teacher.pretrained_ckpt={tmp_path / 'right.pth'}"])
    assert not list(tmp_path.glob("table2/smoke/*/"))


def test_config_error_exit_code(capsys):
    assert main(["table2", "profile=smoke", "pretrain.mask_ratio=1.5"]) == 2
    assert "mask_ratio" in capsys.readouterr().err


def test_multirun_expands_sweeps():
    from harness.run.cli import expand_sweep
    runs = expand_sweep(["profile=smoke", "seed=0,1", "rows.dmae_95.pretrain.mask_ratio=0.9,0.95"])
    assert len(runs) == 4 and ["profile=smoke", "seed=1", "rows.dmae_95.pretrain.mask_ratio=0.9"] in runs
