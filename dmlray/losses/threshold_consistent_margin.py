"""Threshold-consistent margin (TCM) loss (Zhang et al., ICCV 2023)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.block import BlockLoss
from dmlray.losses.pair_statistics import mean_over
from dmlray.losses.registry import register


@register("threshold_consistent_margin")
class ThresholdConsistentMarginLoss(BlockLoss):
    """L = λ⁺·mean_{(a,p): s_ap ≤ m⁺}(m⁺ − s_ap) + λ⁻·mean_{(a,n): s_an ≥ m⁻}(s_an − m⁻).

    The means run over the batch's positive / negative pairs past their margin (0 when
    none is). Paper: "Threshold-Consistent Margin Loss for Open-World Deep Metric
    Learning", Zhang et al., ICCV 2023 (meant as a regulariser beside a base loss).
    Defaults (pytorch-metric-learning's): λ⁺ = λ⁻ = 1, m⁺ = 0.9, m⁻ = 0.5. With
    references the pairs are anchor × reference.
    """

    rank_decomposable = False  # two means over the batch's pairs, each with its own count

    def __init__(
        self, lambda_plus: float = 1.0, lambda_minus: float = 1.0, margin_plus: float = 0.9, margin_minus: float = 0.5
    ):
        super().__init__()
        self.lambda_plus = lambda_plus
        self.lambda_minus = lambda_minus
        self.margin_plus = margin_plus
        self.margin_minus = margin_minus

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        s = pairs.sim
        pos = mean_over(self.margin_plus - s, pairs.pos & (s <= self.margin_plus))
        neg = mean_over(s - self.margin_minus, pairs.neg & (s >= self.margin_minus))
        return self.lambda_plus * pos + self.lambda_minus * neg
