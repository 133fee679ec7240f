"""Resume from checkpoint-last is bit-identical to an uninterrupted run; a checkpoint of another spec is refused; a
corrupt checkpoint-last falls back to checkpoint-prev with a warning."""
import json

import pytest
import torch

import harness.core.train as train_mod
from harness.core.checkpoints import LAST, PREV, CheckpointError, atomic_save, safe_load, state_dict_of
from harness.core.models import PRESETS, build_mae
from harness.core.stages import run_stage
from harness.core.rundir import ATTEMPT_FIELDS

DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, eval_crop_pct=1.0)
MODEL = dict(preset="vit_w32d2_dec32d1", patch_size=4)
TEACHER = dict(preset="vit_w48d3_dec48d1", patch_size=4)
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)
EPOCHS = 3
# per-run timing, not a metric
TIMING = ATTEMPT_FIELDS  # the fields in which an interrupted run may differ from a clean one


def pretrain_spec(objective="mae", **over):
    pt = dict(epochs=EPOCHS, warmup_epochs=1, batch_size=16, accum_iter=2, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
              betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
    pt.update(over)
    spec = dict(kind="pretrain", name="pt", seed=3, data=DATA, model=MODEL, objective=objective, pretrain=pt)
    if objective == "dmae":
        spec["distill"] = dict(alpha=1.0, pixel_weight=1.0, pairs=[[1, 1]], projection="linear", distance="l1",
                               normalize=True, include_cls=True, teacher_mode="partial")
        spec["teacher_model"] = TEACHER
    return spec


def finetune_spec(**over):
    # every random stream in play: RandAug (python random), Mixup/CutMix (numpy), random erasing, drop path (torch)
    ft = dict(epochs=EPOCHS, warmup_epochs=1, batch_size=16, accum_iter=1, blr=2e-3, min_lr=1e-6, weight_decay=0.05,
              betas=[0.9, 0.999], clip_grad=1.0, layer_decay=0.75, drop_path=0.1, mixup=0.8, cutmix=1.0,
              smoothing=0.1, reprob=0.25, randaug="rand-m9-mstd0.5-inc1", eval_batch_size=32)
    ft.update(over)
    return dict(kind="finetune", name="ft", seed=3, data=DATA, model=MODEL, finetune=ft, kd=None)


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, epoch):
    """Make fit() die right after it wrote the checkpoint of `epoch` (as a pre-emption would)."""
    real = train_mod.save_last

    def save_then_die(state, run_dir):
        real(state, run_dir)
        if state["epoch"] == epoch:
            raise Interrupted(f"killed after epoch {epoch}")

    monkeypatch.setattr(train_mod, "save_last", save_then_die)


def log_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_weights(a, b):
    sa, sb = state_dict_of(safe_load(a / "model.pth")), state_dict_of(safe_load(b / "model.pth"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


def metrics(result):
    return {k: v for k, v in result.items() if k not in TIMING}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_mae(PRESETS[TEACHER["preset"]], DATA["img_size"], TEACHER["patch_size"])
    path = tmp_path_factory.mktemp("teacher") / "model.pth"
    atomic_save({"model": teacher.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_path):
    """Reference runs, once per stage kind."""
    cache = {}

    def get(key):
        if key not in cache:
            spec, inputs = CASES[key](teacher_path)
            d = tmp_path_factory.mktemp(f"ref-{key}")
            cache[key] = (d, run_stage(spec, d, inputs, RUNTIME, key))
        return cache[key]

    return get


CASES = {
    "mae": lambda t: (pretrain_spec("mae"), {}),
    "dmae": lambda t: (pretrain_spec("dmae"), {"teacher": t}),
    "finetune": lambda t: (finetune_spec(), {}),
}


@pytest.mark.parametrize("key", sorted(CASES))
def test_resume_is_bit_identical(tmp_path, monkeypatch, teacher_path, uninterrupted, key):
    ref_dir, ref = uninterrupted(key)
    spec, inputs = CASES[key](teacher_path)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run_stage(spec, tmp_path, inputs, RUNTIME, key)
    assert (tmp_path / LAST).exists() and not (tmp_path / "result.json").exists()
    assert "Interrupted" in json.loads((tmp_path / "error.json").read_text())["error"]
    monkeypatch.undo()

    res = run_stage(spec, tmp_path, inputs, dict(RUNTIME, keep_checkpoints=True), key)  # PREV is read below
    assert res["resumed_from_epoch"] == 1 and ref["resumed_from_epoch"] == 0
    assert not (tmp_path / "error.json").exists()
    assert_same_weights(ref_dir, tmp_path)
    assert log_rows(tmp_path) == log_rows(ref_dir)
    assert len(log_rows(ref_dir)) == EPOCHS
    assert metrics(res) == metrics(ref)
    # resuming must matter: the epoch-1 weights differ from the final ones
    early = state_dict_of(safe_load(tmp_path / PREV))
    final = state_dict_of(safe_load(tmp_path / "model.pth"))
    assert any(not torch.equal(early[k], final[k]) for k in final)


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path, monkeypatch, teacher_path):
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run_stage(pretrain_spec("mae"), tmp_path, {}, RUNTIME, "pt")
    monkeypatch.undo()
    before = (tmp_path / LAST).read_bytes()
    with pytest.raises(CheckpointError, match="another configuration"):
        run_stage(pretrain_spec("mae", blr=3e-3), tmp_path, {}, RUNTIME, "pt")
    assert (tmp_path / LAST).read_bytes() == before  # left untouched
    assert "CheckpointError" in json.loads((tmp_path / "error.json").read_text())["error"]
    assert not (tmp_path / "result.json").exists()


def test_corrupt_last_falls_back_to_prev(tmp_path, monkeypatch, uninterrupted):
    ref_dir, ref = uninterrupted("mae")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_stage(pretrain_spec("mae"), tmp_path, {}, RUNTIME, "mae")
    monkeypatch.undo()
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 3])  # torn write
    with pytest.warns(UserWarning, match="checkpoint-prev"):
        res = run_stage(pretrain_spec("mae"), tmp_path, {}, RUNTIME, "mae")
    assert res["resumed_from_epoch"] == 1
    assert_same_weights(ref_dir, tmp_path)
    # the log is rebuilt from the checkpoint's history: epoch 2 appears once, as in the uninterrupted run
    assert log_rows(tmp_path) == log_rows(ref_dir)
    assert metrics(res) == metrics(ref)


def test_finished_stage_is_not_rerun(tmp_path, monkeypatch, uninterrupted):
    ref_dir, ref = uninterrupted("mae")

    def boom(**kw):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr("harness.core.stages.fit", boom)
    assert run_stage(pretrain_spec("mae"), ref_dir, {}, RUNTIME, "mae") == ref
