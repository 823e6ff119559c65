"""Every loss against a plain Python loop over anchors and pairs written from its formula.

Values and gradients (through a normalisation, as in training) are compared in float64
on small batches: without references, with references, with ``self_index`` (including
-1 entries), and on the edge cases (one class, singletons, nothing mined, duplicates).
Row-wise losses run on all three engine paths (default chunks, one row per chunk, plain
autograd).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from recipes import PML_CHECKED_PAIR_LOSSES

from dmlray import losses
from dmlray.losses.miners import distance_weighted_triplets
from dmlray.losses.rowwise import RowwiseLoss

D = 8


# ---------------------------------------------------------------- inputs


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def make_case(name: str, seed: int = 0) -> dict:
    """Raw (pre-normalisation) anchors and the contract's optional reference arguments."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(12, D, generator=g, dtype=torch.float64)
    labels = torch.arange(12) % 4
    case = {"raw": raw, "labels": labels, "refs": None, "ref_labels": None, "self_index": None}
    if name == "batch":
        pass
    elif name == "refs":
        case["refs"] = _unit(torch.randn(15, D, generator=g, dtype=torch.float64))
        case["ref_labels"] = torch.randint(0, 5, (15,), generator=g)
    elif name == "self_index":
        # memory = [other entries | the batch (detached) | more]; some anchors' slots are -1
        extra = _unit(torch.randn(10, D, generator=g, dtype=torch.float64))
        case["refs"] = torch.cat([extra[:6], _unit(raw).detach(), extra[6:]])
        case["ref_labels"] = torch.cat(
            [torch.randint(0, 4, (6,), generator=g), labels, torch.randint(0, 4, (4,), generator=g)]
        )
        own = torch.arange(12) + 6
        own[[1, 7]] = -1
        case["self_index"] = own
    elif name == "one_class":
        case["labels"] = torch.zeros(12, dtype=torch.long)
    elif name == "singletons":
        case["labels"] = torch.arange(12)
    elif name == "duplicates":
        raw[5] = raw[1]
        raw[9] = raw[1]
        raw[10] = raw[2]
        case["labels"] = torch.tensor([0, 0, 1, 1, 2, 0, 2, 3, 3, 0, 3, 1])
    elif name == "separated":
        # classes on orthogonal axes, tight: every positive beats every negative by far
        axes = torch.eye(D, dtype=torch.float64)[labels]
        case["raw"] = axes + 0.01 * torch.randn(12, D, generator=g, dtype=torch.float64)
    else:
        raise ValueError(name)
    return case


CASES = ["batch", "refs", "self_index", "one_class", "singletons", "duplicates", "separated"]


class Loop:
    """Per-anchor pair sets of the contract, for the loop references."""

    def __init__(self, emb, labels, refs, ref_labels, self_index):
        self.emb = emb
        no_refs = refs is None
        self.refs = emb if no_refs else refs
        self.ref_labels = labels if no_refs else ref_labels
        self.labels = labels
        self.sim = emb @ self.refs.T
        self.own = list(range(len(emb))) if no_refs else (None if self_index is None else self_index.tolist())
        self.B, self.M = self.sim.shape

    def pairs(self, i):
        own = None if self.own is None else self.own[i]
        others = [j for j in range(self.M) if j != own]
        pos = [j for j in others if self.ref_labels[j] == self.labels[i]]
        neg = [j for j in others if self.ref_labels[j] != self.labels[i]]
        return pos, neg

    def s(self, i, j):
        return self.sim[i, j]


def _lse(xs):
    return torch.logsumexp(torch.stack(xs), dim=0)


def _dist(s):
    return torch.sqrt(torch.clamp(2 - 2 * s, min=1e-12))


def ms_sets(lp, i, eps):
    pos, neg = lp.pairs(i)
    if not pos or not neg:
        return [], []
    min_pos = min(lp.s(i, p) for p in pos)
    max_neg = max(lp.s(i, n) for n in neg)
    return [p for p in pos if lp.s(i, p) - eps < max_neg], [n for n in neg if lp.s(i, n) + eps > min_pos]


def mined(lp, i, mining, eps=0.1):
    return ms_sets(lp, i, eps) if mining == "ms" else lp.pairs(i)


# ---------------------------------------------------------------- loop references


