"""Baseline: knowledge distillation from a fine-tuned teacher during fine-tuning (not in the official DMAE code).

The student classifier is fine-tuned as usual (Mixup/CutMix soft targets) and, on the same mixed full images, is
pulled towards a fine-tuned teacher classifier:

    loss = (1 - weight) * CE(student, mixed targets) + weight * KD

- soft (the recipes' default): KD = KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch (Hinton).
- hard (DeiT's hard-label distillation): KD = CE(s, argmax t).
The paper does not say which variant its "distilling a fine-tuned ViT-L" baseline used; recipes name theirs.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.objectives import ClassifyObjective, Terms


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float
            ) -> torch.Tensor:
    if kind == "soft":
        t = temperature
        return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1),
                        F.log_softmax(teacher_logits.float() / t, dim=-1),
                        reduction="batchmean", log_target=True) * (t * t)
    if kind == "hard":
        return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))
    raise ValueError(f"kd.kind must be 'soft' or 'hard', got {kind!r}")


class KDObjective(ClassifyObjective):
    def __init__(self, teacher: nn.Module, num_classes: int, kind: str = "soft", weight: float = 0.5,
                 temperature: float = 1.0, **classify_kwargs):
        super().__init__(num_classes, **classify_kwargs)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"kd.weight must be in [0, 1], got {weight}")
        kd_term(torch.zeros(1, 2), torch.zeros(1, 2), kind, temperature)  # validates kind early
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.weight, self.temperature = kind, weight, temperature

    def __call__(self, model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Terms]:
        imgs, targets = self.mix(imgs, labels)
        logits = model(imgs)
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(imgs)
        loss_ce = self.criterion(logits, targets)
        loss_kd = kd_term(logits, teacher_logits, self.kind, self.temperature)
        loss = (1.0 - self.weight) * loss_ce + self.weight * loss_kd
        return loss, {"loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}
