"""Lifted structure loss, in the smooth per-anchor form of the MS code base."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, masked_logsumexp
from dmlray.losses.registry import register
from dmlray.losses.rowwise import MinedRowwiseLoss


@register("lifted_structure")
class LiftedStructureLoss(MinedRowwiseLoss):
    """L_i = (2/β)·log Σ_{p∈P_i} e^{−β s_ip} + (2/α)·log Σ_{n∈N_i} e^{α s_in}; mean over anchors.

    An anchor with no positive or no negative (after mining) contributes 0. Paper: "Deep
    Metric Learning via Lifted Structured Feature Embedding", Oh Song et al., CVPR 2016;
    this modified form is the one benchmarked with MS loss (Wang et al., CVPR 2019).
    Defaults: α = 40, β = 2, no mining; ``mining="ms"`` with ε = ``mining_margin`` = 0.1 is
    the optional MS mining (any ``dmlray.losses.miners.mine_pairs`` method works).
    """

    def __init__(self, alpha: float = 40.0, beta: float = 2.0, mining: str | None = None, mining_margin: float = 0.1):
        super().__init__(mining, mining_margin)
        self.alpha = alpha
        self.beta = beta

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        s = pairs.sim
        pos, neg = self.mined(pairs)
        pos_lse, has_pos = masked_logsumexp(-self.beta * s, pos)
        neg_lse, has_neg = masked_logsumexp(self.alpha * s, neg)
        value = 2.0 / self.beta * pos_lse + 2.0 / self.alpha * neg_lse
        return torch.where(has_pos & has_neg, value, torch.zeros_like(value))