def ref_contrastive(lp, margin=0.5, mining=None):
    total = 0.0
    for i in range(lp.B):
        pos, neg = mined(lp, i, mining)
        total = total + sum((1 - lp.s(i, p) for p in pos), torch.tensor(0.0, dtype=torch.float64))
        total = total + sum((lp.s(i, n) for n in neg if lp.s(i, n) > margin), torch.tensor(0.0, dtype=torch.float64))
    return total / lp.B


def ref_triplet_semihard(lp, margin=0.2):
    total, count = 0.0, 0
    for i in range(lp.B):
        pos, neg = lp.pairs(i)
        if not neg:
            continue
        for p in pos:
            d_ap = _dist(lp.s(i, p))
            farther = [n for n in neg if _dist(lp.s(i, n)) > d_ap]
            if farther:
                n = min(farther, key=lambda n: float(_dist(lp.s(i, n)).detach()))
            else:
                n = max(neg, key=lambda n: float(_dist(lp.s(i, n)).detach()))
            total = total + torch.relu(d_ap - _dist(lp.s(i, n)) + margin)
            count += 1
    return total / max(count, 1)


def ref_lifted(lp, alpha=40.0, beta=2.0, mining=None):
    total = 0.0
    for i in range(lp.B):
        pos, neg = mined(lp, i, mining)
        if pos and neg:
            total = total + 2 / beta * _lse([-beta * lp.s(i, p) for p in pos])
            total = total + 2 / alpha * _lse([alpha * lp.s(i, n) for n in neg])
    return total / lp.B


def ref_binomial(lp, alpha=40.0, beta=2.0, base=0.5, mining=None):
    total = 0.0
    for i in range(lp.B):
        pos, neg = mined(lp, i, mining)
        if pos and neg:
            total = total + sum(torch.log1p(torch.exp(-beta * (lp.s(i, p) - base))) for p in pos) / len(pos)
            total = total + sum(torch.log1p(torch.exp(alpha * (lp.s(i, n) - base))) for n in neg) / len(neg)
    return total / lp.B


def ref_nca(lp, scale=16.0):
    total = 0.0
    for i in range(lp.B):
        pos, neg = lp.pairs(i)
        if pos:
            num = sum(torch.exp(scale * lp.s(i, p)) for p in pos)
            den = sum(torch.exp(scale * lp.s(i, k)) for k in pos + neg)
            total = total - torch.log(num / den)
    return total / lp.B


def ref_ms(lp, alpha=2.0, beta=40.0, base=0.5, margin=0.1):
    total = 0.0
    for i in range(lp.B):
        pos, neg = ms_sets(lp, i, margin)
        if pos and neg:
            total = total + torch.log(1 + sum(torch.exp(-alpha * (lp.s(i, p) - base)) for p in pos)) / alpha
            total = total + torch.log(1 + sum(torch.exp(beta * (lp.s(i, n) - base)) for n in neg)) / beta
    return total / lp.B


def ref_cbml(
    lp,
    type="log",
    adaptive_neg=True,
    num_hard_negatives=100,
    pos_a=0.5,
    pos_b=0.5,
    neg_a=1.0,
    neg_b=0.01,
    margin=0.1,
    weight=1.0,
    hyper_weight=0.1,
    weight_p=0.25,
    weight_n=0.25,
):
    total = 0.0
    for i in range(lp.B):
        pos, neg = lp.pairs(i)
        if not pos or not neg:
            continue
        s_pos = [lp.s(i, p) for p in pos]
        s_neg = [lp.s(i, n) for n in neg]
        mean = hyper_weight * sum(s_pos) / len(s_pos) + (1 - hyper_weight) * sum(s_neg) / len(s_neg)
        spread = sum((s - mean) ** 2 for s in s_neg)
        hard_pos, hard_neg = ms_sets(lp, i, margin)
        if not adaptive_neg:
            hard_neg = sorted(neg, key=lambda n: -float(lp.s(i, n).detach()))[:num_hard_negatives]
        if not hard_pos or not hard_neg:
            continue
        sum_p = sum(torch.exp(-(lp.s(i, p) - pos_a) / pos_b) for p in hard_pos)
        sum_n = sum(torch.exp((lp.s(i, n) - neg_a) / neg_b) for n in hard_neg)
        if type == "log":
            terms = torch.log(1 + sum_p) + torch.log(1 + sum_n)
        elif type == "sqrt":
            terms = torch.sqrt(1 + sum_p) + torch.sqrt(1 + sum_n)
        else:
            terms = (1 + weight_p * sum_p) + (1 + weight_n * sum_n)
        total = total + terms + weight * spread
    return total / lp.B


