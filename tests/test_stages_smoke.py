"""Stages through harness.core.stages.run_stage.

- optimizer parameter groups of the pre-train and fine-tune stages (MAE's weight-decay and layer-decay rules);
- (slow) an end-to-end smoke pipeline on tiny Fashion-MNIST subsets: teacher MAE pre-train -> teacher fine-tune;
  student MAE pre-train; student DMAE pre-train (teacher = the MAE teacher) -> student fine-tunes (MAE init, DMAE init,
  MAE init + soft KD from the fine-tuned teacher) -> evaluate.
"""
import json
import math

import pytest
import torch

import harness.core.stages as stages_mod
from harness.core.checkpoints import safe_load, state_dict_of
from harness.core.stages import run_stage

DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=256,
            test_subset=128, holdout=96, eval_crop_pct=1.0)
TEACHER = dict(preset="vit_w48d3_dec48d1", patch_size=4)
STUDENT = dict(preset="vit_w32d2_dec32d1", patch_size=4)
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)
PT = dict(epochs=2, warmup_epochs=1, batch_size=32, accum_iter=1, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
          betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
FT = dict(epochs=2, warmup_epochs=1, batch_size=32, accum_iter=1, blr=2e-3, min_lr=1e-6, weight_decay=0.05,
          betas=[0.9, 0.999], clip_grad=None, layer_decay=0.75, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1,
          reprob=0.25, randaug="rand-m9-mstd0.5-inc1", eval_batch_size=64)
DISTILL = dict(alpha=1.0, pixel_weight=1.0, pairs=[[1, 2]], projection="linear", distance="l1", normalize=True,
               include_cls=True, teacher_mode="partial")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """RUNTIME threads=1 sets torch's thread count for the process; put it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


class _Stop(Exception):
    pass


def _groups_of(monkeypatch, tmp_path, spec, inputs=None):
    """The parameter groups a stage hands to fit(), {param name: (weight_decay, lr_scale)}."""
    captured = {}

    def fake_fit(*, model, param_groups, **kw):
        names = {id(p): n for n, p in model.named_parameters()}
        captured.update({names[id(p)]: (g["weight_decay"], g.get("lr_scale", 1.0))
                         for g in param_groups for p in g["params"]})
        captured["__trainable__"] = {n for n, p in model.named_parameters() if p.requires_grad}
        raise _Stop

    monkeypatch.setattr(stages_mod, "fit", fake_fit)
    with pytest.raises(_Stop):
        run_stage(dict(spec, name="groups", seed=0, data=DATA), tmp_path, inputs or {}, RUNTIME, "groups")
    return captured


def test_pretrain_weight_decay_groups_follow_mae(tmp_path, monkeypatch):
    g = _groups_of(monkeypatch, tmp_path, dict(kind="pretrain", model=STUDENT, objective="mae", pretrain=PT))
    trainable = g.pop("__trainable__")
    assert set(g) == trainable and "pos_embed" not in g and "decoder_pos_embed" not in g  # fixed sin-cos
    wd = PT["weight_decay"]
    # optim_factory.add_weight_decay(model, wd) as in MAE/DMAE pre-training: 0 on biases and 1-D params only
    for name, (decay, _) in g.items():
        one_d = name.endswith(".bias") or (name.endswith(".weight") and "norm" in name.split(".")[-2])
        assert decay == (0.0 if one_d else wd), name
    assert g["cls_token"][0] == wd and g["mask_token"][0] == wd
    assert g["blocks.0.attn.qkv.weight"][0] == wd and g["decoder_pred.weight"][0] == wd


def test_finetune_layer_decay_groups_follow_mae(tmp_path, monkeypatch):
    g = _groups_of(monkeypatch, tmp_path, dict(kind="finetune", model=STUDENT, finetune=FT, kd=None))
    g.pop("__trainable__")
    depth, d, wd = 2, FT["layer_decay"], FT["weight_decay"]  # vit_w32d2_dec32d1: 2 blocks
    # MAE lrd.param_groups_lrd: layer 0 = cls/pos/patch_embed, block i = layer i+1, the rest = depth+1;
    # scale = decay ** (depth + 1 - layer); no decay on 1-D params, biases, pos_embed and cls_token
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert g[name][1] == pytest.approx(d ** (depth + 1)), name
    for i in range(depth):
        assert g[f"blocks.{i}.mlp.fc1.weight"][1] == pytest.approx(d ** (depth - i))
    for name in ("fc_norm.weight", "head.weight", "head.bias"):
        assert g[name][1] == pytest.approx(1.0), name
    assert g["cls_token"][0] == 0.0 and g["pos_embed"][0] == 0.0 and g["head.bias"][0] == 0.0
    assert g["blocks.1.norm1.weight"][0] == 0.0
    assert g["head.weight"][0] == wd and g["patch_embed.proj.weight"][0] == wd


@pytest.mark.slow
def test_smoke_pipeline(tmp_path, monkeypatch):
    runs = {}
    loaded = []  # (source, a loaded weight) for every checkpoint a stage loads: init, DMAE teacher, KD teacher
    real_load = stages_mod.load_weights

    def recording_load(model, sd, **kw):
        real_load(model, sd, **kw)
        loaded.append((kw.get("source", ""), model.state_dict()["blocks.0.attn.qkv.weight"].clone()))

    monkeypatch.setattr(stages_mod, "load_weights", recording_load)

    def go(name, spec, inputs):
        d = tmp_path / name
        res = run_stage(dict(spec, name=name, seed=0, data=DATA), d, inputs, RUNTIME, name)
        runs[name] = (d, res)
        assert res["status"] == "done" and res["kind"] == spec["kind"]
        assert (d / "result.json").exists() and (d / "config.json").exists() and not (d / "error.json").exists()
        assert json.loads((d / "result.json").read_text()) == res
        if spec["kind"] != "evaluate":
            # a finished stage keeps model.pth; its checkpoints are deleted (run.keep_checkpoints defaults to false)
            assert (d / "model.pth").exists() and not list(d.glob("checkpoint-*.pth"))
            rows = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            assert [r["epoch"] for r in rows] == [1, 2]
            assert all(_finite(r["loss"]) and _finite(r["lr"]) for r in rows)
        return str(d / "model.pth")

    t_pt = go("teacher_pt", dict(kind="pretrain", model=TEACHER, objective="mae", pretrain=PT), {})
    t_ft = go("teacher_ft", dict(kind="finetune", model=TEACHER, finetune=FT, kd=None), {"init": t_pt})
    s_mae = go("student_mae", dict(kind="pretrain", model=STUDENT, objective="mae", pretrain=PT), {})
    s_dmae = go("student_dmae", dict(kind="pretrain", model=STUDENT, objective="dmae", pretrain=PT, distill=DISTILL,
                                     teacher_model=TEACHER), {"teacher": t_pt})
    go("ft_mae", dict(kind="finetune", model=STUDENT, finetune=FT, kd=None), {"init": s_mae})
    f_dmae = go("ft_dmae", dict(kind="finetune", model=STUDENT, finetune=FT, kd=None), {"init": s_dmae})
    f_kd = go("ft_kd", dict(kind="finetune", model=STUDENT, finetune=FT, teacher_model=TEACHER,
                            kd=dict(kind="soft", weight=0.5, temperature=1.0)), {"init": s_mae, "kd_teacher": t_ft})
    go("eval_dmae", dict(kind="evaluate", model=STUDENT, eval_batch_size=64), {"model": f_dmae})
    go("eval_kd", dict(kind="evaluate", model=STUDENT, eval_batch_size=64), {"model": f_kd})

    # pre-training results
    for name in ("teacher_pt", "student_mae", "student_dmae"):
        res = runs[name][1]
        assert _finite(res["final_loss"]) and _finite(res["final_loss_pix"]) and res["train_images"] == 256
    assert runs["student_mae"][1]["final_loss_feat"] is None
    dmae = runs["student_dmae"][1]
    assert _finite(dmae["final_loss_feat"]) and dmae["final_loss_feat"] > 0
    assert dmae["final_loss"] == pytest.approx(dmae["final_loss_pix"] + dmae["final_loss_feat"], rel=1e-6)
    # fine-tuning results
    for name in ("teacher_ft", "ft_mae", "ft_dmae", "ft_kd"):
        res = runs[name][1]
        assert 0.0 <= res["best_val_top1"] <= 100.0 and 0.0 <= res["last_val_top1"] <= res["last_val_top5"] <= 100.0
        assert res["best_val_top1"] >= res["last_val_top1"] and res["num_classes"] == 10 and res["n_val"] == 96
        assert _finite(res["final_loss"])
    rows = [json.loads(line) for line in (runs["ft_kd"][0] / "log.jsonl").read_text().splitlines()]
    assert all(_finite(r["loss_kd"]) and _finite(r["loss_ce"]) for r in rows)
    # the evaluation stage reads the test split; the saved model reproduces the fine-tune's last validation numbers
    from harness.core.data import Aug, build_dataset
    from harness.core.spec import DataConfig, ModelConfig
    from harness.core.runtime import setup_runtime
    from harness.core.train import evaluate_classifier
    val_ds, _ = build_dataset(DataConfig(**DATA), "val", Aug("eval", DATA["img_size"]))
    for ev, ft in (("eval_dmae", "ft_dmae"), ("eval_kd", "ft_kd")):
        res = runs[ev][1]
        assert res["n_eval"] == 128 and res["split"] == "test" and 0.0 <= res["top1"] <= 100.0
        model = stages_mod.load_classifier(runs[ft][0] / "model.pth", ModelConfig(**STUDENT), DATA["img_size"], 10)
        again = evaluate_classifier(model, val_ds, 64, setup_runtime(**RUNTIME))
        assert again["top1"] == runs[ft][1]["last_val_top1"] and again["top5"] == runs[ft][1]["last_val_top5"]

    # saved files keep the official layout: decoder in pre-train files, projection only in the DMAE student,
    # fc_norm/head and no decoder in fine-tuned ones
    sd = state_dict_of(safe_load(runs["student_dmae"][0] / "model.pth"))
    assert "decoder_pred.weight" in sd and "mask_token" in sd and sd["distill_proj.0.weight"].shape == (48, 32)
    assert not any(k.startswith("distill_proj") for k in state_dict_of(safe_load(s_mae)))
    ft_sd = state_dict_of(safe_load(f_dmae))
    assert "head.weight" in ft_sd and "fc_norm.weight" in ft_sd
    assert not any(k.startswith(("decoder_", "mask_token", "distill_proj", "norm.")) for k in ft_sd)

    # each stage started from the checkpoint it was given (weights as loaded, before any training; evaluate too)
    expected = {f"pre-trained checkpoint {t_pt}": t_pt, f"teacher checkpoint {t_pt}": t_pt,
                f"pre-trained checkpoint {s_mae}": s_mae, f"pre-trained checkpoint {s_dmae}": s_dmae,
                f"classifier checkpoint {t_ft}": t_ft, f"classifier checkpoint {f_dmae}": f_dmae,
                f"classifier checkpoint {f_kd}": f_kd}
    assert {src for src, _ in loaded} == set(expected)
    for src, w in loaded:
        assert torch.equal(w, state_dict_of(safe_load(expected[src]))["blocks.0.attn.qkv.weight"]), src

    # a finished stage returns its stored result without running again
    d, res = runs["ft_dmae"]
    mtime = (d / "model.pth").stat().st_mtime_ns
    assert run_stage(json.loads((d / "config.json").read_text())["spec"], d, {"init": s_dmae}, RUNTIME,
                     "ft_dmae") == res
    assert (d / "model.pth").stat().st_mtime_ns == mtime
