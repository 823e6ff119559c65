"""The triplet margin loss over all triplets, or over those any miner selects."""

from __future__ import annotations

from typing import Any

import torch

from dmlray.losses.base import Pairs, euclidean_from_sim, pairs_from_sim, resolve_references, similarity
from dmlray.losses.miners import Miner, TripletSelection, build_miner
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss


def triplet_hinge_sums(
    dist: torch.Tensor, selection: TripletSelection, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: Σ [d_ap − d_an + m]_+ over the selected triplets, and how many are > 0.

    For a positive p the active negatives are those with d_an < d_ap + m (and inside the
    selection's margin range), an interval of the anchor's sorted negative distances:
    its size and sum come from one sort, a prefix sum and binary searches — O(M log M)
    per anchor instead of O(|P|·|N|), so a 55k-entry memory costs no (B, M, M) tensor.
    """
    if selection.one_per_anchor and selection.margin_range is None:
        return _one_triplet_hinge(dist, selection, margin)
    keys = torch.where(selection.neg, dist, torch.full_like(dist, float("inf"))).detach()
    sorted_keys, order = torch.sort(keys, dim=1)
    sorted_dist = torch.where(torch.isfinite(sorted_keys), dist.gather(1, order), torch.zeros_like(dist))
    prefix = torch.cat([torch.zeros_like(dist[:, :1]), sorted_dist.cumsum(dim=1)], dim=1)
    d_ap = dist.detach().contiguous()
    # negatives strictly closer than d_ap + m: the hinge is positive exactly there
    upper = torch.searchsorted(sorted_keys, d_ap + margin, right=False)
    lower = torch.zeros_like(upper)
    if selection.margin_range is not None:
        lo, hi = selection.margin_range
        # lo < d_an − d_ap ≤ hi
        upper = torch.minimum(upper, torch.searchsorted(sorted_keys, d_ap + hi, right=True))
        if lo != float("-inf"):
            lower = torch.searchsorted(sorted_keys, d_ap + lo, right=True)
    count = (upper - lower).clamp(min=0) * selection.pos
    upper = torch.maximum(upper, lower)
    active_sum = prefix.gather(1, upper) - prefix.gather(1, lower)
    per_pos = count.to(dist.dtype) * (dist + margin) - active_sum
    value = torch.where(count > 0, per_pos, torch.zeros_like(per_pos)).sum(dim=1)
    return value, count.sum(dim=1).to(dist.dtype)


def _one_triplet_hinge(
    dist: torch.Tensor, selection: TripletSelection, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triplet_hinge_sums`` for at most one (p, n) a row: two gathers, no sort."""
    valid = selection.pos.any(dim=1)
    d_ap = dist.gather(1, selection.pos.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    d_an = dist.gather(1, selection.neg.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    hinge = torch.relu(d_ap - d_an + margin)
    active = valid & (hinge > 0)
    return torch.where(active, hinge, torch.zeros_like(hinge)), active.to(dist.dtype)


@register("triplet_margin")
class TripletMarginLoss(RowwiseLoss):
    """L = mean over the selected triplets with a non-zero term of [d_ap − d_an + m]_+.

    d is the Euclidean distance of the normalised embeddings. Without a miner every
    triplet (a, p, n) of the batch (or of anchors × references) is formed; ``miner`` names
    one of ``dmlray.losses.miners.MINERS`` ("batch_hard", "batch_easy_hard",
    "pair_margin", "triplet_margin", "hdc", "angular", "uniform_histogram"), built with
    ``miner_params``, or is a ``Miner``; a ``triplet_wise`` miner (angular) is computed on
    the dense (B, M, M) triplets with plain autograd instead of the chunked engine.
    Paper: "FaceNet", Schroff et al., CVPR 2015 / Weinberger & Saul, JMLR 2009. Defaults
    (pytorch-metric-learning's, with its AvgNonZeroReducer): m = 0.05, all triplets.
    PML's ``swap`` and ``smooth_loss`` options are not offered.
    """

    pair_mean = True  # a mean over the active triplets: distributed steps normalise by the global count

    def __init__(
        self, margin: float = 0.05, miner: str | Miner | None = None, miner_params: dict[str, Any] | None = None
    ):
        super().__init__()
        self.margin = margin
        if isinstance(miner, str):
            miner = build_miner(miner, **(miner_params or {}))
        elif miner_params:
            raise ValueError("miner_params given without a miner name")
        self.miner = miner
        if miner is not None and not miner.rowwise:
            self.chunk_elements = 0  # the miner needs the whole block at once

    @property
    def rank_decomposable(self) -> bool:
        return self.miner is None or self.miner.rowwise

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.miner is None or not self.miner.triplet_wise:
            return super().forward(embeddings, labels, ref_embeddings, ref_labels, self_index)
        total, count = self.sum_and_count(embeddings, labels, ref_embeddings, ref_labels, self_index)
        return total / count.clamp(min=1)

    def sum_and_count(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.miner is None or not self.miner.triplet_wise:
            return super().sum_and_count(embeddings, labels, ref_embeddings, ref_labels, self_index)
        return self._triplet_wise_sum_and_count(embeddings, labels, ref_embeddings, ref_labels, self_index)

    def _triplet_wise_sum_and_count(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
        self_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, M, M) triplets for a miner that reads d_pn (plain autograd, not chunked)."""
        assert self.miner is not None
        refs, ref_labels, self_index = resolve_references(embeddings, labels, ref_embeddings, ref_labels, self_index)
        pairs = pairs_from_sim(similarity(embeddings, refs), labels, ref_labels.to(labels.device), self_index)
        dist = euclidean_from_sim(pairs.sim)
        ref_dist = euclidean_from_sim(similarity(refs.detach(), refs.detach()))
        kept = self.miner.mine_triplets(dist.detach(), ref_dist, pairs.pos, pairs.neg)
        hinge = torch.relu(dist.unsqueeze(2) - dist.unsqueeze(1) + self.margin)
        active = kept & (hinge > 0)
        return torch.where(active, hinge, torch.zeros_like(hinge)).sum(), active.sum().to(dist.dtype)

    def per_anchor(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        dist = euclidean_from_sim(pairs.sim)
        if self.miner is None:
            selection = TripletSelection(pairs.pos, pairs.neg)
        else:
            selection = self.miner.mine(dist.detach(), pairs.pos, pairs.neg)
        return triplet_hinge_sums(dist, selection, self.margin)

    def reduce(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return values.sum() / weights.sum().clamp(min=1)
