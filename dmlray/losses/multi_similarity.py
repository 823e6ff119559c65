"""Multi-similarity loss (Wang et al., CVPR 2019), with its MS pair mining."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, masked_logsumexp_plus_one
from dmlray.losses.miners import ms_mine
from dmlray.losses.registry import register
from dmlray.losses.rowwise import Block, RowwiseLoss


@register("multi_similarity")
class MultiSimilarityLoss(RowwiseLoss):
    """L_i = 1/α·log(1 + Σ_{P'_i} e^{−α(s_ip−λ)}) + 1/β·log(1 + Σ_{N'_i} e^{β(s_in−λ)}).

    P'_i, N'_i come from MS mining with margin ε; an anchor whose P'_i or N'_i is empty
    contributes 0 but counts in the mean. Paper: "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", Wang et al., CVPR 2019. Defaults as the authors'
    code: α=2, β=40 (paper: 50), λ=0.5, ε=0.1.

    Training uses a closed-form gradient per chunk of anchors (``block_value_and_grad``);
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

    def block_value_and_grad(self, block: Block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values and dL_i/ds_ij of a chunk, overwriting ``block.sim`` with the gradient.

        With w_ij = e^{β(s_ij−λ)} on N'_i and e^{−α(s_ij−λ)} on P'_i:
        dL_i/ds_in = w_in / (1 + Σ_{N'_i} w), dL_i/ds_ip = −w_ip / (1 + Σ_{P'_i} w).
        Each log-sum-exp is shifted by its row maximum, which the mining statistics give:
        for an anchor with pairs, the most similar negative is always in N'_i and the least
        similar positive always in P'_i.

        Written for CPU speed as well as GPU: masks are 0/1 floats and selections are
        additive 0/−inf terms (a float add is ~20× cheaper than a boolean select on CPU);
        adding an exact 0 leaves the selected similarities bit-identical, so the mining
        decisions are exactly those of ``ms_mine``. One exp serves both sets.
        """
        s = block.sim
        not_same = _not_same(block, s.dtype)
        not_pos = not_same.clone()
        if block.self_index is not None:
            own = block.self_index.long()
            # each anchor's own column is no positive (-1 rows rewrite column 0 unchanged)
            column = own.clamp(min=0).unsqueeze(1)
            not_pos.scatter_(1, column, torch.where(own.unsqueeze(1) >= 0, 1.0, not_pos.gather(1, column)))
        same = 1.0 - not_same
        pos = 1.0 - not_pos

        # masked extremes: unselected entries are pushed ±_FAR beyond any cosine
        min_pos = torch.add(s, not_pos, alpha=_FAR).amin(dim=1)
        max_neg = torch.add(s, same, alpha=-_FAR).amax(dim=1)
        # an anchor without positives (negatives) has min_pos ≥ _FAR − 1 (max_neg ≤ 1 − _FAR):
        # nothing below is then mined, as in ms_mine. N' ≠ ∅ ⟺ max_neg + ε > min_pos and
        # P' ≠ ∅ ⟺ min_pos − ε < max_neg (rounding is monotone)
        valid = (max_neg + self.margin > min_pos) & (min_pos - self.margin < max_neg)
        zero = torch.zeros_like(min_pos)
        shift_neg = torch.where(valid, self.beta * (max_neg - self.base), zero).clamp(min=0)
        shift_pos = torch.where(valid, -self.alpha * (min_pos - self.base), zero).clamp(min=0)

        # N'_i: s + ε > min_pos, other class → 0 where kept, −inf elsewhere
        gap = torch.add(s, self.margin).sub_(min_pos.unsqueeze(1)).add_(same, alpha=-_FAR)
        exponent = torch.add((-self.beta * self.base - shift_neg).unsqueeze(1), s, alpha=self.beta)
        exponent.add_(_keep_if_positive(gap))
        # P'_i: s − ε < max_neg, same class, not the anchor itself
        gap = torch.sub(s, self.margin).neg_().add_(max_neg.unsqueeze(1)).add_(not_pos, alpha=-_FAR)
        exponent_pos = torch.add((self.alpha * self.base - shift_pos).unsqueeze(1), s, alpha=-self.alpha)
        exponent_pos.add_(_keep_if_positive(gap))
        # the two sets are disjoint: the larger exponent is the finite one, or both are −inf
        weight = torch.maximum(exponent, exponent_pos, out=exponent).exp_()
        w_pos = weight * pos
        w_neg = weight.mul_(not_pos)
        z_neg = w_neg.sum(dim=1) + torch.exp(-shift_neg)
        z_pos = w_pos.sum(dim=1) + torch.exp(-shift_pos)
        value = (shift_pos + torch.log(z_pos)) / self.alpha + (shift_neg + torch.log(z_neg)) / self.beta
        value = torch.where(valid, value, zero)

        keep = valid.to(s.dtype)
        grad = torch.mul(w_neg, (keep / z_neg).unsqueeze(1), out=s)
        grad.addcmul_(w_pos, (keep / z_pos).unsqueeze(1), value=-1.0)
        return value, torch.zeros_like(value), grad


_FAR = 16.0
"""Offset that moves an unselected cosine (|s| ≤ 1) out of any min/max or threshold."""


def _keep_if_positive(gap: torch.Tensor) -> torch.Tensor:
    """0 where gap > 0, −inf elsewhere, in place (threshold and clamp vectorise on CPU)."""
    return torch.threshold_(gap, 0.0, float("-inf")).clamp_(max=0.0)


def _not_same(block: Block, dtype: torch.dtype) -> torch.Tensor:
    """(b, M) 1.0 where the reference's label differs from the anchor's, else 0.0.

    |ℓ_ref − ℓ_anchor| clamped at 1, in float64 (exact for any label below 2^53), is
    several times faster on CPU than ``==`` followed by a cast.
    """
    codes = block.shared.get("ref_label_codes")
    if codes is None:
        codes = block.shared["ref_label_codes"] = block.ref_labels.to(torch.float64)
    diff = codes.unsqueeze(0) - block.labels.to(torch.float64).unsqueeze(1)
    return diff.abs_().clamp_(max=1.0).to(dtype)
