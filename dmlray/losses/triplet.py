"""Triplet loss with FaceNet's semi-hard negatives (the TF-Addons ``triplet_semihard_loss`` rule)."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, euclidean_from_sim
from dmlray.losses.miners import semihard_negatives
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


@register("triplet_semihard")
class TripletSemihardLoss(RowwiseLoss):
    """loss = mean over positive pairs (i, p) of max(0, d_ip − d_in + m).

    d is the Euclidean distance of the normalised embeddings; n is the semi-hard negative
    argmin{d_in : d_in > d_ip}, or argmax d_in when none is farther
    (``dmlray.losses.miners.semihard_negatives``). The mean runs over the positive pairs whose
    anchor has a negative (not over anchors). Paper: "FaceNet", Schroff et al., CVPR 2015.
    Default: m = 0.2.
    """

    pair_mean = True  # a mean over triplets: distributed steps normalise by the global count

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def per_anchor(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        dist = euclidean_from_sim(pairs.sim)
        negative, valid = semihard_negatives(dist, pairs.pos, pairs.neg)
        d_an = torch.gather(dist, 1, negative)
        hinge = torch.relu(dist - d_an + self.margin)
        value = torch.where(valid, hinge, torch.zeros_like(hinge)).sum(dim=1)
        return value, valid.sum(dim=1).to(value.dtype)

    def reduce(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # mean over the triplets (one per positive pair), not over anchors
        return values.sum() / weights.sum().clamp(min=1)
