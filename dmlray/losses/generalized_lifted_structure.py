"""The generalised lifted structure loss (Hermans et al., 2017, after Oh Song et al.)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, euclidean_from_sim, masked_logsumexp
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("generalized_lifted_structure")
class GeneralizedLiftedStructureLoss(RowwiseLoss):
    """L_i = [log Σ_{p∈P_i} e^{d_ip − m⁺} + log Σ_{n∈N_i} e^{m⁻ − d_in}]_+; mean over anchors.

    d is the Euclidean distance of the normalised embeddings; an empty sum contributes 0.
    Paper: "In Defense of the Triplet Loss for Person Re-Identification", Hermans et al.,
    2017 (p. 4), generalising "Deep Metric Learning via Lifted Structured Feature
    Embedding", Oh Song et al., CVPR 2016. Defaults (pytorch-metric-learning's): m⁺ =
    ``pos_margin`` = 0, m⁻ = ``neg_margin`` = 1.
    """

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0):
        super().__init__()
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        dist = euclidean_from_sim(pairs.sim)
        pos_lse, _ = masked_logsumexp(dist - self.pos_margin, pairs.pos)
        neg_lse, _ = masked_logsumexp(self.neg_margin - dist, pairs.neg)
        return torch.relu(pos_lse + neg_lse)
