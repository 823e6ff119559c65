"""Histogram loss (Ustinova & Lempitsky, NIPS 2016)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.block import BlockLoss
from dmlray.losses.registry import register


@register("histogram")
class HistogramLoss(BlockLoss):
    """L = Σ_r h⁻_r · Σ_{q≤r} h⁺_q: the probability that a negative pair is more similar than a positive.

    h⁺, h⁻ are the histograms of positive / negative pair similarities on ``num_steps``
    evenly spaced nodes over [−1, 1] with linear (triangular) binning, each normalised by
    its pair count. Every (anchor, reference) pair counts once; without references a pair
    appears as (i, j) and (j, i), which leaves the normalised histograms unchanged. No
    positive or no negative pair gives 0. Paper: "Learning Deep Embeddings with Histogram
    Loss", Ustinova & Lempitsky, NIPS 2016. Default (CBML code base): 1000 nodes.
    """

    rank_decomposable = False  # histograms of all the global batch's pairs

    def __init__(self, num_steps: int = 1000):
        super().__init__()
        if num_steps < 2:
            raise ValueError("num_steps must be at least 2")
        self.num_steps = num_steps

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        h_pos, n_pos = self._histogram(pairs.sim, pairs.pos)
        h_neg, n_neg = self._histogram(pairs.sim, pairs.neg)
        loss = (h_neg * torch.cumsum(h_pos, dim=0)).sum()
        return torch.where((n_pos > 0) & (n_neg > 0), loss, loss * 0.0)

    def _histogram(self, sim: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = 2.0 / (self.num_steps - 1)
        pos = (sim.clamp(-1.0, 1.0) + 1.0) / step  # position in units of nodes
        left = pos.detach().floor().clamp(max=self.num_steps - 2)
        frac = pos - left  # weight of the right node; gradient flows through it
        keep = mask.to(sim.dtype)
        hist = sim.new_zeros(self.num_steps)
        index = left.long().flatten()
        hist = hist.scatter_add(0, index, ((1.0 - frac) * keep).flatten())
        hist = hist.scatter_add(0, index + 1, (frac * keep).flatten())
        count = keep.sum()
        return hist / count.clamp(min=1), count
