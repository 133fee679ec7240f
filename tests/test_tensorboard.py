"""TensorBoard curves (harness.core.tblog): a stage's <stage dir>/tb/ read back with TensorBoard's own
EventAccumulator --
the loss terms, lr and img/s every run.tb_every steps at global step epoch x steps_per_epoch + step, the epoch's log
line and validation top-1 per epoch; a resumed stage continues the curve without duplicated steps (the earlier
attempt's file stays); only rank 0 writes; a failure to write warns once and never stops a stage; the runtime
settings leave stage ids alone; the writer's benchmark writes its figures where harness.bench.estimate does not read."""
import json
import math
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import harness.core.train as train_mod
from harness.bench.results import load_results
from harness.bench.tblog import INTERVAL_LADDER, SCHEMA, run_tensorboard
from harness.core.checkpoints import atomic_save
from harness.plan.config import ConfigError, load_config
from harness.plan.resolve import runtime_of
from harness.core.models import PRESETS, build_mae
from harness.plan.graph import build_plan
from harness.core.spec import StageRuntime
from harness.core.stages import run_stage
from harness.core.tblog import TB_DIR, TBLog
from harness.core.runtime import Runtime

# the smoke profile's smallest models, on 64 training images at 16 px: 4 steps of 16 an epoch
DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, holdout=32, eval_crop_pct=1.0)
STUDENT = dict(preset="vit_w32d2_dec32d1", patch_size=4)
TEACHER = dict(preset="vit_w48d3_dec48d1", patch_size=4)
BATCH, STEPS = 16, 4
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)


def pretrain_spec(objective="mae", epochs=1):
    pt = dict(epochs=epochs, warmup_epochs=1, batch_size=BATCH, accum_iter=1, blr=1.5e-3, min_lr=0.0,
              weight_decay=0.05, betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper",
              norm_pix_loss=False)
    spec = dict(kind="pretrain", name=f"pt-{objective}", seed=0, data=DATA, model=STUDENT, objective=objective,
                pretrain=pt)
    if objective == "dmae":
        spec["distill"] = dict(alpha=1.0, pixel_weight=1.0, pairs=[[1, 2]], projection="linear", distance="l1",
                               normalize=True, include_cls=True, teacher_mode="partial")
        spec["teacher_model"] = TEACHER
    return spec


def finetune_spec(epochs=1):
    ft = dict(epochs=epochs, warmup_epochs=0, batch_size=BATCH, accum_iter=1, blr=1e-3, min_lr=1e-6,
              weight_decay=0.05, betas=[0.9, 0.999], clip_grad=None, layer_decay=0.75, drop_path=0.0, crop_min=1.0,
              mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, randaug="", eval_batch_size=32)
    return dict(kind="finetune", name="ft", seed=0, data=DATA, model=STUDENT, finetune=ft, kd=None)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_mae(PRESETS[TEACHER["preset"]], DATA["img_size"], TEACHER["patch_size"])
    path = tmp_path_factory.mktemp("teacher") / "model.pth"
    atomic_save({"model": teacher.state_dict()}, path)
    return str(path)


