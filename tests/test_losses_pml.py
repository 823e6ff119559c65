"""Agreement with pytorch-metric-learning (PML) where it implements the same loss.

Each test states the configuration under which the two definitions coincide: PML's
reducers (MeanReducer averages the elements it returns, AvgNonZeroReducer only the
non-zero ones; dmlray averages over all B anchors, so SumReducer/B is used where they
differ), its distances (it normalises embeddings itself: gradients are compared through
a normalisation of raw vectors, where the two agree), and where the definitions differ
by a constant or a factor. Float64 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PML's own deprecation notices
from pytorch_metric_learning import distances, miners, reducers  # noqa: E402

from dmlray import losses  # noqa: E402
from dmlray.losses.base import build_pairs, euclidean_from_sim  # noqa: E402
from dmlray.losses.miners import distance_weighted_triplets, semihard_negatives  # noqa: E402

D = 16


def _batch(seed=0, batch=24, classes=6, per_class=None):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, D, generator=g, dtype=torch.float64)
    labels = torch.arange(batch) % classes if per_class is None else torch.arange(batch) // per_class
    return raw, labels


def _refs(seed=1, size=30, classes=6):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(size, D, generator=g, dtype=torch.float64), dim=1), torch.randint(
        0, classes, (size,), generator=g
    )


def _value_and_grad(fn, raw, *params):
    raw = raw.clone().requires_grad_(True)
    value = fn(F.normalize(raw, dim=1))
    grads = torch.autograd.grad(value, [raw, *params])
    return value.detach(), grads


def _assert_same(ours, theirs, scale=1.0, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(ours[0], scale * theirs[0], rtol=rtol, atol=atol)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, scale * b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("with_refs", [False, True])
def test_multi_similarity_with_ms_miner(with_refs):
    """MultiSimilarityLoss(α, β, λ) on MultiSimilarityMiner(ε) pairs, MeanReducer: equal.

    PML zeroes each term of an anchor separately; dmlray skips the anchor when P' or N'
    is empty — the same thing, since under MS mining P' = ∅ ⟺ N' = ∅.
    """
    raw, labels = _batch()
    refs, ref_labels = _refs() if with_refs else (None, None)
    ours = losses.build("multi_similarity", alpha=2.0, beta=40.0, base=0.5, margin=0.1)
    theirs = pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)
    miner = miners.MultiSimilarityMiner(epsilon=0.1)

    def pml(e):
        if refs is None:
            return theirs(e, labels, miner(e, labels))
        return theirs(e, labels, miner(e, labels, refs, ref_labels), refs, ref_labels)

    _assert_same(_value_and_grad(lambda e: ours(e, labels, refs, ref_labels), raw), _value_and_grad(pml, raw))


def test_multi_similarity_with_cross_batch_memory():
    """PML's CrossBatchMemory(MS loss, MS miner) = dmlray MS on (batch, memory, self_index).

    The memory holds the current batch (enqueued first); PML removes each anchor's
    self-comparison after mining, dmlray excludes it by ``self_index``. Every anchor has
    other positives in memory, so PML's miner seeing the self pair changes nothing.
    """
    torch.manual_seed(0)
    memory_size, batch = 64, 16
    cbm = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5),
        D,
        memory_size=memory_size,
        miner=miners.MultiSimilarityMiner(epsilon=0.1),
    ).double()
    ours = losses.build("multi_similarity")
    for step in range(6):  # wraps around the ring buffer
        raw, labels = _batch(seed=step, batch=batch, classes=4)
        emb = F.normalize(raw, dim=1)
        with torch.no_grad():
            theirs = cbm(emb, labels)
        own = cbm.curr_batch_idx.clone()
        mem, mem_labels = cbm.embedding_memory.clone(), cbm.label_memory.clone()
        if not cbm.has_been_filled:
            mem, mem_labels = mem[: cbm.queue_idx], mem_labels[: cbm.queue_idx]
        value = ours(emb, labels, mem, mem_labels, own)
        torch.testing.assert_close(value, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_refs", [False, True])
def test_contrastive_differs_by_the_margin_constant(with_refs):
    """PML ContrastiveLoss(pos_margin=1, neg_margin=m, CosineSimilarity, SumReducer)/B has
    the same gradient; PML's negative term is [s − m]_+ where XBM's is s·[s > m], so the
    values differ by m · #{active negatives} / B exactly."""
    raw, labels = _batch()
    refs, ref_labels = _refs() if with_refs else (None, None)
    m = 0.5
    ours = losses.build("contrastive", margin=m)
    theirs = pml_losses.ContrastiveLoss(
        pos_margin=1, neg_margin=m, distance=distances.CosineSimilarity(), reducer=reducers.SumReducer()
    )
    b = len(raw)
    got = _value_and_grad(lambda e: ours(e, labels, refs, ref_labels), raw)
    want = _value_and_grad(lambda e: theirs(e, labels, ref_emb=refs, ref_labels=ref_labels) / b, raw)
    pairs = build_pairs(F.normalize(raw, dim=1), labels, refs, ref_labels)
    active = (pairs.neg & (pairs.sim > m)).sum().item()
    assert active > 0
    torch.testing.assert_close(got[0], want[0] + m * active / b)
    torch.testing.assert_close(got[1][0], want[1][0])


