"""Building the measured steps: each step's models, objective and optimizer, made by harness.core.build -- the functions
the stages build theirs with -- from the profile's settings in its StepSpec, so a benchmarked step is the step
training runs."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from harness.core import build
from harness.core.spec import DistillSpec, FinetuneSpec, KDConfig, PretrainSpec
from harness.core.models import build_classifier, build_mae, get_arch
from harness.core.runtime import autocast
from harness.bench.spec import StepSpec

# the variants --ablate adds to a step: build_step options
ABLATIONS = {"fused_off": {"fused_attn": False}, "fused_on": {"fused_attn": True}, "compile": {"compile": True},
             "adamw_foreach": {"optimizer": "adamw_foreach"}, "adamw_fused": {"optimizer": "adamw_fused"}}


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
    projection = dict(s.distill).get("projection", DistillSpec.projection)

    def make():
        torch.manual_seed(0)
        m = build_mae(get_arch(s.model), s.img_size, s.patch_size)
        if distill_dims:
            m.add_distill_heads(list(distill_dims), projection)
        return m.to(pool.device).train()
    key = ("mae", s.model, s.patch_size, s.img_size, tuple(distill_dims), projection if distill_dims else None)
    return pool.get(key, make)  # a linear- and an MLP-headed student are different models


def _teacher_mae(pool: Pool, s: StepSpec):
    def make():
        torch.manual_seed(1)
        return build_mae(get_arch(s.teacher), s.img_size, s.teacher_patch, with_decoder=True).to(pool.device).eval()
    return pool.get(("mae_frozen", s.teacher, s.teacher_patch, s.img_size), make)


def _classifier(pool: Pool, preset: str, s: StepSpec, patch: int, frozen: bool, drop_path: float):
    def make():
        torch.manual_seed(2)
        m = build_classifier(get_arch(preset), s.num_classes, s.img_size, patch, drop_path=drop_path)
        return m.to(pool.device)
    return pool.get(("cls_frozen" if frozen else "cls", preset, patch, s.img_size, s.num_classes,
                     0.0 if frozen else drop_path), make)


def _optimizer(pool: Pool, model: nn.Module, s: StepSpec, impl: str = "default"):
    """The optimizer the stages build (harness.core.build), at the profile's weight decay, layer decay and betas."""
    def make():
        if s.kind in ("mae", "dmae"):
            groups = build.pretrain_param_groups(model, s.weight_decay)
            betas = s.betas or PretrainSpec().betas
        else:
            groups = build.finetune_param_groups(model, s.weight_decay, s.layer_decay)
            betas = s.betas or FinetuneSpec().betas
        return build.optimizer(groups, 1e-5, betas, impl)
    return pool.get(("opt", id(model), impl), make)


def _objective(pool: Pool, s: StepSpec, teacher: Optional[nn.Module]):
    """The objective the stages build (harness.core.build) from the profile's settings."""
    def make():
        if s.kind in ("mae", "dmae"):
            p = PretrainSpec(mask_ratio=s.mask_ratio, visible_rounding=s.visible_rounding,
                             norm_pix_loss=s.norm_pix_loss)
            d = DistillSpec(**dict(s.distill), teacher_mode=s.teacher_mode) \
                if s.kind == "dmae" else None  # a spec from elsewhere (the estimator) has the stage defaults
            return build.pretrain_objective(s.kind, p, d, teacher, s.pairs)
        f = FinetuneSpec(mixup=s.mixup, cutmix=s.cutmix, smoothing=s.smoothing)
        kd = KDConfig(*s.kd) if s.kind == "finetune_kd" else None
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
                with autocast(dev, amp):
                    loss, _ = objective(run_model, x, y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def fwd_bwd(m=run_model):
            model.train()
            with attn():
                with autocast(dev, amp):
                    loss, _ = objective(m, x, y)
                loss.backward()
            opt.zero_grad(set_to_none=True)

        def phases():
            model.train()
            out = {}
            with attn():
                sync(dev)
                t0 = time.perf_counter()
                with autocast(dev, amp):
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
            with attn(), torch.no_grad(), autocast(dev, amp):
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
        with attn(), torch.no_grad(), autocast(dev, amp):
            model(x)
    return Step(fn, s.batch, models, phases, eager_eval, fn)
