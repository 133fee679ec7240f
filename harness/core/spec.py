"""The typed stage spec: what one stage runs, built once by the planner (harness.plan.graph), written into the stage's
config.json, and read back by the stage (harness.core.stages), the cost estimate and the benchmark's step builder.

    PretrainStage   kind=pretrain: objective (mae | dmae), model, pretrain; dmae adds distill and teacher_model
    FinetuneStage   kind=finetune: model, finetune, kd (null unless the row distils logits; then teacher_model too)
    EvaluateStage   kind=evaluate: model, eval_batch_size
    ProbeStage      kind=probe: model, block, split, probe (k, temperature): a frozen encoder's kNN top-1

Every stage also has name, seed, data, amp and inputs (role -> stage id or "file:<path>"). The sections are the
recipe's sections as a stage uses them: `PretrainSpec` and `FinetuneSpec` are `Schedule`s (what train.fit reads)
plus their own settings; the table config (harness.plan.schema) extends each with the keys that are resolved away before
a stage sees them (effective_batch -> accum_iter, epoch_scale -> epochs, align -> pairs, teacher_source).

A spec's dict form (`spec_dict`) is what config.json holds and what a stage id hashes. An optional section a stage
does not use (a MAE pre-train's distill, a plain fine-tune's teacher_model) is left out of it rather than written as
null, so a field added later with such a default leaves the ids of existing stages, and their results, in place.
Built from a dict (`stage_spec`), a spec is type-checked and an unknown key is an error. Standard library and
omegaconf only: the planner and --dry-run use it without importing torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from math import inf
from typing import Any, Dict, List, Mapping, Optional, Union

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.core.rules import at_least, in_range, one_of

# a field with this metadata is absent from the spec's dict form while it is None (see the module docstring)
OMIT_WHEN_NONE = {"omit_when_none": True}


@dataclass
class ModelConfig:
    preset: str = "vit_base"  # a key of harness.core.arch.PRESETS
    patch_size: int = 16


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | imagefolder
    root: str = MISSING  # set by the profile; the paper profile asks for it on the command line
    img_size: int = 28
    train_subset: int = 0  # 0 = every training image (after the holdout)
    test_subset: int = 0  # 0 = every test image (the final evaluation)
    # training images carved out (fixed, seed 0) as the validation split that tuning and per-epoch monitoring read;
    # 0 = none (fine-tuning then logs no per-epoch accuracy; the test split is read by the evaluation stage only)
    holdout: int = 0
    eval_crop_pct: float = 1.0  # ImageNet: 0.875 (Resize 256 + CenterCrop 224)


@dataclass
class Schedule:
    """The optimizer and its lr schedule (train.fit): per-iteration linear warmup, then half-cosine to min_lr;
    lr = blr x effective batch / 256. Defaults: the official pre-training's. Each field's rule (harness.core.rules)
    is checked when a recipe is composed."""
    epochs: int = at_least(1, default=100)
    warmup_epochs: float = 20
    batch_size: int = at_least(1, default=128)  # per device
    accum_iter: int = at_least(1, default=4)
    blr: float = in_range(0, inf, "()", default=1.5e-4)
    min_lr: float = in_range(0, inf, "[)", default=0.0)
    weight_decay: float = in_range(0, inf, "[)", default=0.05)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: Optional[float] = in_range(0, inf, "()", default=None)


@dataclass
class PretrainSpec(Schedule):
    mask_ratio: float = in_range(0, 1, "[)", default=0.75)
    crop_min: float = in_range(0, 1, "(]", default=0.2)  # RandomResizedCrop scale (crop_min, 1): official 0.2
    # paper: round(N(1-r)) | official: int(N(1-r))
    visible_rounding: str = one_of("paper", "official", default="paper")
    norm_pix_loss: bool = False


@dataclass
class FinetuneSpec(Schedule):
    # the official fine-tuning's optimizer (its other Schedule defaults are the pre-training's)
    accum_iter: int = at_least(1, default=1)
    blr: float = in_range(0, inf, "()", default=5e-4)
    min_lr: float = in_range(0, inf, "[)", default=1e-6)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = in_range(0, 1, "(]", default=0.75)
    drop_path: float = in_range(0, 1, "[)", default=0.15)
    # RandomResizedCrop scale (crop_min, 1): timm's default, as the official fine-tuning
    crop_min: float = in_range(0, 1, "(]", default=0.08)
    mixup: float = in_range(0, inf, "[)", default=0.8)
    cutmix: float = in_range(0, inf, "[)", default=1.0)
    smoothing: float = in_range(0, 1, "[)", default=0.1)
    reprob: float = in_range(0, 1, "[]", default=0.25)
    randaug: str = "rand-m9-mstd0.5-inc1"
    eval_batch_size: int = at_least(1, default=256)


@dataclass
class DistillSpec:
    alpha: float = 1.0
    pixel_weight: float = 1.0  # 0 = feature distillation only
    pairs: List[List[int]] = field(default_factory=list)  # aligned (student block, teacher block), 0-based
    projection: str = "linear"  # linear | mlp
    distance: str = "l1"  # l1 | l2
    normalize: bool = True
    include_cls: bool = True
    teacher_mode: str = "partial"  # partial: up to the deepest aligned block | full: every block + decoder


@dataclass
class KDConfig:
    kind: str = "soft"  # soft (KL with temperature) | hard (DeiT hard label)
    weight: float = 0.5
    temperature: float = 1.0


@dataclass
class StageRuntime:
    """Where and how a stage runs (runtime.setup_runtime), not what it computes: not part of a stage's id."""
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | none | bf16 | fp16
    threads: int = 0  # torch CPU threads (0 = torch's default)
    log_every: int = 20
    num_workers: int = 0
    nan_restarts: int = 0  # a non-finite loss restarts the stage from its last checkpoint this many times (logged)
    # false: a finished stage's checkpoint-last/-prev (resume state, 2+ GB at paper scale) are deleted once its
    # model.pth and result.json exist
    keep_checkpoints: bool = False
    # TensorBoard event files in <stage dir>/tb/ (rank 0; harness.core.tblog): per-epoch points, and per-step points
    # every
    # tb_every steps (the mean since the previous point; 0 = per-epoch only); false: none written. Every step: the
    # writer measured at 0.05-0.24% of a tiny-profile CPU step (python -m harness.bench --tensorboard)
    tensorboard: bool = True
    tb_every: int = 1