def test_triplet_semihard_equals_pml_triplet_loss_on_its_triplets():
    """Our semi-hard triplets fed to TripletMarginLoss(m, MeanReducer) give the same loss.

    PML's TripletMarginMiner("semihard") keeps *every* negative in the band
    d_ap < d_an < d_ap + m — not FaceNet's one-per-positive rule — so the selection
    itself is checked against a loop in test_losses / test_miners, not against PML.
    """
    raw, labels = _batch(per_class=4)
    ours = losses.build("triplet_semihard", margin=0.2)
    pairs = build_pairs(F.normalize(raw, dim=1), labels)
    negative, valid = semihard_negatives(euclidean_from_sim(pairs.sim), pairs.pos, pairs.neg)
    a, p = valid.nonzero(as_tuple=True)
    n = negative[a, p]
    theirs = pml_losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer())
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw),
        _value_and_grad(lambda e: theirs(e, labels, (a, p, n)), raw),
        rtol=1e-6,
        atol=1e-8,
    )


def test_lifted_structure_is_twice_generalized_lifted_at_unit_scales():
    """At α = β = 1, dmlray's L_i = 2·(log Σ_P e^{−s} + log Σ_N e^{s}); PML's
    GeneralizedLiftedStructureLoss(pos_margin=0, neg_margin=0, CosineSimilarity) is
    [log Σ_P e^{−s} + log Σ_N e^{s}]_+ per anchor. They coincide ×2 when no hinge is
    active (checked); at α = 40, β = 2 the definitions differ (PML has no scales)."""
    raw, labels = _batch(per_class=4)
    ours = losses.build("lifted_structure", alpha=1.0, beta=1.0)
    theirs = pml_losses.GeneralizedLiftedStructureLoss(
        neg_margin=0, pos_margin=0, distance=distances.CosineSimilarity()
    )
    per_anchor = pml_losses.GeneralizedLiftedStructureLoss(
        neg_margin=0, pos_margin=0, distance=distances.CosineSimilarity(), reducer=reducers.DoNothingReducer()
    )(F.normalize(raw, dim=1), labels)["loss"]["losses"]
    assert (per_anchor > 0).all()
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw), _value_and_grad(lambda e: theirs(e, labels), raw), scale=2.0
    )