def ref_ranked_list(lp, margin=0.4, alpha=1.4, temperature=10.0):
    total = 0.0
    for i in range(lp.B):
        pos, neg = lp.pairs(i)
        d_pos = [_dist(lp.s(i, p)) for p in pos]
        total = total + sum((torch.relu(d + margin - alpha) for d in d_pos), torch.tensor(0.0, dtype=torch.float64)) / (
            len(pos) + 1e-5
        )
        inside = [_dist(lp.s(i, n)) for n in neg if _dist(lp.s(i, n)) < alpha]
        weights = [torch.exp(temperature * (alpha - d)) for d in inside]
        zero = torch.tensor(0.0, dtype=torch.float64)
        num = sum((w * (alpha - d) for w, d in zip(weights, inside, strict=True)), zero)
        total = total + num / (sum(weights, torch.tensor(0.0, dtype=torch.float64)) + 1e-5)
    return total / lp.B


def ref_circle(lp, m=0.4, gamma=80.0):
    total = 0.0
    for i in range(lp.B):
        pos, neg = lp.pairs(i)
        if pos and neg:
            lp_terms = [-gamma * torch.relu(1 + m - lp.s(i, p).detach()) * (lp.s(i, p) - (1 - m)) for p in pos]
            ln_terms = [gamma * torch.relu(lp.s(i, n).detach() + m) * (lp.s(i, n) - m) for n in neg]
            total = total + F.softplus(_lse(lp_terms) + _lse(ln_terms))
    return total / lp.B


def ref_supcon(lp, temperature=0.1):
    total = 0.0
    for i in range(lp.B):
        pos, neg = lp.pairs(i)
        if pos:
            den = _lse([lp.s(i, k) / temperature for k in pos + neg])
            total = total - sum(lp.s(i, p) / temperature - den for p in pos) / len(pos)
    return total / lp.B


def ref_histogram(lp, num_steps=21):
    step = 2 / (num_steps - 1)
    nodes = torch.linspace(-1, 1, num_steps, dtype=torch.float64)

    def hist(pairs):
        # triangular kernel at every node: the linear binning written the other way round
        h = sum(torch.relu(1 - (lp.s(i, j) - nodes).abs() / step) for i, j in pairs)
        return h / len(pairs)

    pos = [(i, j) for i in range(lp.B) for j in lp.pairs(i)[0]]
    neg = [(i, j) for i in range(lp.B) for j in lp.pairs(i)[1]]
    if not pos or not neg:
        return lp.sim.sum() * 0
    h_pos, h_neg = hist(pos), hist(neg)
    return sum(h_neg[r] * sum(h_pos[q] for q in range(r + 1)) for r in range(num_steps))


PAIR_REFS = {
    "contrastive": ({}, ref_contrastive),
    "contrastive_ms": ({"mining": "ms"}, lambda lp: ref_contrastive(lp, mining="ms")),
    "triplet_semihard": ({}, ref_triplet_semihard),
    "lifted_structure": ({}, ref_lifted),
    "lifted_structure_ms": ({"mining": "ms"}, lambda lp: ref_lifted(lp, mining="ms")),
    "binomial_deviance": ({}, ref_binomial),
    "binomial_deviance_ms": ({"mining": "ms"}, lambda lp: ref_binomial(lp, mining="ms")),
    "nca": ({}, ref_nca),
    "multi_similarity": ({}, ref_ms),
    "multi_similarity_beta50": ({"beta": 50.0}, lambda lp: ref_ms(lp, beta=50.0)),
    "cbml": ({}, ref_cbml),
    "cbml_sqrt": ({"type": "sqrt"}, lambda lp: ref_cbml(lp, type="sqrt")),
    "cbml_const": ({"type": "const"}, lambda lp: ref_cbml(lp, type="const")),
    "cbml_top3": (
        {"adaptive_neg": False, "num_hard_negatives": 3},
        lambda lp: ref_cbml(lp, adaptive_neg=False, num_hard_negatives=3),
    ),
    "ranked_list": ({}, ref_ranked_list),
    "circle": ({}, ref_circle),
    "supcon": ({}, ref_supcon),
    "histogram": ({"num_steps": 21}, ref_histogram),
}


def _registry_name(key: str) -> str:
    return next(n for n in losses.names() if key == n or key.startswith(n + "_"))


def _run(loss, case, **extra):
    raw = case["raw"].clone().requires_grad_(True)
    emb = _unit(raw)
    value = loss(emb, case["labels"], case["refs"], case["ref_labels"], case["self_index"], **extra)
    (grad,) = torch.autograd.grad(value, raw)
    return value.detach(), grad


