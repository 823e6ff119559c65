"""Ranked list loss (Wang et al., CVPR 2019), as in the CBML code base."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, euclidean_from_sim
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("ranked_list")
class RankedListLoss(RowwiseLoss):
    """L_i = Σ_{P_i} [d_ip + m − α]_+ / (|P_i| + 1e-5) + Σ_{n∈N_i, d_in<α} w_in (α − d_in) / (Σ w_in + 1e-5).

    w_in = e^{T(α − d_in)}; d is the Euclidean distance of the normalised embeddings; mean
    over anchors. Paper: "Ranked List Loss for Deep Metric Learning", Wang et al., CVPR
    2019. Defaults (CBML code base): m = 0.4, α = 1.4, T = 10. The weighted mean is
    computed with weights shifted by their row maximum, exactly (the 1e-5 scaled along).
    """

    def __init__(self, margin: float = 0.4, alpha: float = 1.4, temperature: float = 10.0):
        super().__init__()
        self.margin = margin
        self.alpha = alpha
        self.temperature = temperature

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        dist = euclidean_from_sim(pairs.sim)
        zero = torch.zeros_like(dist)
        pos_hinge = torch.where(pairs.pos, torch.relu(dist + self.margin - self.alpha), zero).sum(dim=1)
        pos_term = pos_hinge / (pairs.pos.sum(dim=1).to(dist.dtype) + 1e-5)

        inside = pairs.neg & (dist < self.alpha)
        logit = torch.where(inside, self.temperature * (self.alpha - dist), torch.full_like(dist, float("-inf")))
        shift = logit.detach().amax(dim=1, keepdim=True).clamp(min=0)
        weight = torch.exp(logit - shift)  # 0 outside
        num = (weight * torch.where(inside, self.alpha - dist, zero)).sum(dim=1)
        den = weight.sum(dim=1) + 1e-5 * torch.exp(-shift.squeeze(1))
        return pos_term + num / den
