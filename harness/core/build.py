"""What a stage trains with, built from its spec sections: the objective, the optimizer's parameter groups and the
optimizer. The stages (harness.core.stages) and the benchmark (harness.bench) call these same functions, so a
benchmarked step is the step training runs (nanoGPT's `configure_optimizers` serving both train.py and bench.py).
Also the registry of fine-tuning objectives (FINETUNE_OBJECTIVES): plain cross-entropy and the KD baseline of
baselines/kd.py, imported here (baselines.kd imports harness.core.objectives, never this module)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from baselines.kd import KDObjective
from harness.core.objectives import ClassifyObjective, DMAEObjective, MAEObjective
from harness.core.spec import DistillSpec, FinetuneSpec, KDConfig, PretrainSpec


def pretrain_objective(objective: str, p: PretrainSpec, d: Optional[DistillSpec] = None,
                       teacher: Optional[nn.Module] = None, pairs: Sequence = ()):
    """MAE (pixel loss) or DMAE (pixel loss + feature distillation from `teacher` at `pairs`); p: the pretrain
    section, d: the distill section."""
    mae_kwargs = dict(mask_ratio=p.mask_ratio, visible_rounding=p.visible_rounding, norm_pix_loss=p.norm_pix_loss)
    if objective == "mae":
        return MAEObjective(**mae_kwargs)
    if objective == "dmae":
        return DMAEObjective(teacher, pairs, alpha=d.alpha, pixel_weight=d.pixel_weight, distance=d.distance,
                             normalize=d.normalize, include_cls=d.include_cls, teacher_mode=d.teacher_mode,
                             **mae_kwargs)
    raise ValueError(f"pre-training objective must be 'mae' or 'dmae', got {objective!r}")


# The fine-tuning objectives by name: a stage with a kd section fine-tunes with "kd", any other with "classify"
FINETUNE_OBJECTIVES = {"classify": ClassifyObjective, "kd": KDObjective}


def registered_objective(name: str):
    """The fine-tuning objective class registered under `name` in FINETUNE_OBJECTIVES."""
    if name not in FINETUNE_OBJECTIVES:
        raise ValueError(f"no fine-tuning objective {name!r} (registered: {', '.join(sorted(FINETUNE_OBJECTIVES))})")
    return FINETUNE_OBJECTIVES[name]


def finetune_objective(num_classes: int, f: FinetuneSpec, kd: Optional[KDConfig] = None,
                       teacher: Optional[nn.Module] = None):
    """Cross-entropy on (Mixup/CutMix) targets; with a kd section, plus distillation from the fine-tuned teacher
    classifier (the baseline in baselines/kd.py)."""
    mix = dict(mixup=f.mixup, cutmix=f.cutmix, smoothing=f.smoothing)
    if kd:
        return registered_objective("kd")(teacher, num_classes, kind=kd.kind, weight=kd.weight,
                                          temperature=kd.temperature, **mix)
    return registered_objective("classify")(num_classes, **mix)


def pretrain_param_groups(model: nn.Module, weight_decay: float) -> list:
    """MAE/DMAE pre-training (official optim_factory.add_weight_decay, no skip list): no decay on biases and 1-D
    (norm) parameters only; cls_token and mask_token are decayed, the position embeddings are frozen."""
    return param_groups_weight_decay(model, weight_decay)


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list:
    """Fine-tuning (official lrd.param_groups_lrd): layer-wise lr decay, no decay on biases, norms and the model's
    no_weight_decay() set."""
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


def optimizer(param_groups: list, lr: float, betas: Sequence[float], impl: str = "default") -> torch.optim.AdamW:
    """AdamW as the official code builds it; impl: default | adamw_foreach | adamw_fused (benchmark ablations)."""
    extra = {"foreach": True} if impl == "adamw_foreach" else {"fused": True} if impl == "adamw_fused" else {}
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), **extra)
