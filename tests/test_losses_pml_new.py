"""The losses added for issue #17 against pytorch-metric-learning (PML), float64.

``dmlray.losses.build(name)`` with its defaults is PML's loss with PML's defaults: every
test builds both sides with defaults only (plus the class count and dimension where the
loss owns class weights, the same weights copied across) and compares the value and the
gradients — of the raw embeddings, through a normalisation, and of the loss's
parameters — on random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PML's own deprecation notices

from dmlray import losses  # noqa: E402

D = 16
CLASSES = 6


def _batch(seed=0, batch=24, classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, D, generator=g, dtype=torch.float64)
    labels = torch.randperm(batch, generator=g) % classes
    return raw, labels


def _value_and_grad(fn, raw, *params):
    raw = raw.clone().requires_grad_(True)
    value = fn(F.normalize(raw, dim=1))
    grads = torch.autograd.grad(value, [raw, *params])
    return value.detach(), grads


def _assert_same(ours, theirs, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=atol)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- margin-softmax family

CLASSIFIERS = {
    "arcface": lambda: pml_losses.ArcFaceLoss(num_classes=CLASSES, embedding_size=D),
    "cosface": lambda: pml_losses.CosFaceLoss(num_classes=CLASSES, embedding_size=D),
    "sphereface": lambda: pml_losses.SphereFaceLoss(num_classes=CLASSES, embedding_size=D),
    "large_margin_softmax": lambda: pml_losses.LargeMarginSoftmaxLoss(num_classes=CLASSES, embedding_size=D),
    "subcenter_arcface": lambda: pml_losses.SubCenterArcFaceLoss(num_classes=CLASSES, embedding_size=D),
    "p2sgrad": lambda: pml_losses.P2SGradLoss(descriptors_dim=D, num_classes=CLASSES),
}


def _pml_weight(theirs):
    return theirs.weight if hasattr(theirs, "weight") else theirs.W


def _class_batch(weight, seed):
    """Random anchors, a third of them near their class's weight and a third near its
    opposite: targets on both sides of ArcFace's θ = π − m switch and in every L-Softmax
    piece k = ⌊4θ/π⌋ (checked), so every branch is compared."""
    raw, labels = _batch(seed)
    centre = F.normalize(weight[labels * (weight.shape[0] // CLASSES)], dim=1)
    raw[:8] = centre[:8] * 3 + raw[:8] * 0.3
    raw[8:16] = -centre[8:16] * 3 + raw[8:16] * 0.3
    theta = torch.acos((F.normalize(raw, dim=1) * centre).sum(dim=1))
    assert (theta > math.pi - math.radians(28.6)).any() and (theta < math.radians(20)).any()
    assert set(torch.floor(theta / (math.pi / 4)).long().tolist()) == {0, 1, 2, 3}
    return raw, labels


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_margin_softmax_family_at_defaults(name, seed):
    torch.manual_seed(seed)
    ours = losses.build(name, num_classes=CLASSES, embedding_dim=D).double()
    theirs = CLASSIFIERS[name]().double()
    # PML keeps W as (D, C·K); dmlray as (C·K, D); the same weights on both sides
    _pml_weight(theirs).data = ours.weight.data.T.clone()
    raw, labels = _class_batch(ours.weight.detach(), seed)
    got = _value_and_grad(lambda e: ours(e, labels), raw, ours.weight)
    want = _value_and_grad(lambda e: theirs(e, labels), raw, _pml_weight(theirs))
    _assert_same((got[0], (got[1][0], got[1][1].T)), want)
    assert got[1][0].abs().sum() > 0 and got[1][1].abs().sum() > 0


# ---------------------------------------------------------------- pair and tuple losses


def _refs(seed=1, size=30, classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    refs = F.normalize(torch.randn(size, D, generator=g, dtype=torch.float64), dim=1)
    return refs, torch.randint(0, classes, (size,), generator=g)


PAIR_LOSSES = {
    "tuplet_margin": pml_losses.TupletMarginLoss,
    "ntxent": pml_losses.NTXentLoss,
    "generalized_lifted_structure": pml_losses.GeneralizedLiftedStructureLoss,
    "intra_pair_variance": pml_losses.IntraPairVarianceLoss,
    "snr_contrastive": pml_losses.SignalToNoiseRatioContrastiveLoss,
    "threshold_consistent_margin": pml_losses.ThresholdConsistentMarginLoss,
    "fast_ap": pml_losses.FastAPLoss,
}
# PML's TCM pairs anchors with ``embeddings[p]`` even when references are given (it
# ignores ref_emb), so it is compared on the batch only; with references dmlray's pairs
# are anchor × reference like every other pair loss (the distributed test covers them).
# PML's FastAP refuses references; dmlray's anchors rank them like the batch.
NO_PML_REFS = {"threshold_consistent_margin", "fast_ap"}


@pytest.mark.parametrize("with_refs", [False, True])
@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_losses_at_defaults(name, with_refs):
    if with_refs and name in NO_PML_REFS:
        pytest.skip("PML ignores the references of this loss")
    raw, labels = _batch()
    refs, ref_labels = _refs() if with_refs else (None, None)
    ours = losses.build(name)
    theirs = PAIR_LOSSES[name]()
    got = _value_and_grad(lambda e: ours(e, labels, refs, ref_labels), raw)
    want = _value_and_grad(lambda e: theirs(e, labels, ref_emb=refs, ref_labels=ref_labels), raw)
    _assert_same(got, want)
    assert got[0] != 0 and got[1][0].abs().sum() > 0


# ---------------------------------------------------------------- triplet margin loss and miners

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

MINER_CASES = {
    "none": (None, {}, None),
    "batch_hard": ("batch_hard", {}, lambda: pml_miners.BatchHardMiner()),
    "batch_easy_hard": ("batch_easy_hard", {}, lambda: pml_miners.BatchEasyHardMiner()),
    "batch_easy_hard_semihard_pos": (
        "batch_easy_hard",
        {"pos_strategy": "semihard", "neg_strategy": "hard"},
        lambda: pml_miners.BatchEasyHardMiner(pos_strategy="semihard", neg_strategy="hard"),
    ),
    "batch_easy_hard_all_easy_ranged": (
        "batch_easy_hard",
        {"pos_strategy": "all", "neg_strategy": "easy", "allowed_neg_range": (0.9, 1.3)},
        lambda: pml_miners.BatchEasyHardMiner(pos_strategy="all", neg_strategy="easy", allowed_neg_range=(0.9, 1.3)),
    ),
    # at the default neg_margin 0.8 no negative pair of these batches is mined
    "pair_margin": ("pair_margin", {"neg_margin": 1.2}, lambda: pml_miners.PairMarginMiner(neg_margin=1.2)),
    "hdc": ("hdc", {}, lambda: pml_miners.HDCMiner()),
    **{
        f"triplet_margin_{kind}": (
            "triplet_margin",
            {"type_of_triplets": kind},
            lambda kind=kind: pml_miners.TripletMarginMiner(type_of_triplets=kind),
        )
        for kind in ("all", "hard", "semihard", "easy")
    },
}


def _clustered_batch(seed=0, batch=24):
    """Labels with a spread of class centres: easy, semi-hard and hard triplets all occur."""
    raw, labels = _batch(seed, batch)
    centres = torch.randn(CLASSES, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return raw * 0.6 + centres[labels], labels


@pytest.mark.parametrize("with_refs", [False, True])
@pytest.mark.parametrize("case", sorted(MINER_CASES))
def test_triplet_margin_with_each_miner(case, with_refs):
    """TripletMarginLoss on PML miner(e, labels[, refs]) = dmlray's triplet_margin with that
    miner; "none" is both sides' defaults (all triplets, m = 0.05)."""
    name, params, pml_miner = MINER_CASES[case]
    raw, labels = _clustered_batch()
    refs, ref_labels = _clustered_batch(seed=1, batch=30) if with_refs else (None, None)
    refs = None if refs is None else F.normalize(refs, dim=1)
    # a loss margin of 1 puts nearly every mined triplet on the hinge, so equal values
    # mean equal selections (at 0.05 most mined triplets score 0 whatever is mined)
    margin = {} if name is None else {"margin": 1.0}
    ours = losses.build("triplet_margin", miner=name, miner_params=params or None, **margin)
    theirs = pml_losses.TripletMarginLoss(**margin)
    miner = pml_miner() if pml_miner else None

    def pml(e):
        tuples = None if miner is None else miner(e, labels, refs, ref_labels)
        return theirs(e, labels, tuples, ref_emb=refs, ref_labels=ref_labels)

    got = _value_and_grad(lambda e: ours(e, labels, refs, ref_labels), raw)
    want = _value_and_grad(pml, raw)
    _assert_same(got, want)
    assert got[0] != 0 and got[1][0].abs().sum() > 0


