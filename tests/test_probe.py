"""The frozen-feature probe (harness.core.probe) and its stage: a kNN vote that scores separable features ~100% and
shuffled labels ~chance; the stage probes a pre-trained encoder, or a seed's random initialisation."""
import torch
import pytest

from harness.core.probe import block_features, knn_top1
from harness.core.data import TensorImages, Aug


def _clusters(n_per: int, classes: int, dim: int, spread: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(n_per)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(x, dim=-1), labels


def test_knn_separable_clusters_score_100():
    bank, bank_y = _clusters(100, 5, 16, 0.05, seed=0)
    query, query_y = _clusters(40, 5, 16, 0.05, seed=0)  # same centres (seed 0), fresh points
    query = torch.nn.functional.normalize(query + 0.01 * torch.randn(query.shape, generator=torch.Generator()
                                                                     .manual_seed(1)), dim=-1)
    r = knn_top1(bank, bank_y, query, query_y, num_classes=5)
    assert r["top1"] == 100.0 and r["n_eval"] == 200 and r["k"] == 20


def test_knn_shuffled_labels_score_chance():
    bank, bank_y = _clusters(200, 10, 16, 0.05, seed=0)
    query, query_y = _clusters(100, 10, 16, 0.05, seed=0)
    shuffled = bank_y[torch.randperm(len(bank_y), generator=torch.Generator().manual_seed(3))]
    r = knn_top1(bank, shuffled, query, query_y, num_classes=10)
    assert 3.0 < r["top1"] < 20.0  # chance is 10%; 1000 queries


def test_knn_vote_is_weighted_by_similarity():
    # two neighbours of class 1 far away, one of class 0 very close: k=3 votes exp(cos/T) pick class 0
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.2, 1.0]]), dim=-1)
    r = knn_top1(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), torch.tensor([0]), 2, k=3)
    assert r["top1"] == 100.0
    with pytest.raises(ValueError, match="k=20"):
        knn_top1(bank, torch.tensor([0, 1, 1]), bank, torch.tensor([0, 1, 1]), 2)


def test_block_features_mean_patch_token_of_the_block():
    from harness.core.arch import get_arch
    from harness.core.models import build_mae
    torch.manual_seed(0)
    enc = build_mae(get_arch("vit_w32d2_dec32d1"), 28, 4, with_decoder=False)
    imgs = (torch.rand(6, 28, 28) * 255).to(torch.uint8)
    ds = TensorImages(imgs, torch.arange(6), Aug("eval", 28))
    f, y = block_features(enc, ds, block=0, batch_size=4)
    x = ds.batch(torch.arange(6), None)[0]
    _, out = enc.forward_encoder(x, None, out_blocks=(0,), stop_after=0)
    want = torch.nn.functional.normalize(out[0][:, 1:].mean(1), dim=-1)
    assert f.shape == (6, 32) and torch.equal(y, torch.arange(6))
    torch.testing.assert_close(f, want)