def _run_ref(ref, case):
    raw = case["raw"].clone().requires_grad_(True)
    lp = Loop(_unit(raw), case["labels"], case["refs"], case["ref_labels"], case["self_index"])
    value = ref(lp)
    value = value + raw.sum() * 0  # a loop that formed no pair returns a constant
    (grad,) = torch.autograd.grad(value, raw, allow_unused=True)
    return value.detach(), torch.zeros_like(raw) if grad is None else grad


ENGINES = {"chunked": None, "row_per_chunk": 1, "plain": 0}


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("key", sorted(PAIR_REFS))
def test_pair_loss_matches_loop(key, case_name):
    kwargs, ref = PAIR_REFS[key]
    case = make_case(case_name)
    expected_value, expected_grad = _run_ref(ref, case)
    loss = losses.build(_registry_name(key), **kwargs)
    engines = ENGINES if isinstance(loss, RowwiseLoss) else {"plain": None}
    for engine, chunk in engines.items():
        if chunk is not None:
            loss.chunk_elements = chunk
        value, grad = _run(loss, case)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), engine
        torch.testing.assert_close(value, expected_value, rtol=1e-9, atol=1e-10, msg=f"{engine} value")
        torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-9, msg=f"{engine} grad")


def test_pair_losses_cover_the_registry():
    pair_losses = {n for n in losses.names() if losses.loss_class(n).supports_references}
    assert pair_losses == {_registry_name(k) for k in PAIR_REFS} | {"margin"} | PML_CHECKED_PAIR_LOSSES


def test_nothing_mined_gives_zero_ms():
    case = make_case("separated")
    value, grad = _run(losses.build("multi_similarity"), case)
    assert value == 0 and (grad == 0).all()


# ---------------------------------------------------------------- margin loss


@pytest.mark.parametrize("case_name", ["batch", "refs", "self_index", "one_class", "singletons", "duplicates"])
def test_margin_loss_matches_loop_on_its_triplets(case_name):
    case = make_case(case_name)
    loss = losses.build("margin", num_classes=12, embedding_dim=D, seed=3).double()
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.9, 1.3, 12, dtype=torch.float64))
    raw = case["raw"].clone().requires_grad_(True)
    value = loss(_unit(raw), case["labels"], case["refs"], case["ref_labels"], case["self_index"])
    grad_raw, grad_beta = torch.autograd.grad(value, [raw, loss.beta])

    # same draws: a fresh generator with the same seed, the miner on the same similarities
    raw2 = case["raw"].clone().requires_grad_(True)
    beta = loss.beta.detach().clone().requires_grad_(True)
    lp = Loop(_unit(raw2), case["labels"], case["refs"], case["ref_labels"], case["self_index"])
    pos_mask = torch.zeros(lp.B, lp.M, dtype=torch.bool)
    neg_mask = torch.zeros(lp.B, lp.M, dtype=torch.bool)
    for i in range(lp.B):
        p, n = lp.pairs(i)
        pos_mask[i, p] = True
        neg_mask[i, n] = True
    gen = torch.Generator().manual_seed(3)
    positive, negative, valid = distance_weighted_triplets(lp.sim, pos_mask, neg_mask, D, 0.5, 1.4, gen)
    terms, count = [], 0
    for i in range(lp.B):
        if not valid[i]:
            continue
        d_ap = torch.sqrt(2 - 2 * lp.s(i, int(positive[i])) + 1e-8)
        d_an = torch.sqrt(2 - 2 * lp.s(i, int(negative[i])) + 1e-8)
        b = beta[int(case["labels"][i])]
        for t in (torch.relu(d_ap - b + 0.2), torch.relu(b - d_an + 0.2)):
            terms.append(t)
            count += int(t > 0)
    expected = sum(terms, raw2.sum() * 0) / max(count, 1)
    exp_raw, exp_beta = torch.autograd.grad(expected, [raw2, beta], allow_unused=True)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad_raw, exp_raw if exp_raw is not None else torch.zeros_like(raw2))
    torch.testing.assert_close(grad_beta, exp_beta if exp_beta is not None else torch.zeros_like(beta))


