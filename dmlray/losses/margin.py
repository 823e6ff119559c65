"""Margin loss with distance-weighted sampling (Wu et al., ICCV 2017)."""

from __future__ import annotations

import torch
from torch import nn

from dmlray.losses.base import PairLoss, build_pairs
from dmlray.losses.miners import distance_weighted_triplets
from dmlray.losses.registry import register
from dmlray.losses.sampling import SeededSampling


@register("margin")
class MarginLoss(SeededSampling, PairLoss):
    """L = Σ_i ([d_ap − β_{y_i} + m]_+ + [β_{y_i} − d_an + m]_+) / #(non-zero terms), one triplet per anchor.

    The triplet comes from distance-weighted sampling (``dmlray.losses.miners.
    distance_weighted_triplets``); d = sqrt(‖a − b‖² + 1e-8); β is learnable per class
    (labels must be class indices in [0, num_classes)) unless ``learn_beta=False``; an
    optional ν·Σβ/#terms regulariser as in the paper. Paper: "Sampling Matters in Deep
    Embedding Learning", Wu et al., ICCV 2017. Defaults (CBML code base): m = 0.2,
    β₀ = 1.2, ν = 0, cut-off 0.5, upper cut-off 1.4. ``seed`` makes the sampling
    reproducible (its generator state is checkpointed with the loss); None uses the global
    RNG. References (memory, gathered batch) are sampled from like the batch.
    """

    needs_classes = True
    rank_decomposable = False  # one sampled triplet per anchor: one draw over the global batch

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: float = 0.2,
        beta: float = 1.2,
        learn_beta: bool = True,
        nu: float = 0.0,
        cutoff: float = 0.5,
        upper_cutoff: float | None = 1.4,
        seed: int | None = None,
    ):
        super().__init__()
        self.margin = margin
        self.nu = nu
        self.cutoff = cutoff
        self.upper_cutoff = upper_cutoff
        self.init_sampling(seed)
        initial = torch.full((num_classes,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pairs = build_pairs(embeddings, labels, ref_embeddings, ref_labels, self_index)
        if pairs.sim.shape[1] == 0:
            return pairs.sim.sum() * 0.0 + self.beta.sum() * 0.0
        positive, negative, valid = distance_weighted_triplets(
            pairs.sim,
            pairs.pos,
            pairs.neg,
            embeddings.shape[1],
            self.cutoff,
            self.upper_cutoff,
            self.generator(embeddings.device),
        )
        d_ap = _distance(pairs.sim.gather(1, positive.unsqueeze(1)).squeeze(1))
        d_an = _distance(pairs.sim.gather(1, negative.unsqueeze(1)).squeeze(1))
        beta = self.beta.to(d_ap.dtype)[labels.long()]
        keep = valid.to(d_ap.dtype)
        pos_loss = torch.relu(d_ap - beta + self.margin) * keep
        neg_loss = torch.relu(beta - d_an + self.margin) * keep
        count = ((pos_loss > 0).sum() + (neg_loss > 0).sum()).clamp(min=1).to(d_ap.dtype)
        loss = (pos_loss + neg_loss).sum() / count
        if self.nu:
            loss = loss + self.nu * (beta * keep).sum() / count
        return loss


def _distance(sim: torch.Tensor) -> torch.Tensor:
    """‖a − b‖ of unit vectors with the CBML code's +1e-8 (finite gradient at d = 0)."""
    return torch.sqrt((2.0 - 2.0 * sim).clamp(min=0.0) + 1e-8)
