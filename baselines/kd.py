"""Baseline: knowledge distillation from a fine-tuned teacher during fine-tuning (not in the official DMAE code).

The student classifier is fine-tuned as usual (Mixup/CutMix soft targets) and, on the same mixed full images, is
pulled towards a fine-tuned teacher classifier:

    loss = (1 - weight) * CE(student, mixed targets) + weight * KD

- soft (the recipes' default): KD = KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch (Hinton).
- hard (DeiT's hard-label distillation): KD = CE(s, argmax t).
The paper does not say which variant its "distilling a fine-tuned ViT-L" baseline used; recipes name theirs.

`CachedTeacherLogits`: when every training input is one of a few fixed views of each image (a flip-only
augmentation of an in-memory dataset, no Mixup/CutMix), the teacher's logits are computed once per view and looked
up by the input's exact bytes; any other input goes through the teacher. The loss is the same; the teacher runs on
2 N images instead of epochs x N. The objective owns it: `KDObjective.teacher_logits_cached` is the rule (which the
cost estimate asks too), `prepare` builds the cache before training where the rule holds, `result_fields` reports
its counts in result.json (kd_cached_views, kd_cache_hits, kd_cache_misses).

The harness finds the objective in harness.core.build's registry of fine-tuning objectives (FINETUNE_OBJECTIVES).
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.objectives import ClassifyObjective, Terms

if TYPE_CHECKING:
    from harness.core.runtime import Runtime
    from harness.core.spec import FinetuneStage


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


def _digest(x: torch.Tensor) -> bytes:
    return hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest()


class CachedTeacherLogits:
    """The teacher's logits for a fixed set of inputs (`views`: batches of them), keyed by each input's bytes."""

    def __init__(self, teacher: nn.Module, views: Iterable[torch.Tensor]):
        self.teacher = teacher.eval().requires_grad_(False)
        self.index, chunks, row = {}, [], 0
        with torch.no_grad():
            for x in views:
                x = x.contiguous()
                for r in x:  # equal inputs (a duplicate image, a symmetric one) share the first one's row
                    self.index.setdefault(_digest(r), row)
                    row += 1
                chunks.append(self.teacher(x))
        self.logits = torch.cat(chunks) if chunks else torch.empty(0)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        rows = [self.index.get(_digest(r)) for r in imgs.detach().cpu().contiguous()]
        if None in rows:  # not one of the views (another crop, a mixed image): the teacher computes the batch
            self.misses += len(rows)
            return self.teacher(imgs)
        self.hits += len(rows)
        return self.logits[rows].to(imgs.device)


class KDObjective(ClassifyObjective):
    def __init__(self, teacher: nn.Module, num_classes: int, kind: str = "soft", weight: float = 0.5,
                 temperature: float = 1.0, **classify_kwargs):
        super().__init__(num_classes, **classify_kwargs)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"kd.weight must be in [0, 1], got {weight}")
        kd_term(torch.zeros(1, 2), torch.zeros(1, 2), kind, temperature)  # validates kind early
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.weight, self.temperature = kind, weight, temperature
        self.cached: Optional[CachedTeacherLogits] = None

    @staticmethod
    def teacher_logits_cached(spec: FinetuneStage, device_type: str) -> bool:
        """Whether a KD fine-tune looks its teacher's logits up (CachedTeacherLogits) instead of running the
        teacher every step: on CPU, for the in-memory dataset at its native 28 px with a flip-only augmentation (no
        crop, RandAug, erasing, Mixup or CutMix), where every training input is an image or its mirror. `prepare` and
        the cost estimate (harness.bench.estimate) both ask this."""
        f, data = spec.finetune, spec.data
        return spec.kd is not None and device_type == "cpu" and data.name == "fashion_mnist" and data.img_size == 28 \
            and f.crop_min >= 1.0 and not f.randaug and not f.reprob and not f.mixup and not f.cutmix

    def cache_teacher_logits(self, views: Iterable[torch.Tensor]) -> CachedTeacherLogits:
        self.cached = CachedTeacherLogits(self.teacher, views)
        return self.cached

    def prepare(self, spec: FinetuneStage, train_ds, rt: Runtime) -> None:
        """Before training: the teacher's logits of every view of the training set, once, where the rule holds
        and the training set confirms that its augmentation is flip-only."""
        if not (self.teacher_logits_cached(spec, rt.device.type) and train_ds.flip_only):
            return
        t0 = time.time()
        cache = self.cache_teacher_logits(train_ds.flip_views())
        rt.log(f"[{spec.name}] teacher logits of {len(cache)} views (each image and its mirror) computed once "
               f"({time.time() - t0:.1f} s): the augmentation is flip-only")

    def result_fields(self) -> dict:
        """The cache's counts when there is one (a resumed run counts only its own epochs)."""
        c = self.cached
        if c is None:
            return {}
        return {"kd_cached_views": len(c), "kd_cache_hits": c.hits, "kd_cache_misses": c.misses}

    def __call__(self, model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Terms]:
        imgs, targets = self.mix(imgs, labels)
        logits = model(imgs)
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.cached(imgs) if self.cached is not None else self.teacher(imgs)
        loss_ce = self.criterion(logits, targets)
        loss_kd = kd_term(logits, teacher_logits, self.kind, self.temperature)
        loss = (1.0 - self.weight) * loss_ce + self.weight * loss_kd
        return loss, {"loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}
