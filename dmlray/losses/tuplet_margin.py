"""Tuplet margin loss (Yu & Tao, ICCV 2019)."""

from __future__ import annotations

import math

import torch

from dmlray.losses.positive_pair_softmax import PositivePairSoftmaxLoss
from dmlray.losses.registry import register


@register("tuplet_margin")
class TupletMarginLoss(PositivePairSoftmaxLoss):
    """L = mean over positive pairs (a, p) of log(1 + Σ_{n∈N_a} e^{s·(cos θ_an − cos(θ_ap − β))}).

    Paper: "Deep Metric Learning with Tuplet Margin Loss", Yu & Tao, ICCV 2019 (the
    paper's intra-pair variance term is the separate ``intra_pair_variance`` loss).
    Defaults (pytorch-metric-learning's): β = 5.73° (``margin``, in degrees), s = 64.
    cos(θ − β) is c·cos β + sin θ·sin β with sin θ clamped away from 0 (no acos: finite
    gradients for duplicates).
    """

    def __init__(self, margin: float = 5.73, scale: float = 64.0):
        super().__init__()
        self.margin = margin
        self.scale = scale

    def negative_logits(self, sim: torch.Tensor) -> torch.Tensor:
        return self.scale * sim

    def positive_logits(self, sim: torch.Tensor) -> torch.Tensor:
        beta = math.radians(self.margin)
        c = sim.clamp(-1.0, 1.0)
        sin = torch.sqrt((1.0 - c * c).clamp(min=1e-12))
        return self.scale * (c * math.cos(beta) + sin * math.sin(beta))
