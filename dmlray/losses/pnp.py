"""PNP loss (Li et al., AAAI 2022): penalise only the negatives ranked before each positive."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs
from dmlray.losses.block import BlockLoss
from dmlray.losses.registry import register

PNP_VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")


def clamped_sigmoid(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """σ(x/τ) with the exponent clamped to [−50, 50] (the authors' code: flat beyond)."""
    return 1.0 / (1.0 + torch.exp((-x / temperature).clamp(-50.0, 50.0)))


@register("pnp")
class PNPLoss(BlockLoss):
    """L = mean over anchors q of (1/|P_q|) Σ_{i∈P_q} f(R⁻(i)), R⁻(i) = Σ_{j∈N_q} σ((s_qj − s_qi)/τ).

    R⁻(i) counts (smoothly) the negatives ranked above positive i; P_q includes the
    query itself (rank 1: its R⁻ is ~0), as in the authors' code. f by ``variant``:
    "O" R, "Ds" log(1 + R), "Dq" the loss is 1 − mean (1 + R)^−α, "Iu" (1 + R)·log(1 + R),
    "Ib" (bR − log(1 + bR))/b². Paper: "Rethinking the Optimization of Average Precision:
    Only Penalizing Negative Instances before Positive Ones is Enough", Li et al., AAAI
    2022. Defaults (pytorch-metric-learning's): b = 2, α = 1, τ = ``anneal`` = 0.01,
    variant "O". The ranks cost B·B² sigmoids: references are refused and the loss is
    computed over the whole global batch.
    """

    supports_references = False  # B·M² sigmoids against M references
    rank_decomposable = False  # every anchor ranks the whole global batch

    def __init__(self, b: float = 2.0, alpha: float = 1.0, anneal: float = 0.01, variant: str = "O"):
        super().__init__()
        if variant not in PNP_VARIANTS:
            raise ValueError(f"variant must be one of {PNP_VARIANTS}, got {variant!r}")
        self.b = b
        self.alpha = alpha
        self.anneal = anneal
        self.variant = variant

    def _transform(self, rank: torch.Tensor) -> torch.Tensor:
        if self.variant == "Ds":
            return torch.log1p(rank)
        if self.variant == "Dq":
            return (1.0 + rank) ** -self.alpha
        if self.variant == "Iu":
            return (1.0 + rank) * torch.log1p(rank)
        if self.variant == "Ib":
            return (self.b * rank - torch.log1p(self.b * rank)) / self.b**2
        return rank

    def block_loss(self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        s = pairs.sim
        if s.shape[0] == 0:
            return s.sum() * 0.0
        # (q, i, j): negative j of q ranked above i
        above = clamped_sigmoid(s.unsqueeze(1) - s.unsqueeze(2), self.anneal)
        rank = torch.where(pairs.neg.unsqueeze(1), above, torch.zeros_like(above)).sum(dim=2)
        positives = pairs.pos | ~pairs.not_self  # the query is its own first positive
        per_pos = torch.where(positives, self._transform(rank), torch.zeros_like(rank))
        per_query = per_pos.sum(dim=1) / positives.sum(dim=1).to(s.dtype)
        loss = per_query.mean()
        return 1.0 - loss if self.variant == "Dq" else loss