@pytest.mark.parametrize("config", ["cosine", "squared_euclidean"])
def test_nca(config):
    """NCALoss with SumReducer/B: CosineSimilarity at softmax_scale = σ, or PML's default
    squared Euclidean distance at softmax_scale = σ/2 (−‖a − b‖² = 2s − 2, the constant cancels)."""
    raw, labels = _batch()
    sigma = 16.0
    ours = losses.build("nca", scale=sigma)
    if config == "cosine":
        theirs = pml_losses.NCALoss(
            softmax_scale=sigma, distance=distances.CosineSimilarity(), reducer=reducers.SumReducer()
        )
    else:
        theirs = pml_losses.NCALoss(softmax_scale=sigma / 2, reducer=reducers.SumReducer())
    b = len(raw)
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw),
        _value_and_grad(lambda e: theirs(e, labels) / b, raw),
        rtol=1e-6,
        atol=1e-8,
    )


def test_margin_loss_on_the_same_triplets():
    """MarginLoss(m, ν=0, β, learn_beta, num_classes) on our distance-weighted triplets:
    same value and gradients (embeddings and β); dmlray's d carries the seed's +1e-8."""
    raw, labels = _batch(per_class=4)
    classes = 6
    ours = losses.build("margin", num_classes=classes, embedding_dim=D, seed=11).double()
    theirs = pml_losses.MarginLoss(margin=0.2, nu=0, beta=1.2, learn_beta=True, num_classes=classes)
    theirs.beta.data = theirs.beta.data.double()
    with torch.no_grad():
        spread = torch.linspace(0.9, 1.4, classes, dtype=torch.float64)
        ours.beta.copy_(spread)
        theirs.beta.copy_(spread)
    pairs = build_pairs(F.normalize(raw, dim=1), labels)
    positive, negative, valid = distance_weighted_triplets(
        pairs.sim, pairs.pos, pairs.neg, D, 0.5, 1.4, torch.Generator().manual_seed(11)
    )
    a = valid.nonzero(as_tuple=True)[0]
    triplets = (a, positive[a], negative[a])
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw, ours.beta),
        _value_and_grad(lambda e: theirs(e, labels, triplets), raw, theirs.beta),
        rtol=1e-6,
        atol=1e-7,
    )


def test_proxy_nca_without_smoothing():
    """ProxyNCALoss(softmax_scale = s_x·s_p) with the same proxies = dmlray's at smoothing 0
    and s_x = s_p (‖s x − s p‖² = s²‖x − p‖²)."""
    raw, labels = _batch()
    ours = losses.build("proxy_nca", num_classes=6, embedding_dim=D, smoothing=0.0).double()
    theirs = pml_losses.ProxyNCALoss(num_classes=6, embedding_size=D, softmax_scale=9)
    theirs.proxies.data = ours.proxies.data.clone()
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw, ours.proxies),
        _value_and_grad(lambda e: theirs(e, labels), raw, theirs.proxies),
        rtol=1e-6,
        atol=1e-8,
    )


def test_proxy_anchor():
    raw, labels = _batch(classes=5)
    ours = losses.build("proxy_anchor", num_classes=7, embedding_dim=D).double()  # two classes absent
    theirs = pml_losses.ProxyAnchorLoss(num_classes=7, embedding_size=D, margin=0.1, alpha=32)
    theirs.proxies.data = ours.proxies.data.clone()
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw, ours.proxies),
        _value_and_grad(lambda e: theirs(e, labels), raw, theirs.proxies),
    )


def test_softtriple_without_center_regulariser():
    """SoftTripleLoss(C, D, K, λ, γ, δ) with the same centres = dmlray's at τ = 0 (PML has
    no centre-spread term; it offers a generic weight regulariser instead)."""
    raw, labels = _batch()
    ours = losses.build("softtriple", num_classes=6, embedding_dim=D, centers_per_class=2, tau=0.0).double()
    theirs = pml_losses.SoftTripleLoss(
        num_classes=6, embedding_size=D, centers_per_class=2, la=20, gamma=0.1, margin=0.01
    )
    theirs.fc.data = ours.fc.data.clone()
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw, ours.fc),
        _value_and_grad(lambda e: theirs(e, labels), raw, theirs.fc),
    )