def test_margin_loss_seed_is_reproducible_and_checkpointed():
    case = make_case("batch")
    emb = _unit(case["raw"])
    a = losses.build("margin", num_classes=4, embedding_dim=D, seed=7).double()
    first = [a(emb, case["labels"]) for _ in range(3)]
    b = losses.build("margin", num_classes=4, embedding_dim=D, seed=7).double()
    assert [float(x.detach()) for x in first] == [float(b(emb, case["labels"]).detach()) for _ in range(3)]
    # resume after the first draw: the state dict carries the generator
    c = losses.build("margin", num_classes=4, embedding_dim=D, seed=7).double()
    c(emb, case["labels"])
    state = c.state_dict()
    d = losses.build("margin", num_classes=4, embedding_dim=D, seed=7).double()
    d.load_state_dict(state)
    assert float(d(emb, case["labels"]).detach()) == float(first[1].detach())


# ---------------------------------------------------------------- losses with parameters


def _params_case(seed=0, batch=10, classes=5):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3, 4, 0, 4][:batch])
    return raw, labels, classes


def _compare_param_loss(loss, ref_fn):
    raw, labels, _ = _params_case()
    raw = raw.clone().requires_grad_(True)
    params = [p for p in loss.parameters()]
    value = loss(_unit(raw), labels)
    grads = torch.autograd.grad(value, [raw, *params])
    raw2 = raw.detach().clone().requires_grad_(True)
    params2 = [p.detach().clone().requires_grad_(True) for p in params]
    expected = ref_fn(_unit(raw2), labels, *params2)
    exp_grads = torch.autograd.grad(expected, [raw2, *params2])
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, exp_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_proxy_nca_matches_loop():
    loss = losses.build("proxy_nca", num_classes=5, embedding_dim=D).double()

    def ref(x, labels, proxies):
        total = 0.0
        for i in range(len(x)):
            sq = [((3 * x[i] - 3 * proxies[c] / proxies[c].norm()) ** 2).sum() for c in range(5)]
            log_z = _lse([-d for d in sq])
            for c in range(5):
                t = 0.9 if c == labels[i] else 0.1 / 4
                total = total - t * (-sq[c] - log_z)
        return total / len(x)

    _compare_param_loss(loss, ref)


def test_proxy_anchor_matches_loop():
    loss = losses.build("proxy_anchor", num_classes=5, embedding_dim=D).double()

    def ref(x, labels, proxies):
        pos_total, neg_total, present = 0.0, 0.0, 0
        for c in range(5):
            p = proxies[c] / proxies[c].norm()
            members = [i for i in range(len(x)) if labels[i] == c]
            others = [i for i in range(len(x)) if labels[i] != c]
            if members:
                present += 1
                pos_total = pos_total + torch.log(1 + sum(torch.exp(-32 * (x[i] @ p - 0.1)) for i in members))
            neg_total = neg_total + torch.log(1 + sum(torch.exp(32 * (x[i] @ p + 0.1)) for i in others))
        return pos_total / present + neg_total / 5

    _compare_param_loss(loss, ref)


def test_softtriple_matches_loop():
    loss = losses.build("softtriple", num_classes=5, embedding_dim=D, centers_per_class=3).double()

    def ref(x, labels, fc):
        centers = fc / fc.norm(dim=0, keepdim=True)
        total = 0.0
        for i in range(len(x)):
            logits = []
            for c in range(5):
                sims = torch.stack([x[i] @ centers[:, c * 3 + k] for k in range(3)])
                soft = (torch.softmax(sims / 0.1, dim=0) * sims).sum()
                logits.append(20 * (soft - (0.01 if c == labels[i] else 0.0)))
            total = total - (logits[int(labels[i])] - _lse(logits))
        reg = 0.0
        for c in range(5):
            for k in range(3):
                for k2 in range(k + 1, 3):
                    reg = reg + torch.sqrt(2 + 1e-5 - 2 * centers[:, c * 3 + k] @ centers[:, c * 3 + k2])
        return total / len(x) + 0.2 * reg / (5 * 3 * 2)

    _compare_param_loss(loss, ref)


def test_cross_entropy_matches_loop():
    loss = losses.build("cross_entropy", num_classes=5, embedding_dim=D).double()

    def ref(x, labels, weight):
        total = 0.0
        for i in range(len(x)):
            logits = [x[i] @ weight[c] / weight[c].norm() / 0.05 for c in range(5)]
            total = total - (logits[int(labels[i])] - _lse(logits))
        return total / len(x)

    _compare_param_loss(loss, ref)


def test_center_matches_loop():
    loss = losses.build("center", num_classes=5, embedding_dim=D).double()

    def ref(x, labels, centers):
        return sum(((x[i] - centers[int(labels[i])]) ** 2).sum() for i in range(len(x))) / len(x)

    _compare_param_loss(loss, ref)


