"""Binomial deviance loss (Yi et al., 2014), as benchmarked with MS loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlray.losses.base import Pairs, masked_mean
from dmlray.losses.registry import register
from dmlray.losses.rowwise import MinedRowwiseLoss


@register("binomial_deviance")
class BinomialDevianceLoss(MinedRowwiseLoss):
    """L_i = mean_{p∈P_i} log(1 + e^{−β(s_ip − λ)}) + mean_{n∈N_i} log(1 + e^{α(s_in − λ)}).

    Mean over anchors; an anchor with no positive or no negative (after mining)
    contributes 0. Paper: "Deep Metric Learning for Person Re-identification", Yi et al.,
    ICPR 2014 (the binomial deviance of "Learning Deep Embeddings with Histogram Loss" and
    the MS paper's benchmark). Defaults: α = 40, β = 2, λ = 0.5, no mining; ``mining="ms"``
    (ε = ``mining_margin`` = 0.1) is the optional MS mining. Softplus keeps α = 40 stable.
    """

    def __init__(
        self,
        alpha: float = 40.0,
        beta: float = 2.0,
        base: float = 0.5,
        mining: str | None = None,
        mining_margin: float = 0.1,
    ):
        super().__init__(mining, mining_margin)
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        s = pairs.sim
        pos, neg = self.mined(pairs)
        pos_term = masked_mean(F.softplus(-self.beta * (s - self.base)), pos)
        neg_term = masked_mean(F.softplus(self.alpha * (s - self.base)), neg)
        valid = pos.any(dim=1) & neg.any(dim=1)
        return torch.where(valid, pos_term + neg_term, torch.zeros_like(pos_term))
