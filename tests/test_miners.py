"""Miners against loops over anchors, and the distance-weighted sampler's distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dmlray import losses
from dmlray.losses.base import build_pairs
from dmlray.losses.miners import (
    MINING_METHODS,
    distance_weighted_triplets,
    hard_triplets,
    mine_pairs,
    ms_mine,
    semihard_negatives,
)

D = 8


def _pairs(seed=0, batch=14, duplicates=False, refs=False):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(batch, D, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(batch) % 4
    if duplicates:
        emb[6] = emb[2]  # same class as 2: a duplicate positive
        emb[7] = emb[1]  # a duplicate negative for most anchors
        emb[11] = emb[1]
    if refs:
        mem = F.normalize(torch.randn(20, D, generator=g, dtype=torch.float64), dim=1)
        mem_labels = torch.randint(0, 4, (20,), generator=g)
        own = torch.arange(batch)
        own[3] = -1
        return build_pairs(emb, labels, torch.cat([emb, mem]), torch.cat([labels, mem_labels]), own)
    return build_pairs(emb, labels)


def _rows(mask, i):
    return [j for j in range(mask.shape[1]) if mask[i, j]]


def _dist(s):
    return math.sqrt(max(2 - 2 * float(s), 0.0))


CONFIGS = [dict(), dict(duplicates=True), dict(refs=True), dict(seed=3, batch=5)]


@pytest.mark.parametrize("config", CONFIGS)
def test_ms_mine_matches_loop(config):
    pairs = _pairs(**config)
    hard_pos, hard_neg = ms_mine(pairs.sim, pairs.pos, pairs.neg, 0.1)
    for i in range(pairs.sim.shape[0]):
        pos, neg = _rows(pairs.pos, i), _rows(pairs.neg, i)
        s = pairs.sim[i]
        want_pos = [p for p in pos if neg and s[p] - 0.1 < max(s[n] for n in neg)]
        want_neg = [n for n in neg if pos and s[n] + 0.1 > min(s[p] for p in pos)]
        assert _rows(hard_pos, i) == want_pos
        assert _rows(hard_neg, i) == want_neg


@pytest.mark.parametrize("config", CONFIGS)
def test_semihard_negatives_follow_the_facenet_rule(config):
    pairs = _pairs(**config)
    dist = torch.sqrt((2 - 2 * pairs.sim).clamp(min=0))
    index, valid = semihard_negatives(dist, pairs.pos, pairs.neg)
    for i in range(pairs.sim.shape[0]):
        neg = _rows(pairs.neg, i)
        for p in range(pairs.sim.shape[1]):
            assert bool(valid[i, p]) == (bool(pairs.pos[i, p]) and bool(neg))
            if not valid[i, p]:
                continue
            farther = [n for n in neg if dist[i, n] > dist[i, p]]
            # ties: the lowest index, as min()/max() pick the first
            want = (
                min(farther, key=lambda n: float(dist[i, n])) if farther else max(neg, key=lambda n: float(dist[i, n]))
            )
            assert dist[i, int(index[i, p])] == dist[i, want]
            assert int(index[i, p]) == want


@pytest.mark.parametrize("config", CONFIGS)
def test_hard_triplets_match_loop(config):
    pairs = _pairs(**config)
    positive, negative, valid = hard_triplets(pairs.sim, pairs.pos, pairs.neg)
    for i in range(pairs.sim.shape[0]):
        pos, neg = _rows(pairs.pos, i), _rows(pairs.neg, i)
        assert bool(valid[i]) == bool(pos and neg)
        if pos and neg:
            assert int(positive[i]) == min(pos, key=lambda p: float(pairs.sim[i, p]))
            assert int(negative[i]) == max(neg, key=lambda n: float(pairs.sim[i, n]))


def test_distance_weighted_picks_only_valid_pairs_and_is_seeded():
    pairs = _pairs(refs=True)
    a = distance_weighted_triplets(pairs.sim, pairs.pos, pairs.neg, D, generator=torch.Generator().manual_seed(5))
    b = distance_weighted_triplets(pairs.sim, pairs.pos, pairs.neg, D, generator=torch.Generator().manual_seed(5))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    positive, negative, valid = a
    rows = torch.arange(pairs.sim.shape[0])
    assert valid.all()
    assert pairs.pos[rows, positive].all() and pairs.neg[rows, negative].all()


def _expected_negative_probabilities(dist_row, neg_row, dim, cutoff, upper):
    weights = []
    for d, is_neg in zip(dist_row.tolist(), neg_row.tolist(), strict=True):
        if not is_neg or (upper is not None and max(d, cutoff) >= upper):
            weights.append(0.0)
            continue
        d = max(d, cutoff)
        weights.append(d ** (2 - dim) * (1 - d * d / 4) ** (-(dim - 3) / 2))
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize("upper", [1.4, None])
def test_distance_weighted_negatives_follow_inverse_sphere_density(upper):
    """Many draws for one anchor (its row repeated): frequencies ≈ 1/q(d), normalised."""
    g = torch.Generator().manual_seed(0)
    dim = 6
    anchor = F.normalize(torch.randn(1, dim, generator=g, dtype=torch.float64), dim=1)
    refs = F.normalize(torch.randn(12, dim, generator=g, dtype=torch.float64), dim=1)
    refs[0] = anchor[0]  # a positive at distance 0 (below the cut-off)
    sim = (anchor @ refs.T).expand(20000, -1).contiguous()
    labels = torch.tensor([0] + [1] * 11)
    pos = (labels == 0).expand(20000, -1)
    neg = ~pos
    _, negative, _ = distance_weighted_triplets(sim, pos, neg, dim, 0.5, upper, torch.Generator().manual_seed(1))
    counts = torch.bincount(negative, minlength=12).double() / 20000
    dist = torch.sqrt((2 - 2 * sim[0]).clamp(min=0))
    want = torch.tensor(_expected_negative_probabilities(dist, neg[0], dim, 0.5, upper), dtype=torch.float64)
    assert counts[0] == 0
    torch.testing.assert_close(counts, want, atol=0.015, rtol=0)


def test_distance_weighted_falls_back_to_uniform_beyond_the_cutoff():
    """All negatives farther than the upper cut-off: uniform over them (the authors' code)."""
    sim = torch.tensor([[0.9, -0.5, -0.6, -0.7, -0.8]], dtype=torch.float64).expand(8000, -1).contiguous()
    pos = torch.tensor([[False, False, False, False, False]]).expand(8000, -1).clone()
    pos[:, 0] = True
    neg = ~pos
    _, negative, valid = distance_weighted_triplets(sim, pos, neg, 16, 0.5, 1.4, torch.Generator().manual_seed(2))
    assert valid.all()
    counts = torch.bincount(negative, minlength=5).double() / 8000
    torch.testing.assert_close(
        counts, torch.tensor([0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64), atol=0.02, rtol=0
    )


def test_distance_weighted_without_candidates_is_invalid():
    sim = torch.zeros(3, 4, dtype=torch.float64)
    pos = torch.tensor([[True, False, False, False], [False] * 4, [True, True, False, False]])
    neg = torch.tensor([[False] * 4, [False, True, True, True], [False, False, True, True]])
    _, _, valid = distance_weighted_triplets(sim, pos, neg, D)
    assert valid.tolist() == [False, False, True]


@pytest.mark.parametrize("method", [None, *MINING_METHODS])
def test_mine_pairs_selects_subsets(method):
    pairs = _pairs(refs=True)
    pos, neg = mine_pairs(
        method, pairs.sim, pairs.pos, pairs.neg, margin=0.1, dim=D, generator=torch.Generator().manual_seed(0)
    )
    assert not (pos & ~pairs.pos).any() and not (neg & ~pairs.neg).any()
    if method in ("hard", "distance_weighted"):
        assert (pos.sum(dim=1) <= 1).all() and (neg.sum(dim=1) <= 1).all()
    if method == "hard":
        positive, negative, valid = hard_triplets(pairs.sim, pairs.pos, pairs.neg)
        rows = torch.arange(len(valid))[valid]
        assert pos[rows, positive[valid]].all() and neg[rows, negative[valid]].all()
    if method == "semihard":
        index, valid = semihard_negatives(torch.sqrt((2 - 2 * pairs.sim).clamp(min=0)), pairs.pos, pairs.neg)
        assert torch.equal(pos, valid)
        for i in range(pairs.sim.shape[0]):
            assert set(_rows(neg, i)) == {int(index[i, p]) for p in _rows(valid, i)}


def test_mine_pairs_rejects_unknown_and_needs_dim():
    pairs = _pairs()
    with pytest.raises(ValueError, match="unknown mining"):
        mine_pairs("hardest", pairs.sim, pairs.pos, pairs.neg)
    with pytest.raises(ValueError, match="dimension"):
        mine_pairs("distance_weighted", pairs.sim, pairs.pos, pairs.neg)


@pytest.mark.parametrize("name", ["contrastive", "lifted_structure", "binomial_deviance"])
@pytest.mark.parametrize("method", MINING_METHODS)
def test_pair_losses_take_every_miner(name, method):
    """Any miner plugs into a loss with a ``mining`` option; checked exactly for "hard"."""
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(14, D, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    labels = torch.arange(14) % 4
    loss = losses.build(name, mining=method)
    loss.generator = torch.Generator().manual_seed(4)
    value = loss(emb, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()
    if method == "hard" and name == "contrastive":
        sim = (emb @ emb.T).detach()
        pairs = build_pairs(emb.detach(), labels)
        positive, negative, valid = hard_triplets(sim, pairs.pos, pairs.neg)
        total = 0.0
        for i in range(14):
            if valid[i]:
                total += 1 - float(sim[i, positive[i]])
                s_n = float(sim[i, negative[i]])
                total += s_n if s_n > 0.5 else 0.0
        assert math.isclose(float(value.detach()), total / 14, rel_tol=1e-12)


def test_hdc_cut_does_not_flip_between_the_two_halves_of_a_symmetric_pair():
    """A self-block's d_ij and d_ji are equal up to their last bits, which differ between two
    computations of one step (a batch embedded whole or per rank): the cut must keep the
    same pairs in both, as the rank-exactness of whole-batch mining relies on."""
    from dmlray.losses.miners import HDCMiner

    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(12, D, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(12) % 3
    dist = torch.cdist(x, x)
    dist = (dist + dist.T) / 2  # exactly symmetric
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(12, dtype=torch.bool)
    neg = labels[:, None] != labels[None, :]
    miner = HDCMiner(0.3)  # ⌈0.3·36⌉ = 11 positives, ⌈0.3·96⌉ = 29 negatives: odd, so a cut splits a pair
    reference = miner.mine(dist, pos, neg)
    nudged = dist.clone()
    upper = torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)
    nudged[upper] = torch.nextafter(nudged[upper], torch.full_like(nudged[upper], 3.0))  # one ulp up
    selected = miner.mine(nudged, pos, neg)
    assert torch.equal(reference.pos, selected.pos) and torch.equal(reference.neg, selected.neg)
    # and the cut still keeps ⌈p·count⌉ of each, the farthest positives
    assert int(reference.pos.sum()) == math.ceil(0.3 * int(pos.sum()))
    kept, dropped = dist[reference.pos], dist[pos & ~reference.pos]
    assert kept.min() >= dropped.max() - 1e-12
