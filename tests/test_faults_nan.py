"""NaN/inf loss: detected at the step it appears, the stage stops with an error naming the epoch, the step and the loss
terms, keeps its last good checkpoint, and the report shows the stage (and what depends on it) as failed with that
reason. run.nan_restarts restarts a stage from its last checkpoint (logged) before giving up.

tests/test_reproduce.py::test_failed_stage_is_reported_and_independent_stages_go_on checks the error.json of a NaN run
of the full smoke table and that independent rows finish; here: the step-level detection, the report, restarts.
"""
import json

import pytest
import torch
from torch import nn

import harness.core.objectives as objectives
from harness.core.checkpoints import LAST, safe_load
from harness.core.stages import run_stage
from harness.core.spec import Schedule
from harness.core.rank_status import NonFiniteLoss
from harness.core.runtime import Runtime
from harness.core.train import fit
from harness.core.rundir import ATTEMPT_FIELDS

RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)
DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, eval_crop_pct=1.0)
TIMING = ATTEMPT_FIELDS  # the fields in which an interrupted run may differ from a clean one


class BadAt:
    """A pixel + feature objective whose feature term becomes `value` at the given (0-based) call numbers."""

    def __init__(self, calls, value=float("inf")):
        self.calls, self.value, self.n = set(calls), value, 0

    def __call__(self, model, imgs, labels):
        pix = model(imgs.flatten(1)).pow(2).mean()
        feat = pix.detach() * 0 + (self.value if self.n in self.calls else 0.5)
        self.n += 1
        return pix + feat, {"loss_pix": pix.detach(), "loss_feat": feat}


def test_nonfinite_loss_is_caught_at_its_step_and_names_the_terms(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.randn(32, 3, 4, 4), torch.zeros(32, dtype=torch.long))
    model = nn.Linear(48, 4)
    sched = Schedule(epochs=3, warmup_epochs=0, batch_size=8, accum_iter=1, blr=1e-3)
    rt = Runtime(torch.device("cpu"), "none", log_every=0)
    # 4 steps per epoch: call 6 is epoch 1 (0-based), step 2
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss inf at epoch 1 step 2 \(0-based; "
                                            r"loss_pix=[0-9.e-]+, loss_feat=inf\) in toy"):
        fit(model=model, objective=BadAt({6}), param_groups=[{"params": model.parameters()}], dataset=ds,
            schedule=sched, run_dir=tmp_path, spec_hash="h", seed=0, rt=rt, name="toy")
    # the epoch before the fault is kept: its log line and its checkpoint, nothing of the bad epoch
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]
    assert safe_load(tmp_path / LAST)["epoch"] == 1
    assert torch.isfinite(model.weight).all()  # the bad step never updated the weights


