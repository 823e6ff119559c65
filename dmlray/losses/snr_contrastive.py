"""Signal-to-noise-ratio contrastive loss (Yuan et al., CVPR 2019)."""

from __future__ import annotations

import torch

from dmlray.losses.base import PairLoss, compute_dtype, pairs_from_sim, resolve_references
from dmlray.losses.pair_statistics import mean_over
from dmlray.losses.registry import register


def snr_distance(embeddings: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, M) d_ar = Var(a − r) / Var(a), (B, M) a·r), from one product E·Rᵀ.

    Var is the unbiased variance over the D components; Var(a − r) = (‖a‖² + ‖r‖² − 2a·r
    − (Σa − Σr)²/D) / (D − 1), so no (B, M, D) difference tensor is formed.
    """
    dim = embeddings.shape[1]
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        dtype = compute_dtype(embeddings)
        x, r = embeddings.to(dtype), refs.to(dtype)
        dot = x @ r.T
        sq_x, sq_r = (x * x).sum(dim=1), (r * r).sum(dim=1)
        sum_x, sum_r = x.sum(dim=1), r.sum(dim=1)
        diff_sum = sum_x.unsqueeze(1) - sum_r.unsqueeze(0)
        var_diff = (sq_x.unsqueeze(1) + sq_r.unsqueeze(0) - 2.0 * dot - diff_sum * diff_sum / dim) / (dim - 1)
        var_x = (sq_x - sum_x * sum_x / dim) / (dim - 1)
        return var_diff / var_x.unsqueeze(1), dot


@register("snr_contrastive")
class SignalToNoiseRatioContrastiveLoss(PairLoss):
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

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        refs, ref_labels, self_index = resolve_references(embeddings, labels, ref_embeddings, ref_labels, self_index)
        if embeddings.shape[1] < 2:
            raise ValueError(f"the SNR distance needs embeddings of dimension ≥ 2, got {embeddings.shape[1]}")
        dist, dot = snr_distance(embeddings, refs)
        pairs = pairs_from_sim(dot, labels, ref_labels, self_index)
        pos_term = torch.relu(dist - self.pos_margin)
        neg_term = torch.relu(self.neg_margin - dist)
        return mean_over(pos_term, pairs.pos & (pos_term > 0)) + mean_over(neg_term, pairs.neg & (neg_term > 0))