@dataclass
class StageSpec:
    kind: str = MISSING  # pretrain | finetune | evaluate | probe
    name: str = ""  # what the stage is, the first part of its id (not hashed: the id's hash covers the rest)
    seed: int = 0
    model: ModelConfig = MISSING  # the model the stage trains or evaluates
    data: DataConfig = MISSING
    amp: str = "auto"  # run.amp: a stage's precision is part of what it computes
    inputs: Dict[str, str] = field(default_factory=dict)  # role -> stage id | "file:<path>"


@dataclass
class PretrainStage(StageSpec):
    kind: str = "pretrain"
    objective: str = MISSING  # mae | dmae
    pretrain: PretrainSpec = MISSING
    distill: Optional[DistillSpec] = field(default=None, metadata=OMIT_WHEN_NONE)  # dmae
    teacher_model: Optional[ModelConfig] = field(default=None, metadata=OMIT_WHEN_NONE)  # dmae: the MAE teacher


@dataclass
class FinetuneStage(StageSpec):
    kind: str = "finetune"
    finetune: FinetuneSpec = MISSING
    kd: Optional[KDConfig] = None  # logit distillation from the fine-tuned teacher (the KD baseline)
    teacher_model: Optional[ModelConfig] = field(default=None, metadata=OMIT_WHEN_NONE)  # kd: its classifier


@dataclass
class EvaluateStage(StageSpec):
    kind: str = "evaluate"
    eval_batch_size: int = 256


@dataclass
class ProbeSpec:
    """The frozen-feature probe (harness.core.probe): a weighted kNN vote over the mean patch token of one block."""
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 512


@dataclass
class ProbeStage(StageSpec):
    """A frozen encoder's kNN top-1: the `encoder` input's block `block` (0-based; -1 = the last), memory bank = the
    training images with their labels, queries = `split` (test for reports, val while tuning). Without an `encoder`
    input the encoder is the random initialisation of `seed` (the scratch row's start)."""
    kind: str = "probe"
    block: int = -1
    split: str = "test"  # test | val
    probe: ProbeSpec = field(default_factory=ProbeSpec)


STAGE_SPECS = {"pretrain": PretrainStage, "finetune": FinetuneStage, "evaluate": EvaluateStage, "probe": ProbeStage}
AnySpec = Union[PretrainStage, FinetuneStage, EvaluateStage, ProbeStage]
SECTIONS = {"model": ModelConfig, "teacher_model": ModelConfig, "data": DataConfig, "pretrain": PretrainSpec,
            "finetune": FinetuneSpec, "distill": DistillSpec, "kd": KDConfig, "probe": ProbeSpec}


def build_stage(kind: str, **fields) -> AnySpec:
    """The planner's constructor: a stage spec from sections the config layer has already validated and resolved
    (harness.plan.resolve.resolve_row), each a dict or typed. A key a section or the stage does not have is a TypeError.
    Plain dataclass construction: ~100x faster than `stage_spec`'s schema merge, which checks what it reads back."""
    return STAGE_SPECS[kind](**{k: SECTIONS[k](**v) if k in SECTIONS and isinstance(v, Mapping) else v
                                for k, v in fields.items()})


class SpecError(ValueError):
    """A stage spec's dict does not match its kind's schema (unknown key, wrong type, missing value)."""


def _typed(cls, d: Mapping, what: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), dict(d)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise SpecError(f"{what}: {key}: {str(e).splitlines()[0]}") from None


def stage_spec(d: Union[Mapping, StageSpec]) -> AnySpec:
    """The typed spec of a stage from its dict form (the planner's sections, a config.json); a typed spec is
    returned as it is."""
    if isinstance(d, StageSpec):
        return d
    kind = d.get("kind")
    if kind not in STAGE_SPECS:
        raise SpecError(f"stage spec: kind={kind!r} must be one of {', '.join(STAGE_SPECS)}")
    name = d.get("name")
    return _typed(STAGE_SPECS[kind], d, f"{kind} stage spec" + (f" {name!r}" if name else ""))


def stage_runtime(d: Union[Mapping, StageRuntime, None]) -> StageRuntime:
    """The typed runtime from its dict form (config.json's runtime); a StageRuntime is returned as it is."""
    if isinstance(d, StageRuntime):
        return d
    return _typed(StageRuntime, d or {}, "stage runtime")


def _plain(v: Any) -> Any:
    return asdict(v) if is_dataclass(v) else [_plain(x) for x in v] if isinstance(v, list) else \
        {k: _plain(x) for k, x in v.items()} if isinstance(v, dict) else v


def spec_dict(spec: Union[StageSpec, StageRuntime], name: bool = True) -> Dict[str, Any]:
    """The plain dict form (JSON-able): config.json's spec, and with name=False what a stage id hashes."""
    out = {}
    for f in fields(spec):
        v = getattr(spec, f.name)
        if (v is None and f.metadata.get("omit_when_none")) or (f.name == "name" and not name):
            continue
        out[f.name] = _plain(v)
    return out