def pretrain_spec():
    pt = dict(epochs=3, warmup_epochs=1, batch_size=16, accum_iter=1, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
              betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
    return dict(kind="pretrain", name="pt", seed=2, data=DATA, model=dict(preset="vit_w32d2_dec32d1", patch_size=4),
                objective="mae", pretrain=pt)


def glitch_once_at(monkeypatch, call):
    """A transient fault: the MAE loss is NaN at one call of the whole process, fine otherwise."""
    real, n = objectives.MAEObjective.__call__, [0]

    def call_(self, model, imgs, labels):
        loss, terms = real(self, model, imgs, labels)
        n[0] += 1
        if n[0] == call:
            return loss * float("nan"), {k: v * float("nan") for k, v in terms.items()}
        return loss, terms

    monkeypatch.setattr(objectives.MAEObjective, "__call__", call_)


def _metrics(d):
    res = json.loads((d / "result.json").read_text())
    rows = [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (d / "log.jsonl").read_text()
            .splitlines()]
    return {k: v for k, v in res.items() if k not in TIMING}, rows


def test_nan_restart_resumes_from_the_last_checkpoint_and_matches_a_clean_run(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    run_stage(pretrain_spec(), ref, {}, RUNTIME, "pt")
    d = tmp_path / "glitch"
    glitch_once_at(monkeypatch, 10)  # epoch 2 (0-based 2), 4 steps per epoch
    res = run_stage(pretrain_spec(), d, {}, dict(RUNTIME, nan_restarts=1), "pt")
    out = capsys.readouterr().out
    assert "WARNING: [pt] non-finite loss nan at epoch 2 step 1" in out
    assert "restarting from the last checkpoint (run.nan_restarts: 1/1)" in out
    assert "resumed from checkpoint-last at epoch 2/3" in out
    assert res["resumed_from_epoch"] == 2
    assert _metrics(d) == _metrics(ref)
    assert not (d / "error.json").exists()


def test_nan_that_persists_fails_after_the_restarts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(objectives.MAEObjective, "__call__",
                        lambda self, m, i, lab: (torch.tensor(float("nan")), {"loss_pix": torch.tensor(float("nan"))}))
    with pytest.raises(NonFiniteLoss, match=r"again after 2 restart\(s\)"):
        run_stage(pretrain_spec(), tmp_path, {}, dict(RUNTIME, nan_restarts=2), "pt")
    assert capsys.readouterr().out.count("restarting from the last checkpoint") == 2
    err = json.loads((tmp_path / "error.json").read_text())["error"]
    assert err.startswith("NonFiniteLoss: non-finite loss nan at epoch 0 step 0 (0-based; loss_pix=nan)")


def test_nan_restarts_is_a_validated_config_key():
    from harness.plan.config import ConfigError, load_config
    from harness.plan.resolve import runtime_of
    cfg = load_config("table2", ["profile=smoke", "run.nan_restarts=1"])
    assert runtime_of(cfg).nan_restarts == 1
    assert runtime_of(load_config("table2", ["profile=smoke"])).nan_restarts == 0  # default: no restart
    with pytest.raises(ConfigError, match="nan_restarts"):
        load_config("table2", ["profile=smoke", "run.nan_restarts=-1"])


@pytest.mark.slow
def test_nan_stage_is_failed_in_the_report_with_its_reason(tmp_path):
    """The issue's scenario: alpha=nan on the 98% row (smoke profile, in-process launcher), then the report. Only the
    teacher and the dmae_98 row are kept to stay short."""
    from harness.plan.config import load_config
    from harness.plan.graph import build_plan
    from harness.report.markdown import write_report
    from harness.run.cli import run_table
    args = ["profile=smoke", "launcher=debug", "report=false", f"results_root={tmp_path / 'results'}",
            "+rows.dmae_98.distill.alpha=nan", "~rows.mae", "~rows.kd_finetuned_teacher", "~rows.dmae_75",
            "~rows.dmae_95", "data.train_subset=128", "data.test_subset=64"]
    assert run_table("table2", args) == 1
    plan = build_plan(load_config("table2", args))
    cell = plan.cells[0]
    err = json.loads((plan.dir(cell.pretrain) / "error.json").read_text())["error"]
    assert err.startswith("NonFiniteLoss: non-finite loss nan at epoch 0 step 0 (0-based; loss_pix=")
    # alpha=nan: both terms are finite, their weighted sum is not; the message says so
    assert "loss_feat=" in err and "a weight combining them is not (e.g. distill.alpha)" in err
    assert not (plan.dir(cell.finetune)).exists()  # blocked: never started

    text = write_report(plan.root, tmp_path / "reports", figures=False).read_text()
    stages = text.split("## Stages", 1)[1] if "## Stages" in text else text
    line = next(x for x in stages.splitlines() if cell.pretrain in x)
    assert "| failed |" in line and "NonFiniteLoss: non-finite loss nan at epoch 0 step 0" in line
    assert "loss_feat=" in line
    per_seed = next(x for x in text.splitlines() if x.startswith("| dmae_98 | 0 |"))
    assert "failed: student-pretrain" in per_seed and "NonFiniteLoss" in per_seed
    assert "0/1 done" in text or "1/1 failed" in text