def test_fast_ap_with_references_is_pml_on_the_concatenation():
    """PML's FastAP refuses references, but anchor i's row of PML on [batch; references]
    ranks the other batch samples and the references: dmlray's anchors against
    references = [batch; references] with self_index = arange(B). Compared on the mean
    of PML's per-anchor losses (DoNothingReducer) over the batch's anchors."""
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    raw, labels = _batch()
    refs, ref_labels = _refs()
    b = len(raw)
    ours = losses.build("fast_ap")
    theirs = pml_losses.FastAPLoss(reducer=reducers.DoNothingReducer())

    def pml(e):
        out = theirs(torch.cat([e, refs]), torch.cat([labels, ref_labels]))["loss"]
        return out["losses"][out["indices"] < b].mean()

    def dmlray(e):
        return ours(e, labels, torch.cat([e, refs]), torch.cat([labels, ref_labels]), torch.arange(b))

    _assert_same(_value_and_grad(dmlray, raw), _value_and_grad(pml, raw))


# ---------------------------------------------------------------- ranking surrogates


def _smooth_ap_loop(e, labels, tau):
    """The paper's formula, one query and one positive at a time."""
    total, queries = 0.0, 0
    for q in range(len(e)):
        others = [j for j in range(len(e)) if j != q]
        positives = [j for j in others if labels[j] == labels[q]]
        if not positives:
            continue
        s = {j: e[q] @ e[j] for j in others}
        ap = 0.0
        for i in positives:
            rank = 1 + sum(torch.sigmoid((s[j] - s[i]) / tau) for j in others if j != i)
            rank_pos = 1 + sum(torch.sigmoid((s[j] - s[i]) / tau) for j in positives if j != i)
            ap = ap + rank_pos / rank
        total = total + 1 - ap / len(positives)
        queries += 1
    return total / queries


