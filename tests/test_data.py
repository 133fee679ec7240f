"""The batched (in-memory) augmentation draws what the per-image torchvision pipeline draws."""
import math

import PIL.Image
import pytest
import torch
from torchvision import transforms

from harness.core.data import crop_boxes, random_resized_crop_flip


def test_scale_one_is_the_whole_image_flipped_or_not():
    x = torch.rand(256, 3, 28, 28)
    y = random_resized_crop_flip(x, 28, 1.0, torch.Generator().manual_seed(0))
    plain = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert (plain | flipped).all()  # exact copies: nothing cropped, nothing resampled
    assert 0.35 < plain.float().mean() < 0.65


@pytest.mark.parametrize("crop_min", [0.2, 0.35, 1.0])
def test_crop_boxes_fit_and_match_torchvision(crop_min):
    n = 4000
    top, left, h, w = crop_boxes(n, 28, 28, crop_min, torch.Generator().manual_seed(1))
    assert ((top >= 0) & (left >= 0) & (top + h <= 28) & (left + w <= 28) & (h >= 1) & (w >= 1)).all()
    assert torch.equal(top, top.floor()) and torch.equal(w, w.round())  # whole pixels, as torchvision crops
    torch.manual_seed(0)
    img = PIL.Image.new("RGB", (28, 28))
    ref = [transforms.RandomResizedCrop.get_params(img, [crop_min, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ref_area = sum(hh * ww for _, _, hh, ww in ref) / n / 784
    ours_area = (h * w).mean().item() / 784
    # means of n draws; their standard error is below 0.005 at n = 4000
    assert math.isclose(ours_area, ref_area, abs_tol=0.02), (ours_area, ref_area)


def test_same_generator_same_batch():
    x = torch.rand(64, 3, 28, 28)
    a = random_resized_crop_flip(x, 28, 0.2, torch.Generator().manual_seed(5))
    b = random_resized_crop_flip(x, 28, 0.2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
