"""Pair and triplet selection shared by the losses; masks in, masks out, no host sync.

Every miner works on the detached similarity block of some anchors against their
references (rows are independent, so the losses may call them on chunks of rows) and
returns selections as tensors: (B, M) bool masks for pair losses, per-anchor or
per-positive-pair indices for triplet losses. ``mine_pairs`` exposes them all to the
pair losses that take a ``mining`` option. Euclidean distances are those of unit vectors,
``d = sqrt(2 − 2s)``, so selections follow the similarities exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

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


# ---------------------------------------------------------------- miner objects (pytorch-metric-learning's)


@dataclass(frozen=True)
class TripletSelection:
    """The triplets a miner keeps: (a, p, n) with p ∈ pos[a], n ∈ neg[a] and, when
    ``margin_range = (lo, hi)`` is set, lo < d_an − d_ap ≤ hi."""

    pos: torch.Tensor
    """(B, M) bool: the positives kept for each anchor."""
    neg: torch.Tensor
    """(B, M) bool: the negatives kept for each anchor."""
    margin_range: tuple[float, float] | None = None
    """Bounds on the triplet margin d_an − d_ap (a triplet miner's condition)."""
    one_per_anchor: bool = False
    """True when each row keeps at most one positive and one negative (both or neither):
    the loss then gathers the one triplet instead of sorting the row."""


class Miner:
    """Base class: ``mine(dist, pos, neg)`` selects triplets from a detached (B, M) block of
    Euclidean distances between unit vectors and the contract's masks.

    ``rowwise`` is False when a row's selection depends on other rows (a quantile over
    the batch's pairs): the loss then mines the whole block at once and is not
    rank-decomposable.
    """

    rowwise: ClassVar[bool] = True
    triplet_wise: ClassVar[bool] = False
    """True when the selection of (a, p, n) also depends on d_pn (the references' own
    distances): such a miner implements ``mine_triplets`` instead of ``mine``."""

    def mine(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> TripletSelection:
        raise NotImplementedError  # pragma: no cover - abstract

    def mine_triplets(
        self, dist: torch.Tensor, ref_dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> torch.Tensor:
        """(B, M, M) bool: triplet (a, p, n) kept, from the anchors' (B, M) and the references'
        (M, M) detached distances; only for ``triplet_wise`` miners."""
        raise NotImplementedError  # pragma: no cover - abstract


BATCH_STRATEGIES = ("hard", "semihard", "easy", "all")


def _pick(values: torch.Tensor, mask: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) one-hot of each row's largest / smallest value under mask, and (B,) whether one exists."""
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(mask, values, torch.full_like(values, fill))
    index = masked.argmax(dim=1) if largest else masked.argmin(dim=1)
    exists = mask.any(dim=1)
    one_hot = torch.zeros_like(mask)
    one_hot.scatter_(1, index.unsqueeze(1), exists.unsqueeze(1))
    return one_hot, exists


def _in_range(dist: torch.Tensor, allowed: tuple[float, float] | None) -> torch.Tensor:
    if allowed is None:
        return torch.ones_like(dist, dtype=torch.bool)
    return (dist >= allowed[0]) & (dist <= allowed[1])


class BatchEasyHardMiner(Miner):
    """One positive and one negative per anchor, each by its strategy (or all of them).

    Positives: "easy" the closest, "hard" the farthest, "semihard" the farthest closer
    than the chosen negative. Negatives: "hard" the closest, "easy" the farthest,
    "semihard" the closest farther than the chosen positive. "all" keeps every pair of
    that side. ``allowed_pos_range`` / ``allowed_neg_range`` restrict the candidates to
    distances in [lo, hi]. Paper: "Improved Embeddings with Easy Positive Triplet Mining",
    Xuan et al., WACV 2020. Defaults (pytorch-metric-learning's): easy positives,
    semi-hard negatives.
    """

    def __init__(
        self,
        pos_strategy: str = "easy",
        neg_strategy: str = "semihard",
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
    ):
        if pos_strategy not in BATCH_STRATEGIES or neg_strategy not in BATCH_STRATEGIES:
            raise ValueError(
                f"pos_strategy and neg_strategy must be in {BATCH_STRATEGIES}, got {pos_strategy!r}, {neg_strategy!r}"
            )
        if pos_strategy == neg_strategy == "semihard":
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if "semihard" in (pos_strategy, neg_strategy) and "all" in (pos_strategy, neg_strategy):
            raise ValueError('"semihard" cannot be used in combination with "all"')
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = allowed_pos_range
        self.allowed_neg_range = allowed_neg_range

    def _positives(
        self, dist: torch.Tensor, pos: torch.Tensor, neg_dist: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = pos & _in_range(dist, self.allowed_pos_range)
        if neg_dist is not None:  # semi-hard: closer than the chosen negative
            candidates = candidates & (dist < neg_dist.unsqueeze(1))
        return _pick(dist, candidates, largest=self.pos_strategy != "easy")

    def _negatives(
        self, dist: torch.Tensor, neg: torch.Tensor, pos_dist: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = neg & _in_range(dist, self.allowed_neg_range)
        if pos_dist is not None:  # semi-hard: farther than the chosen positive
            candidates = candidates & (dist > pos_dist.unsqueeze(1))
        return _pick(dist, candidates, largest=self.neg_strategy == "easy")

    def mine(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> TripletSelection:
        inf = torch.full_like(dist, float("inf"))
        chosen_pos = chosen_neg = None
        if self.pos_strategy == "semihard":
            chosen_neg, has_neg = self._negatives(dist, neg)
            chosen_pos, has_pos = self._positives(dist, pos, torch.where(chosen_neg, dist, inf).amin(dim=1))
        elif self.neg_strategy == "semihard":
            chosen_pos, has_pos = self._positives(dist, pos)
            chosen_neg, has_neg = self._negatives(dist, neg, torch.where(chosen_pos, dist, inf).amin(dim=1))
        else:
            if self.pos_strategy != "all":
                chosen_pos, has_pos = self._positives(dist, pos)
            if self.neg_strategy != "all":
                chosen_neg, has_neg = self._negatives(dist, neg)
        if chosen_pos is None:
            assert chosen_neg is not None or self.neg_strategy == "all"
            return TripletSelection(pos, neg if chosen_neg is None else chosen_neg)
        if chosen_neg is None:
            return TripletSelection(chosen_pos, neg)
        # one triplet per anchor: only where both sides found one
        keep = (has_pos & has_neg).unsqueeze(1)
        return TripletSelection(chosen_pos & keep, chosen_neg & keep, one_per_anchor=True)


class BatchHardMiner(BatchEasyHardMiner):
    """Each anchor's farthest positive and closest negative ("batch hard", Hermans et al.,
    "In Defense of the Triplet Loss for Person Re-Identification", 2017)."""

    def __init__(
        self, allowed_pos_range: tuple[float, float] | None = None, allowed_neg_range: tuple[float, float] | None = None
    ):
        super().__init__("hard", "hard", allowed_pos_range, allowed_neg_range)


class PairMarginMiner(Miner):
    """Positive pairs farther than ``pos_margin``, negative pairs closer than ``neg_margin``.

    Defaults (pytorch-metric-learning's): 0.2 and 0.8 (Euclidean distances).
    """

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8):
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def mine(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> TripletSelection:
        return TripletSelection(pos & (dist > self.pos_margin), neg & (dist < self.neg_margin))


TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


class TripletMarginMiner(Miner):
    """Triplets by their margin t = d_an − d_ap: "all" t ≤ m, "hard" t ≤ min(0, m),
    "semihard" 0 < t ≤ m, "easy" t > m. Default (pytorch-metric-learning's): m = 0.2, "all"."""

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all"):
        if type_of_triplets not in TRIPLET_TYPES:
            raise ValueError(f"type_of_triplets must be one of {tuple(TRIPLET_TYPES)}, got {type_of_triplets!r}")
        self.margin = margin
        self.type_of_triplets = type_of_triplets

    def mine(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> TripletSelection:
        m = self.margin
        bounds = {
            "all": (float("-inf"), m),
            "hard": (float("-inf"), min(0.0, m)),
            "semihard": (0.0, m),
            "easy": (m, float("inf")),
        }
        return TripletSelection(pos, neg, bounds[self.type_of_triplets])


class HDCMiner(Miner):
    """Hard-aware deeply cascaded mining: the ``filter_percentage`` farthest positive pairs
    and closest negative pairs of the whole block (⌈p·count⌉ of each).

    Paper: "Hard-Aware Deeply Cascaded Embedding", Yuan et al., ICCV 2017. Default
    (pytorch-metric-learning's): p = 0.5. A quantile over the batch's pairs: not row-wise.
    """

    rowwise = False

    def __init__(self, filter_percentage: float = 0.5):
        if not 0.0 < filter_percentage <= 1.0:
            raise ValueError(f"filter_percentage must be in (0, 1], got {filter_percentage}")
        self.filter_percentage = filter_percentage

    def _top(self, values: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
        """mask restricted to its ⌈p·count⌉ largest / smallest values, without a host sync."""
        # order by the value on a grid of 4096 ulps, ties by position: the pairs (i, j) and
        # (j, i) of a self-block are equal but may differ in their last bits between two
        # computations of the same step (a batch embedded at once or per rank), and without
        # the grid the cut could keep one in one computation and the other in the other
        grid = torch.finfo(values.dtype).eps * 4096
        coarse = torch.round(values / grid)
        flat = torch.where(mask, coarse, torch.full_like(values, float("-inf") if largest else float("inf")))
        order = torch.argsort(flat.flatten(), descending=largest, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        keep = torch.ceil(self.filter_percentage * mask.sum().to(values.dtype))
        return mask & (rank.view_as(mask) < keep)

    def mine(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> TripletSelection:
        return TripletSelection(self._top(dist, pos, largest=True), self._top(dist, neg, largest=False))


class AngularMiner(Miner):
    """Triplets whose angle at the negative exceeds ``angle`` (degrees): atan(d_ap / (2·d_nc)) > α,
    c = (a + p)/2 the centre of the anchor-positive pair.

    d_nc comes from the median formula d_nc² = (d_an² + d_pn²)/2 − d_ap²/4, so the (B, M)
    block and the references' (M, M) distances suffice (no (B, M, M, D) tensor); the test is
    d_ap² > 4·tan²α·d_nc². Paper: "Deep Metric Learning with Angular Loss", Wang et al.,
    ICCV 2017. Default (pytorch-metric-learning's): α = 20°. It forms B·M² triplets: meant
    for a batch or a gathered batch, not a large cross-batch memory. PML's
    ``F.pairwise_distance`` adds 1e-6 to each coordinate difference; the exact distances
    are used here (the selections differ only within ~1e-6 of the threshold).
    """

    triplet_wise = True

    def __init__(self, angle: float = 20.0):
        if not 0.0 <= angle < 90.0:
            raise ValueError(f"angle must be in [0, 90) degrees, got {angle}")
        self.angle = angle

    def mine_triplets(
        self, dist: torch.Tensor, ref_dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> torch.Tensor:
        d_ap2 = (dist * dist).unsqueeze(2)  # (B, M, 1): indexed by p
        d_an2 = (dist * dist).unsqueeze(1)  # (B, 1, M): indexed by n
        d_nc2 = 0.5 * (d_an2 + (ref_dist * ref_dist).unsqueeze(0)) - 0.25 * d_ap2
        wide = d_ap2 > 4.0 * math.tan(math.radians(self.angle)) ** 2 * d_nc2
        return pos.unsqueeze(2) & neg.unsqueeze(1) & wide


def histogram_edges(low: torch.Tensor, high: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(num_bins + 1,) equal-width edges from ``low`` to ``high`` (0-dim tensors), as
    ``torch.linspace`` places them (first half from the start, second half from the end),
    without reading the bounds on the host."""
    steps = num_bins + 1
    i = torch.arange(steps, device=low.device, dtype=low.dtype)
    step = (high - low) / num_bins
    return torch.where(i < steps // 2, low + step * i, high - step * (steps - 1 - i))


def uniform_histogram_draws(
    values: torch.Tensor, mask: torch.Tensor, num_bins: int, per_bin: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_bin`` draws with replacement, uniform within each of ``num_bins`` equal-width bins
    spanning [min, max] of ``values[mask]`` (a bin is [lo, hi), the last [lo, hi]).

    Returns ((num_bins, per_bin) flat indices into ``values``, (num_bins,) bool: the bin is
    non-empty, its draws valid). Members are grouped by a stable sort on their bin and
    each draw is ⌊u·count⌋ into its bin's group: no loop over bins, no host sync.
    """
    flat, keep = values.flatten(), mask.flatten()
    big = torch.finfo(values.dtype).max
    low = torch.where(keep, flat, big).amin()
    high = torch.where(keep, flat, -big).amax()
    edges = histogram_edges(low, high, num_bins)
    bins = (torch.searchsorted(edges, flat.contiguous(), right=True) - 1).clamp(0, num_bins - 1)
    bins = torch.where(keep, bins, num_bins)  # pairs outside the mask sort after every bin
    order = torch.argsort(bins, stable=True)
    counts = torch.bincount(bins, minlength=num_bins + 1)[:num_bins]
    starts = torch.cumsum(counts, dim=0) - counts
    u = torch.rand(num_bins, per_bin, dtype=torch.float64, device=values.device, generator=generator)
    offset = torch.floor(u * counts.unsqueeze(1)).long().clamp(max=max(flat.numel() - 1, 0))
    picks = order[(starts.unsqueeze(1) + offset).clamp(max=max(flat.numel() - 1, 0))]
    return picks, counts > 0


class UniformHistogramMiner(Miner):
    """Positive and negative pairs whose distances are spread uniformly: the distances of
    each kind are cut into ``num_bins`` equal bins between their min and max, and
    ``pos_per_bin`` / ``neg_per_bin`` pairs are drawn with replacement from every non-empty bin.

    A selection is a mask, so a pair drawn twice counts once (PML's index lists repeat it).
    Defaults (pytorch-metric-learning's): 100 bins, 10 pairs of each kind per bin
    (Euclidean distances of the normalised embeddings). Random, and its bins span the
    whole block: not row-wise (the loss then mines the whole global batch at once).
    ``generator`` makes the draws reproducible; None uses torch's global RNG.
    """

    rowwise = False

    def __init__(
        self,
        num_bins: int = 100,
        pos_per_bin: int = 10,
        neg_per_bin: int = 10,
        generator: torch.Generator | None = None,
    ):
        if num_bins < 1 or pos_per_bin < 1 or neg_per_bin < 1:
            raise ValueError(
                f"num_bins, pos_per_bin and neg_per_bin must be positive, got {num_bins}, {pos_per_bin}, {neg_per_bin}"
            )
        self.num_bins = num_bins
        self.pos_per_bin = pos_per_bin
        self.neg_per_bin = neg_per_bin
        self.generator = generator

    def _drawn(self, dist: torch.Tensor, mask: torch.Tensor, per_bin: int) -> torch.Tensor:
        if mask.numel() == 0:
            return mask
        picks, valid = uniform_histogram_draws(dist, mask, self.num_bins, per_bin, self.generator)
        hits = torch.zeros(dist.numel(), dtype=torch.int32, device=dist.device)
        hits.scatter_add_(0, picks.flatten(), valid.unsqueeze(1).expand_as(picks).flatten().to(torch.int32))
        return (hits.view_as(mask) > 0) & mask

    def mine(self, dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> TripletSelection:
        return TripletSelection(self._drawn(dist, pos, self.pos_per_bin), self._drawn(dist, neg, self.neg_per_bin))


MINERS: dict[str, type[Miner]] = {
    "batch_easy_hard": BatchEasyHardMiner,
    "batch_hard": BatchHardMiner,
    "pair_margin": PairMarginMiner,
    "triplet_margin": TripletMarginMiner,
    "hdc": HDCMiner,
    "angular": AngularMiner,
    "uniform_histogram": UniformHistogramMiner,
}
"""Miner name → class, for losses that take ``miner=<name>`` and ``miner_params``."""


def build_miner(name: str, **params) -> Miner:
    """The miner registered under ``name`` with its parameters; unknown names list the known ones."""
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; known: {', '.join(sorted(MINERS))}")
    try:
        return MINERS[name](**params)
    except TypeError as exc:
        raise TypeError(f"miner {name!r}: {exc}") from None
