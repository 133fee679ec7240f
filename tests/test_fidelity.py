"""Fidelity to the official DMAE code (UCSC-VLAA/DMAE, a fork of facebookresearch/mae) where it changes numbers:
the lr schedule's placement with gradient accumulation, fp16 training with a dynamic loss scaler, and golden losses
recorded from the official implementation (python -m tools.verify_official regenerates them)."""
import copy
import math

import pytest
import torch
from torch import nn

import harness.core.train as train_mod
from harness.core.spec import Schedule
from harness.core.runtime import Runtime
from harness.core.train import fit, lr_at

# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedule


def official_lr_sequence(epochs, warmup, lr, min_lr, steps_per_epoch, accum):
    """The official engine's schedule, written out: on every step with step % accum == 0, MAE's
    adjust_learning_rate at fractional epoch step / len(loader) + epoch (linear warmup from 0, then half-cosine)."""
    out = []
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            if step % accum:
                continue
            e = step / steps_per_epoch + epoch
            if e < warmup:
                value = lr * e / warmup
            else:
                value = min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
            out.append(value)
    return out


def harness_lr_sequence(sched, lr, steps_per_epoch, placement="official"):
    return [lr_at(sched, lr, epoch, step, steps_per_epoch, placement)
            for epoch in range(sched.epochs) for step in range(steps_per_epoch) if step % sched.accum_iter == 0]


def timm_lr_sequence(sched, lr, steps_per_epoch):
    """What the harness computed before (timm CosineLRScheduler over optimizer updates)."""
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    upe = max(1, steps_per_epoch // sched.accum_iter)
    total = upe * sched.epochs
    warm = min(int(round(sched.warmup_epochs * upe)), total)
    s = CosineLRScheduler(opt, t_initial=max(1, total - warm), lr_min=sched.min_lr, warmup_t=warm, warmup_lr_init=0.0,
                          warmup_prefix=True, t_in_epochs=False)
    out = []
    for epoch in range(sched.epochs):
        for step in range(steps_per_epoch):
            if step % sched.accum_iter == 0:
                s.step_update(num_updates=epoch * upe + step // sched.accum_iter)
                out.append(opt.param_groups[0]["lr"])
    return out


def schedule(epochs=5, warmup=2, accum=1, min_lr=0.0):
    return Schedule(epochs=epochs, warmup_epochs=warmup, batch_size=2, accum_iter=accum, blr=1e-3, min_lr=min_lr)


@pytest.mark.parametrize("epochs,warmup,steps,min_lr", [(5, 2, 7, 0.0), (4, 1, 8, 1e-6), (3, 0.5, 8, 0.0),
                                                        (6, 0, 5, 1e-5)])
def test_lr_without_accumulation_is_unchanged(epochs, warmup, steps, min_lr):
    # accum 1: the official placement gives the lr sequence the harness had before (timm scheduler), so earlier runs
    # and the resume / bit-identity tests are not affected
    sched = schedule(epochs, warmup, 1, min_lr)
    ours = harness_lr_sequence(sched, 2.4e-3, steps)
    assert len(ours) == epochs * steps
    assert ours == pytest.approx(timm_lr_sequence(sched, 2.4e-3, steps), rel=1e-12, abs=1e-18)
    assert ours == official_lr_sequence(epochs, warmup, 2.4e-3, min_lr, steps, 1)  # same arithmetic, bit for bit


def test_lr_with_accumulation_follows_the_official_placement():
    # 10 steps per epoch, accum 4: lr set at steps 0, 4, 8 of every epoch, at epoch + step / 10 (official), not at
    # epoch + k / (10 // 4) = epoch + k / 2 (the harness's earlier placement)
    sched = schedule(epochs=4, warmup=1, accum=4, min_lr=1e-6)
    ours = harness_lr_sequence(sched, 2.4e-3, 10)
    ref = official_lr_sequence(4, 1, 2.4e-3, 1e-6, 10, 4)
    assert len(ours) == len(ref) == 12
    assert ours == ref  # bit for bit
    assert ours[:3] == pytest.approx([0.0, 2.4e-3 * 0.4, 2.4e-3 * 0.8], rel=1e-12)
    old = harness_lr_sequence(schedule(4, 1, 4, 1e-6), 2.4e-3, 10, "updates")
    assert old[:3] == pytest.approx([0.0, 2.4e-3 * 0.5, 2.4e-3 * 1.0], rel=1e-12)  # k / 2: a different curve
    assert old != pytest.approx(ours)


def test_lr_placements_agree_when_accum_divides_the_epoch():
    a = harness_lr_sequence(schedule(5, 2, 4), 1e-3, 12)
    b = harness_lr_sequence(schedule(5, 2, 4), 1e-3, 12, "updates")
    assert a == pytest.approx(b, rel=1e-12, abs=1e-18)
    with pytest.raises(ValueError, match="lr placement"):
        lr_at(schedule(), 1e-3, 0, 0, 10, "per_epoch")


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that records every group's lr each time it actually steps."""

    log = []

    def step(self, closure=None):
        type(self).log.append([g["lr"] for g in self.param_groups])
        return super().step(closure)


def _toy(n=20, dim=4):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, dim, generator=g), torch.zeros(n, dtype=torch.long))


