"""Intra-pair variance loss (Yu & Tao, ICCV 2019)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.block import BlockLoss
from dmlray.losses.pair_statistics import mean_over
from dmlray.losses.registry import register


@register("intra_pair_variance")
class IntraPairVarianceLoss(BlockLoss):
    """L = mean_{P}[(1 − ε⁺)·s̄⁺ − s_ap]_+² + mean_{N}[s_an − (1 + ε⁻)·s̄⁻]_+².

    s̄⁺ / s̄⁻ are the means of the batch's positive / negative similarities (part of the
    graph); an empty set contributes 0. Paper: "Deep Metric Learning with Tuplet Margin
    Loss", Yu & Tao, ICCV 2019 (used beside ``tuplet_margin``). Defaults
    (pytorch-metric-learning's): ε⁺ = ``pos_eps`` = 0.01, ε⁻ = ``neg_eps`` = 0.01. With
    references the pairs are anchor × reference.
    """

    rank_decomposable = False  # batch-wide means inside every term

    def __init__(self, pos_eps: float = 0.01, neg_eps: float = 0.01):
        super().__init__()
        self.pos_eps = pos_eps
        self.neg_eps = neg_eps

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        s = pairs.sim
        pos_spread = torch.relu((1.0 - self.pos_eps) * mean_over(s, pairs.pos) - s) ** 2
        neg_spread = torch.relu(s - (1.0 + self.neg_eps) * mean_over(s, pairs.neg)) ** 2
        return mean_over(pos_spread, pairs.pos) + mean_over(neg_spread, pairs.neg)