def scalars(path):
    """{tag: [(step, value)]} of a tb/ folder (every event file, TensorBoard's purging applied) or of one file."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def steps_of(points):
    return [s for s, _ in points]


def expected_points(epochs, every, steps=STEPS, first_epoch=0):
    """Global steps of the per-step points: every `every` steps of an epoch, and its last step."""
    return [e * steps + s for e in range(first_epoch, epochs) for s in range(steps)
            if (s + 1) % every == 0 or s == steps - 1]


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_dmae_pretrain_curves_every_loss_term(tmp_path, teacher_path):
    d = tmp_path / "dmae"
    res = run_stage(pretrain_spec("dmae"), d, {"teacher": teacher_path}, dict(RUNTIME, tb_every=3), "dmae")
    assert res["status"] == "done" and res["steps"] == STEPS
    tb = scalars(d / TB_DIR)
    terms = ("loss", "loss_pix", "loss_feat", "loss_feat_0")  # loss_feat_<k>: the official distillation_loss/<pair>
    assert set(tb) == {f"train/{t}" for t in terms + ("lr", "images_per_s")} | \
        {f"epoch/{t}" for t in terms + ("lr", "epoch_s", "images_per_s")}
    for t in terms + ("lr", "images_per_s"):
        assert steps_of(tb[f"train/{t}"]) == expected_points(1, 3) == [2, 3]  # ceil(4 / 3) points an epoch
    assert all(steps_of(v) == [STEPS - 1] for k, v in tb.items() if k.startswith("epoch/"))  # the epoch's last step
    row = log_rows(d)[0]
    for t in terms:
        assert tb[f"epoch/{t}"][0][1] == pytest.approx(row[t], rel=1e-6)
        # each point is the mean of the steps since the previous one (3, then 1): together, the epoch's mean
        (_, first), (_, last) = tb[f"train/{t}"]
        assert (3 * first + last) / 4 == pytest.approx(row[t], rel=1e-5)
    assert all(v > 0 and math.isfinite(v) for _, v in tb["train/lr"] + tb["train/images_per_s"])


def test_finetune_curves_with_validation_top1_per_epoch(tmp_path):
    d = tmp_path / "ft"
    run_stage(finetune_spec(epochs=2), d, {}, dict(RUNTIME, tb_every=1), "ft")
    tb = scalars(d / TB_DIR)
    assert steps_of(tb["train/loss_ce"]) == steps_of(tb["train/loss"]) == list(range(2 * STEPS))
    rows = log_rows(d)
    for key in ("top1", "top5"):
        assert tb[f"val/{key}"] == [(STEPS - 1, pytest.approx(rows[0][f"val_{key}"], rel=1e-6)),
                                    (2 * STEPS - 1, pytest.approx(rows[1][f"val_{key}"], rel=1e-6))]
    assert not any(tag.endswith("n_val") or tag == "epoch/epoch" for tag in tb)
    # no warm-up here: the lr follows the cosine down from the first step
    lrs = [v for _, v in tb["train/lr"]]
    assert lrs[0] > lrs[-1] > 0


class Interrupted(Exception):
    pass


def test_a_resumed_stage_continues_the_curve_without_duplicated_steps(tmp_path, monkeypatch):
    d = tmp_path / "mae"
    real = train_mod.stop_together

    def dies_in_epoch_2(rt, failure, where, name):  # killed at the 3rd step of the 2nd epoch, after its checkpoint
        if where.startswith("at epoch 1 step 2 "):
            raise Interrupted(where)
        return real(rt, failure, where, name)

    monkeypatch.setattr(train_mod, "stop_together", dies_in_epoch_2)
    with pytest.raises(Interrupted):
        run_stage(pretrain_spec("mae", epochs=3), d, {}, dict(RUNTIME, tb_every=1), "mae")
    monkeypatch.setattr(train_mod, "stop_together", real)
    res = run_stage(pretrain_spec("mae", epochs=3), d, {}, dict(RUNTIME, tb_every=1), "mae")
    assert res["status"] == "done" and res["resumed_from_epoch"] == 1
    files = sorted((d / TB_DIR).iterdir())
    assert len(files) == 2  # the earlier attempt's event file stays; the resumed one appends its own
    first, second = scalars(files[0]), scalars(files[1])
    # the first attempt logged two steps of epoch 2 past its checkpoint; the second replays them from step 4 on
    assert steps_of(first["train/loss"]) == list(range(STEPS + 2))
    assert steps_of(second["train/loss"]) == list(range(STEPS, 3 * STEPS))
    merged = scalars(d / TB_DIR)
    assert steps_of(merged["train/loss"]) == expected_points(3, 1) == list(range(3 * STEPS))
    assert [v for _, v in merged["train/loss"][STEPS:]] == [v for _, v in second["train/loss"]]
    assert steps_of(merged["epoch/loss"]) == [STEPS - 1, 2 * STEPS - 1, 3 * STEPS - 1]
    rows = log_rows(d)
    assert [v for _, v in merged["epoch/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_only_rank_0_writes(tmp_path):
    for rt in (Runtime(torch.device("cpu"), rank=1, world=2, tensorboard=True, tb_every=1),
               Runtime(torch.device("cpu"), rank=0, world=1, tensorboard=False, tb_every=1)):
        tb = TBLog(tmp_path, rt, STEPS)
        assert not tb.active and not tb.per_step
        tb.step(0, STEPS - 1, {"loss": 1.0}, BATCH, 0.1, None)
        tb.epoch(0, {"epoch": 1, "loss": 1.0})
        tb.close()
    assert not (tmp_path / TB_DIR).exists()
    tb = TBLog(tmp_path, Runtime(torch.device("cpu"), tensorboard=True, tb_every=1), STEPS)
    assert tb.active
    tb.close()
    assert len(list((tmp_path / TB_DIR).iterdir())) == 1


def test_tensorboard_false_writes_nothing(tmp_path):
    d = tmp_path / "off"
    assert run_stage(pretrain_spec(), d, {}, dict(RUNTIME, tensorboard=False), "off")["status"] == "done"
    assert not (d / TB_DIR).exists()


def test_a_folder_that_cannot_be_written_warns_once_and_the_stage_goes_on(tmp_path):
    d = tmp_path / "blocked"
    d.mkdir()
    (d / TB_DIR).write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="TensorBoard") as caught:
        res = run_stage(pretrain_spec(), d, {}, dict(RUNTIME, tb_every=1), "blocked")
    assert res["status"] == "done" and len(log_rows(d)) == 1
    assert len([w for w in caught if "TensorBoard" in str(w.message)]) == 1


def test_a_writer_failing_mid_run_warns_once_and_stops_writing(tmp_path, capsys):
    class Broken:
        def __init__(self):
            self.calls = 0

        def add_scalar(self, *a, **kw):
            self.calls += 1
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    tb = TBLog(tmp_path, Runtime(torch.device("cpu"), tensorboard=True, tb_every=1), STEPS, name="full")
    tb.close()
    tb.writer = broken = Broken()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            tb.step(0, step, {"loss": 1.0}, BATCH, 0.1, None)
        tb.epoch(0, {"epoch": 1, "loss": 1.0})
        tb.close()
    assert broken.calls == 1 and not tb.active
    assert len(caught) == 1 and "No space left on device" in str(caught[0].message)
    assert capsys.readouterr().out.count("WARNING: [full] TensorBoard") == 1


def test_runtime_settings_leave_stage_ids_alone(tmp_path):
    base = build_plan(load_config("table2", ["profile=smoke", f"results_root={tmp_path}"]))
    other_cfg = load_config("table2", ["profile=smoke", f"results_root={tmp_path}", "run.tb_every=7",
                                       "run.tensorboard=false"])
    assert set(build_plan(other_cfg).stages) == set(base.stages)
    rt = runtime_of(other_cfg)
    assert (rt.tb_every, rt.tensorboard) == (7, False)
    default = runtime_of(load_config("table2", ["profile=smoke"]))
    assert (default.tb_every, default.tensorboard) == (StageRuntime.tb_every, True)  # on at every profile
    with pytest.raises(ConfigError, match="run.tb_every"):
        load_config("table2", ["profile=smoke", "run.tb_every=-1"])


def test_writer_benchmark_files(tmp_path):
    """The benchmark end to end at the smoke shapes, one repetition of 2 steps: its fields, never its timings."""
    result, path = run_tensorboard(["smoke"], reps=1, steps=2, intervals=[1], threads=1, out_dir=tmp_path,
                                   log=lambda *a: None)
    assert path.is_file() and path.with_suffix(".md").is_file() and path.name.startswith("tensorboard-")
    assert json.loads(path.read_text())["schema"] == SCHEMA and load_results(tmp_path) == []  # not a step benchmark
    steps = result["shapes"]["smoke"]["steps"]
    assert {e["label"] for e in steps} == {"mae_m75", "dmae_partial_m75", "finetune"}
    for e in steps:
        assert e["writer"]["point_cpu_s"] > 0 and e["writer"]["bytes_per_point"] > 0
        assert set(e["in_loop"]) == {"off_again", "every_1"} and len(e["times_s"]["off"]) == 1
    assert result["recommendation"]["interval"] in INTERVAL_LADDER and result["load_avg_start"]
