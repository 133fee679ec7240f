"""Timing: the variants of a shape (its steps, their ablations and a square-matmul peak) warmed up, then timed
interleaved so machine noise hits them alike; where a step's time goes (torch.profiler op categories); paired
ratios and summary statistics of the timed repetitions."""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from harness.bench.flops import count_flops
from harness.bench.spec import StepSpec
from harness.bench.steps import Step, sync


@dataclass
class Variant:
    label: str
    spec: Optional[StepSpec]  # None: the matmul peak
    step: Step
    options: dict = field(default_factory=dict)
    flops: float = 0.0  # per call
    flops_by_op: Dict[str, float] = field(default_factory=dict)
    inner: int = 1
    times: List[float] = field(default_factory=list)  # seconds per call, one per repetition
    warmup_s: float = 0.0
    target_s: Optional[float] = None  # seconds per repetition, when not measure()'s target_rep_s
    phases: Dict[str, float] = field(default_factory=dict)
    breakdown: Dict[str, float] = field(default_factory=dict)


def _timed(fn: Callable[[], None], device: torch.device, inner: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def peak_step(device: torch.device, dtype: torch.dtype, n: int) -> Step:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return Step(lambda: torch.mm(a, b, out=c), 0, [], lambda: {})


_CATEGORIES = (
    ("attention", re.compile(r"scaled_dot_product|flash_attention|efficient_attention|_softmax|softmax")),
    ("matmul", re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul|linear|convolution|_convolution|mkldnn_convolution|"
                          r"convolution_backward|mkldnn|_mm|cudnn_convolution)|gemm|cutlass|sm\d+_xmma")),
    ("norm/activation", re.compile(r"layer_norm|gelu|dropout|native_layer_norm")),
    ("elementwise/copy", re.compile(r"aten::(add|mul|sub|div|copy_|clone|cat|gather|scatter|index|cumsum|sum|mean|"
                                    r"pow|sqrt|rsqrt|abs|sign|neg|where|fill_|zero_|masked|exp|log|l1_loss|mse_loss|"
                                    r"norm|linalg_vector_norm|clamp|argsort|sort|rand|bernoulli|floor|to|_to_copy|"
                                    r"expand|contiguous|reshape|view|permute|transpose|t|select|slice|stack|flip|"
                                    r"empty|ones|zeros|lerp|addcdiv|addcmul|maximum|_local_scalar_dense|item|ne|eq|"
                                    r"one_hot|topk|kl_div|log_softmax|_log_softmax|nll_loss|sigmoid)")),
)


def op_breakdown(fn: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Self time of one call of fn by op category (seconds), from torch.profiler."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    out: Dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda":
            t = getattr(ev, "self_device_time_total", None)
            t = getattr(ev, "self_cuda_time_total", 0.0) if t is None else t
        else:
            t = ev.self_cpu_time_total
        if not t:
            continue
        cat = next((c for c, rx in _CATEGORIES if rx.search(ev.key)), "other")
        out[cat] = out.get(cat, 0.0) + t / 1e6
    return out


def measure(variants: List[Variant], device: torch.device, reps: int, warmup: int, target_rep_s: float,
            breakdown: bool = False, log=print) -> None:
    """Warm up each variant with `warmup` (>= 1) untimed calls -- the first FLOP-counted (forward + backward), the
    last picking the calls per repetition so that one lasts about target_rep_s -- then time `reps` repetitions
    interleaved across variants, in an order rotated by one each repetition. With warmup=1 the optimizer's state
    is created in the first timed repetition (the median absorbs it)."""
    for v in variants:
        t0 = time.perf_counter()
        if v.spec is not None:
            v.flops, v.flops_by_op = count_flops(v.step.count)
        else:
            v.step.fn()
        sync(device)
        t1 = time.perf_counter() - t0  # the counted call (forward + backward) sizes the repetitions with warmup=1
        for i in range(max(0, warmup - 1)):
            if i == warmup - 2:  # the last warm-up call: how many calls make a repetition
                t1 = _timed(v.step.fn, device, 1)
            else:
                v.step.fn()
        v.inner = max(1, min(50, int(round((v.target_s or target_rep_s) / max(t1, 1e-6)))))
        v.warmup_s = time.perf_counter() - t0
        if breakdown and v.spec is not None:
            v.phases = v.step.phases()
            v.breakdown = op_breakdown(v.step.fwd_bwd, device)
        log(f"  warm-up {v.label}: {v.warmup_s:.1f} s, one call {t1 * 1e3:.1f} ms, {v.inner} call(s) per repetition")
    for r in range(reps):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            v.times.append(_timed(v.step.fn, device, v.inner))


def stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def ratio(a: Variant, b: Variant) -> dict:
    """a / b per image: the median of the per-repetition ratios (paired), and the FLOP ratio."""
    per = [(ta / a.step.images) / (tb / b.step.images) for ta, tb in zip(a.times, b.times)]
    fr = (a.flops / a.step.images) / (b.flops / b.step.images)
    t = statistics.median(per)
    best = (min(a.times) / a.step.images) / (min(b.times) / b.step.images)
    return {"numerator": a.label, "denominator": b.label, "time": t, "time_min": min(per), "time_max": max(per),
            "time_of_fastest": best, "flops": fr, "time_over_flops": t / fr}
