"""Clustering loss of the CBML code base: class centres against each other in the batch."""

from __future__ import annotations

import torch

from dmlray.losses.base import WithinBatchLoss, compute_dtype
from dmlray.losses.registry import register


@register("cluster")
class ClusterLoss(WithinBatchLoss):
    """L = mean over classes c of [max_{i∈c} ‖μ_c − x_i‖ − min_{c'≠c} ‖μ_c − μ_{c'}‖ + m]_+.

    μ_c is the batch mean of class c. Classes are found with masks (no unique(), no host
    sync): each sample carries its class's centre and statistics, and a class's value is
    averaged over its samples. A batch with one class has no inter-class distance; its
    loss is 0. Paper: "Cluster Loss for Person Re-Identification", Alex et al., ICVGIP
    2018. Default (CBML code base): m = 10. The loss is defined on the batch's classes,
    so ``supports_references = False``.
    """

    rank_decomposable = False  # clusters the global batch as a whole

    def __init__(self, margin: float = 10.0):
        super().__init__()
        self.margin = margin

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = embeddings.to(compute_dtype(embeddings))
        if x.shape[0] == 0:
            return x.sum() * 0.0
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        weights = same.to(x.dtype)
        size = weights.sum(dim=1)  # samples in my class (≥ 1: myself)
        centre = weights @ x / size.unsqueeze(1)  # (B, D): my class's centre
        to_members = _dist(centre, x)  # ‖μ_{c(i)} − x_j‖
        intra = torch.where(same, to_members, torch.zeros_like(to_members)).amax(dim=1)
        between = _dist(centre, centre)
        inter = torch.where(~same, between, torch.full_like(between, float("inf"))).amin(dim=1)
        per_sample = torch.relu(intra - inter + self.margin)
        has_other = (~same).any(dim=1)
        per_sample = torch.where(has_other, per_sample, torch.zeros_like(per_sample))
        # each class counts once: its samples share its value, weighted 1/size
        num_classes = (1.0 / size).sum()
        return (per_sample / size).sum() / num_classes


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances with the seed code's clamp at 1e-12 before the square root."""
    sq = (a * a).sum(dim=1, keepdim=True) + (b * b).sum(dim=1).unsqueeze(0) - 2.0 * a @ b.T
    return sq.clamp(min=1e-12).sqrt()
