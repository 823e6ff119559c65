"""Multi-similarity loss (Wang et al., CVPR 2019), with its MS pair mining."""

from __future__ import annotations

import torch

from dmlray.losses.base import PairLoss, build_pairs, masked_logsumexp_plus_one
from dmlray.losses.registry import register
from dmlray.miners import ms_mine


@register("multi_similarity")
class MultiSimilarityLoss(PairLoss):
    """L_i = 1/α·log(1 + Σ_{P'_i} e^{−α(s_ip−λ)}) + 1/β·log(1 + Σ_{N'_i} e^{β(s_in−λ)}).

    P'_i, N'_i come from MS mining with margin ε; an anchor whose P'_i or N'_i is empty
    contributes 0 but counts in the mean. Paper: "Multi-Similarity Loss with General Pair
    Weighting for Deep Metric Learning", Wang et al., CVPR 2019. Defaults as the authors'
    code: α=2, β=40 (paper: 50), λ=0.5, ε=0.1.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5, margin: float = 0.1):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.margin = margin

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, self_index=None):
        pairs = build_pairs(embeddings, labels, ref_embeddings, ref_labels, self_index)
        pos, neg = ms_mine(pairs.sim, pairs.pos, pairs.neg, self.margin)
        valid = pos.any(dim=1) & neg.any(dim=1)
        pos_term = masked_logsumexp_plus_one(-self.alpha * (pairs.sim - self.base), pos) / self.alpha
        neg_term = masked_logsumexp_plus_one(self.beta * (pairs.sim - self.base), neg) / self.beta
        per_anchor = torch.where(valid, pos_term + neg_term, torch.zeros_like(pos_term))
        return per_anchor.mean()
