"""The last issue #17 losses and miners against pytorch-metric-learning (PML), float64.

Instance and Manifold losses: ``dmlray.losses.build(name)`` at its defaults against PML's
loss at PML's defaults, value and gradients (of the raw embeddings through a
normalisation, and of the proxies), on random inputs; Manifold's random meta-classes are
drawn from torch's global RNG on both sides, seeded identically. The angular miner is
deterministic: its triplets equal PML's. The uniform-histogram miner is random and does
not consume the RNG as PML does (PML loops over bins calling ``multinomial``; dmlray
draws all bins at once), so its deterministic part (bin edges, which bins are occupied,
which pair falls in which bin) is compared with PML exactly and its random part by its
distribution: every occupied bin gets exactly its quota of draws, uniform within the bin.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PML's own deprecation notices

from dmlray import losses  # noqa: E402
from dmlray.losses.base import build_pairs, euclidean_from_sim  # noqa: E402
from dmlray.losses.instance import label_ranks  # noqa: E402
from dmlray.losses.miners import (  # noqa: E402
    AngularMiner,
    UniformHistogramMiner,
    build_miner,
    histogram_edges,
    uniform_histogram_draws,
)

D = 16
CLASSES = 6


def _raw(seed=0, batch=24):
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _value_and_grad(fn, raw, *params):
    raw = raw.clone().requires_grad_(True)
    value = fn(F.normalize(raw, dim=1)).reshape(())
    grads = torch.autograd.grad(value, [raw, *params])
    return value.detach(), grads


def _assert_same(ours, theirs, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=atol)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- instance loss


def _instance_labels(seed, batch=24, instances=CLASSES, ids=lambda r: r):
    """Instance ids with the batch starting at one sample of each id in increasing order."""
    g = torch.Generator().manual_seed(seed)
    first = torch.arange(instances)
    return ids(torch.cat([first, torch.randint(0, instances, (batch - instances,), generator=g)]))


@pytest.mark.parametrize(
    "ids", [lambda r: r, lambda r: 3 * r - 7], ids=["0..C-1", "sparse ids"]
)  # PML maps ids to ranks
@pytest.mark.parametrize("seed", [0, 1])
def test_instance_loss_at_defaults(seed, ids):
    raw, labels = _raw(seed), _instance_labels(seed, ids=ids)
    ours, theirs = losses.build("instance"), pml_losses.InstanceLoss()
    got = _value_and_grad(lambda e: ours(e, labels), raw)
    _assert_same(got, _value_and_grad(lambda e: theirs(e, labels), raw))
    assert got[0] > 0 and got[1][0].abs().sum() > 0


def test_instance_loss_image_text_pairs():
    """The paper's use: n images and their n captions share ids [0..n−1, 0..n−1]."""
    raw = _raw(2, batch=20)
    labels = torch.arange(10).repeat(2)
    got = _value_and_grad(lambda e: losses.build("instance")(e, labels), raw)
    _assert_same(got, _value_and_grad(lambda e: pml_losses.InstanceLoss()(e, labels), raw))


def test_label_ranks_are_uniques_inverse():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        labels = torch.randint(-4, 9, (17,), generator=g)
        assert torch.equal(label_ranks(labels), torch.unique(labels, return_inverse=True)[1])


def test_instance_loss_refuses_labels_whose_column_is_another_instance():
    """Random class labels (a PK batch) make PML's target column another instance's
    sample: refused by default, PML's value when the check is switched off."""
    raw = _raw(4)
    labels = torch.randperm(24, generator=torch.Generator().manual_seed(4)) % CLASSES
    assert not torch.equal(labels[label_ranks(labels)], labels)
    with pytest.raises(ValueError, match="instance ids"):
        losses.build("instance")(F.normalize(raw, dim=1), labels)
    unchecked = losses.build("instance", check_labels=False)
    got = _value_and_grad(lambda e: unchecked(e, labels), raw)
    _assert_same(got, _value_and_grad(lambda e: pml_losses.InstanceLoss()(e, labels), raw))


