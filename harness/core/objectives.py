"""Training objectives. Each is a callable `objective(model, images, labels) -> (loss, {term: float tensor})` that
plugs into the one training loop (harness.core.train.fit).

- MAEObjective: per-patch MSE on the masked patches (norm_pix switch).
- DMAEObjective: MAE + alpha * feature distance, summed over aligned pairs, between projected student blocks and
  the teacher's blocks, on the SAME visible patches; the teacher runs in eval mode, without grad, only up to its
  deepest aligned block (teacher_mode='partial'), or all blocks + decoder as the official code does ('full').
- ClassifyObjective: fine-tuning cross-entropy with timm Mixup/CutMix and label smoothing; its `prepare` (once
  before training) and `result_fields` (added to result.json) hooks do nothing.
The fine-tuned-teacher KD baseline lives in baselines/kd.py (a ClassifyObjective; harness.core.build registers it).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from harness.core.models import MaskedAutoencoderViT, Masking, random_masking

Terms = Dict[str, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def pixel_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE (target: patchified images, (B, N, p*p*C))."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str = "l1", normalize: bool = True,
                     include_cls: bool = True) -> torch.Tensor:
    """Distance between (B, 1+n_vis, D) feature maps: L1 (mean over all elements, the official default) or L2
    (MSE), on per-token L2-normalised vectors unless normalize=False."""
    if not include_cls:
        student, teacher = student[:, 1:], teacher[:, 1:]
    student, teacher = student.float(), teacher.float()
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    if distance == "l1":
        return F.l1_loss(student, teacher)
    if distance == "l2":
        return F.mse_loss(student, teacher)
    raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")


class MAEObjective:
    def __init__(self, mask_ratio: float = 0.75, visible_rounding: str = "paper", norm_pix_loss: bool = False):
        self.mask_ratio = mask_ratio
        self.rounding = visible_rounding
        self.norm_pix = norm_pix_loss

    def draw_mask(self, model: nn.Module, imgs: torch.Tensor) -> Masking:
        return random_masking(imgs.shape[0], unwrap(model).num_patches, self.mask_ratio, imgs.device, self.rounding)

    def __call__(self, model: nn.Module, imgs: torch.Tensor, labels: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Terms]:
        masking = self.draw_mask(model, imgs)
        pred, _ = model(imgs, masking)
        loss = pixel_loss(unwrap(model).patchify(imgs), pred, masking.mask, self.norm_pix)
        return loss, {"loss_pix": loss.detach()}


class DMAEObjective(MAEObjective):
    """L = pixel_weight * L_pix + alpha * SUM over pairs k of d(proj_k(student block s_k), teacher block t_k).

    A sum, as the paper's L_Dist (sum over aligned layers) and the official engine (`loss += loss_v` for every aligned
    block). Terms: loss_pix, loss_feat (the sum, before alpha) and loss_feat_<k> for each pair k (in `pairs` order).
    """


    def __init__(self, teacher: MaskedAutoencoderViT, pairs: Sequence[Sequence[int]], alpha: float = 1.0,
                 pixel_weight: float = 1.0, distance: str = "l1", normalize: bool = True, include_cls: bool = True,
                 teacher_mode: str = "partial", **mae_kwargs):
        super().__init__(**mae_kwargs)
        if teacher_mode not in ("partial", "full"):
            raise ValueError(f"teacher_mode must be 'partial' or 'full', got {teacher_mode!r}")
        if teacher_mode == "full" and not teacher.has_decoder:
            raise ValueError("teacher_mode='full' runs the teacher's decoder too: give a teacher checkpoint with one")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_blocks = [int(s) for s, _ in pairs]
        self.teacher_blocks = [int(t) for _, t in pairs]
        self.alpha, self.pixel_weight = alpha, pixel_weight
        self.distance, self.normalize, self.include_cls = distance, normalize, include_cls
        self.teacher_mode = teacher_mode

    @torch.no_grad()
    def teacher_features(self, imgs: torch.Tensor, masking: Masking) -> Sequence[torch.Tensor]:
        self.teacher.eval()
        if self.teacher_mode == "partial":
            _, feats = self.teacher.forward_encoder(imgs, masking.ids_keep, out_blocks=self.teacher_blocks,
                                                    stop_after=max(self.teacher_blocks))
        else:  # the official code's cost: every block, then the decoder, whose output is unused
            latent, feats = self.teacher.forward_encoder(imgs, masking.ids_keep, out_blocks=self.teacher_blocks)
            self.teacher.forward_decoder(latent, masking.ids_restore)
        return [feats[t] for t in self.teacher_blocks]

    def __call__(self, model: nn.Module, imgs: torch.Tensor, labels: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Terms]:
        masking = self.draw_mask(model, imgs)  # one mask, shared by teacher and student
        targets = self.teacher_features(imgs, masking)
        pred, projected = model(imgs, masking, self.student_blocks)
        loss_pix = pixel_loss(unwrap(model).patchify(imgs), pred, masking.mask, self.norm_pix)
        per_pair = [feature_distance(s, t, self.distance, self.normalize, self.include_cls)
                    for s, t in zip(projected, targets)]
        loss_feat = torch.stack(per_pair).sum()
        loss = self.pixel_weight * loss_pix + self.alpha * loss_feat
        terms = {"loss_pix": loss_pix.detach(), "loss_feat": loss_feat.detach()}
        terms.update({f"loss_feat_{k}": d.detach() for k, d in enumerate(per_pair)})
        return loss, terms


class ClassifyObjective:
    """Cross-entropy on Mixup/CutMix soft targets (timm SoftTargetCrossEntropy), or label-smoothed CE without mixing."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, smoothing: float = 0.0):
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                                  num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def prepare(self, spec, train_ds, rt) -> None:
        """What a fine-tuning objective does once before training (harness.core.stages.finetune calls it with the
        stage spec, its training set and the Runtime): nothing here (the KD baseline may cache its teacher's logits)."""

    def result_fields(self) -> dict:
        """What the objective adds to the stage's result.json: nothing here (the KD baseline: its cache's counts)."""
        return {}

    def mix(self, imgs: torch.Tensor, labels: torch.Tensor):
        return self.mixup_fn(imgs, labels) if self.mixup_fn is not None else (imgs, labels)

    def __call__(self, model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Terms]:
        imgs, targets = self.mix(imgs, labels)
        loss = self.criterion(model(imgs), targets)
        return loss, {"loss_ce": loss.detach()}
