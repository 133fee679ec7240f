"""Official MAE checkpoint formats load (teacher, classifier, fine-tuning init); misfits, unsafe pickles and corrupt
files are refused with CheckpointError; position embeddings are interpolated; checkpoint-last rotation and fallback."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from harness.core.checkpoints import (LAST, PREV, CheckpointError, atomic_save, encoder_to_classifier, load_last,
                                      load_weights, safe_load, save_last, state_dict_of)
from harness.core.models import PRESETS, build_classifier
from harness.core.spec import ModelConfig
from harness.core.stages import load_classifier, load_teacher_encoder

PRESET, PATCH, IMG = "vit_w48d3_dec48d1", 4, 16  # width 48, 3 blocks, decoder 48 x 1 block; 4 x 4 = 16 patches
MODEL_CFG = ModelConfig(PRESET, PATCH)


def _block(prefix, d, mlp=4):
    return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (mlp * d, d), f"{prefix}.mlp.fc1.bias": (mlp * d,),
            f"{prefix}.mlp.fc2.weight": (d, mlp * d), f"{prefix}.mlp.fc2.bias": (d,)}


def official_layout(kind, img=IMG, patch=PATCH, num_classes=10):
    """Key -> shape, written from dmae-spec.md 'Official checkpoint formats' (not from our models).

    kind: 'pretrain' (mae_pretrain_vit_*.pth, encoder only), 'visualize' (mae_visualize_vit_*.pth, with decoder),
    'finetuned' (global-pool fine-tuned classifier: fc_norm + head, no final norm)."""
    a = PRESETS[PRESET]
    d, n = a.embed_dim, (img // patch) ** 2
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d),
              "patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,)}
    for i in range(a.depth):
        shapes.update(_block(f"blocks.{i}", d))
    if kind == "finetuned":
        shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,), "head.weight": (num_classes, d),
                       "head.bias": (num_classes,)})
        return shapes
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    if kind == "visualize":
        dd = a.decoder_embed_dim
        shapes.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
                       "decoder_pos_embed": (1, 1 + n, dd), "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                       "decoder_pred.weight": (patch * patch * 3, dd), "decoder_pred.bias": (patch * patch * 3,)})
        for i in range(a.decoder_depth):
            shapes.update(_block(f"decoder_blocks.{i}", dd))
    return shapes


def official_sd(kind, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * 0.02 for k, s in sorted(official_layout(kind, **kw).items())}


def save_official(tmp_path, name, sd):
    path = tmp_path / name
    torch.save({"model": sd, "epoch": 799, "args": {"note": "official-like extras are ignored"}}, path)
    return str(path)


def assert_loaded(model, sd, skip=()):
    own = model.state_dict()
    for k, v in sd.items():
        if k.startswith(tuple(skip)):
            continue
        assert torch.equal(own[k], v), k


# ---------------------------------------------------------------------------------------------------------------
# official formats


def test_encoder_only_release_loads_as_teacher(tmp_path):
    sd = official_sd("pretrain")
    path = save_official(tmp_path, "mae_pretrain_vit_w48d3_dec48d1.pth", sd)
    teacher = load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=False)
    assert not teacher.has_decoder
    assert_loaded(teacher, sd)
    assert set(teacher.state_dict()) == set(sd)
    # the encoder-only release cannot drive teacher_mode='full' (needs the decoder): the error names the keys
    with pytest.raises(CheckpointError, match="missing keys.*decoder_embed.weight"):
        load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=True)


def test_visualize_release_loads_with_and_without_decoder(tmp_path):
    sd = official_sd("visualize")
    path = save_official(tmp_path, "mae_visualize_vit_w48d3_dec48d1.pth", sd)
    full = load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=True)
    assert_loaded(full, sd)
    assert set(full.state_dict()) == set(sd)
    enc = load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=False)
    assert_loaded(enc, sd, skip=("decoder_", "mask_token"))
    assert not any(k.startswith(("decoder_", "mask_token")) for k in enc.state_dict())


def test_finetuned_release_loads_as_classifier_and_as_teacher(tmp_path):
    sd = official_sd("finetuned")
    path = save_official(tmp_path, "mae_finetuned_vit_w48d3_dec48d1.pth", sd)
    clf = load_classifier(path, MODEL_CFG, IMG, num_classes=10)
    assert_loaded(clf, sd)
    assert set(clf.state_dict()) == set(sd)
    with pytest.raises(CheckpointError, match="head"):
        load_classifier(path, MODEL_CFG, IMG, num_classes=5)  # a head for another label set
    teacher = load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=False)
    assert_loaded(teacher, sd, skip=("fc_norm.", "head."))


@pytest.mark.parametrize("kind", ["pretrain", "visualize"])
def test_finetune_init_from_official_pretrain(tmp_path, kind):
    sd = official_sd(kind)
    sd_student = dict(sd)
    # a DMAE student checkpoint also carries its projection heads: dropped at fine-tuning
    sd_student["distill_proj.0.weight"] = torch.zeros(1024, PRESETS[PRESET].embed_dim)
    sd_student["distill_proj.0.bias"] = torch.zeros(1024)
    path = save_official(tmp_path, "pretrained.pth", sd_student)
    torch.manual_seed(0)
    clf = build_classifier(PRESETS[PRESET], 10, IMG, PATCH)
    head_before = clf.head.weight.detach().clone()
    init = encoder_to_classifier(state_dict_of(safe_load(path)))
    assert not any(k.startswith(("decoder_", "mask_token", "distill_proj.", "norm.", "head.", "fc_norm."))
                   for k in init)
    load_weights(clf, init, source="init", allow_missing=("head.", "fc_norm."))
    assert_loaded(clf, {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token", "norm."))})
    assert torch.equal(clf.head.weight, head_before)  # fresh head kept
    # without allow_missing the fresh head is reported as missing
    with pytest.raises(CheckpointError, match="head.weight"):
        load_weights(clf, init, source="init")


# ---------------------------------------------------------------------------------------------------------------
# misfits name the keys


def test_wrong_shape_names_the_key(tmp_path):
    sd = official_sd("pretrain")
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(10, 48)
    path = save_official(tmp_path, "bad.pth", sd)
    with pytest.raises(CheckpointError) as e:
        load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=False)
    msg = str(e.value)
    assert "shape mismatches" in msg and "blocks.1.attn.qkv.weight" in msg and "(10, 48)" in msg and "(144, 48)" in msg
    assert path in msg


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = official_sd("pretrain")
    del sd["blocks.2.mlp.fc2.bias"]
    sd["blocks.7.attn.qkv.weight"] = torch.zeros(144, 48)
    path = save_official(tmp_path, "bad.pth", sd)
    with pytest.raises(CheckpointError) as e:
        load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=False)
    msg = str(e.value)
    assert "missing keys (1): blocks.2.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg


def test_wrong_preset_is_refused(tmp_path):
    path = save_official(tmp_path, "pico.pth", official_sd("pretrain"))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_teacher_encoder(path, ModelConfig("vit_w32d2_dec32d1", PATCH), IMG, with_decoder=False)


def test_no_weights_in_checkpoint():
    with pytest.raises(CheckpointError, match="no model weights"):
        state_dict_of({"epoch": 3, "args": "x"})
    sd = official_sd("pretrain")
    assert state_dict_of({"model": sd}) is sd
    assert state_dict_of({"state_dict": sd}) is sd
    assert state_dict_of(sd) is sd


# ---------------------------------------------------------------------------------------------------------------
# position-embedding interpolation


def _mae_interpolate(pos, new_grid):
    """MAE's util/pos_embed.interpolate_pos_embed: class token kept, grid resized bicubic, align_corners=False."""
    d = pos.shape[-1]
    old = int((pos.shape[1] - 1) ** 0.5)
    grid = pos[:, 1:].reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("new_img", [32, 24])
