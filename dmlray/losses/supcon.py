"""Supervised contrastive loss (Khosla et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, masked_logsumexp, masked_mean
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("supcon")
class SupConLoss(RowwiseLoss):
    """L_i = −mean_{p∈P_i} [ s_ip/τ − log Σ_{k≠i} e^{s_ik/τ} ]; mean over anchors.

    An anchor with no positive contributes 0. Paper: "Supervised Contrastive Learning",
    Khosla et al., NeurIPS 2020 (the L_out form). Default: τ = 0.1.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        logits = pairs.sim / self.temperature
        denominator, _ = masked_logsumexp(logits, pairs.not_self)
        value = denominator - masked_mean(logits, pairs.pos)
        return torch.where(pairs.pos.any(dim=1), value, torch.zeros_like(value))
