"""Multi-similarity loss (Wang et al., CVPR 2019), with its MS pair mining."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, masked_logsumexp_plus_one
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss
from dmlray.miners import ms_mine


@register("multi_similarity")
class MultiSimilarityLoss(RowwiseLoss):
    """L_i = 1/α·log(1 + Σ_{P'_i} e^{−α(s_ip−λ)}) + 1/β·log(1 + Σ_{N'_i} e^{β(s_in−λ)}).

    P'_i, N'_i come from MS mining with margin ε; an anchor whose P'_i or N'_i is empty
    contributes 0 but counts in the mean. Paper: "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", Wang et al., CVPR 2019. Defaults as the authors'
    code: α=2, β=40 (paper: 50), λ=0.5, ε=0.1.

    Training uses a closed-form gradient per chunk of anchors (``per_anchor_and_grad``);
    ``per_anchor`` is the same definition written with autograd-able masked ops.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5, margin: float = 0.1):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.margin = margin

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        pos, neg = ms_mine(pairs.sim, pairs.pos, pairs.neg, self.margin)
        valid = pos.any(dim=1) & neg.any(dim=1)
        pos_term = masked_logsumexp_plus_one(-self.alpha * (pairs.sim - self.base), pos) / self.alpha
        neg_term = masked_logsumexp_plus_one(self.beta * (pairs.sim - self.base), neg) / self.beta
        return torch.where(valid, pos_term + neg_term, torch.zeros_like(pos_term))

    def per_anchor_and_grad(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values and dL_i/ds_ij of a chunk, overwriting ``pairs.sim`` with the gradient.

        With w_ij = e^{β(s_ij−λ)} on N'_i and e^{−α(s_ij−λ)} on P'_i:
        dL_i/ds_in = w_in / (1 + Σ_{N'_i} w), dL_i/ds_ip = −w_ip / (1 + Σ_{P'_i} w).
        Each log-sum-exp is shifted by its row maximum, which the mining statistics already
        give: for an anchor with pairs, the most similar negative is always in N'_i and
        the least similar positive always in P'_i.
        """
        s = pairs.sim
        inf = float("inf")
        min_pos = torch.where(pairs.pos, s, inf).amin(dim=1)
        max_neg = torch.where(pairs.neg, s, -inf).amax(dim=1)
        min_pos_col, max_neg_col = min_pos.unsqueeze(1), max_neg.unsqueeze(1)
        # the same expressions as ms_mine, so the selection is bit-identical
        drop_neg = ~(pairs.neg & (s + self.margin > min_pos_col))
        drop_pos = ~(pairs.pos & (s - self.margin < max_neg_col))
        # N'_i ≠ ∅ ⟺ max_neg + ε > min_pos and P'_i ≠ ∅ ⟺ min_pos − ε < max_neg (monotone rounding)
        valid = (max_neg + self.margin > min_pos) & (min_pos - self.margin < max_neg)
        zero = torch.zeros_like(min_pos)
        shift_neg = torch.where(valid, self.beta * (max_neg - self.base), zero).clamp(min=0)
        shift_pos = torch.where(valid, -self.alpha * (min_pos - self.base), zero).clamp(min=0)

        centred = s - self.base
        w_neg = torch.mul(centred, self.beta).sub_(shift_neg.unsqueeze(1)).exp_().masked_fill_(drop_neg, 0.0)
        w_pos = centred.mul_(-self.alpha).sub_(shift_pos.unsqueeze(1)).exp_().masked_fill_(drop_pos, 0.0)
        z_neg = w_neg.sum(dim=1) + torch.exp(-shift_neg)
        z_pos = w_pos.sum(dim=1) + torch.exp(-shift_pos)
        value = (shift_pos + torch.log(z_pos)) / self.alpha + (shift_neg + torch.log(z_neg)) / self.beta
        value = torch.where(valid, value, zero)

        keep = valid.to(s.dtype)
        grad = torch.mul(w_neg, (keep / z_neg).unsqueeze(1), out=s)
        grad.addcmul_(w_pos, (keep / z_pos).unsqueeze(1), value=-1.0)
        return value, torch.zeros_like(value), grad
