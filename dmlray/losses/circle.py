"""Circle loss (Sun et al., CVPR 2020) for pairwise labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlray.losses.base import Pairs, masked_logsumexp
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("circle")
class CircleLoss(RowwiseLoss):
    """L_i = softplus( log Σ_{P_i} e^{−γ a_p (s_ip − Δ_p)} + log Σ_{N_i} e^{γ a_n (s_in − Δ_n)} ).

    a_p = [1 + m − s_ip]_+ and a_n = [s_in + m]_+ (no gradient through them), Δ_p = 1 − m,
    Δ_n = m; an anchor with no positive or no negative contributes 0; mean over anchors.
    Paper: "Circle Loss: A Unified Perspective of Pair Similarity Optimization", Sun et al.,
    CVPR 2020. Defaults (fine-grained retrieval in the paper): m = 0.4, γ = 80.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        self.m = m
        self.gamma = gamma

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        s = pairs.sim
        a_p = torch.relu(1.0 + self.m - s.detach())
        a_n = torch.relu(s.detach() + self.m)
        pos_lse, has_pos = masked_logsumexp(-self.gamma * a_p * (s - (1.0 - self.m)), pairs.pos)
        neg_lse, has_neg = masked_logsumexp(self.gamma * a_n * (s - self.m), pairs.neg)
        value = F.softplus(pos_lse + neg_lse)
        return torch.where(has_pos & has_neg, value, torch.zeros_like(value))
