"""FastAP (Cakir et al., CVPR 2019): average precision through a soft histogram of distances."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("fast_ap")
class FastAPLoss(RowwiseLoss):
    """L = mean over anchors with a positive of 1 − (1/N⁺) Σ_b h⁺_b H⁺_b / H_b.

    Squared distances d² = ‖x − r‖² ∈ [0, 4] are binned by triangular kernels
    δ_b(d²) = [1 − |d² − c_b| / Δ]_+ at the L + 1 points c_b = bΔ, Δ = 4/L; h⁺_b / h⁻_b
    sum them over the anchor's positives / negatives, H⁺ / H are the cumulative sums of
    h⁺ / h⁺ + h⁻ (terms with h⁺H⁺ = 0 or H = 0 are 0). Paper: "Deep Metric Learning to
    Rank", Cakir et al., CVPR 2019. Default (pytorch-metric-learning's): L =
    ``num_bins`` = 10. Anchors rank the references (memory, gathered batch) like the batch.
    """

    pair_mean = True  # a mean over the anchors that have a positive: the count is summed over ranks

    def __init__(self, num_bins: int = 10):
        super().__init__()
        if int(num_bins) != num_bins or num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.num_bins = int(num_bins)

    def per_anchor(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        sq_dist = (2.0 - 2.0 * pairs.sim).clamp(min=0.0)
        delta = 4.0 / self.num_bins
        centres = torch.arange(self.num_bins + 1, dtype=sq_dist.dtype, device=sq_dist.device) * delta
        # (b, M, L + 1) kernel weights: one chunk of rows at a time keeps this small
        pulse = torch.relu(1.0 - (sq_dist.unsqueeze(2) - centres).abs() / delta)
        zero = torch.zeros_like(pulse)
        pos_hist = torch.where(pairs.pos.unsqueeze(2), pulse, zero).sum(dim=1)
        neg_hist = torch.where(pairs.neg.unsqueeze(2), pulse, zero).sum(dim=1)
        product = pos_hist * pos_hist.cumsum(dim=1)
        total = (pos_hist + neg_hist).cumsum(dim=1)
        safe = (product > 0) & (total > 0)
        ratio = torch.where(safe, product / torch.where(safe, total, torch.ones_like(total)), torch.zeros_like(total))
        num_pos = pairs.pos.sum(dim=1)
        has_pos = num_pos > 0
        ap = ratio.sum(dim=1) / num_pos.clamp(min=1).to(ratio.dtype)
        value = torch.where(has_pos, 1.0 - ap, torch.zeros_like(ap))
        return value, has_pos.to(value.dtype)

    def reduce(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return values.sum() / weights.sum().clamp(min=1)
