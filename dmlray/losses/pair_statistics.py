"""Means over all the selected pairs of a similarity block (not per anchor).

Losses built from such means (a mean over the batch's positive pairs plus one over its
negative pairs, or a batch-wide mean inside each term) are not sums of per-anchor terms:
they declare ``rank_decomposable = False`` and the trainer computes them over the whole
global batch on every rank.
"""

from __future__ import annotations

import torch


def mean_over(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask; 0 (graph-attached, no nan) when there are none."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1).to(x.dtype)
