"""Dynamic soft margin loss (Zhang & Rusinkiewicz, ICCV 2019): triplets weighted by a running CDF."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, euclidean_from_sim
from dmlray.losses.block import BlockLoss
from dmlray.losses.registry import register


@register("dynamic_soft_margin")
class DynamicSoftMarginLoss(BlockLoss):
    """L = mean over all triplets (a, p, n) of F(x)·x, x = d_ap − d_an.

    F is the CDF of a running histogram of x: ``num_bins`` bins of width δ = 2|min_val| /
    num_bins from ``min_val``, each batch's x added with linear interpolation between
    neighbouring bins and blended in with weight ``momentum`` (1 on the first batch); the
    gradient flows through the current batch's share of the histogram, as in
    pytorch-metric-learning. Values past the last bin count in it (PML indexes past its
    end there). d is the Euclidean distance of the normalised embeddings. Paper:
    "Learning Local Descriptors with a CDF-Based Dynamic Soft Margin", Zhang &
    Rusinkiewicz, ICCV 2019. Defaults (PML's): min_val = −2, num_bins = 10, momentum = 0.01.

    The histogram is a buffer (checkpointed with the loss) updated at every call. All
    B·|P|·|N| triplets are formed: references are refused, and the loss is computed over
    the whole global batch (the histogram then stays identical on every rank).
    """

    supports_references = False  # all triplets: B·M² against M references
    rank_decomposable = False  # one histogram of the whole batch's triplets

    hist: torch.Tensor

    def __init__(self, min_val: float = -2.0, num_bins: int = 10, momentum: float = 0.01):
        super().__init__()
        if int(num_bins) != num_bins or num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.min_val = min_val
        self.num_bins = int(num_bins)
        self.delta = 2.0 * abs(min_val) / num_bins
        self.momentum = momentum
        self.register_buffer("hist", torch.zeros(self.num_bins))

    def _bins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position = (x - self.min_val) / self.delta
        index = torch.floor(position.detach()).long()
        return index.clamp(0, self.num_bins - 1), position - index  # frac, with x's gradient

    def _updated_histogram(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The running histogram with this batch's kept x blended in (differentiable in x)."""
        index, frac = self._bins(x)
        weight = keep.to(x.dtype)
        old = self.hist.to(x.dtype)
        momentum = torch.where(old.sum() != 0, torch.full_like(old[0], self.momentum), torch.ones_like(old[0]))
        lower = torch.zeros_like(old).scatter_add(0, index.flatten(), (weight * (1.0 - frac)).flatten())
        upper = torch.zeros_like(old).scatter_add(
            0, (index + 1).clamp(max=self.num_bins - 1).flatten(), (weight * frac).flatten()
        )
        hist = (1.0 - momentum) * old + momentum * (lower + upper)
        return hist / hist.sum()

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        dist = euclidean_from_sim(pairs.sim)
        # (a, p, n) in one (B, B, B) block
        x = dist.unsqueeze(2) - dist.unsqueeze(1)
        keep = pairs.pos.unsqueeze(2) & pairs.neg.unsqueeze(1)
        count = keep.sum()
        x = torch.where(keep, x, torch.zeros_like(x))
        hist = self._updated_histogram(x, keep)
        # a batch without triplets leaves the histogram as it was
        with torch.no_grad():
            self.hist.copy_(torch.where(count > 0, hist.detach(), self.hist.to(hist.dtype)).to(self.hist.dtype))
        index, _ = self._bins(x)
        weighted = torch.cumsum(hist, 0)[index] * x
        return torch.where(keep, weighted, torch.zeros_like(weighted)).sum() / count.clamp(min=1).to(x.dtype)
