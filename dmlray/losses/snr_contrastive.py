"""Signal-to-noise-ratio contrastive loss (Yuan et al., CVPR 2019)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, compute_dtype
from dmlray.losses.block import BlockLoss
from dmlray.losses.pair_statistics import mean_over
from dmlray.losses.registry import register


def snr_distance(embeddings: torch.Tensor, refs: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """(B, M) d_ar = Var(a − r) / Var(a) from the products ``dot`` = E·Rᵀ (in the compute dtype).

    Var is the unbiased variance over the D components; Var(a − r) = (‖a‖² + ‖r‖² − 2a·r
    − (Σa − Σr)²/D) / (D − 1), so no (B, M, D) difference tensor is formed.
    """
    dim = embeddings.shape[1]
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        dtype = compute_dtype(embeddings)
        x, r = embeddings.to(dtype), refs.to(dtype)
        sq_x, sq_r = (x * x).sum(dim=1), (r * r).sum(dim=1)
        sum_x, sum_r = x.sum(dim=1), r.sum(dim=1)
        diff_sum = sum_x.unsqueeze(1) - sum_r.unsqueeze(0)
        var_diff = (sq_x.unsqueeze(1) + sq_r.unsqueeze(0) - 2.0 * dot - diff_sum * diff_sum / dim) / (dim - 1)
        var_x = (sq_x - sum_x * sum_x / dim) / (dim - 1)
        return var_diff / var_x.unsqueeze(1)


@register("snr_contrastive")
class SignalToNoiseRatioContrastiveLoss(BlockLoss):
    """L = mean_{P, d>m⁺}(d_ap − m⁺) + mean_{N, d<m⁻}(m⁻ − d_an), d = Var(a − r) / Var(a).

    Each mean runs over the pairs whose term is non-zero (0 when none is). Paper: "Signal-
    To-Noise Ratio: A Robust Distance Metric for Deep Metric Learning", Yuan et al., CVPR
    2019. Defaults (pytorch-metric-learning's): m⁺ = ``pos_margin`` = 0, m⁻ =
    ``neg_margin`` = 1. With references the pairs are anchor × reference.
    """

    rank_decomposable = False  # two means over the batch's active pairs, each with its own count

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0):
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[1] < 2:
            raise ValueError(f"the SNR distance needs embeddings of dimension ≥ 2, got {embeddings.shape[1]}")
        dist = snr_distance(embeddings, refs, pairs.sim)
        pos_term = torch.relu(dist - self.pos_margin)
        neg_term = torch.relu(self.neg_margin - dist)
        return mean_over(pos_term, pairs.pos & (pos_term > 0)) + mean_over(neg_term, pairs.neg & (neg_term > 0))
