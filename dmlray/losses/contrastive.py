"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) in the cosine form of XBM."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.registry import register
from dmlray.losses.rowwise import MinedRowwiseLoss


@register("contrastive")
class ContrastiveLoss(MinedRowwiseLoss):
    """L_i = Σ_{p∈P_i} (1 − s_ip) + Σ_{n∈N_i, s_in > m} s_in; mean over anchors.

    Paper: "Dimensionality Reduction by Learning an Invariant Mapping", Hadsell et al.,
    CVPR 2006; this cosine form (sums per anchor, divided by the batch size) is the one
    of XBM ("Cross-Batch Memory for Embedding Learning", Wang et al., CVPR 2020).
    Defaults: m = 0.5, no mining. ``mining`` (see ``dmlray.losses.miners.mine_pairs``) restricts
    both sums to the mined pairs; ``mining_margin`` is MS mining's ε.
    """

    def __init__(self, margin: float = 0.5, mining: str | None = None, mining_margin: float = 0.1):
        super().__init__(mining, mining_margin)
        self.margin = margin

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        s = pairs.sim
        pos, neg = self.mined(pairs)
        zero = torch.zeros_like(s)
        pos_term = torch.where(pos, 1.0 - s, zero).sum(dim=1)
        neg_term = torch.where(neg & (s > self.margin), s, zero).sum(dim=1)
        return pos_term + neg_term
