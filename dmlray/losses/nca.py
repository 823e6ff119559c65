"""Neighbourhood components analysis loss (Goldberger et al., NIPS 2004) on cosine similarity."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, masked_logsumexp
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("nca")
class NCALoss(RowwiseLoss):
    """L_i = −log( Σ_{p∈P_i} e^{σ s_ip} / Σ_{k≠i} e^{σ s_ik} ); mean over anchors.

    The denominator runs over every reference but the anchor itself. An anchor with no
    positive contributes 0. Paper: "Neighbourhood Components Analysis", Goldberger et al.,
    NIPS 2004 (as a DML loss: Movshovitz-Attias et al., ICCV 2017). Default: σ = 16.
    """

    def __init__(self, scale: float = 16.0):
        super().__init__()
        self.scale = scale

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        logits = self.scale * pairs.sim
        pos_lse, has_pos = masked_logsumexp(logits, pairs.pos)
        all_lse, _ = masked_logsumexp(logits, pairs.not_self)
        value = all_lse - pos_lse
        return torch.where(has_pos, value, torch.zeros_like(value))