# ---------------------------------------------------------------- batch-defined losses


def _tuples(labels):
    seen = {}
    for i, c in enumerate(labels.tolist()):
        seen.setdefault(c, []).append(i)
    return [(v[0], v[1]) for v in seen.values() if len(v) >= 2]


def ref_npair(x, labels, l2_reg=0.02):
    tuples = _tuples(labels)
    if not tuples:
        return x.sum() * 0
    total = 0.0
    for a, p in tuples:
        logits = [x[a] @ x[q] for _, q in tuples]
        own = x[a] @ x[p]
        total = total + torch.log(sum(torch.exp(v - own) for v in logits))
    l2 = sum((x[a] ** 2).sum() + (x[p] ** 2).sum() for a, p in tuples)
    return total / len(tuples) + l2_reg * l2 / len(tuples)


def ref_angular(x, labels, t=1.0, l2_reg=0.02, tuples="npair", with_npair=False, lam=2.0):
    pairs = _tuples(labels)
    if tuples == "npair":
        total = x.sum() * 0
        for a, p in pairs:
            terms = [4 * t * (x[a] + x[p]) @ x[q] - 2 * (1 + t) * x[a] @ x[p] for b, q in pairs if (b, q) != (a, p)]
            total = total + torch.log(1 + sum((torch.exp(v) for v in terms), torch.tensor(0.0, dtype=x.dtype)))
        loss = total / max(len(pairs), 1)
    else:
        total, count = x.sum() * 0, 0
        for a in range(len(x)):
            for p in range(len(x)):
                if p == a or labels[p] != labels[a]:
                    continue
                negs = [n for n in range(len(x)) if labels[n] != labels[a]]
                terms = [4 * t * (x[a] + x[p]) @ x[n] - 2 * (1 + t) * x[a] @ x[p] for n in negs]
                total = total + torch.log(1 + sum((torch.exp(v) for v in terms), torch.tensor(0.0, dtype=x.dtype)))
                count += 1
        loss = total / max(count, 1)
    if with_npair:
        loss = ref_npair(x, labels, 0.0) + lam * loss
    l2 = sum((x[a] ** 2).sum() + (x[p] ** 2).sum() for a, p in pairs)
    return loss + l2_reg * l2 / max(len(pairs), 1)


def ref_cluster(x, labels, margin=10.0):
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        return x.sum() * 0
    centres = {c: x[labels == c].mean(dim=0) for c in classes}
    total = 0.0
    for c in classes:
        intra = max(
            torch.sqrt(((centres[c] - x[i]) ** 2).sum().clamp(min=1e-12)) for i in range(len(x)) if labels[i] == c
        )
        inter = min(torch.sqrt(((centres[c] - centres[o]) ** 2).sum().clamp(min=1e-12)) for o in classes if o != c)
        total = total + torch.relu(intra - inter + margin)
    return total / len(classes)


BATCH_REFS = {
    "npair": ({}, ref_npair),
    "npair_no_l2": ({"l2_reg": 0.0}, lambda x, y: ref_npair(x, y, 0.0)),
    "angular": ({}, ref_angular),
    "angular_all": ({"tuples": "all", "l2_reg": 0.0}, lambda x, y: ref_angular(x, y, l2_reg=0.0, tuples="all")),
    "angular_with_npair": (
        {"with_npair": True, "angle_bound": 0.5},
        lambda x, y: ref_angular(x, y, t=0.5, with_npair=True),
    ),
    "cluster": ({}, ref_cluster),
    "cluster_small_margin": ({"margin": 0.1}, lambda x, y: ref_cluster(x, y, 0.1)),
}


@pytest.mark.parametrize("case_name", ["batch", "one_class", "singletons", "duplicates"])
@pytest.mark.parametrize("key", sorted(BATCH_REFS))
def test_batch_loss_matches_loop(key, case_name):
    kwargs, ref = BATCH_REFS[key]
    case = make_case(case_name)
    if case_name == "batch":
        case["labels"] = torch.tensor([0, 1, 0, 2, 1, 3, 2, 0, 4, 1, 3, 5])  # unordered, a singleton
    loss = losses.build(_registry_name(key), **kwargs)
    value, grad = _run(loss, case)
    raw = case["raw"].clone().requires_grad_(True)
    expected = ref(_unit(raw), case["labels"])
    (exp_grad,) = torch.autograd.grad(expected, raw, allow_unused=True)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad, torch.zeros_like(raw) if exp_grad is None else exp_grad)


