"""FLOP counting: a step's FLOPs (forward + backward) by torch.utils.flop_counter.FlopCounterMode, on its device
and on the meta device (no memory, no compute), which is how harness.bench.estimate scales measured costs to shapes that
were never benchmarked."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils import flop_counter as fc

from harness.bench.spec import StepSpec
from harness.bench.steps import Pool, build_step


def _flop_mapping() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernels that F.scaled_dot_product_attention uses
    on CPU; register the generic SDPA ones so attention is counted on every device (as bmm's on the math path)."""
    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn: Callable[[], None]) -> Tuple[float, Dict[str, float]]:
    """FLOPs of one call of fn (forward + backward for a training step), total and per aten op."""
    with fc.FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    per_op = {str(k).replace("aten.", ""): float(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op


_META_CACHE: Dict[tuple, float] = {}


@contextmanager
def _flash_sdpa_on_meta():
    """On the meta device F.scaled_dot_product_attention takes the math path (its backward: 2 bmm's per forward
    bmm), while CPU and GPU run flash kernels whose backward recomputes the scores (counted 2.5x the forward).
    Route it to the CPU flash kernel so meta counts equal the real ones."""
    aten = torch.ops.aten
    original = F.scaled_dot_product_attention
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        yield
        return

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or kwargs.get("enable_gqa"):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def meta_flops_per_image(s: StepSpec) -> float:
    """FLOPs per image of step s, counted on the meta device (no memory, no compute): what harness.bench.estimate uses
    to scale measured costs to shapes that were not benchmarked. Equals the count on a real device."""
    key = s.match_key() + (s.kind, s.drop_path > 0, s.mixup > 0 or s.cutmix > 0)
    if key not in _META_CACHE:
        b = 2
        pool = Pool(torch.device("meta"))
        with torch.device("meta"):
            step = build_step(pool, replace(s, batch=b), "none")
        with _flash_sdpa_on_meta():
            flops, _ = count_flops(step.count)
        _META_CACHE[key] = flops / b
    return _META_CACHE[key]