def test_fit_sets_the_official_lr_with_accumulation(tmp_path, monkeypatch):
    # 20 images / batch 2 = 10 steps per epoch, accum 4: updates at steps 3 and 7 (steps 8-9 are dropped with the
    # epoch's leftover gradient, as officially), each with the lr set at steps 0 and 4; layer-decay lr_scale honoured
    monkeypatch.setattr(_RecordingAdamW, "log", [])
    monkeypatch.setattr(train_mod.torch.optim, "AdamW", _RecordingAdamW)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    groups = [{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}]
    sched = Schedule(epochs=3, warmup_epochs=1, batch_size=2, accum_iter=4, blr=1e-3, min_lr=1e-6)
    lr = 1e-3 * 2 * 4 / 256

    def objective(m, x, y):
        loss = m(x).pow(2).mean()
        return loss, {}

    fit(model=model, objective=objective, param_groups=groups, dataset=_toy(), schedule=sched, run_dir=tmp_path,
        spec_hash="x", seed=0, rt=Runtime(torch.device("cpu"), log_every=0))
    ref = official_lr_sequence(3, 1, lr, 1e-6, 10, 4)  # lrs set at steps 0, 4, 8 of each epoch
    used = [v for i, v in enumerate(ref) if i % 3 != 2]  # the one set at step 8 never reaches an update
    assert [g[1] for g in _RecordingAdamW.log] == used
    assert [g[0] for g in _RecordingAdamW.log] == [0.5 * v for v in used]


# ---------------------------------------------------------------------------------------------------------------
# fp16 with a dynamic loss scaler (the official NativeScalerWithGradNormCount = torch GradScaler defaults)


class _Fp16Objective:
    """Tiny regression; the first call's loss is so large that its fp16 gradients overflow."""

    def __init__(self):
        self.calls, self.last = 0, None

    def __call__(self, model, x, y):
        self.calls += 1
        self.last = (model, x)
        out = model(x)
        assert out.dtype == torch.float16  # autocast is on
        loss = 1e-3 * out.float().pow(2).mean()
        if self.calls == 1:
            loss = loss * 1e6
        return loss, {"loss_toy": loss.detach()}