def test_adversarial_reverses_gradients_and_trains_regressor():
    torch.manual_seed(0)
    loss = losses.build("adversarial", num_classes=3, embedding_dim=D, aux_dim=6, proj_dim=5).double()
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    value = loss(x, torch.zeros(7, dtype=torch.long), aux_embeddings=g)
    grads = torch.autograd.grad(value, [x, g, *loss.regressor.parameters()])

    x2, g2 = x.detach().clone().requires_grad_(True), g.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in loss.regressor.parameters()]
    w1, b1, w2, b2 = params
    total = 0.0
    for i in range(7):
        xi = x2[i] / x2[i].norm()
        gi = g2[i] / g2[i].norm()
        r = w2 @ (w1 @ gi + b1) + b2
        total = total + ((xi * r / r.norm()) ** 2).mean()
    expected = -total / 7
    exp = torch.autograd.grad(expected, [x2, g2, *params])
    torch.testing.assert_close(value, expected)
    # inputs get the reversed gradient, the regressor the plain one
    torch.testing.assert_close(grads[0], -exp[0])
    torch.testing.assert_close(grads[1], -exp[1])
    for got, want in zip(grads[2:], exp[2:], strict=True):
        torch.testing.assert_close(got, want)
    assert torch.allclose(loss.between(x, g), value)
    with pytest.raises(ValueError, match="aux_embeddings"):
        loss(x, torch.zeros(7, dtype=torch.long))


# ---------------------------------------------------------------- contract and numerics


def _build_any(name, classes=5, dim=D):
    cls = losses.loss_class(name)
    kwargs = {"num_classes": classes, "embedding_dim": dim} if cls.needs_classes else {}
    return losses.build(name, **kwargs)


def _call(loss, name, emb, labels, *refs):
    extra = {"aux_embeddings": emb.detach() + 0.1} if name == "adversarial" else {}
    return loss(emb, labels, *refs, **extra)


def test_parameters_are_exposed_and_checkpointed():
    for name in losses.names():
        cls = losses.loss_class(name)
        loss = _build_any(name)
        params = list(loss.parameters())
        assert bool(params) == cls.needs_classes, name
        if params:
            state = loss.state_dict()
            assert all(isinstance(p, torch.nn.Parameter) for p in params)
            assert set(dict(loss.named_parameters())) <= set(state), name


def test_references_rejected_where_meaningless():
    emb = _unit(torch.randn(6, D))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # instance ids in the instance loss's layout
    for name in losses.names():
        loss = _build_any(name)
        if losses.loss_class(name).supports_references:
            continue
        with pytest.raises(ValueError, match="references"):
            _call(loss, name, emb, labels, _unit(torch.randn(4, D)), labels[:4])
        # the anchors as their own references are what a world-size-1 trainer passes
        assert torch.isfinite(_call(loss, name, emb, labels, emb, labels, torch.arange(6)))


def test_unknown_options_fail_early():
    with pytest.raises(ValueError, match="mining"):
        losses.build("lifted_structure", mining="hardest")
    with pytest.raises(ValueError, match="type"):
        losses.build("cbml", type="cube")
    with pytest.raises(ValueError, match="tuples"):
        losses.build("angular", tuples="some")


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_no_nan_or_inf_at_published_and_extreme_scales(scale):
    """β = 50, 1/b_n = 100, γ = 256 and random/degenerate inputs: every value and gradient finite."""
    strong = {
        "multi_similarity": {"beta": 50.0 * scale},
        "lifted_structure": {"alpha": 40.0 * scale},
        "binomial_deviance": {"alpha": 40.0 * scale},
        "cbml": {"neg_b": 0.01 / scale},
        "nca": {"scale": 16.0 * scale},
        "circle": {"gamma": 256.0 * scale},
        "supcon": {"temperature": 0.1 / scale},
        "proxy_anchor": {"alpha": 32.0 * scale},
        "ranked_list": {"temperature": 10.0 * scale},
    }
    g = torch.Generator().manual_seed(1)
    batches = [
        _unit(torch.randn(16, D, generator=g)),
        _unit(torch.ones(16, D)),  # every embedding equal
        _unit(torch.cat([torch.ones(8, D), -torch.ones(8, D)])),  # antipodal
    ]
    labels = torch.arange(16) % 4
    for name in losses.names():
        cls = losses.loss_class(name)
        kwargs = dict(strong.get(name, {}))
        if cls.needs_classes:
            kwargs.update(num_classes=4, embedding_dim=D)
        loss = losses.build(name, **kwargs)
        for emb in batches:
            emb = emb.clone().requires_grad_(True)
            value = _call(loss, name, emb, labels)
            (grad,) = torch.autograd.grad(value, emb)
            assert torch.isfinite(value), name
            assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("name", [n for n in losses.names()])
