"""Smooth-AP (Brown et al., ECCV 2020): average precision with sigmoid-relaxed ranks."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.block import BlockLoss
from dmlray.losses.registry import register


@register("smooth_ap")
class SmoothAPLoss(BlockLoss):
    """L = mean over anchors q with a positive of 1 − (1/|P_q|) Σ_{i∈P_q} R⁺(i) / R(i).

    R(i) = 1 + Σ_{j∈Ω_q, j≠i} σ((s_qj − s_qi)/τ) is i's smoothed rank among all the
    other samples Ω_q, R⁺(i) the same over the positives P_q. Paper: "Smooth-AP:
    Smoothing the Path Towards Large-Scale Image Retrieval", Brown et al., ECCV 2020.
    Default (the paper's): τ = 0.01. The query is left out of its own ranking (the
    authors' code and pytorch-metric-learning's port count it among its positives, and
    need classes of equal size in contiguous blocks; this form takes any labels).

    The ranks cost B·B² sigmoids, which is fine for a batch and not for a memory:
    references are refused, and the loss is computed over the whole global batch.
    """

    supports_references = False  # B·M² sigmoids against M references
    rank_decomposable = False  # every anchor ranks the whole global batch

    def __init__(self, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        s = pairs.sim
        # (B, i, j): σ((s_qj − s_qi)/τ) over j ∈ Ω_q, j ≠ i
        sigma = torch.sigmoid((s.unsqueeze(1) - s.unsqueeze(2)) / self.temperature)
        others = pairs.not_self.unsqueeze(1) & ~torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
        zero = torch.zeros_like(sigma)
        rank_all = 1.0 + torch.where(others, sigma, zero).sum(dim=2)
        rank_pos = 1.0 + torch.where(others & pairs.pos.unsqueeze(1), sigma, zero).sum(dim=2)
        num_pos = pairs.pos.sum(dim=1)
        ratio = torch.where(pairs.pos, rank_pos / rank_all, torch.zeros_like(rank_all))
        ap = ratio.sum(dim=1) / num_pos.clamp(min=1).to(s.dtype)
        has_pos = num_pos > 0
        return torch.where(has_pos, 1.0 - ap, torch.zeros_like(ap)).sum() / has_pos.sum().clamp(min=1)
