"""DMAE / MAE losses against hand computations, partial teacher execution, shared visible sets, and the KD baseline."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.kd import KDObjective, kd_term
from harness.core.models import PRESETS, build_mae, num_visible, random_masking
from harness.core.objectives import DMAEObjective, MAEObjective, feature_distance, pixel_loss


# ---------------------------------------------------------------------------------------------------------------
# feature distance and pixel loss on hand-written tensors


S = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # (B=1, 1+n_vis=2, D=2); token 0 plays the class token
T = torch.tensor([[[0.0, 2.0], [0.0, -5.0]]])
# normalised: S -> [.6, .8], [1, 0];  T -> [0, 1], [0, -1]


def test_feature_distance_l1_normalised_by_hand():
    # |.6-0| + |.8-1| + |1-0| + |0+1| = .6 + .2 + 1 + 1 = 2.8, mean over 4 elements
    assert feature_distance(S, T).item() == pytest.approx(0.7, abs=1e-7)
    assert feature_distance(S, T, "l1", normalize=True, include_cls=True).item() == pytest.approx(0.7, abs=1e-7)


def test_feature_distance_l2_normalised_by_hand():
    # .36 + .04 + 1 + 1 = 2.4, mean over 4
    assert feature_distance(S, T, "l2").item() == pytest.approx(0.6, abs=1e-7)


def test_feature_distance_without_normalisation_and_cls():
    # raw L1: 3 + 2 + 1 + 5 = 11 over 4
    assert feature_distance(S, T, "l1", normalize=False).item() == pytest.approx(2.75, abs=1e-7)
    # raw L2: 9 + 4 + 1 + 25 = 39 over 4
    assert feature_distance(S, T, "l2", normalize=False).item() == pytest.approx(9.75, abs=1e-7)
    # class token dropped: only [1, 0] vs [0, -1] after normalisation -> (1 + 1) / 2
    assert feature_distance(S, T, "l1", include_cls=False).item() == pytest.approx(1.0, abs=1e-7)
    with pytest.raises(ValueError):
        feature_distance(S, T, "cosine")


def test_feature_distance_is_per_token_normalisation():
    # scaling one teacher token must not change a normalised distance; scaling the whole tensor must not either
    t2 = T.clone()
    t2[0, 1] *= 7.0
    assert feature_distance(S, t2).item() == pytest.approx(feature_distance(S, T).item(), abs=1e-7)
    assert feature_distance(S, T * 3).item() == pytest.approx(0.7, abs=1e-7)


TARGET = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # (B=1, N=2 patches, 2 values per patch)


def test_pixel_loss_masked_only_by_hand():
    pred = torch.zeros(1, 2, 2)
    # per-patch MSE: patch0 (1 + 9) / 2 = 5, patch1 (4 + 4) / 2 = 4
    assert pixel_loss(TARGET, pred, torch.tensor([[1.0, 0.0]]), False).item() == pytest.approx(5.0)
    assert pixel_loss(TARGET, pred, torch.tensor([[0.0, 1.0]]), False).item() == pytest.approx(4.0)
    assert pixel_loss(TARGET, pred, torch.tensor([[1.0, 1.0]]), False).item() == pytest.approx(4.5)
    # a perfect prediction on the masked patch gives 0 whatever happens on visible ones
    pred2 = torch.tensor([[[1.0, 3.0], [100.0, -100.0]]])
    assert pixel_loss(TARGET, pred2, torch.tensor([[1.0, 0.0]]), False).item() == 0.0


def test_pixel_loss_norm_pix_by_hand():
    # patch0 [1, 3]: mean 2, unbiased var ((-1)^2 + 1^2) / (2 - 1) = 2 -> target [-a, a], a = 1/sqrt(2 + 1e-6)
    # patch1 [2, 2]: var 0 -> target [0, 0]
    a = 1.0 / math.sqrt(2.0 + 1e-6)
    pred = torch.tensor([[[0.5, -0.5], [1.0, 3.0]]])
    expected0 = ((0.5 + a) ** 2 + (-0.5 - a) ** 2) / 2
    expected1 = (1.0 + 9.0) / 2
    assert pixel_loss(TARGET, pred, torch.tensor([[1.0, 0.0]]), True).item() == pytest.approx(expected0, rel=1e-6)
    assert pixel_loss(TARGET, pred, torch.tensor([[0.0, 1.0]]), True).item() == pytest.approx(expected1, rel=1e-6)
    assert pixel_loss(TARGET, pred, torch.tensor([[1.0, 1.0]]), True).item() == pytest.approx(
        (expected0 + expected1) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# DMAE objective on tiny models

IMG, PATCH = 16, 4  # 16 patches


def tiny_pair(seed=0, teacher_decoder=True, pairs=((0, 0), (1, 2))):
    torch.manual_seed(seed)
    teacher = build_mae(PRESETS["vit_w48d3_dec48d1"], IMG, PATCH, with_decoder=teacher_decoder)  # 3 blocks, width 48
    student = build_mae(PRESETS["vit_w32d2_dec32d1"], IMG, PATCH)  # 2 blocks, width 32
    student.add_distill_heads([teacher.embed_dim] * len(pairs))
    imgs = torch.randn(2, 3, IMG, IMG)
    return teacher, student, imgs


def fixed_masking(batch=2, n=16, ratio=0.75, seed=123):
    return random_masking(batch, n, ratio, "cpu", generator=torch.Generator().manual_seed(seed))


def test_dmae_total_matches_independent_computation(monkeypatch):
    pairs = [[0, 0], [1, 2]]
    teacher, student, imgs = tiny_pair(pairs=pairs)
    masking = fixed_masking()
    obj = DMAEObjective(teacher, pairs, alpha=2.5, pixel_weight=0.7, mask_ratio=0.75)
    monkeypatch.setattr(obj, "draw_mask", lambda model, x: masking)
    loss, terms = obj(student, imgs)

    # independent: full teacher run, our own patchify / masked MSE / normalised L1
    with torch.no_grad():
        _, t_feats = teacher.forward_encoder(imgs, masking.ids_keep, out_blocks=[0, 2])
        pred, projected = student(imgs, masking, [0, 1])
    p = PATCH
    target = imgs.reshape(2, 3, IMG // p, p, IMG // p, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)
    per_patch = ((pred - target) ** 2).mean(-1)
    pix = (per_patch * masking.mask).sum() / masking.mask.sum()
    def l1n(a, b):
        return (a / a.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)).abs().mean()
    feat0, feat1 = l1n(projected[0], t_feats[0]), l1n(projected[1], t_feats[2])
    feat = feat0 + feat1  # a SUM over aligned pairs, as the paper and the official engine
    expected = 0.7 * pix + 2.5 * feat

    torch.testing.assert_close(terms["loss_pix"], pix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_feat"], feat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_feat_0"], feat0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_feat_1"], feat1, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"loss_pix", "loss_feat", "loss_feat_0", "loss_feat_1"}
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert feat.item() > 0 and pix.item() > 0


class _StubTeacher(nn.Module):
    """Returns hand-written block outputs; records what it was asked for."""

    def __init__(self, feats):
        super().__init__()
        self.feats, self.calls = feats, []

    def forward_encoder(self, imgs, ids_keep, out_blocks=(), stop_after=None):
        self.calls.append((list(out_blocks), stop_after))
        return None, dict(self.feats)


class _StubStudent(nn.Module):
    num_patches = 2

    def __init__(self, pred, projected):
        super().__init__()
        self.pred, self.projected, self.calls = pred, projected, []

    def patchify(self, imgs):
        return TARGET

    def forward(self, imgs, masking, feat_blocks=()):
        self.calls.append(list(feat_blocks))
        return self.pred, list(self.projected)


def test_dmae_two_pairs_sum_by_hand(monkeypatch):
    from harness.core.models import Masking
    # pair 0: S vs T -> normalised L1 0.7 (see above)
    # pair 1: [1, 0], [0, 1] vs [0, 3], [0, 1] -> normalised [1, 0], [0, 1] vs [0, 1], [0, 1]:
    #         |1 - 0| + |0 - 1| + 0 + 0 = 2 over 4 elements = 0.5
    s2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t2 = torch.tensor([[[0.0, 3.0], [0.0, 1.0]]])
    teacher = _StubTeacher({5: T, 9: t2})
    student = _StubStudent(torch.zeros(1, 2, 2), [S, s2])
    obj = DMAEObjective(teacher, [[1, 5], [3, 9]], alpha=2.0, pixel_weight=0.5)
    masking = Masking(torch.tensor([[1]]), torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]))
    monkeypatch.setattr(obj, "draw_mask", lambda model, x: masking)
    loss, terms = obj(student, torch.zeros(1, 3, 2, 2))
    assert teacher.calls == [([5, 9], 9)] and student.calls == [[1, 3]]
    assert terms["loss_feat_0"].item() == pytest.approx(0.7, abs=1e-7)
    assert terms["loss_feat_1"].item() == pytest.approx(0.5, abs=1e-7)
    assert terms["loss_feat"].item() == pytest.approx(1.2, abs=1e-6)  # sum, not mean (0.6)
    assert terms["loss_pix"].item() == pytest.approx(5.0)  # masked patch 0: (1 + 9) / 2
    assert loss.item() == pytest.approx(0.5 * 5.0 + 2.0 * 1.2, abs=1e-6)


def test_mae_objective_is_pixel_loss(monkeypatch):
    _, student, imgs = tiny_pair()
    masking = fixed_masking()
    obj = MAEObjective(mask_ratio=0.75, norm_pix_loss=True)
    monkeypatch.setattr(obj, "draw_mask", lambda model, x: masking)
    loss, terms = obj(student, imgs)
    with torch.no_grad():
        pred, _ = student(imgs, masking)
    assert torch.equal(loss.detach(), pixel_loss(student.patchify(imgs), pred, masking.mask, True))
    assert set(terms) == {"loss_pix"}


def test_dmae_gradients_reach_student_only():
    teacher, student, imgs = tiny_pair()
    teacher.train()  # the objective must put it back in eval mode
    obj = DMAEObjective(teacher, [[0, 0], [1, 2]])
    assert not teacher.training
    loss, _ = obj(student, imgs)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in student.distill_proj)
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_dmae_alpha_zero_is_mae(monkeypatch):
    teacher, student, imgs = tiny_pair()
    masking = fixed_masking()
    dmae = DMAEObjective(teacher, [[0, 0], [1, 2]], alpha=0.0, mask_ratio=0.75)
    mae = MAEObjective(mask_ratio=0.75)
    for o in (dmae, mae):
        monkeypatch.setattr(o, "draw_mask", lambda model, x: masking)
    assert torch.equal(dmae(student, imgs)[0].detach(), mae(student, imgs)[0].detach())


def test_dmae_rejects_bad_settings():
    teacher, _, _ = tiny_pair(teacher_decoder=False)
    with pytest.raises(ValueError, match="teacher_mode"):
        DMAEObjective(teacher, [[0, 0]], teacher_mode="half")
    with pytest.raises(ValueError, match="decoder"):
        DMAEObjective(teacher, [[0, 0]], teacher_mode="full")


# ---------------------------------------------------------------------------------------------------------------
# partial teacher execution


@pytest.mark.parametrize("t", [0, 1, 2])
def test_partial_teacher_equals_full_run_at_aligned_block(t):
    teacher, _, imgs = tiny_pair()
    teacher.eval()
    masking = fixed_masking()
    with torch.no_grad():
        full_latent, full = teacher.forward_encoder(imgs, masking.ids_keep, out_blocks=[0, 1, 2])
        latent, part = teacher.forward_encoder(imgs, masking.ids_keep, out_blocks=[t], stop_after=t)
    assert torch.equal(part[t], full[t])
    assert set(part) == {t}
    assert (latent is None) == (t < 2)  # the final norm runs only when the last block does
    if t == 2:
        assert torch.equal(latent, full_latent)
    # raw residual stream of block t (class token first, visible tokens in ids_keep order), not the final-normed latent
    with torch.no_grad():
        x = teacher.patch_embed(imgs) + teacher.pos_embed[:, 1:]
        x = torch.stack([x[b, masking.ids_keep[b]] for b in range(x.shape[0])])
        x = torch.cat([(teacher.cls_token + teacher.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for i in range(t + 1):
            x = teacher.blocks[i](x)
    assert part[t].shape == (2, 1 + 4, 48)
    torch.testing.assert_close(part[t], x, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full[2], full_latent)


def test_partial_teacher_mode_matches_full_mode_and_skips_deeper_blocks(monkeypatch):
    pairs = [[0, 0], [1, 1]]  # deepest aligned teacher block 1 of 3 -> block 2 and the decoder must not run
    teacher, student, imgs = tiny_pair(pairs=pairs)
    masking = fixed_masking()
    calls = {"block2": 0, "decoder": 0}
    orig_block2, orig_decoder = teacher.blocks[2].forward, teacher.forward_decoder

    def block2(*a, **k):
        calls["block2"] += 1
        return orig_block2(*a, **k)

    def decoder(*a, **k):
        calls["decoder"] += 1
        return orig_decoder(*a, **k)

    monkeypatch.setattr(teacher.blocks[2], "forward", block2)
    monkeypatch.setattr(teacher, "forward_decoder", decoder)
    partial = DMAEObjective(teacher, pairs, teacher_mode="partial")
    full = DMAEObjective(teacher, pairs, teacher_mode="full")
    fp = partial.teacher_features(imgs, masking)
    assert calls == {"block2": 0, "decoder": 0}
    ff = full.teacher_features(imgs, masking)
    assert calls == {"block2": 1, "decoder": 1}  # the official code's cost, kept as a comparison mode
    assert len(fp) == len(ff) == 2
    for a, b in zip(fp, ff):
        assert torch.equal(a, b)
    for o in (partial, full):
        monkeypatch.setattr(o, "draw_mask", lambda model, x: masking)
    assert torch.equal(partial(student, imgs)[0].detach(), full(student, imgs)[0].detach())


# ---------------------------------------------------------------------------------------------------------------
# teacher and student see the same visible patches


def _record_ids_keep(monkeypatch, model, store):
    orig = model.forward_encoder

    def wrapped(imgs, ids_keep, *a, **k):
        store.append(None if ids_keep is None else ids_keep.clone())
        return orig(imgs, ids_keep, *a, **k)

    monkeypatch.setattr(model, "forward_encoder", wrapped)


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_teacher_and_student_share_the_visible_set(monkeypatch, mode):
    teacher, student, imgs = tiny_pair()
    seen_t, seen_s = [], []
    _record_ids_keep(monkeypatch, teacher, seen_t)
    _record_ids_keep(monkeypatch, student, seen_s)
    obj = DMAEObjective(teacher, [[0, 0], [1, 2]], teacher_mode=mode, mask_ratio=0.75)
    torch.manual_seed(5)
    obj(student, imgs)
    obj(student, imgs)  # a second call draws a new mask, shared again
    assert len(seen_t) == len(seen_s) == 2
    for t, s in zip(seen_t, seen_s):
        assert t is not None and t.shape == (2, num_visible(16, 0.75))
        assert torch.equal(t, s)
    assert not torch.equal(seen_t[0], seen_t[1])


@pytest.mark.parametrize("rounding,n_vis", [("paper", 10), ("official", 9)])
def test_dmae_at_95_percent_uses_the_paper_count(rounding, n_vis):
    # 56 / 4 = 14 x 14 = 196 patches, as ViT-B/16 at 224
    torch.manual_seed(0)
    teacher = build_mae(PRESETS["vit_w32d2_dec32d1"], 56, 4, with_decoder=False)
    student = build_mae(PRESETS["vit_w32d2_dec32d1"], 56, 4)
    student.add_distill_heads([teacher.embed_dim])
    obj = DMAEObjective(teacher, [[1, 1]], mask_ratio=0.95, visible_rounding=rounding)
    imgs = torch.randn(1, 3, 56, 56)
    masking = obj.draw_mask(student, imgs)
    assert masking.ids_keep.shape == (1, n_vis)
    feats = obj.teacher_features(imgs, masking)
    assert feats[0].shape == (1, 1 + n_vis, teacher.embed_dim)
    loss, _ = obj(student, imgs)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# KD baseline (distilling a fine-tuned teacher during fine-tuning)

S_LOGITS = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T_LOGITS = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 2.0]])


def _softmax(row, temp):
    e = [math.exp(v / temp) for v in row]
    z = sum(e)
    return [v / z for v in e]


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_soft_by_hand(temp):
    total = 0.0
    for s, t in zip(S_LOGITS.tolist(), T_LOGITS.tolist()):
        ps, pt = _softmax(s, temp), _softmax(t, temp)
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))  # KL(teacher || student)
    expected = total / 2 * temp ** 2
    assert kd_term(S_LOGITS, T_LOGITS, "soft", temp).item() == pytest.approx(expected, rel=1e-5)


def test_kd_soft_is_zero_for_identical_logits_and_positive_otherwise():
    assert kd_term(T_LOGITS, T_LOGITS, "soft", 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_term(S_LOGITS, T_LOGITS, "soft", 2.0).item() > 0


def test_kd_hard_is_ce_against_teacher_argmax_by_hand():
    # teacher argmax: row 0 -> class 0, row 1 -> class 2
    expected = 0.0
    for s, c in zip(S_LOGITS.tolist(), [0, 2]):
        expected += -math.log(_softmax(s, 1.0)[c])
    expected /= 2
    assert kd_term(S_LOGITS, T_LOGITS, "hard", 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert kd_term(S_LOGITS, T_LOGITS, "hard", 5.0).item() == pytest.approx(expected, rel=1e-6)  # T unused
    with pytest.raises(ValueError, match="kd.kind"):
        kd_term(S_LOGITS, T_LOGITS, "token", 1.0)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_kd_objective_mixes_ce_and_kd(kind):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    imgs, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    obj = KDObjective(teacher, 3, kind=kind, weight=0.3, temperature=2.0)
    loss, terms = obj(student, imgs, labels)
    with torch.no_grad():
        s, t = student(imgs), teacher(imgs)
    ce = F.cross_entropy(s, labels)
    kd = kd_term(s, t, kind, 2.0)
    torch.testing.assert_close(terms["loss_ce"], ce)
    torch.testing.assert_close(terms["loss_kd"], kd)
    torch.testing.assert_close(loss.detach(), 0.7 * ce + 0.3 * kd)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError):
        KDObjective(teacher, 3, weight=1.5)


def _fashion_like(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    images[1] = images[0]  # a duplicate image
    images[2] = torch.cat([images[2][:, :14], images[2][:, :14].flip(-1)], 1)  # a mirror-symmetric one
    return images, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_cached_teacher_logits_give_the_same_kd_loss_on_flip_only_batches(kind):
    from harness.core.data import Aug, TensorBatches, TensorImages
    from harness.core.models import build_classifier, get_arch
    images, targets = _fashion_like()
    ds = TensorImages(images, targets, Aug("finetune", 28, crop_min=1.0))
    assert ds.flip_only
    torch.manual_seed(0)
    teacher = build_classifier(get_arch("vit_w32d2_dec32d1"), 10, 28, 4).eval()
    student = build_classifier(get_arch("vit_w32d2_dec32d1"), 10, 28, 4)
    plain = KDObjective(teacher, 10, kind=kind, weight=0.5, temperature=2.0)
    cached = KDObjective(teacher, 10, kind=kind, weight=0.5, temperature=2.0)
    cache = cached.cache_teacher_logits(ds.flip_views(batch_size=16))
    assert len(cache) == 2 * 40 - 3  # a duplicate image shares both views, a symmetric one its mirror
    for epoch in range(3):
        for imgs, labels in TensorBatches(ds, 8, train=True, epoch=epoch, seed=0, rank=0, world=1):
            torch.manual_seed(epoch)
            a = plain(student, imgs, labels)[1]
            torch.manual_seed(epoch)
            b = cached(student, imgs, labels)[1]
            torch.testing.assert_close(a["loss_kd"], b["loss_kd"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a["loss_ce"], b["loss_ce"])
    assert cache.misses == 0 and cache.hits == 3 * 40


def test_cached_teacher_logits_fall_back_to_the_teacher_for_other_inputs():
    from harness.core.data import Aug, TensorBatches, TensorImages
    from harness.core.models import build_classifier, get_arch
    images, targets = _fashion_like()
    cropped = TensorImages(images, targets, Aug("finetune", 28, crop_min=0.35))
    assert not cropped.flip_only and not TensorImages(images, targets, Aug("finetune", 28, reprob=0.25)).flip_only
    torch.manual_seed(0)
    teacher = build_classifier(get_arch("vit_w32d2_dec32d1"), 10, 28, 4).eval()
    obj = KDObjective(teacher, 10)
    flip_ds = TensorImages(images, targets, Aug("finetune", 28, crop_min=1.0))
    cache = obj.cache_teacher_logits(flip_ds.flip_views())
    imgs, _ = next(iter(TensorBatches(cropped, 8, train=True, epoch=0, seed=0, rank=0, world=1)))
    with torch.no_grad():
        torch.testing.assert_close(cache(imgs), teacher(imgs))
    assert cache.misses == 8 and cache.hits == 0
