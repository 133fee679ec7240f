"""Model shapes, the official MAE state-dict layout, masking counts, patchify order and sin-cos position embeddings."""
import numpy as np
import pytest
import torch

from harness.core.checkpoints import encoder_to_classifier
from harness.core.models import (PRESETS, build_classifier, build_mae, get_arch, num_visible, random_masking,
                                 sincos_pos_embed_2d)

IMG, PATCH = 32, 16  # 2x2 = 4 tokens: paper presets stay cheap
N_TOKENS = (IMG // PATCH) ** 2
# Paper-width presets are built and run on the meta device (the same code path, shapes and keys only): initialising
# ViT-L/H on CPU alone takes ~20 s. The CPU-sized presets run for real.
META = {"vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"}


def encoder_keys(depth):
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


def decoder_keys(depth):
    keys = {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"decoder_blocks.{i}.{part}.weight", f"decoder_blocks.{i}.{part}.bias"}
    return keys


def classifier_keys(depth):
    return (encoder_keys(depth) - {"norm.weight", "norm.bias"}) | {"fc_norm.weight", "fc_norm.bias", "head.weight",
                                                                   "head.bias"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_and_official_layout(name):
    arch = PRESETS[name]
    device = torch.device("meta") if name in META else torch.device("cpu")
    torch.manual_seed(0)
    teacher_dim = 1024
    with device:
        mae = build_mae(arch, IMG, PATCH)
        mae.add_distill_heads([teacher_dim, 96])
        imgs = torch.randn(1, 3, IMG, IMG)
        masking = random_masking(1, N_TOKENS, 0.75, device)
        pred, projected = mae(imgs, masking, feat_blocks=[0, arch.depth - 1])
        latent, feats = mae.forward_encoder(imgs, masking.ids_keep, out_blocks=[arch.depth - 1])
        clf = build_classifier(arch, num_classes=7, img_size=IMG, patch_size=PATCH)
        logits = clf(imgs)
    n_vis = num_visible(N_TOKENS, 0.75)
    assert n_vis == 1
    assert pred.shape == (1, N_TOKENS, PATCH * PATCH * 3)
    assert [p.shape for p in projected] == [(1, 1 + n_vis, teacher_dim), (1, 1 + n_vis, 96)]
    assert latent.shape == (1, 1 + n_vis, arch.embed_dim)
    assert feats[arch.depth - 1].shape == (1, 1 + n_vis, arch.embed_dim)
    assert logits.shape == (1, 7)
    if device.type == "cpu":
        assert torch.isfinite(pred).all() and torch.isfinite(logits).all()

    sd = mae.state_dict()
    proj_keys = {k for k in sd if k.startswith("distill_proj.")}
    assert proj_keys == {f"distill_proj.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
    assert set(sd) - proj_keys == encoder_keys(arch.depth) | decoder_keys(arch.decoder_depth)
    assert sd["pos_embed"].shape == (1, 1 + N_TOKENS, arch.embed_dim)
    assert sd["decoder_pos_embed"].shape == (1, 1 + N_TOKENS, arch.decoder_embed_dim)
    assert sd["mask_token"].shape == (1, 1, arch.decoder_embed_dim)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * arch.embed_dim, arch.embed_dim)
    assert sd["decoder_pred.weight"].shape == (PATCH * PATCH * 3, arch.decoder_embed_dim)
    assert set(clf.state_dict()) == classifier_keys(arch.depth)
    # pre-trained -> fine-tuning init keeps exactly the encoder minus its final norm
    assert set(encoder_to_classifier(sd)) == classifier_keys(arch.depth) - {"fc_norm.weight", "fc_norm.bias",
                                                                            "head.weight", "head.bias"}


def test_paper_presets_match_the_paper_sizes():
    # ViT-B/16 student with MAE's dec512d8b decoder; ViT-L/16 teacher; official aligned blocks 8 and 17 exist.
    b, lg = get_arch("vit_base"), get_arch("vit_large")
    assert (b.embed_dim, b.depth, b.num_heads) == (768, 12, 12)
    assert (b.decoder_embed_dim, b.decoder_depth, b.decoder_num_heads) == (512, 8, 16)
    assert (lg.embed_dim, lg.depth, lg.num_heads) == (1024, 24, 16)
    assert (PRESETS["vit_huge"].embed_dim, PRESETS["vit_huge"].depth) == (1280, 32)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_arch("vit_gigantic")


def test_encoder_only_mae_has_no_decoder_keys():
    mae = build_mae(PRESETS["vit_w32d2_dec32d1"], 16, 4, with_decoder=False)
    assert set(mae.state_dict()) == encoder_keys(PRESETS["vit_w32d2_dec32d1"].depth)


@pytest.mark.parametrize("ratio,rounding,expected", [
    (0.95, "paper", 10), (0.98, "paper", 4), (0.95, "official", 9), (0.98, "official", 3),
    (0.75, "paper", 49), (0.75, "official", 49), (0.0, "paper", 196)])
def test_num_visible(ratio, rounding, expected):
    assert num_visible(196, ratio, rounding) == expected


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_num_visible_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(196, ratio)
    with pytest.raises(ValueError):
        random_masking(2, 196, ratio, "cpu")


def test_num_visible_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="rounding"):
        num_visible(196, 0.95, "nearest")


@pytest.mark.parametrize("ratio,rounding,n_vis", [(0.95, "paper", 10), (0.98, "official", 3), (0.75, "paper", 49)])
def test_random_masking_is_consistent(ratio, rounding, n_vis):
    g = torch.Generator().manual_seed(0)
    m = random_masking(3, 196, ratio, "cpu", rounding, generator=g)
    assert m.ids_keep.shape == (3, n_vis)
    assert m.mask.shape == (3, 196)
    assert torch.equal(m.mask.sum(1), torch.full((3,), 196.0 - n_vis))
    for b in range(3):
        keep = m.ids_keep[b]
        assert len(set(keep.tolist())) == n_vis
        assert (m.mask[b, keep] == 0).all()  # visible patches are exactly the unmasked ones
        assert torch.equal(torch.sort(m.ids_restore[b]).values, torch.arange(196))
    # different images get different masks
    assert not torch.equal(m.ids_keep[0], m.ids_keep[1])


def test_patchify_is_maes_channel_last_order():
    p, c, h, w = 2, 3, 4, 6
    mae = build_mae(PRESETS["vit_w32d2_dec32d1"], 4, p, with_decoder=False)
    imgs = torch.arange(2 * c * h * w, dtype=torch.float32).reshape(2, c, h, w)
    out = mae.patchify(imgs)
    gh, gw = h // p, w // p
    assert out.shape == (2, gh * gw, p * p * c)
    for b in range(2):
        for i in range(gh):
            for j in range(gw):
                for pi in range(p):
                    for pj in range(p):
                        for ch in range(c):
                            assert out[b, i * gw + j, (pi * p + pj) * c + ch] == imgs[b, ch, i * p + pi, j * p + pj]


def _mae_reference_sincos(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True), re-typed from its description."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("dim,grid", [(32, 4), (48, 7), (768, 14)])
def test_sincos_matches_mae_reference(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    ref = torch.from_numpy(_mae_reference_sincos(dim, grid)).float()
    assert ours.shape == (1 + grid * grid, dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_mae_pos_embeds_are_fixed_sincos():
    mae = build_mae(PRESETS["vit_w48d3_dec48d1"], 28, 4)
    torch.testing.assert_close(mae.pos_embed[0], sincos_pos_embed_2d(48, 7), rtol=0, atol=0)
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_pos_embed_2d(48, 7), rtol=0, atol=0)
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert mae.cls_token.requires_grad and mae.mask_token.requires_grad


def test_classifier_head_init_and_pooling():
    torch.manual_seed(0)
    clf = build_classifier(PRESETS["vit_w48d3_dec48d1"], num_classes=10, img_size=16, patch_size=4)
    assert 1e-5 < clf.head.weight.std().item() < 4e-5  # trunc_normal(std=2e-5), as MAE's fine-tuning
    assert torch.equal(clf.head.bias, torch.zeros(10))
    assert clf.global_pool == "avg"
    # MAE's global_pool fine-tuning: mean over the patch tokens (class token excluded), then fc_norm
    x = torch.randn(2, 1 + 16, 48)
    pooled = clf.forward_head(x, pre_logits=True)
    torch.testing.assert_close(pooled, clf.fc_norm(x[:, 1:].mean(1)))


def test_distill_heads_keep_pytorch_default_init():
    # official: proj = nn.Linear(768, 1024) with bias, one head per aligned pair, built AFTER the model's weight-init
    # pass (initialize_weights), so it keeps PyTorch's default nn.Linear init (kaiming-uniform a=sqrt(5) weight,
    # uniform(+-1/sqrt(fan_in)) bias) -- not xavier, not a zero bias.
    torch.manual_seed(0)
    mae = build_mae(PRESETS["vit_w32d2_dec32d1"], 16, 4)
    assert mae.distill_proj is None
    state = torch.get_rng_state()
    mae.add_distill_heads([48, 64])
    torch.set_rng_state(state)
    reference = [torch.nn.Linear(32, 48), torch.nn.Linear(32, 64)]  # the same draws, PyTorch's own init
    assert len(mae.distill_proj) == 2
    bound = 1.0 / 32 ** 0.5
    for head, ref, out in zip(mae.distill_proj, reference, (48, 64)):
        assert isinstance(head, torch.nn.Linear) and head.weight.shape == (out, 32)
        assert torch.equal(head.weight, ref.weight) and torch.equal(head.bias, ref.bias)
        assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.8 * bound
        assert head.bias.abs().max() <= bound and head.bias.abs().max() > 0
    with pytest.raises(ValueError, match="projection"):
        mae.add_distill_heads([48], kind="conv")
    with pytest.raises(ValueError, match="init"):
        mae.add_distill_heads([48], init="kaiming")


def test_distill_heads_xavier_option():
    # the harness's earlier init, kept selectable: xavier-uniform weight, zero bias
    torch.manual_seed(0)
    mae = build_mae(PRESETS["vit_w32d2_dec32d1"], 16, 4)
    mae.add_distill_heads([48, 64], init="xavier")
    for head, out in zip(mae.distill_proj, (48, 64)):
        assert torch.equal(head.bias, torch.zeros(out))
        bound = (6.0 / (32 + out)) ** 0.5
        assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.8 * bound


def test_mlp_distill_head_is_timm_mlp_with_default_init():
    # official 'mlp-1layer': timm Mlp(in=student dim, hidden=teacher dim, out=teacher dim, GELU), default init
    from timm.layers import Mlp
    torch.manual_seed(0)
    mae = build_mae(PRESETS["vit_w32d2_dec32d1"], 16, 4)
    state = torch.get_rng_state()
    mae.add_distill_heads([48], kind="mlp")
    torch.set_rng_state(state)
    ref = Mlp(in_features=32, hidden_features=48, out_features=48, act_layer=torch.nn.GELU)
    head = mae.distill_proj[0]
    assert isinstance(head, Mlp) and isinstance(head.act, torch.nn.GELU)
    assert {k: v.shape for k, v in head.state_dict().items()} == {
        "fc1.weight": (48, 32), "fc1.bias": (48,), "fc2.weight": (48, 48), "fc2.bias": (48,)}
    for k, v in ref.state_dict().items():
        assert torch.equal(head.state_dict()[k], v)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(head(x), head.fc2(torch.nn.functional.gelu(head.fc1(x))))