def test_instance_loss_refuses_references_and_survives_bf16():
    emb, labels = F.normalize(_raw(5), dim=1), _instance_labels(5)
    loss = losses.build("instance")
    with pytest.raises(ValueError, match="references"):
        loss(emb, labels, emb.clone(), labels)
    assert not loss.supports_references and not loss.rank_decomposable
    x = emb.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x.bfloat16(), labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(value, loss(emb.float(), labels), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- manifold loss

MANIFOLD_BATCH = 60  # PML needs at least K = 50 embeddings


def _manifold_pair(**params):
    torch.manual_seed(0)
    ours = losses.build("manifold", embedding_dim=D, **params).double()
    theirs = pml_losses.ManifoldLoss(l=D, **params).double()
    theirs.proxies.data = ours.proxies.data.clone()
    return ours, theirs


@pytest.mark.parametrize(
    "params", [{}, {"lambdaC": 0.0}, {"K": 7, "alpha": 0.5, "margin": 0.05}], ids=["defaults", "intrinsic", "small K"]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_manifold_loss_matches_pml_with_the_same_draws(seed, params):
    """Both draw the meta-classes from the global RNG in the same order. PML inverts the
    (N+K)² matrix in float32 even for float64 inputs (dmlray in float64), hence 1e-6."""
    ours, theirs = _manifold_pair(**params)
    raw = _raw(seed, MANIFOLD_BATCH)
    labels = torch.zeros(MANIFOLD_BATCH, dtype=torch.long)  # unused by both
    torch.manual_seed(10 + seed)
    got = _value_and_grad(lambda e: ours(e, labels), raw, ours.proxies)
    torch.manual_seed(10 + seed)
    want = _value_and_grad(lambda e: theirs(e), raw, theirs.proxies)
    _assert_same(got, want, rtol=1e-6, atol=1e-9)
    assert got[0] > 0 and got[1][0].abs().sum() > 0 and got[1][1].abs().sum() > 0


def test_manifold_defaults_are_pmls():
    ours, theirs = _manifold_pair()
    for name in ("K", "lambdaC", "alpha", "margin"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.proxies.shape == theirs.proxies.shape == (50, D)
    assert ours.needs_classes and not ours.supports_references and not ours.rank_decomposable


def test_manifold_context_only_and_seeded_stream():
    """λ_C = ∞ is the context term alone: L(λ_C=1) − L(λ_C=0) on the same draws. A seed
    fixes the draws, and the generator state resumes from the state_dict."""
    emb = F.normalize(_raw(3, MANIFOLD_BATCH), dim=1)
    labels = torch.zeros(MANIFOLD_BATCH, dtype=torch.long)
    values = {}
    for lam in (0.0, 1.0, math.inf):
        torch.manual_seed(0)
        loss = losses.build("manifold", embedding_dim=D, lambdaC=lam).double()
        torch.manual_seed(5)
        values[lam] = loss(emb, labels)
    torch.testing.assert_close(values[math.inf], values[1.0] - values[0.0], rtol=1e-10, atol=1e-12)

    torch.manual_seed(0)
    a = losses.build("manifold", embedding_dim=D, seed=3).double()
    first = a(emb, labels)
    state = a.state_dict()
    second = a(emb, labels)
    torch.manual_seed(0)
    b = losses.build("manifold", embedding_dim=D, seed=3).double()
    assert torch.equal(b(emb, labels), first)
    b.load_state_dict(state)
    assert torch.equal(b(emb, labels), second) and not torch.equal(first, second)


def test_manifold_meta_classes_small_batches_and_references():
    """N ≥ K: every proxy is some embedding's meta-class; N < K (PML refuses): distinct ones."""
    loss = losses.build("manifold", embedding_dim=D)
    for n in (MANIFOLD_BATCH, 50):
        assert set(loss.meta_classes(n, torch.device("cpu")).tolist()) == set(range(50))
    small = loss.meta_classes(40, torch.device("cpu"))
    assert len(set(small.tolist())) == 40 and 0 <= int(small.min()) and int(small.max()) < 50
    assert torch.isfinite(loss(F.normalize(_raw(0, 40), dim=1).float(), torch.zeros(40)))
    emb = F.normalize(_raw(0, MANIFOLD_BATCH), dim=1).float()
    with pytest.raises(ValueError, match="references"):
        loss(emb, torch.zeros(MANIFOLD_BATCH), emb.clone(), torch.zeros(MANIFOLD_BATCH))
    x = emb.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        value = loss(x.bfloat16(), torch.zeros(MANIFOLD_BATCH))
    value.backward()
    torch.manual_seed(1)
    assert value.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(value, loss(emb, torch.zeros(MANIFOLD_BATCH)), rtol=0.02, atol=0.02)


# ---------------------------------------------------------------- angular miner


def _clustered(seed=0, batch=24, spread=0.6):
    """Class centres plus noise: wide and narrow angles both occur."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(batch, generator=g) % CLASSES
    centres = torch.randn(CLASSES, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return F.normalize(
        torch.randn(batch, D, generator=g, dtype=torch.float64) * spread + centres[labels], dim=1
    ), labels


def _triplet_set(a, p, n):
    return set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))


@pytest.mark.parametrize("with_refs", [False, True])
@pytest.mark.parametrize("angle", [20.0, 30.0])
def test_angular_miner_selects_pmls_triplets(angle, with_refs):
    emb, labels = _clustered()
    refs, ref_labels = _clustered(seed=1, batch=30) if with_refs else (emb, labels)
    want = _triplet_set(*pml_miners.AngularMiner(angle=angle)(emb, labels, *((refs, ref_labels) if with_refs else ())))
    pairs = build_pairs(emb, labels, *((refs, ref_labels) if with_refs else ()))
    dist = euclidean_from_sim(pairs.sim)
    kept = AngularMiner(angle).mine_triplets(dist, euclidean_from_sim(refs @ refs.T), pairs.pos, pairs.neg)
    got = _triplet_set(*kept.nonzero().unbind(1))
    assert got == want
    all_triplets = int((pairs.pos.unsqueeze(2) & pairs.neg.unsqueeze(1)).sum())
    assert 0 < len(got) < all_triplets  # the threshold keeps some and rejects some


@pytest.mark.parametrize("with_refs", [False, True])
def test_triplet_margin_with_the_angular_miner(with_refs):
    """A loss margin of 1 puts nearly every mined triplet on the hinge: equal values mean
    equal selections; the default 0.05 is compared too."""
    raw, labels = _clustered()
    refs, ref_labels = _clustered(seed=1, batch=30) if with_refs else (None, None)
    miner = pml_miners.AngularMiner()
    for margin in (0.05, 1.0):
        ours = losses.build("triplet_margin", miner="angular", margin=margin)
        theirs = pml_losses.TripletMarginLoss(margin=margin)

        def pml(e, theirs=theirs):
            return theirs(e, labels, miner(e, labels, refs, ref_labels), ref_emb=refs, ref_labels=ref_labels)

        got = _value_and_grad(lambda e, ours=ours: ours(e, labels, refs, ref_labels), raw)
        _assert_same(got, _value_and_grad(pml, raw))
        assert got[0] > 0 and got[1][0].abs().sum() > 0
    assert ours.rank_decomposable and ours.pair_mean


# ---------------------------------------------------------------- uniform-histogram miner


def _pml_bins(pml, values):
    """PML's bin index of every value (its own edges and [lo, hi) / [lo, hi] rule)."""
    edges = pml.get_bins(values)
    index = torch.full(values.shape, -1)
    for i in range(len(edges) - 1):
        upper = values < edges[i + 1] if i != len(edges) - 2 else values <= edges[i + 1]
        index[(edges[i] <= values) & upper] = i
    return edges, index


@pytest.mark.parametrize("num_bins", [100, 7])
def test_uniform_histogram_bins_and_quotas(num_bins):
    """Exact against PML: edges, and each pair's bin. Distribution: every occupied bin
    gets exactly ``per_bin`` draws, each inside that bin and among the masked pairs —
    and PML's own output has the same per-bin counts."""
    emb, labels = _clustered(spread=1.5)
    pairs = build_pairs(emb, labels)
    dist = euclidean_from_sim(pairs.sim)
    pml = pml_miners.UniformHistogramMiner(num_bins=num_bins)
    torch.manual_seed(0)
    a1, p, a2, n = pml(emb, labels)
    for mask, (a, o), per_bin in ((pairs.pos, (a1, p), 10), (pairs.neg, (a2, n), 10)):
        values = dist[mask]
        edges, pml_bin = _pml_bins(pml, values)
        lo, hi = values.min(), values.max()
        torch.testing.assert_close(histogram_edges(lo, hi, num_bins), edges, rtol=0, atol=1e-15)
        picks, occupied = uniform_histogram_draws(dist, mask, num_bins, per_bin, torch.Generator().manual_seed(1))
        assert torch.equal(occupied, torch.bincount(pml_bin, minlength=num_bins) > 0)
        flat_bin = torch.full((dist.numel(),), -1)
        flat_bin[mask.flatten()] = pml_bin
        drawn = picks[occupied]
        assert mask.flatten()[drawn].all()
        assert torch.equal(flat_bin[drawn], torch.arange(num_bins)[occupied].unsqueeze(1).expand_as(drawn))
        # PML's mined pairs: the same quota in the same bins
        pml_pairs = (a * dist.shape[1] + o).tolist()
        pml_counts = torch.bincount(flat_bin[pml_pairs], minlength=num_bins)
        assert torch.equal(pml_counts, occupied.long() * per_bin)


def test_uniform_histogram_draws_are_uniform_within_a_bin():
    """Three bins over 0..8 with 1, 3 and 5 members: 30000 draws each, every member's
    share within 4% of 1/members (≈ 4 standard deviations)."""
    values = torch.tensor([[0.0, 3.1, 3.5, 3.9, 6.1, 6.5, 7.0, 7.5, 8.0, 99.0]], dtype=torch.float64)
    mask = torch.ones_like(values, dtype=torch.bool)
    mask[0, -1] = False
    picks, occupied = uniform_histogram_draws(values, mask, 3, 30000, torch.Generator().manual_seed(0))
    assert occupied.tolist() == [True, True, True]
    for members, row in zip(([0], [1, 2, 3], [4, 5, 6, 7, 8]), picks, strict=True):
        counts = torch.bincount(row, minlength=10)[members].double() / row.numel()
        assert counts.sum() == 1.0
        torch.testing.assert_close(counts, torch.full_like(counts, 1 / len(members)), rtol=0.04, atol=0)


def test_uniform_histogram_miner_masks_and_triplet_margin():
    """The miner's masks are the distinct drawn pairs; triplet_margin on them is PML's
    TripletMarginLoss on those pairs (PML repeats a pair drawn twice; a mask does not)."""
    raw, labels = _clustered(spread=1.5)
    emb = F.normalize(raw, dim=1)
    pairs = build_pairs(emb, labels)
    dist = euclidean_from_sim(pairs.sim)
    selection = UniformHistogramMiner(20, 2, 3, generator=torch.Generator().manual_seed(2)).mine(
        dist, pairs.pos, pairs.neg
    )
    g = torch.Generator().manual_seed(2)  # the miner draws positives, then negatives
    for mask, full, per_bin in ((selection.pos, pairs.pos, 2), (selection.neg, pairs.neg, 3)):
        picks, occupied = uniform_histogram_draws(dist, full, 20, per_bin, g)
        want = torch.zeros(full.numel(), dtype=torch.bool)
        want[picks[occupied]] = True
        assert torch.equal(mask.flatten(), want) and not (mask & ~full).any()
        assert int(mask.sum()) < int(occupied.sum()) * per_bin  # some pair was drawn twice
    miner = UniformHistogramMiner(generator=torch.Generator().manual_seed(5))
    ours = losses.build("triplet_margin", miner=miner, margin=1.0)
    mined = miner.mine(dist, pairs.pos, pairs.neg)
    a1, p = mined.pos.nonzero().unbind(1)
    a2, n = mined.neg.nonzero().unbind(1)
    miner.generator = torch.Generator().manual_seed(5)  # the loss draws the same masks
    theirs = pml_losses.TripletMarginLoss(margin=1.0)
    got = _value_and_grad(lambda e: ours(e, labels), raw)
    _assert_same(got, _value_and_grad(lambda e: theirs(e, labels, (a1, p, a2, n)), raw))
    assert got[0] > 0 and not ours.rank_decomposable


def test_new_miners_are_registered_with_pmls_defaults():
    angular = build_miner("angular")
    histogram = build_miner("uniform_histogram")
    pml_angular, pml_histogram = pml_miners.AngularMiner(), pml_miners.UniformHistogramMiner()
    assert math.isclose(math.radians(angular.angle), pml_angular.angle)
    assert (histogram.num_bins, histogram.pos_per_bin, histogram.neg_per_bin) == (
        pml_histogram.num_bins,
        pml_histogram.pos_per_bin,
        pml_histogram.neg_per_bin,
    )
    with pytest.raises(ValueError, match="angle"):
        build_miner("angular", angle=90)
