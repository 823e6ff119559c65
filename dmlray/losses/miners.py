"""Pair and triplet selection shared by the losses; masks in, masks out, no host sync.

Every miner works on the detached similarity block of some anchors against their
references (rows are independent, so the losses may call them on chunks of rows) and
returns selections as tensors: (B, M) bool masks for pair losses, per-anchor or
per-positive-pair indices for triplet losses. ``mine_pairs`` exposes them all to the
pair losses that take a ``mining`` option. Euclidean distances are those of unit vectors,
``d = sqrt(2 − 2s)``, so selections follow the similarities exactly.
"""

from __future__ import annotations

import torch

MINING_METHODS = ("ms", "semihard", "hard", "distance_weighted")
"""Names accepted by ``mine_pairs`` (and by the ``mining`` option of the pair losses)."""


def ms_mine(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-similarity mining: the hard pairs of each anchor.

    N'_i = {n ∈ N_i : s_in + ε > min_{p∈P_i} s_ip},
    P'_i = {p ∈ P_i : s_ip − ε < max_{n∈N_i} s_in}.
    An anchor without positives keeps no negatives and vice versa.
    """
    big = torch.finfo(sim.dtype).max
    # mining thresholds are selections, not part of the loss's gradient
    s = sim.detach()
    min_pos = torch.where(pos, s, big).amin(dim=1, keepdim=True)
    max_neg = torch.where(neg, s, -big).amax(dim=1, keepdim=True)
    hard_neg = neg & (s + margin > min_pos)
    hard_pos = pos & (s - margin < max_neg)
    return hard_pos, hard_neg


def semihard_negatives(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FaceNet's semi-hard negative of every positive pair, as TF-Addons picks it.

    For the pair (i, p): argmin{d_in : d_in > d_ip}, or argmax d_in when no negative is
    farther. Returns ((B, M) long index of that negative, (B, M) bool: pair (i, p) is a
    positive with at least one negative). Each row's negatives are sorted once and every
    positive is placed by binary search, O(B·M log M) — no (B, M, M) tensor.
    """
    d = dist.detach()
    inf = torch.full_like(d, float("inf"))
    # stable: among equal distances the lowest index comes first, as a loop's min() picks
    neg_sorted, order = torch.sort(torch.where(neg, d, inf), dim=1, stable=True)
    num_neg = neg.sum(dim=1, keepdim=True)
    # first negative strictly farther than the positive (sorted are +inf past num_neg)
    first_farther = torch.searchsorted(neg_sorted, d.contiguous(), right=True)
    farther = torch.gather(order, 1, first_farther.clamp(max=d.shape[1] - 1))
    # none farther: the farthest negative (argmax returns the first of equal maxima)
    farthest = torch.where(neg, d, -inf).argmax(dim=1, keepdim=True)
    index = torch.where(first_farther < num_neg, farther, farthest)
    return index, pos & (num_neg > 0)


def hard_triplets(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard triplets: each anchor's least similar positive and most similar negative.

    Returns (B,) positive index, (B,) negative index, (B,) bool valid (both exist).
    """
    s = sim.detach()
    inf = torch.full_like(s, float("inf"))
    hardest_pos = torch.where(pos, s, inf).argmin(dim=1)
    hardest_neg = torch.where(neg, s, -inf).argmax(dim=1)
    return hardest_pos, hardest_neg, pos.any(dim=1) & neg.any(dim=1)


def distance_weighted_triplets(
    sim: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    dim: int,
    cutoff: float = 0.5,
    upper_cutoff: float | None = 1.4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance-weighted sampling (Wu et al., "Sampling Matters", ICCV 2017): one triplet per anchor.

    The positive is uniform over P_i. The negative is drawn with probability ∝ 1/q(d),
    q(d) ∝ d^{n−2} (1 − d²/4)^{(n−3)/2} being the density of distances between points
    uniform on the unit sphere in n = ``dim`` dimensions, with d clamped below at
    ``cutoff``; negatives farther than ``upper_cutoff`` get weight 0 unless all are, in which
    case the draw is uniform over N_i (as the authors' code). Draws are Gumbel-max on the
    log-weights: no host sync, reproducible with ``generator``.
    Returns (B,) positive index, (B,) negative index, (B,) bool valid.
    """
    s = sim.detach()
    dist = torch.sqrt((2.0 - 2.0 * s).clamp(min=0.0)).clamp(min=cutoff)
    # log 1/q(d); 1 − d²/4 is clamped so an antipodal pair gets a large finite weight
    log_weight = (2.0 - dim) * torch.log(dist) - ((dim - 3) / 2.0) * torch.log(
        (1.0 - 0.25 * dist * dist).clamp(min=1e-12)
    )
    in_range = neg if upper_cutoff is None else neg & (dist < upper_cutoff)
    any_in_range = in_range.any(dim=1, keepdim=True)
    candidates = torch.where(any_in_range, in_range, neg)
    neg_inf = torch.full_like(s, float("-inf"))
    # uniform fallback: equal log-weights over N_i
    neg_logits = torch.where(candidates, torch.where(any_in_range, log_weight, torch.zeros_like(s)), neg_inf)
    pos_logits = torch.where(pos, torch.zeros_like(s), neg_inf)
    negative = (neg_logits + _gumbel(s, generator)).argmax(dim=1)
    positive = (pos_logits + _gumbel(s, generator)).argmax(dim=1)
    return positive, negative, pos.any(dim=1) & neg.any(dim=1)


def _gumbel(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise shaped like ``like``: argmax(logits + G) samples softmax(logits)."""
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny)))


def triplets_to_pairs(
    positive: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """One triplet per anchor → (B, M) masks of its positive pair and its negative pair."""
    pos = torch.zeros(shape, dtype=torch.bool, device=valid.device)
    neg = torch.zeros(shape, dtype=torch.bool, device=valid.device)
    pos.scatter_(1, positive.unsqueeze(1), valid.unsqueeze(1))
    neg.scatter_(1, negative.unsqueeze(1), valid.unsqueeze(1))
    return pos, neg


def mine_pairs(
    method: str | None,
    sim: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    margin: float = 0.1,
    dim: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative pairs a pair loss keeps under ``method``.

    None: all pairs. "ms": multi-similarity mining with margin ε = ``margin``.
    "semihard": every positive pair that has a negative, with the union of their
    semi-hard negatives. "hard": each anchor's hardest positive and hardest negative.
    "distance_weighted": each anchor's sampled triplet (needs ``dim``).
    """
    if method is None:
        return pos, neg
    if method == "ms":
        return ms_mine(sim, pos, neg, margin)
    if method == "semihard":
        index, valid = semihard_negatives(torch.sqrt((2.0 - 2.0 * sim.detach()).clamp(min=0.0)), pos, neg)
        # several positives may share a negative: count, then threshold (a bool scatter races)
        hits = torch.zeros(sim.shape, dtype=torch.int32, device=sim.device)
        hits.scatter_add_(1, index, valid.to(torch.int32))
        return valid, (hits > 0) & neg
    if method == "hard":
        return triplets_to_pairs(*hard_triplets(sim, pos, neg), sim.shape)
    if method == "distance_weighted":
        if dim <= 0:
            raise ValueError("distance_weighted mining needs the embedding dimension")
        return triplets_to_pairs(*distance_weighted_triplets(sim, pos, neg, dim, generator=generator), sim.shape)
    raise ValueError(f"unknown mining method {method!r}; known: {', '.join(MINING_METHODS)}")


def check_mining(method: str | None) -> None:
    """Fail at construction, not at the first step, on an unknown mining name."""
    if method is not None and method not in MINING_METHODS:
        raise ValueError(f"unknown mining method {method!r}; known: {', '.join(MINING_METHODS)}")