def test_normalized_softmax():
    raw, labels = _batch()
    ours = losses.build("cross_entropy", num_classes=6, embedding_dim=D, temperature=0.05).double()
    theirs = pml_losses.NormalizedSoftmaxLoss(num_classes=6, embedding_size=D, temperature=0.05)
    theirs.W.data = ours.weight.data.T.clone()
    got = _value_and_grad(lambda e: ours(e, labels), raw, ours.weight)
    want = _value_and_grad(lambda e: theirs(e, labels), raw, theirs.W)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][0], want[1][0])
    torch.testing.assert_close(got[1][1], want[1][1].T)


def test_npair_on_first_two_samples_per_class():
    """NPairsLoss takes, per label, the first positive pair — the first two samples of the
    class, our tuple — and a cross-entropy over the tuples' positives: equal at l2_reg = 0."""
    raw, labels = _batch()
    labels = torch.tensor([3, 1, 3, 0, 1, 2, 0, 5, 3, 2, 1, 4, 4, 0, 2, 1, 5, 0, 3, 2, 4, 1, 5, 3])
    ours = losses.build("npair", l2_reg=0.0)
    theirs = pml_losses.NPairsLoss()
    _assert_same(_value_and_grad(lambda e: ours(e, labels), raw), _value_and_grad(lambda e: theirs(e, labels), raw))


def test_angular_all_pairs():
    """AngularLoss(alpha = α°) = dmlray's ``tuples="all"`` at tan²α, l2_reg = 0 (PML forms
    every positive pair with every negative; the CBML code's N-pair tuples differ)."""
    raw, labels = _batch(per_class=4)
    ours = losses.build("angular", tuples="all", angle_bound=math.tan(math.radians(40)) ** 2, l2_reg=0.0)
    theirs = pml_losses.AngularLoss(alpha=40)
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw),
        _value_and_grad(lambda e: theirs(e, labels), raw),
        rtol=1e-6,
        atol=1e-8,
    )


def test_histogram():
    """HistogramLoss(n_bins) = dmlray's with num_steps = n_bins + 1 nodes (PML counts each
    unordered pair once, dmlray both orders: the normalised histograms are the same). PML
    finds the bin of a similarity in float32 even for float64 inputs, hence the 1e-5."""
    raw, labels = _batch(per_class=4)
    ours = losses.build("histogram", num_steps=51)
    theirs = pml_losses.HistogramLoss(n_bins=50)
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw),
        _value_and_grad(lambda e: theirs(e, labels), raw),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("with_refs", [False, True])
def test_circle(with_refs):
    """CircleLoss(m, γ) with SumReducer/B (its default AvgNonZeroReducer skips zero anchors)."""
    raw, labels = _batch()
    refs, ref_labels = _refs() if with_refs else (None, None)
    ours = losses.build("circle", m=0.4, gamma=80.0)
    theirs = pml_losses.CircleLoss(m=0.4, gamma=80, reducer=reducers.SumReducer())
    b = len(raw)
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels, refs, ref_labels), raw),
        _value_and_grad(lambda e: theirs(e, labels, ref_emb=refs, ref_labels=ref_labels) / b, raw),
        rtol=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("with_refs", [False, True])
def test_supcon(with_refs):
    """SupConLoss(τ) with SumReducer/B, on a batch with negatives (PML returns 0 for a batch
    without any negative pair, dmlray still pulls its positives together)."""
    raw, labels = _batch()
    refs, ref_labels = _refs() if with_refs else (None, None)
    ours = losses.build("supcon", temperature=0.1)
    theirs = pml_losses.SupConLoss(temperature=0.1, reducer=reducers.SumReducer())
    b = len(raw)
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels, refs, ref_labels), raw),
        _value_and_grad(lambda e: theirs(e, labels, ref_emb=refs, ref_labels=ref_labels) / b, raw),
    )
