"""Model presets by name: encoder width/depth/heads and the MAE decoder's; and how many patches a mask ratio leaves
visible. Standard library only, so planning and --dry-run never import torch; harness.core.models builds the networks
from these."""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Dict


@dataclass(frozen=True)
class Arch:
    """Encoder width/depth/heads plus the MAE decoder's. Patch and image size come from the data."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0


# Paper-scale presets use MAE's official decoder (dec512d8b). The small ones drive the embedded default on CPU.
PRESETS: Dict[str, Arch] = {
    "vit_tiny": Arch(192, 12, 3),
    "vit_small": Arch(384, 12, 6),
    "vit_base": Arch(768, 12, 12),
    "vit_large": Arch(1024, 24, 16),
    "vit_huge": Arch(1280, 32, 16),
    # CPU-sized ViTs for Fashion-MNIST (28x28, patch 4 -> 49 tokens), named by width (w), depth (d) and decoder.
    # The tiny profile's teacher (128-d/6, ~1.2M encoder parameters) and student (32-d/3, ~40k): the teacher is much
    # the stronger, so its features have something to give (tiny-fast: 64-d/4 student, ~0.2M).
    "vit_w128d6_dec64d1": Arch(128, 6, 4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
    "vit_w64d4_dec64d1": Arch(64, 4, 2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
    "vit_w32d3_dec32d1": Arch(32, 3, 2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    "vit_w192d6_dec128d2": Arch(192, 6, 3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit_w96d4_dec128d2": Arch(96, 4, 3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit_w48d3_dec48d1": Arch(48, 3, 3, decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=3),
    "vit_w32d2_dec32d1": Arch(32, 2, 2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    "vit_w16d2_dec16d1": Arch(16, 2, 2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
}


def get_arch(name: str) -> Arch:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def num_visible(num_patches: int, mask_ratio: float, rounding: str = "paper") -> int:
    """Visible patches per image. 'paper': round(N*(1-r)) (10 and 4 of 196 at 95%/98%, as the paper states);
    'official': int(N*(1-r)) as the official code computes (9 and 3)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    exact = num_patches * (1.0 - mask_ratio)
    if rounding == "paper":
        n = int(math.floor(exact + 0.5))
    elif rounding == "official":
        n = int(exact)
    else:
        raise ValueError(f"visible_rounding must be 'paper' or 'official', got {rounding!r}")
    return max(1, n)
