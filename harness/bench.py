"""`python -m harness.bench` -- the measured cost of every step the harness runs, against the FLOP model, the official
full-teacher step and the hardware's matmul peak.

    python -m harness.bench --quick                 # tiny + smoke shapes, a few steps (CI, well under a minute)
    python -m harness.bench                         # + paper shapes (ViT-B/16 student, ViT-L/16 teacher, 224x224;
                                                    #   batch 4 on a CPU): minutes
    python -m harness.bench --shapes paper --steps 5 --batch 8 --threads 1
    python -m harness.bench --device cuda           # bf16 autocast, the profiles' batch sizes (paper: 128)
    python -m harness.bench --shapes paper --only mae_m75,dmae_partial_m75 --ablate fused_off,compile,adamw_fused

Steps (real objectives, forward + backward + AdamW step where they train; evaluation is forward only):

    mae_m75            MAE pre-training of the student (75% masking)
    dmae_partial_m75   DMAE pre-training, teacher run up to its deepest aligned block on the visible patches
    dmae_full_m75      DMAE with the official code's teacher cost: every block + its decoder (output unused)
    dmae_partial_m95/98  DMAE at 95% / 98% masking
    finetune           fine-tuning (Mixup/CutMix, drop path as in the profile)
    finetune_kd        fine-tuning with KD from the fine-tuned teacher (teacher forward on the full image)
    eval               evaluation forward
    teacher_*          the teacher's own MAE pre-training / fine-tuning / evaluation (profiles that train it)

For each: images/s (median of the timed repetitions after warm-up, with min-max), FLOPs per image (one step,
forward + backward, counted by torch.utils.flop_counter.FlopCounterMode), the achieved FLOP/s and its fraction of a
square-matmul peak timed in the same loop (fp32 on CPU, bf16 on GPU). All steps of a shape (and the matmul) are
timed interleaved -- repetition r runs every variant once, in a rotated order -- so machine noise hits them alike,
and ratios are medians of per-repetition ratios. The input pipeline (pretrain / finetune / eval transforms on
Fashion-MNIST) is timed separately. On a CPU each profile's steps run with its run.threads (--threads overrides).
Results: <out>/<device>-<date>.json and .md (default results/bench/, or $DMAE_BENCH_DIR); harness.estimate turns
the latest of them into --dry-run cost estimates. Timings are only as quiet as the machine: the files record the
load average; on a shared 2-core machine, 2 OpenMP threads per process collapse (use --threads 1 there).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .rundir import git_commit

SCHEMA = 1
DEFAULT_DIR = "results/bench"
TRAIN_KINDS = ("mae", "dmae", "finetune", "finetune_kd")
QUICK_SHAPES = ("tiny", "smoke")
ALL_SHAPES = ("tiny", "smoke", "paper")
ABLATIONS = ("fused_off", "fused_on", "compile", "adamw_foreach", "adamw_fused")


def bench_dir(path: Optional[str | Path] = None) -> Path:
    """Where benchmark files live: the argument, else $DMAE_BENCH_DIR, else results/bench."""
    return Path(path or os.environ.get("DMAE_BENCH_DIR") or DEFAULT_DIR)


# ---------------------------------------------------------------------------------------------------------------
# what a step is


@dataclass(frozen=True)
class StepSpec:
    """One measured step: what runs and at which shape. Also the key harness.estimate maps plan stages to."""

    kind: str  # mae | dmae | finetune | finetune_kd | eval
    model: str  # preset of harness.models.PRESETS (the trained / evaluated model)
    patch_size: int
    img_size: int
    batch: int
    mask_ratio: float = 0.0  # mae / dmae
    visible_rounding: str = "paper"
    teacher: str = ""  # dmae: the MAE teacher; finetune_kd: the fine-tuned teacher classifier
    teacher_patch: int = 0
    teacher_mode: str = ""  # dmae: partial | full
    pairs: Tuple[Tuple[int, int], ...] = ()  # dmae: (student block, teacher block)
    num_classes: int = 10
    drop_path: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    # the optimizer and loss settings of the profile's stages (harness.build makes both from them)
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # fine-tuning kinds
    betas: Tuple[float, ...] = ()  # () = the official default of the kind
    distill: Tuple[Tuple[str, object], ...] = ()  # dmae: alpha, pixel_weight, distance, normalize, include_cls, ...
    kd: Tuple[object, ...] = ("soft", 0.5, 1.0)  # finetune_kd: kind, weight, temperature

    @property
    def trains(self) -> bool:
        return self.kind in TRAIN_KINDS

    def visible(self) -> int:
        from .models import num_visible
        n = (self.img_size // self.patch_size) ** 2
        return num_visible(n, self.mask_ratio, self.visible_rounding) if self.kind in ("mae", "dmae") else n

    def teacher_blocks_run(self) -> int:
        """Teacher encoder blocks a step runs (0 without a teacher)."""
        if self.kind == "dmae":
            from .models import get_arch
            return get_arch(self.teacher).depth if self.teacher_mode == "full" else max(t for _, t in self.pairs) + 1
        if self.kind == "finetune_kd":
            from .models import get_arch
            return get_arch(self.teacher).depth
        return 0

    def match_key(self) -> tuple:
        """What must agree for a measured per-image cost to apply as it is (batch and regularisers aside)."""
        return (self.kind, self.model, self.patch_size, self.img_size, self.visible(), self.teacher,
                self.teacher_patch, self.teacher_mode if self.kind == "dmae" else "", self.teacher_blocks_run())

    @classmethod
    def from_dict(cls, d: dict) -> "StepSpec":
        d = dict(d)
        d["pairs"] = tuple(tuple(int(x) for x in p) for p in d.get("pairs", ()))
        d["betas"] = tuple(d.get("betas", ()))
        d["distill"] = tuple(tuple(kv) for kv in d.get("distill", ()))
        d["kd"] = tuple(d.get("kd", cls.kd))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _mask_tag(r: float) -> str:
    return f"m{round(r * 100)}"


def _profile_cfg(profile: str) -> dict:
    """The table2 recipe at a profile, as a plain dict. The paper profile's mandatory paths (dataset, official
    checkpoints) only matter to a real run: placeholders stand in for them here."""
    from omegaconf import OmegaConf
    from .config import ConfigError, load_config
    try:
        cfg = load_config("table2", [f"profile={profile}"])
    except ConfigError:
        cfg = load_config("table2", [f"profile={profile}", "data.root=/not-used-by-bench",
                                     "teacher.pretrained_ckpt=/not-used-by-bench",
                                     "teacher.finetuned_ckpt=/not-used-by-bench"])
    return OmegaConf.to_container(cfg, resolve=True)


def profile_steps(profile: str, batch: Optional[int] = None, device_type: str = "cpu",
                  batch_cap: Optional[int] = None) -> List[Tuple[str, StepSpec]]:
    """The labelled steps of a profile's shapes (recipes/profile/<profile>.yaml through the table2 recipe).

    batch: one batch size for every step (default: the profile's batch sizes; on CPU the paper shapes use 4);
    batch_cap: at most this batch size."""
    c = _profile_cfg(profile)
    img = int(c["data"]["img_size"])
    n_cls = 1000 if c["data"]["name"] == "imagefolder" else 10
    if batch is None and device_type != "cuda" and img >= 128:
        batch = 4  # ViT-L/ViT-B at 224x224 on a CPU: a small batch keeps the run to minutes

    def bs(profile_batch) -> int:
        return batch or min(int(profile_batch), batch_cap or int(profile_batch))
    st, te = c["student"], c["teacher"]
    pre, fin, dis = c["pretrain"], c["finetune"], c["distill"]
    from .config import resolve_pairs
    from .models import get_arch
    pairs = tuple(tuple(int(x) for x in p)
                  for p in resolve_pairs(dis, get_arch(st["preset"]).depth, get_arch(te["model"]["preset"]).depth))
    masks = sorted({float(pre["mask_ratio"])} | {float(r.get("pretrain", {}).get("mask_ratio", pre["mask_ratio"]))
                                                 for r in c["rows"].values() if r.get("method") == "dmae"})
    base = dict(patch_size=int(st["patch_size"]), img_size=img, num_classes=n_cls)
    distill = tuple((k, dis[k]) for k in ("alpha", "pixel_weight", "distance", "normalize", "include_cls",
                                          "projection"))
    mae = StepSpec("mae", st["preset"], batch=bs(pre["batch_size"]), mask_ratio=float(pre["mask_ratio"]),
                   visible_rounding=pre.get("visible_rounding", "paper"), weight_decay=float(pre["weight_decay"]),
                   betas=tuple(float(b) for b in pre["betas"]), **base)
    dmae = replace(mae, kind="dmae", teacher=te["model"]["preset"], teacher_patch=int(te["model"]["patch_size"]),
                   teacher_mode="partial", pairs=pairs, distill=distill)
    kd = c["kd"]
    ft = StepSpec("finetune", st["preset"], batch=bs(fin["batch_size"]), drop_path=float(fin["drop_path"]),
                  mixup=float(fin["mixup"]), cutmix=float(fin["cutmix"]), smoothing=float(fin["smoothing"]),
                  weight_decay=float(fin["weight_decay"]), layer_decay=float(fin["layer_decay"]),
                  betas=tuple(float(b) for b in fin["betas"]),
                  kd=(kd["kind"], float(kd["weight"]), float(kd["temperature"])), **base)
    steps = [(f"mae_{_mask_tag(mae.mask_ratio)}", mae),
             (f"dmae_partial_{_mask_tag(mae.mask_ratio)}", dmae),
             (f"dmae_full_{_mask_tag(mae.mask_ratio)}", replace(dmae, teacher_mode="full"))]
    steps += [(f"dmae_partial_{_mask_tag(m)}", replace(dmae, mask_ratio=m)) for m in masks if m != mae.mask_ratio]
    steps += [("finetune", ft),
              ("finetune_kd", replace(ft, kind="finetune_kd", teacher=te["model"]["preset"],
                                      teacher_patch=int(te["model"]["patch_size"]))),
              ("eval", StepSpec("eval", st["preset"], batch=bs(fin["eval_batch_size"]), **base))]
    if te.get("train", True):  # the profile pre-trains and fine-tunes its teacher: measure those steps too
        tp, tf = te["pretrain"], te["finetune"]
        tbase = dict(base, patch_size=int(te["model"]["patch_size"]))
        steps += [(f"teacher_mae_{_mask_tag(float(tp['mask_ratio']))}",
                   StepSpec("mae", te["model"]["preset"], batch=bs(tp["batch_size"]),
                            mask_ratio=float(tp["mask_ratio"]), visible_rounding=tp.get("visible_rounding", "paper"),
                            weight_decay=float(tp["weight_decay"]), betas=tuple(float(b) for b in tp["betas"]),
                            **tbase)),
                  ("teacher_finetune",
                   StepSpec("finetune", te["model"]["preset"], batch=bs(tf["batch_size"]),
                            drop_path=float(tf["drop_path"]), mixup=float(tf["mixup"]), cutmix=float(tf["cutmix"]),
                            smoothing=float(tf["smoothing"]), weight_decay=float(tf["weight_decay"]),
                            layer_decay=float(tf["layer_decay"]), betas=tuple(float(b) for b in tf["betas"]),
                            **tbase)),
                  ("teacher_eval", StepSpec("eval", te["model"]["preset"], batch=bs(tf["eval_batch_size"]),
                                            **tbase))]
    return steps


def profile_data(profile: str) -> List[dict]:
    """The input pipelines a profile's stages use: (transform, img_size, randaug, reprob)."""
    c = _profile_cfg(profile)
    img, fin = int(c["data"]["img_size"]), c["finetune"]
    out = [dict(transform="pretrain", img_size=img, randaug="", reprob=0.0, batch=int(c["pretrain"]["batch_size"])),
           dict(transform="finetune", img_size=img, randaug=fin["randaug"] or "", reprob=float(fin["reprob"]),
                batch=int(fin["batch_size"])),
           dict(transform="eval", img_size=img, randaug="", reprob=0.0, crop_pct=float(c["data"]["eval_crop_pct"]),
                batch=int(fin["eval_batch_size"]))]
    tf = c["teacher"].get("finetune", {})
    if c["teacher"].get("train", True) and ((tf.get("randaug") or "") != (fin["randaug"] or "")
                                           or float(tf.get("reprob", 0)) != float(fin["reprob"])):
        out.append(dict(transform="finetune", img_size=img, randaug=tf.get("randaug") or "",
                        reprob=float(tf.get("reprob", 0.0)), batch=int(tf["batch_size"])))
    return out


# ---------------------------------------------------------------------------------------------------------------
# building the steps


class Pool:
    """Models and optimizers of one shape, shared between its steps (MAE and DMAE train the same student; the
    fine-tune, KD and eval steps use the same classifier) so that a paper-shape run fits in memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.items: Dict[tuple, object] = {}

    def get(self, key: tuple, make: Callable[[], object]):
        if key not in self.items:
            self.items[key] = make()
        return self.items[key]


def _student_mae(pool: Pool, s: StepSpec, distill_dims: Sequence[int]):
    from .models import build_mae, get_arch
    projection = dict(s.distill).get("projection", "linear")

    def make():
        torch.manual_seed(0)
        m = build_mae(get_arch(s.model), s.img_size, s.patch_size)
        if distill_dims:
            m.add_distill_heads(list(distill_dims), projection)
        return m.to(pool.device).train()
    return pool.get(("mae", s.model, s.patch_size, s.img_size, tuple(distill_dims)), make)


def _teacher_mae(pool: Pool, s: StepSpec):
    from .models import build_mae, get_arch

    def make():
        torch.manual_seed(1)
        return build_mae(get_arch(s.teacher), s.img_size, s.teacher_patch, with_decoder=True).to(pool.device).eval()
    return pool.get(("mae_frozen", s.teacher, s.teacher_patch, s.img_size), make)


def _classifier(pool: Pool, preset: str, s: StepSpec, patch: int, frozen: bool, drop_path: float):
    from .models import build_classifier, get_arch

    def make():
        torch.manual_seed(2)
        m = build_classifier(get_arch(preset), s.num_classes, s.img_size, patch, drop_path=drop_path)
        return m.to(pool.device)
    return pool.get(("cls_frozen" if frozen else "cls", preset, patch, s.img_size, s.num_classes,
                     0.0 if frozen else drop_path), make)


def _optimizer(pool: Pool, model: nn.Module, s: StepSpec, impl: str = "default"):
    """The optimizer the stages build (harness.build), at the profile's weight decay, layer decay and betas."""
    from . import build

    def make():
        if s.kind in ("mae", "dmae"):
            groups = build.pretrain_param_groups(model, s.weight_decay)
            betas = s.betas or (0.9, 0.95)
        else:
            groups = build.finetune_param_groups(model, s.weight_decay, s.layer_decay)
            betas = s.betas or (0.9, 0.999)
        return build.optimizer(groups, 1e-5, betas, impl)
    return pool.get(("opt", id(model), impl), make)


def _objective(pool: Pool, s: StepSpec, teacher: Optional[nn.Module]):
    """The objective the stages build (harness.build) from the profile's settings."""
    from . import build
    from .config import DistillConfig

    def make():
        if s.kind in ("mae", "dmae"):
            p = dict(mask_ratio=s.mask_ratio, visible_rounding=s.visible_rounding)
            d = {**asdict(DistillConfig()), **dict(s.distill), "teacher_mode": s.teacher_mode} \
                if s.kind == "dmae" else None  # a spec from elsewhere (the estimator) has the config's defaults
            return build.pretrain_objective(s.kind, p, d, teacher, s.pairs)
        f = dict(mixup=s.mixup, cutmix=s.cutmix, smoothing=s.smoothing)
        kd = dict(zip(("kind", "weight", "temperature"), s.kd)) if s.kind == "finetune_kd" else None
        return build.finetune_objective(s.num_classes, f, kd, teacher)
    return pool.get(("objective", s, id(teacher)), make)


def _set_fused_attn(models: Sequence[nn.Module], flag: bool) -> Dict[nn.Module, bool]:
    before = {}
    for model in models:
        for m in model.modules():
            if hasattr(m, "fused_attn") and m not in before:
                before[m] = m.fused_attn
                m.fused_attn = flag
    return before


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Step:
    """A callable training / eval step over fixed inputs; `phases` times forward / backward / optimizer once."""

    fn: Callable[[], None]
    images: int
    models: List[nn.Module]
    phases: Callable[[], Dict[str, float]]
    count: Optional[Callable[[], None]] = None  # what FLOPs are counted over: forward + backward, no optimizer
    fwd_bwd: Optional[Callable[[], None]] = None  # the step without its optimizer update (profiled for op shares)


def build_step(pool: Pool, s: StepSpec, amp: str, options: Optional[dict] = None) -> Step:
    """The step of `s` on pool.device: objective(model, images, labels), backward, AdamW step (training kinds);
    a no-grad forward (eval). options: fused_attn (True/False), compile (bool), optimizer impl."""
    options = options or {}
    dev = pool.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, 3, s.img_size, s.img_size, generator=g, device="cpu").to(dev)
    y = torch.randint(0, s.num_classes, (s.batch,), generator=g, device="cpu").to(dev)
    teacher: Optional[nn.Module] = None
    if s.kind in ("mae", "dmae"):
        from .models import get_arch
        dims = [get_arch(s.teacher).embed_dim] * len(s.pairs) if s.kind == "dmae" else []
        if s.kind == "mae":  # share the DMAE student when this shape has one
            dims = next((list(k[4]) for k in pool.items if k[:4] == ("mae", s.model, s.patch_size, s.img_size)
                         and k[4]), [])
        model = _student_mae(pool, s, dims)
        if s.kind == "dmae":
            teacher = _teacher_mae(pool, s)
    else:
        model = _classifier(pool, s.model, s, s.patch_size, frozen=False, drop_path=s.drop_path)
        if s.kind == "finetune_kd":
            teacher = _classifier(pool, s.teacher, s, s.teacher_patch, frozen=True, drop_path=0.0)
    models = [model] + ([teacher] if teacher is not None else [])
    objective = _objective(pool, s, teacher) if s.trains else None
    opt = _optimizer(pool, model, s, options.get("optimizer", "default")) if s.trains else None
    run_model = model
    if options.get("compile"):
        run_model = pool.get(("compiled", id(model)), lambda: torch.compile(model))
    fused = options.get("fused_attn")

    @contextmanager
    def attn():
        before = _set_fused_attn(models, fused) if fused is not None else {}
        try:
            yield
        finally:
            for m, v in before.items():
                m.fused_attn = v

    if s.trains:
        def fn():
            model.train()
            with attn():
                with _autocast(dev, amp):
                    loss, _ = objective(run_model, x, y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def fwd_bwd(m=run_model):
            model.train()
            with attn():
                with _autocast(dev, amp):
                    loss, _ = objective(m, x, y)
                loss.backward()
            opt.zero_grad(set_to_none=True)

        def phases():
            model.train()
            out = {}
            with attn():
                sync(dev)
                t0 = time.perf_counter()
                with _autocast(dev, amp):
                    loss, _ = objective(run_model, x, y)
                sync(dev)
                t1 = time.perf_counter()
                loss.backward()
                sync(dev)
                t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            t3 = time.perf_counter()
            out.update(forward=t1 - t0, backward=t2 - t1, optimizer=t3 - t2)
            return out
    else:
        def fn():
            model.eval()
            with attn(), torch.no_grad(), _autocast(dev, amp):
                run_model(x)

        def phases():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            return {"forward": time.perf_counter() - t0}
    if s.trains:  # FLOPs counted eagerly (a compiled model would compile under the counter; same FLOPs)
        return Step(fn, s.batch, models, phases, lambda: fwd_bwd(model), fwd_bwd)

    def eager_eval():
        model.eval()
        with attn(), torch.no_grad(), _autocast(dev, amp):
            model(x)
    return Step(fn, s.batch, models, phases, eager_eval, fn)


# ---------------------------------------------------------------------------------------------------------------
# FLOP counting


def _flop_mapping() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernels that F.scaled_dot_product_attention uses
    on CPU; register the generic SDPA ones so attention is counted on every device (as bmm's on the math path)."""
    from torch.utils import flop_counter as fc
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
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    per_op = {str(k).replace("aten.", ""): float(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op


_META_CACHE: Dict[tuple, float] = {}


@contextmanager
def _flash_sdpa_on_meta():
    """On the meta device F.scaled_dot_product_attention takes the math path (its backward: 2 bmm's per forward
    bmm), while CPU and GPU run flash kernels whose backward recomputes the scores (counted 2.5x the forward).
    Route it to the CPU flash kernel so meta counts equal the real ones."""
    import torch.nn.functional as F
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
    """FLOPs per image of step s, counted on the meta device (no memory, no compute): what harness.estimate uses
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


# ---------------------------------------------------------------------------------------------------------------
# timing


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
    from torch.profiler import ProfilerActivity, profile
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


# ---------------------------------------------------------------------------------------------------------------
# data loading


def bench_data(profiles: Sequence[str], n_images: int, root: str, threads: int = 0, log=print) -> List[dict]:
    """Images/s of the input pipelines, one process, on Fashion-MNIST, through the same build_dataset / loader the
    stages use (batched tensor transforms for the in-memory dataset; the per-image PIL pipeline when RandAug is on).
    Torch threads as the profile's stages load data: run.threads in the main process (num_workers=0)."""
    from .data import Aug, DataSpec, FashionMNIST, build_dataset, loader
    out, seen = [], set()
    default_threads = torch.get_num_threads()
    for prof in profiles:
        c = _profile_cfg(prof)
        run_cfg = c["run"]
        workers = int(run_cfg.get("num_workers") or 0)
        torch.set_num_threads(threads or (1 if workers else int(run_cfg.get("threads") or 0)) or default_threads)
        for d in profile_data(prof):
            key = (d["transform"], d["img_size"], d["randaug"], d["reprob"])
            if key in seen:
                continue
            seen.add(key)
            n = n_images if d["img_size"] < 128 else max(32, n_images // 8)
            batch = min(d["batch"], n)
            aug = Aug(d["transform"], d["img_size"], crop_min=float(c.get(d["transform"], {}).get("crop_min", 0.2))
                      if d["transform"] != "eval" else 0.2, randaug=d["randaug"], reprob=d["reprob"],
                      crop_pct=d.get("crop_pct", 1.0))
            try:
                ds, _ = build_dataset(DataSpec("fashion_mnist", root, d["img_size"], train_subset=n + batch),
                                      "train", aug)
            except Exception as e:  # no dataset here: say so, measure the rest
                log(f"  data: skipped ({e})")
                return out
            def timed(dataset) -> Tuple[int, float]:
                it = iter(loader(dataset, batch, d["transform"] != "eval", 0, workers))
                next(it)  # warm-up batch
                t0, seen_imgs = time.perf_counter(), 0
                for imgs, _ in it:
                    seen_imgs += imgs.shape[0]
                return seen_imgs, time.perf_counter() - t0

            seen_imgs, dt = timed(ds)
            row = dict(d, profile=prof, images=seen_imgs, seconds=dt, images_per_s=seen_imgs / dt,
                       s_per_image=dt / seen_imgs, threads=torch.get_num_threads(), profile_num_workers=workers,
                       pipeline="batched tensors" if aug.batched else "per-image PIL",
                       note="" if d["img_size"] < 128 else "28x28 Fashion-MNIST upscaled by the transforms; "
                       "ImageNet JPEG decoding not included")
            if aug.batched:  # the per-image PIL pipeline the stages used before, on the same images, right after
                pil = torch.utils.data.Subset(FashionMNIST(root, "train", aug.pil()), range(n + batch))
                pil_imgs, pil_dt = timed(pil)
                row.update(pil_images_per_s=pil_imgs / pil_dt, speedup_vs_pil=(seen_imgs / dt) / (pil_imgs / pil_dt))
            out.append(row)
            log(f"  data {prof} {d['transform']} {d['img_size']}px randaug={d['randaug'] or '-'} ({row['pipeline']}): "
                f"{row['images_per_s']:.0f} img/s" + (f"; per-image PIL {row['pil_images_per_s']:.0f} img/s, "
                                                      f"{row['speedup_vs_pil']:.0f}x" if aug.batched else ""))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the run


def device_info(device: torch.device, amp: str) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "cuda-" + _slug(name)
    else:
        name = _cpu_name()
        key = f"cpu-{_slug(name)}-{os.cpu_count()}c"
    return {"key": key, "type": device.type, "name": name, "threads": torch.get_num_threads(),
            "dtype": "bf16" if amp == "bf16" else "fp32", "amp": amp, "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def current_device_key(device_type: str) -> Optional[str]:
    """The key this machine's benchmarks are filed under (None for cuda without a GPU)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return None
        return "cuda-" + _slug(torch.cuda.get_device_name(0))
    return f"cpu-{_slug(_cpu_name())}-{os.cpu_count()}c"


def _stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _ratio(a: Variant, b: Variant) -> dict:
    """a / b per image: the median of the per-repetition ratios (paired), and the FLOP ratio."""
    per = [(ta / a.step.images) / (tb / b.step.images) for ta, tb in zip(a.times, b.times)]
    fr = (a.flops / a.step.images) / (b.flops / b.step.images)
    t = statistics.median(per)
    best = (min(a.times) / a.step.images) / (min(b.times) / b.step.images)
    return {"numerator": a.label, "denominator": b.label, "time": t, "time_min": min(per), "time_max": max(per),
            "time_of_fastest": best, "flops": fr, "time_over_flops": t / fr}


RATIOS = (("dmae_over_mae", "dmae_partial_m75", "mae_m75"),
          ("partial_over_full_teacher", "dmae_partial_m75", "dmae_full_m75"),
          ("kd_over_finetune", "finetune_kd", "finetune"),
          ("m95_over_m75", "dmae_partial_m95", "dmae_partial_m75"),
          ("m98_over_m75", "dmae_partial_m98", "dmae_partial_m75"),
          ("mae_over_eval", "mae_m75", "eval"))


def run_shape(shape: str, device: torch.device, amp: str, reps: int, warmup: int, batch: Optional[int],
              batch_cap: Optional[int], only: Optional[Sequence[str]], ablate: Sequence[str],
              ablate_on: Sequence[str], breakdown: bool,
              target_rep_s: float, peak_n: int, log=print) -> dict:
    steps = profile_steps(shape, batch, device.type, batch_cap)
    if only:
        steps = [(lab, s) for lab, s in steps if lab in only]
    pool = Pool(device)
    # DMAE steps first: the MAE step then shares their student (with its unused distillation head)
    order = sorted(steps, key=lambda ls: ls[1].kind != "dmae")
    built = {lab: build_step(pool, s, amp) for lab, s in order}
    variants = [Variant(lab, s, built[lab]) for lab, s in steps]
    for lab, s in steps:
        if lab not in ablate_on:
            continue
        for a in ablate:
            opts = {"fused_off": {"fused_attn": False}, "fused_on": {"fused_attn": True}, "compile": {"compile": True},
                    "adamw_foreach": {"optimizer": "adamw_foreach"}, "adamw_fused": {"optimizer": "adamw_fused"}}[a]
            if "optimizer" in opts and not s.trains:
                continue
            variants.append(Variant(f"{lab}+{a}", s, build_step(pool, s, amp, opts), options=opts))
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    # a single short matmul is hit harder by a busy machine than a long step: give it >= 1 s per repetition
    peak = Variant("matmul_peak", None, peak_step(device, dtype, peak_n), target_s=max(target_rep_s, 1.0))
    peak.flops = 2.0 * peak_n ** 3
    variants.append(peak)
    log(f"[bench] shape {shape}: {len(variants) - 1} steps + a {peak_n}^2 {str(dtype).replace('torch.', '')} "
        f"matmul, {reps} repetitions")
    t0 = time.perf_counter()
    measure(variants, device, reps, warmup, target_rep_s, breakdown, log)
    peak_med = peak.flops / statistics.median(peak.times)
    entries = []
    for v in variants:
        if v.spec is None:
            continue
        s = v.spec
        step_s = _stats(v.times)
        fpi = v.flops / v.step.images
        ach = fpi * v.step.images / step_s["median"]
        e = {"id": f"{shape}/{v.label}", "shape": shape, "label": v.label, "options": v.options,
             "spec": asdict(s), "trains": s.trains, "batch": s.batch, "visible": s.visible(),
             "teacher_blocks_run": s.teacher_blocks_run(),
             "flops_per_image": fpi, "flops_by_op_per_image": {k: f / v.step.images for k, f in v.flops_by_op.items()},
             "step_s": step_s, "s_per_image": step_s["median"] / v.step.images,
             "images_per_s": {"median": v.step.images / step_s["median"], "min": v.step.images / step_s["max"],
                              "max": v.step.images / step_s["min"]},
             "achieved_flops_per_s": ach, "peak_fraction": ach / peak_med,
             "peak_fraction_of_best": ach / (peak.flops / min(peak.times)),
             "threads": torch.get_num_threads(), "reps": len(v.times), "calls_per_rep": v.inner,
             "times_s": v.times, "warmup_s": v.warmup_s}
        if v.phases:
            e["phases_s"] = v.phases
        if v.breakdown:
            tot = sum(v.breakdown.values())
            e["op_time_share"] = {k: t / tot for k, t in sorted(v.breakdown.items(), key=lambda kv: -kv[1])}
        entries.append(e)
    by = {v.label: v for v in variants}
    ratios = {name: _ratio(by[a], by[b]) for name, a, b in RATIOS if a in by and b in by}
    for v in variants:
        if v.options and v.label.split("+")[0] in by:
            ratios[f"{v.label}_over_default"] = _ratio(v, by[v.label.split("+")[0]])
    out = {"shape": shape, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
           "load_avg_end": _loadavg(),
           "peak": {"n": peak_n, "dtype": str(dtype).replace("torch.", ""), "flops": peak.flops,
                    "flops_per_s": {"median": peak_med, "min": peak.flops / max(peak.times),
                                    "max": peak.flops / min(peak.times)},
                    "times_s": peak.times, "calls_per_rep": peak.inner},
           "steps": entries, "ratios": ratios}
    del variants, built, pool, by
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def targets(result: dict) -> List[dict]:
    """The issue's targets, judged on the paper shapes of this run (when they were measured)."""
    sh = result["shapes"].get("paper")
    if not sh:
        return []
    out = []
    r = sh["ratios"]
    if "dmae_over_mae" in r:
        d = r["dmae_over_mae"]
        dev = d["time_over_flops"] - 1.0
        out.append({"target": "DMAE/MAE step-time ratio within 5% of the FLOP ratio", "measured":
                    f"time {d['time']:.3f} vs FLOPs {d['flops']:.3f} ({dev * 100:+.1f}%)", "met": abs(dev) <= 0.05})
    if "partial_over_full_teacher" in r:
        d = r["partial_over_full_teacher"]
        faster = 1.0 - d["time"]
        out.append({"target": "partial teacher >= 15% faster than the full teacher (75% masking)", "measured":
                    f"{faster * 100:.1f}% less time per step (full/partial = {1 / d['time']:.3f}x; "
                    f"FLOPs {(1 - d['flops']) * 100:.1f}% fewer)", "met": faster >= 0.15})
    train = [e for e in sh["steps"] if e["trains"] and not e["options"]]
    if train:
        worst = min(train, key=lambda e: e["peak_fraction"])
        best = max(train, key=lambda e: e["peak_fraction"])
        lo, hi = min(_of_best(e, sh) for e in train), max(_of_best(e, sh) for e in train)
        out.append({"target": "training steps >= 50% of the same-run matmul peak", "measured":
                    f"{worst['peak_fraction'] * 100:.0f}% ({worst['label']}) to {best['peak_fraction'] * 100:.0f}% "
                    f"({best['label']}) of the median peak; {lo * 100:.0f}-{hi * 100:.0f}% of the best peak "
                    "repetition", "met": worst["peak_fraction"] >= 0.5})
    return out


def run(shapes: Sequence[str], device: str = "auto", steps: Optional[int] = None, warmup: Optional[int] = None,
        batch: Optional[int] = None, batch_cap: Optional[int] = None, out_dir: Optional[str | Path] = None,
        data: bool = True,
        data_images: int = 512, only: Optional[Sequence[str]] = None, ablate: Sequence[str] = (),
        ablate_on: Sequence[str] = ("mae_m75", "finetune"), breakdown: bool = False, threads: int = 0,
        target_rep_s: Optional[float] = None, peak_n: Optional[int] = None, command: str = "",
        write: bool = True, log=print) -> Tuple[dict, Optional[Path]]:
    """Benchmark `shapes`; returns (result dict, path of the JSON written)."""
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(shapes, device, steps, warmup, batch, batch_cap, out_dir, data, data_images, only, ablate,
                    ablate_on, breakdown, target_rep_s, peak_n, command, write, log, threads, threads_before)
    finally:
        torch.set_num_threads(threads_before)


def _run(shapes, device, steps, warmup, batch, batch_cap, out_dir, data, data_images, only, ablate, ablate_on,
         breakdown, target_rep_s, peak_n, command, write, log, threads, default_threads
         ) -> Tuple[dict, Optional[Path]]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = "bf16" if dev.type == "cuda" else "none"
    info = device_info(dev, amp)
    import timm
    from timm.layers import use_fused_attn
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": info,
              "command": command, "torch": torch.__version__, "timm": timm.__version__,
              "python": sys.version.split()[0], "host": platform.node(), "git_commit": git_commit(),
              "timm_fused_attn": use_fused_attn(), "load_avg_start": _loadavg(),
              "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                 "MKL_NUM_THREADS", "TIMM_FUSED_ATTN") if k in os.environ},
              "options": {"shapes": list(shapes), "steps": steps, "warmup": warmup, "batch": batch,
                          "batch_cap": batch_cap,
                          "only": list(only or []), "ablate": list(ablate), "ablate_on": list(ablate_on)},
              "shapes": {}, "data": []}
    log(f"[bench] {info['name']} ({info['key']}, {info['threads']} threads, {info['dtype']}), torch {torch.__version__}"
        f", timm fused attention {'on' if use_fused_attn() else 'off'}; load average {result['load_avg_start']}")
    for shape in shapes:
        big = shape == "paper"
        reps = steps or (3 if big and dev.type == "cpu" else 10)
        wu = warmup if warmup is not None else (5 if dev.type == "cuda" else 1 if big else 2)
        trs = target_rep_s if target_rep_s is not None else (0.05 if dev.type == "cpu" else 0.2)
        n = peak_n or (2048 if dev.type == "cpu" else 8192)
        # CPU: the threads the profile's stages run with (run.threads; 0 = torch's default), unless --threads
        shape_threads = threads or (int(_profile_cfg(shape)["run"].get("threads") or 0) if dev.type == "cpu" else 0)
        torch.set_num_threads(shape_threads or default_threads)
        result["shapes"][shape] = run_shape(shape, dev, amp, reps, wu, batch, batch_cap, only, ablate, ablate_on,
                                            breakdown, trs, n, log)
    torch.set_num_threads(threads or default_threads)
    if data:
        from .data import FASHION_MNIST_DIR
        result["data"] = bench_data(shapes, data_images, FASHION_MNIST_DIR, threads, log)
    result["load_avg_end"] = _loadavg()
    result["targets"] = targets(result)
    path = None
    if write:
        d = bench_dir(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        stamp = result["created"].replace(":", "")
        path = d / f"{info['key']}-{stamp}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
        path.with_suffix(".md").write_text(markdown(result))
    return result, path


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _g(x: float) -> str:
    return f"{x / 1e9:.3g}"


def _of_best(entry: dict, shape: dict) -> float:
    return entry.get("peak_fraction_of_best") or entry["achieved_flops_per_s"] / shape["peak"]["flops_per_s"]["max"]


def markdown(result: dict) -> str:
    dev = result["device"]
    lines = [f"# Benchmark: {dev['name']} ({dev['key']}), {result['created']}", "",
             f"{dev['threads']} threads, {dev['dtype']}, torch {result['torch']}, timm {result['timm']} "
             f"(fused attention {'on' if result['timm_fused_attn'] else 'off'}); load average "
             f"{result['load_avg_start']} at the start, {result.get('load_avg_end')} at the end.",
             f"Command: `{result['command'] or 'python -m harness.bench'}`", "",
             "Images/s: median of the timed repetitions (min-max). FLOPs: one step, forward + backward, counted by "
             "FlopCounterMode (matmuls, convolutions, attention). Peak: a square matmul timed in the same "
             "interleaved loop; % of peak against its median and its best repetition. Ratios: per image, the median "
             "of the per-repetition ratios (each repetition runs every step once), and the ratio of the fastest "
             "repetitions.", ""]
    for shape, sh in result["shapes"].items():
        pk = sh["peak"]
        lines += [f"## {shape}", "", f"{sh.get('threads', dev['threads'])} thread(s).",
                  f"Matmul peak ({pk['n']}^2 {pk['dtype']}): {_g(pk['flops_per_s']['median'])} GFLOP/s "
                  f"({_g(pk['flops_per_s']['min'])}-{_g(pk['flops_per_s']['max'])})", "",
                  "| step | batch | visible | images/s (min-max) | ms/image | GFLOP/image | GFLOP/s "
                  "| % of peak (median / best) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
        for e in sh["steps"]:
            ips = e["images_per_s"]
            vis = e["visible"] if e["spec"]["kind"] in ("mae", "dmae") else "-"
            lines.append(f"| {e['label']} | {e['batch']} | {vis}"
                         f" | {ips['median']:.3g} ({ips['min']:.3g}-{ips['max']:.3g}) | {e['s_per_image'] * 1e3:.3g} "
                         f"| {_g(e['flops_per_image'])} | {_g(e['achieved_flops_per_s'])} "
                         f"| {e['peak_fraction'] * 100:.0f}% / {_of_best(e, sh) * 100:.0f}% |")
        if sh["ratios"]:
            lines += ["", "| ratio (per image) | time: median of paired repetitions (min-max) | time: fastest / "
                      "fastest | FLOPs | time / FLOPs |", "|---|---|---:|---:|---:|"]
            for name, r in sh["ratios"].items():
                lines.append(f"| {name} ({r['numerator']} / {r['denominator']}) | {r['time']:.3f} "
                             f"({r['time_min']:.3f}-{r['time_max']:.3f}) | {r['time_of_fastest']:.3f} "
                             f"| {r['flops']:.3f} | {r['time_over_flops']:.3f} |")
        bd = [e for e in sh["steps"] if e.get("op_time_share")]
        if bd:
            lines += ["", "Where the time goes (one step timed by phase, one forward + backward profiled for the "
                      "op shares: single samples, as noisy as the machine):", "",
                      "| step | forward / backward / optimizer (s) | op self-time shares (forward + backward) |",
                      "|---|---|---|"]
            for e in bd:
                ph = e.get("phases_s", {})
                shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in e["op_time_share"].items())
                fbo = " / ".join(f"{ph[k]:.3g}" for k in ("forward", "backward", "optimizer") if k in ph)
                lines.append(f"| {e['label']} | {fbo} | {shares} |")
        lines.append("")
    if result.get("data"):
        lines += ["## Input pipeline (one process; the profile's stages divide this cost by run.num_workers)", "",
                  "| profile | transform | size | RandAug | pipeline | threads | images/s | ms/image | per-image PIL "
                  "images/s (same images, same run) | speed-up | note |",
                  "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
        for d in result["data"]:
            pil = d.get("pil_images_per_s")
            pil_s, speedup = (f"{pil:.0f}", f"{d['speedup_vs_pil']:.0f}x") if pil else ("—", "—")
            lines.append(f"| {d['profile']} | {d['transform']} | {d['img_size']} | {d['randaug'] or '-'} "
                         f"| {d.get('pipeline', 'per-image PIL')} | {d.get('threads', '')} | {d['images_per_s']:.0f} "
                         f"| {d['s_per_image'] * 1e3:.3g} | {pil_s} | {speedup} | {d['note']} |")
        lines.append("")
    if result.get("targets"):
        lines += ["## Targets (paper shapes)", "", "| target | measured | met |", "|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# reading results back (harness.estimate)


def load_results(directory: Optional[str | Path] = None) -> List[dict]:
    """Every benchmark JSON in the directory, oldest first (by their `created` stamp)."""
    d = bench_dir(directory)
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and r.get("schema") == SCHEMA and "device" in r:
            r["_path"] = str(p)
            out.append(r)
    return sorted(out, key=lambda r: r.get("created", ""))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny + smoke shapes, 3 repetitions, 1 warm-up, batch at "
                                                        "most 32 (CI)")
    p.add_argument("--shapes", help=f"comma-separated, of {', '.join(ALL_SHAPES)} (default: all; --quick: tiny,smoke)")
    p.add_argument("--steps", type=int, help="timed repetitions per step (default 10; paper on CPU 3; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (>= 1): the first FLOP-counted, the last "
                                              "sizing the repetitions (default 2; paper on CPU 1; GPU 5; --quick 1)")
    p.add_argument("--batch", type=int, help="one batch size for every step (default: the profiles'; paper on CPU 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda: bf16 autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: each profile's run.threads, "
                                                         "else torch's default)")
    p.add_argument("--out", help=f"output directory (default ${{DMAE_BENCH_DIR}} or {DEFAULT_DIR})")
    p.add_argument("--only", help="comma-separated step labels to measure (e.g. mae_m75,dmae_partial_m75)")
    p.add_argument("--ablate", default="", help=f"extra variants of the --ablate-on steps: {', '.join(ABLATIONS)}")
    p.add_argument("--ablate-on", default="mae_m75,finetune", help="steps the ablations apply to")
    p.add_argument("--breakdown", action="store_true", help="profile one step of each: forward/backward/optimizer "
                                                            "times and op-category shares")
    p.add_argument("--no-data", action="store_true", help="skip the input-pipeline measurement")
    p.add_argument("--data-images", type=int, help="images per input-pipeline measurement (default 512; quick 256)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--render", metavar="JSON", help="rewrite the Markdown summary of a benchmark JSON and exit")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        result["targets"] = targets(result)
        path.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0
    shapes = args.shapes.split(",") if args.shapes else list(QUICK_SHAPES if args.quick else ALL_SHAPES)
    bad = [s for s in shapes if s not in ALL_SHAPES]
    ablate = [a for a in args.ablate.split(",") if a]
    bad += [a for a in ablate if a not in ABLATIONS]
    if bad:
        p.error(f"unknown shape or ablation: {', '.join(bad)}")
    steps = args.steps or (3 if args.quick else None)
    batch_cap = 32 if args.quick and not args.batch else None  # quick: tiny's 128-image batches take too long
    result, path = run(shapes, device=args.device, steps=steps, warmup=args.warmup if args.warmup is not None
                       else (1 if args.quick else None), batch=args.batch, batch_cap=batch_cap, out_dir=args.out,
                       data=not args.no_data, data_images=args.data_images or (256 if args.quick else 512),
                       only=args.only.split(",") if args.only else None, ablate=ablate,
                       ablate_on=args.ablate_on.split(","), breakdown=args.breakdown, threads=args.threads,
                       command="python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                       write=not args.no_write)
    print()
    print(markdown(result))
    if path:
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