@pytest.mark.parametrize("tau", [0.01, 0.2])
def test_smooth_ap_matches_the_papers_formula(tau):
    raw, labels = _batch(batch=14)
    labels[0] = 99  # an anchor without positives: left out of the mean
    ours = losses.build("smooth_ap", temperature=tau)
    _assert_same(
        _value_and_grad(lambda e: ours(e, labels), raw), _value_and_grad(lambda e: _smooth_ap_loop(e, labels, tau), raw)
    )


@pytest.mark.parametrize("anneal", [0.01, 0.2])
@pytest.mark.parametrize("variant", ["O", "Ds", "Dq", "Iu", "Ib"])
def test_pnp_every_variant(variant, anneal):
    """PNPLoss(variant, anneal), PML's defaults otherwise: τ = 0.01 (the default) leaves
    sigmoid gradients only near ties, τ = 0.2 gives every pair one."""
    raw, labels = _batch()
    ours = losses.build("pnp", variant=variant, anneal=anneal)
    theirs = pml_losses.PNPLoss(variant=variant, anneal=anneal)
    got = _value_and_grad(lambda e: ours(e, labels), raw)
    _assert_same(got, _value_and_grad(lambda e: theirs(e, labels), raw))
    assert got[1][0].abs().sum() > 0


def test_pnp_at_defaults():
    raw, labels = _batch()
    _assert_same(
        _value_and_grad(lambda e: losses.build("pnp")(e, labels), raw),
        _value_and_grad(lambda e: pml_losses.PNPLoss()(e, labels), raw),
    )


def test_dynamic_soft_margin_over_several_steps():
    """Three calls: the first fills the histogram (momentum 1), the next blend in with
    momentum 0.01 — value, gradient and histogram agree with PML's at every step. PML's
    histogram keeps the previous step's graph, so its state is detached between steps as
    dmlray's is (a second backward through it would fail)."""
    ours = losses.build("dynamic_soft_margin").double()
    theirs = pml_losses.DynamicSoftMarginLoss()
    for step in range(3):
        raw, labels = _batch(seed=step)
        got = _value_and_grad(lambda e, y=labels: ours(e, y), raw)
        want = _value_and_grad(lambda e, y=labels: theirs(e, y), raw)
        _assert_same(got, want)
        theirs.hist_ = theirs.hist_.detach()
        torch.testing.assert_close(ours.hist, theirs.hist_, rtol=1e-9, atol=1e-12)
        assert got[1][0].abs().sum() > 0


def _our_triplets(selection, dist):
    """The (a, p, n) triplets a TripletSelection keeps, by a loop."""
    out = set()
    lo, hi = selection.margin_range or (float("-inf"), float("inf"))
    for a in range(dist.shape[0]):
        for p in selection.pos[a].nonzero().flatten().tolist():
            for n in selection.neg[a].nonzero().flatten().tolist():
                if lo < float(dist[a, n] - dist[a, p]) <= hi:
                    out.add((a, p, n))
    return out


@pytest.mark.parametrize("case", sorted(set(MINER_CASES) - {"none"}))
def test_miners_select_pmls_triplets(case):
    """Each miner's selection, as triplets, is the set PML's miner returns (PML's pair
    miners' output turned into triplets as its TripletMarginLoss does)."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    from dmlray.losses.base import build_pairs, euclidean_from_sim
    from dmlray.losses.miners import build_miner

    name, params, pml_miner = MINER_CASES[case]
    raw, labels = _clustered_batch()
    emb = F.normalize(raw, dim=1)
    pairs = build_pairs(emb, labels)
    dist = euclidean_from_sim(pairs.sim)
    ours = _our_triplets(build_miner(name, **params).mine(dist, pairs.pos, pairs.neg), dist)
    a, p, n = lmu.convert_to_triplets(pml_miner()(emb, labels), labels)
    theirs = set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    assert ours == theirs
    assert ours, "a miner that selects nothing proves nothing"