def test_pos_embed_interpolated_for_another_image_size(tmp_path, new_img):
    sd = official_sd("visualize", img=IMG)  # 4 x 4 grid
    path = save_official(tmp_path, "mae_visualize_vit_w48d3_dec48d1.pth", sd)
    teacher = load_teacher_encoder(path, MODEL_CFG, new_img, with_decoder=True)
    g = new_img // PATCH
    assert teacher.pos_embed.shape == (1, 1 + g * g, 48)
    for key in ("pos_embed", "decoder_pos_embed"):
        got = getattr(teacher, key).detach()
        assert torch.equal(got[:, 0], sd[key][:, 0])  # class-token row untouched
        torch.testing.assert_close(got, _mae_interpolate(sd[key], g), rtol=1e-5, atol=1e-6)
    assert_loaded(teacher, sd, skip=("pos_embed", "decoder_pos_embed"))
    # and for a fine-tuning classifier at the new size
    clf = build_classifier(PRESETS[PRESET], 10, new_img, PATCH)
    load_weights(clf, encoder_to_classifier(sd), allow_missing=("head.", "fc_norm."))
    torch.testing.assert_close(clf.pos_embed.detach(), _mae_interpolate(sd["pos_embed"], g), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(clf(torch.randn(1, 3, new_img, new_img))).all()


def test_pos_embed_with_wrong_width_is_a_shape_error(tmp_path):
    sd = official_sd("pretrain")
    sd["pos_embed"] = torch.zeros(1, 1 + 64, 32)
    path = save_official(tmp_path, "bad.pth", sd)
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_teacher_encoder(path, MODEL_CFG, IMG, with_decoder=False)


# ---------------------------------------------------------------------------------------------------------------
# unsafe / unreadable files


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    sd = official_sd("pretrain")
    sd["blocks.0.norm1.weight"] = _RunsCode(marker)
    torch.save({"model": sd}, path)
    for load in (lambda: safe_load(path), lambda: load_teacher_encoder(str(path), MODEL_CFG, IMG, False),
                 lambda: load_classifier(str(path), MODEL_CFG, IMG, 10)):
        with pytest.raises(CheckpointError, match="refused"):
            load()
        assert not marker.exists()
    # the payload is live: an unsafe load would have run it (guards this test against a dud payload)
    live = tmp_path / "LIVE"
    live_path = tmp_path / "live.pth"
    torch.save({"model": _RunsCode(live)}, live_path)
    torch.load(live_path, weights_only=False)
    assert live.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    torch.save({"model": official_sd("pretrain")}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        safe_load(truncated)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(CheckpointError, match="expected a dict"):
        safe_load(lst)


# ---------------------------------------------------------------------------------------------------------------
# atomic saves, checkpoint-last rotation and fallback


def test_atomic_save_roundtrip_leaves_no_temp_files(tmp_path):
    sd = official_sd("pretrain")
    atomic_save({"model": sd}, tmp_path / "model.pth")
    back = state_dict_of(safe_load(tmp_path / "model.pth"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_save_last_rotates_and_load_last_falls_back(tmp_path):
    assert load_last(tmp_path, log=lambda m: None) is None
    save_last({"epoch": 1, "w": torch.ones(2)}, tmp_path)
    assert not (tmp_path / PREV).exists()
    save_last({"epoch": 2, "w": torch.ones(2) * 2}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREV]
    assert safe_load(tmp_path / PREV)["epoch"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when checkpoint-last is fine
        assert load_last(tmp_path, log=lambda m: None)["epoch"] == 2

    (tmp_path / LAST).write_bytes(b"\x00garbage, not a zip")
    logged = []
    with pytest.warns(UserWarning, match="resuming from .*checkpoint-prev.pth"):
        state = load_last(tmp_path, log=logged.append)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(2))
    assert logged and "checkpoint-last.pth" in logged[0]

    (tmp_path / PREV).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_last(tmp_path, log=lambda m: None)


def test_requeue_signal_during_a_checkpoint_write_is_delivered_after_it(tmp_path, monkeypatch):
    """A scheduler's USR2 (submitit checkpoints, requeues and exits) that lands inside torch.save used to surface as
    a RuntimeError from the half-written zip and fail the job: the handler now runs once, after the files are in
    place."""
    import os
    import signal

    import harness.core.checkpoints as ck

    seen = []
    real_save = torch.save

    def save_with_signal(obj, f):
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives mid-write
        real_save(obj, f)
        seen.append("saved")

    def handler(signum, frame):
        seen.append(("handler", (tmp_path / ck.LAST).exists() and ck.load_last(tmp_path) is not None))

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        monkeypatch.setattr(ck.torch, "save", save_with_signal)
        ck.save_last({"epoch": 1}, tmp_path)
        monkeypatch.setattr(ck.torch, "save", real_save)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert seen == ["saved", ("handler", True)]
    assert signal.getsignal(signal.SIGUSR2) is old
