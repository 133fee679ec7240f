"""The frozen-feature probe: how much a pre-trained encoder's features say about the labels, with no training.

A weighted k-nearest-neighbour classifier on frozen features, as DINO's kNN evaluation (Caron et al. 2021,
`eval_knn.py`): each image is the mean of one block's patch tokens (the class token left out, the raw block output
before any final norm: the same tensor DMAE's feature loss reads), L2-normalised; a query takes the k training
images of highest cosine similarity, each voting for its label with weight exp(similarity / T). The training images
with their labels are the memory bank; the queries are the validation split (tuning, monitoring) or the test split
(the number a report shows).

Probes expose what fine-tuning washes out: with a few fine-tuning epochs every start can reach the same accuracy,
while the probe still separates an MAE encoder from a random one and a teacher's features from a student's.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from harness.core.data import loader

KNN_K = 20
KNN_T = 0.07  # DINO's temperature


@torch.no_grad()
def block_features(encoder, dataset, block: int, batch_size: int = 512, device: Optional[torch.device] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 L2-normalised, labels (N,)) of a split: the mean of block `block`'s patch tokens
    (0-based; the encoder runs only up to it), every image in order."""
    encoder.eval()
    device = device or torch.device("cpu")
    feats, labels = [], []
    for imgs, y in loader(dataset, batch_size, False, None):
        _, out = encoder.forward_encoder(imgs.to(device), None, out_blocks=(block,), stop_after=block)
        feats.append(F.normalize(out[block][:, 1:].float().mean(1), dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
             query_labels: torch.Tensor, num_classes: int, k: int = KNN_K, temperature: float = KNN_T,
             chunk: int = 1024) -> Dict[str, float]:
    """Top-1 (%) of the weighted kNN vote of normalised features (DINO's rule: weight exp(cos / T))."""
    if len(train_feats) < k:
        raise ValueError(f"kNN probe: k={k} neighbours but only {len(train_feats)} training images")
    correct = 0
    for s in range(0, len(query_feats), chunk):
        sim = query_feats[s:s + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim.double() / temperature).exp())
        correct += (votes.argmax(1) == query_labels[s:s + chunk]).sum().item()
    return {"top1": 100.0 * correct / len(query_feats), "n_eval": len(query_feats), "k": k,
            "temperature": temperature}