def _fp16_fit(run_dir, objective, epochs, monkeypatch, clip_grad=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    sched = Schedule(epochs=epochs, warmup_epochs=0, batch_size=2, accum_iter=1, blr=1e-3, clip_grad=clip_grad)
    fit(model=model, objective=objective, param_groups=[{"params": list(model.parameters())}], dataset=_toy(8),
        schedule=sched, run_dir=run_dir, spec_hash="fp16", seed=0, rt=Runtime(torch.device("cpu"), amp="fp16",
                                                                                log_every=0))
    return model


def test_fp16_dynamic_loss_scale_skips_overflow_and_is_checkpointed(tmp_path, monkeypatch):
    from harness.core.checkpoints import safe_load
    monkeypatch.setattr(_RecordingAdamW, "log", [])
    monkeypatch.setattr(train_mod.torch.optim, "AdamW", _RecordingAdamW)
    obj = _Fp16Objective()
    _fp16_fit(tmp_path, obj, 1, monkeypatch)
    # 4 steps; the first overflows: its update is skipped, the scale backs off 2**16 -> 2**15, the other 3 grow the
    # tracker (growth every 2000 good steps, factor 2)
    assert len(_RecordingAdamW.log) == 3
    sc = safe_load(tmp_path / "checkpoint-last.pth")["scaler"]
    assert sc == {"scale": 2.0 ** 15, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                  "_growth_tracker": 3}
    # resume: the scaler continues from the checkpoint (a fresh one would restart at 2**16 with tracker 0)
    _fp16_fit(tmp_path, obj, 2, monkeypatch)
    sc = safe_load(tmp_path / "checkpoint-last.pth")["scaler"]
    assert sc["scale"] == 2.0 ** 15 and sc["_growth_tracker"] == 7
    assert len(_RecordingAdamW.log) == 7


def test_fp16_gradients_are_unscaled_before_clipping(tmp_path, monkeypatch):
    seen = []
    real_clip = nn.utils.clip_grad_norm_
    obj = _Fp16Objective()
    obj.calls = 1  # no overflow

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        clipped = torch.cat([p.grad.flatten() for p in params]).norm().item()
        # fp32 reference gradient of the same loss at the same weights
        model, x = obj.last
        ref = copy.deepcopy(model).float()
        ref.zero_grad()
        (1e-3 * ref(x).pow(2).mean()).backward()
        seen.append((clipped, torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()))
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", recording_clip)
    _fp16_fit(tmp_path, obj, 1, monkeypatch, clip_grad=1.0)
    assert len(seen) == 4
    for clipped, ref in seen:
        assert clipped == pytest.approx(ref, rel=2e-2)  # the true gradient, not 2**16 times it


# ---------------------------------------------------------------------------------------------------------------
# golden values from the official implementation
#
# Produced by the official side of `python -m tools.verify_official <checkout> --golden` at small shapes
# (tools.verify_official.SMALL: 32 px, patch 4 -> 64 patches; teacher 96-d x 6 blocks, student 64-d x 4 blocks;
# batch 2), i.e. by the official code's own model classes (models_mae_distill.MaskedAutoencoderViT: teacher
# forward_encoder_customized + forward_decoder, student forward, loss += each aligned block's loss as in
# engine_distill; MAE: forward_encoder + forward_decoder + forward_loss) and its own engine loop
# (engine_distill.train_one_epoch with util/lr_sched) for the lr, from UCSC-VLAA/DMAE at the commit below, run with
# torch 2.14.1 / timm 1.0.31 through verify_official's import-time adaptations (torch._six, np.float, Block
# qk_scale). Weights, images and the mask RNG state are regenerated here by verify_official.seeded_state /
# seeded_images / MASK_SEED; the mask uses the official int() visible count (75% -> 16, 95% -> 3 of 64).

OFFICIAL_COMMIT = "a0f4959e848f960e79607c097d0d726ed0677b40"
OFFICIAL_LOSSES = {  # (mask ratio, number of aligned pairs): official values
    (0.75, 1): dict(mae=1.8917607069015503, loss_pix=1.8917607069015503, loss_feat=[0.11701738089323044],
                    loss=2.0087780952453613),
    (0.95, 1): dict(mae=1.8798775672912598, loss_pix=1.8798775672912598, loss_feat=[0.11435163021087646],
                    loss=1.9942291975021362),
    (0.75, 2): dict(mae=1.8917607069015503, loss_pix=1.8917607069015503,
                    loss_feat=[0.11566588282585144, 0.1148148775100708], loss=2.122241497039795),
    (0.95, 2): dict(mae=1.8798775672912598, loss_pix=1.8798775672912598,
                    loss_feat=[0.11338166147470474, 0.11471199989318848], loss=2.10797119140625),
}
# lr in effect at every iteration: 3 epochs x 10 steps, accum 4, warm-up 1 epoch, lr 2.4e-3 -> min_lr 1e-6
OFFICIAL_LR = [0.0, 0.0, 0.0, 0.0, 0.0009599999999999999, 0.0009599999999999999, 0.0009599999999999999,
               0.0009599999999999999, 0.0019199999999999998, 0.0019199999999999998, 0.0024, 0.0024, 0.0024, 0.0024,
               0.002170915884752749, 0.002170915884752749, 0.002170915884752749, 0.002170915884752749,
               0.0015711658847527492, 0.0015711658847527492, 0.0012004999999999997, 0.0012004999999999997,
               0.0012004999999999997, 0.0012004999999999997, 0.0004954515898751786, 0.0004954515898751786,
               0.0004954515898751786, 0.0004954515898751786, 5.9707708703963464e-05, 5.9707708703963464e-05]


@pytest.fixture(scope="module")
def small_models():
    from tools import verify_official as vo
    return {len(pairs): (pairs, *vo.harness_models(vo.SMALL, pairs)) for pairs in vo.SMALL.pairs}


@pytest.mark.parametrize("ratio,n_pairs", sorted(OFFICIAL_LOSSES))
def test_losses_match_official_golden_values(small_models, ratio, n_pairs):
    from tools import verify_official as vo
    pairs, teacher, student = small_models[n_pairs]
    h = vo.harness_losses(teacher, student, pairs, vo.seeded_images(vo.SMALL), ratio)
    gold = OFFICIAL_LOSSES[(ratio, n_pairs)]
    tol = dict(rel=1e-5, abs=1e-6)
    assert h["mae"] == pytest.approx(gold["mae"], **tol)
    assert h["loss_pix"] == pytest.approx(gold["loss_pix"], **tol)
    assert h["loss_feat"] == pytest.approx(gold["loss_feat"], **tol)
    assert h["loss"] == pytest.approx(gold["loss"], **tol)  # pixel + SUM of the per-pair feature losses
    assert h["ids_keep"].shape[1] == {0.75: 16, 0.95: 3}[ratio]


def test_lr_curve_matches_official_golden_values():
    from tools import verify_official as vo
    lr, trace = vo.harness_lr_trace()  # harness.core.train.fit, recorded at every iteration
    assert lr == pytest.approx(2.4e-3, rel=1e-12)
    assert trace == pytest.approx(OFFICIAL_LR, rel=1e-12, abs=1e-18)


def test_verify_official_refuses_a_missing_or_foreign_path(tmp_path, capsys):
    from tools.verify_official import main
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "models_vit.py").write_text("")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a checkout of the official DMAE code" in err and "models_mae_distill.py" in err


@pytest.mark.skipif(not __import__("os").environ.get("DMAE_OFFICIAL"),
                    reason="set DMAE_OFFICIAL to a checkout of github.com/UCSC-VLAA/DMAE to compare live")
def test_verify_official_passes_against_a_checkout(capsys):
    import os
    from tools.verify_official import main
    assert main([os.environ["DMAE_OFFICIAL"]]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("PASS")