def test_bf16_autocast_on_cpu(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(D, D)
    x = torch.randn(12, D)
    labels = torch.arange(12) % 4
    loss = _build_any(name, classes=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = _unit(layer(x))
        assert emb.dtype == torch.bfloat16
        value = _call(loss, name, emb, labels)
    assert value.dtype in (torch.float32, torch.float64)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(layer.weight.grad).all()
    # the loss computed in float32 from the bf16 embeddings: the same value as from their float32 copy
    with torch.no_grad():
        ref = _call(loss, name, emb.detach().float(), labels)
    if name not in ("margin", "manifold"):  # they draw fresh samples
        torch.testing.assert_close(value.detach(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in losses.names()])
def test_empty_selection_is_a_graph_attached_zero(name):
    """No pairs at all (one sample, or no references) → 0 that backward accepts."""
    loss = _build_any(name, classes=4)
    emb = _unit(torch.randn(1, D)).requires_grad_(True)
    labels = torch.tensor([2])
    value = _call(loss, name, emb, labels)
    # classifiers score a lone sample against their class weights: not a pair, not zero
    margin_softmax = ("arcface", "subcenter_arcface", "cosface", "sphereface", "large_margin_softmax", "p2sgrad")
    if name not in (
        "center",
        "cross_entropy",
        "proxy_nca",
        "proxy_anchor",
        "softtriple",
        "adversarial",
        "manifold",  # the lone sample against its proxies
        *margin_softmax,
    ):
        assert value.item() == 0.0, name
    value.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert value.device == emb.device
    if losses.loss_class(name).supports_references:
        emb.grad = None
        empty = loss(emb, labels, torch.zeros(0, D), torch.zeros(0, dtype=torch.long), torch.tensor([-1]))
        assert empty.item() == 0.0 and empty.requires_grad
        empty.backward()
        assert (emb.grad == 0).all()


def test_rowwise_engine_handles_reference_gradients_and_no_grad():
    """Gradients reach references that require them (a gathered batch), and eval needs no graph."""
    torch.manual_seed(0)
    case = make_case("refs")
    refs_raw = case["refs"].clone().requires_grad_(True)
    for name in ["multi_similarity", "contrastive", "circle"]:
        loss = losses.build(name)
        raw = case["raw"].clone().requires_grad_(True)
        value = loss(_unit(raw), case["labels"], refs_raw, case["ref_labels"])
        grads = torch.autograd.grad(value, [raw, refs_raw])
        loss.chunk_elements = 0
        raw2 = case["raw"].clone().requires_grad_(True)
        refs2 = case["refs"].clone().requires_grad_(True)
        plain = loss(_unit(raw2), case["labels"], refs2, case["ref_labels"])
        exp = torch.autograd.grad(plain, [raw2, refs2])
        torch.testing.assert_close(value, plain)
        for got, want in zip(grads, exp, strict=True):
            torch.testing.assert_close(got, want)
        with torch.no_grad():
            loss.chunk_elements = 1 << 18
            assert torch.allclose(loss(_unit(case["raw"]), case["labels"], case["refs"], case["ref_labels"]), plain)


def test_float32_rowwise_matches_float64():
    case = make_case("self_index")
    for name in ["multi_similarity", "cbml", "lifted_structure", "triplet_semihard"]:
        loss = losses.build(name)
        v64 = loss(_unit(case["raw"]), case["labels"], case["refs"], case["ref_labels"], case["self_index"])
        v32 = loss(
            _unit(case["raw"]).float(), case["labels"], case["refs"].float(), case["ref_labels"], case["self_index"]
        )
        assert v32.dtype == torch.float32
        assert math.isclose(float(v32), float(v64), rel_tol=1e-4, abs_tol=1e-5), name


def test_the_registry_holds_pair_losses_only():
    assert all(issubclass(losses.loss_class(n), losses.PairLoss) for n in losses.names())
    before = losses.names()
    with pytest.raises(TypeError, match="'not_a_pair_loss'.*PairLoss"):
        losses.register("not_a_pair_loss")(torch.nn.MSELoss)
    assert losses.names() == before
