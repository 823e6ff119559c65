"""dmlray.evaluation against brute-force loop references over the full similarity matrix."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmlray.evaluation import (
    format_table,
    kmeans,
    knn,
    map_at_r,
    nmi_score,
    recall_at_k,
    retrieval_metrics,
)

# ------------------------------------------------------------------- reference


def brute_force(x, y, gx=None, gy=None, ks=(1, 2, 4, 8)) -> dict:
    """Loops over every query's full ranking: (similarity desc, gallery index asc)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y).tolist()
    loo = gx is None
    gx = x if loo else torch.as_tensor(gx, dtype=torch.float64)
    gy = y if loo else torch.as_tensor(gy).tolist()
    sims = (x @ gx.T).tolist()
    hits = {k: 0 for k in ks}
    aps, rps, p1s, orders = [], [], [], []
    for i in range(len(y)):
        cand = [j for j in range(len(gy)) if not (loo and j == i)]
        order = sorted(cand, key=lambda j: (-sims[i][j], j))
        orders.append(order)
        rel = [gy[j] == y[i] for j in order]
        r = sum(rel)
        for k in ks:
            hits[k] += any(rel[:k])  # R = 0 queries: always a miss
        if r == 0:
            continue  # excluded from MAP@R, R-precision, P@1
        correct, ap = 0, 0.0
        for rank in range(r):
            if rel[rank]:
                correct += 1
                ap += correct / (rank + 1)
        aps.append(ap / r)
        rps.append(sum(rel[:r]) / r)
        p1s.append(float(rel[0]))
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    return {
        "recall": {k: hits[k] / len(y) for k in ks},
        "map@r": mean(aps),
        "r_precision": mean(rps),
        "precision@1": mean(p1s),
        "orders": orders,
    }


def random_data(n, dim, n_classes, seed, noise=1.0):
    """Clustered unit vectors (continuous: no exact ties)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    c = torch.randn(n_classes, dim, generator=g)
    x = torch.nn.functional.normalize(c[y] + noise * torch.randn(n, dim, generator=g), dim=1)
    return x, y


def tied_data(n, dim, n_classes, seed):
    """Unit vectors with entries in {0, 1/2}: dot products are exact multiples of 1/4,
    so many exact ties, identical in float32 whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    for i in range(n):
        x[i, torch.randperm(dim, generator=g)[:4]] = 0.5
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def check(got_recall, got_map, ref, rtol=1e-9):
    assert got_recall.keys() == ref["recall"].keys()
    for k, v in ref["recall"].items():
        assert got_recall[k] == pytest.approx(v, abs=1e-12), k
    assert got_map == pytest.approx(ref["map@r"], rel=rtol, abs=1e-12)


# ------------------------------------------------------- recall@K and MAP@R


@pytest.mark.parametrize("chunk", [1, 7, 33, None])
@pytest.mark.parametrize("make", [random_data, tied_data])
def test_leave_one_out_matches_brute_force(make, chunk):
    x, y = make(157, 8, 25, seed=1)  # 157 is prime: no chunk size divides it
    ks = (1, 2, 4, 8, 16)
    ref = brute_force(x, y, ks=ks)
    check(recall_at_k(x, y, ks=ks, chunk_size=chunk), map_at_r(x, y, chunk_size=chunk), ref)
    m = retrieval_metrics(x, y, ks=ks, nmi=False, chunk_size=chunk)
    assert m["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-12)
    assert m["precision@1"] == pytest.approx(ref["precision@1"], abs=1e-12)
    assert m["map@r"] == pytest.approx(ref["map@r"], abs=1e-12)


@pytest.mark.parametrize("chunk", [5, None])
@pytest.mark.parametrize("make", [random_data, tied_data])
def test_large_k_counting_path(make, chunk):
    # K beyond the top-k table (64) is answered by counting ranks; K beyond N is capped.
    x, y = make(211, 4, 60, seed=2)
    ks = (1, 10, 65, 100, 150, 1000)
    ref = brute_force(x, y, ks=ks)
    check(recall_at_k(x, y, ks=ks, chunk_size=chunk), map_at_r(x, y, chunk_size=chunk), ref)


@pytest.mark.parametrize("make", [random_data, tied_data])
def test_query_vs_gallery(make):
    x, y = make(90, 8, 30, seed=3)
    gx, gy = make(113, 8, 35, seed=4)  # some query classes (30..34 absent) -> R = 0
    ks = (1, 5, 70, 200)
    ref = brute_force(x, y, gx, gy, ks=ks)
    for chunk in (11, None):
        check(recall_at_k(x, y, gx, gy, ks=ks, chunk_size=chunk), map_at_r(x, y, gx, gy, chunk_size=chunk), ref)
    m = retrieval_metrics(x, y, gx, gy, ks=ks, nmi=False)
    assert m["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-12)
    assert m["precision@1"] == pytest.approx(ref["precision@1"], abs=1e-12)


def test_ties_broken_by_lower_index():
    # Query 0 is equally similar to items 1..4; only item 4 shares its class. With index
    # tie-breaking item 4 ranks 4th: R@1..3 miss, R@4 hits.
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 3, 0, 5])
    r = recall_at_k(x[[0]], y[[0]], x[1:], y[1:], ks=(1, 2, 3, 4))
    assert r == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}
    # Move the positive to the front of the gallery: now it wins every tie.
    order = [4, 1, 2, 3, 5]
    r = recall_at_k(x[[0]], y[[0]], x[order], y[order], ks=(1, 2, 3, 4))
    assert r == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    # Same through the counting path (K > 64) with a 100-item tie block.
    gx = torch.tensor([[1.0, 0.0]] * 100)
    gy = torch.arange(100)
    for pos, expect in ((99, {65: 0.0, 100: 1.0}), (30, {65: 1.0, 100: 1.0})):
        gy2 = gy.clone()
        gy2[pos] = -1
        assert recall_at_k(x[[0]], torch.tensor([-1]), gx, gy2, ks=(65, 100)) == expect


def test_knn_order_and_self_exclusion_by_identity():
    x, y = tied_data(60, 6, 10, seed=5)
    x = torch.cat([x, x[:3]])  # exact duplicates: similarity 1 like the query itself
    for chunk in (1, 8, None):
        sims, idx = knn(x, 10, chunk_size=chunk)
        ref = brute_force(x, torch.zeros(len(x)), ks=(1,))["orders"]
        assert idx.tolist() == [o[:10] for o in ref]
        assert (idx != torch.arange(len(x))[:, None]).all()  # never itself
    # Item 0's first neighbour is its lowest-index exact duplicate (item 60 or an earlier
    # one), at similarity 1 like itself: the query is excluded by index, not by value.
    dups = [j for j in range(1, len(x)) if torch.equal(x[j], x[0])]
    assert 60 in dups and idx[0, 0] == dups[0]
    assert idx[60, 0] == 0
    assert sims[0, 0] == 1.0


def test_knn_k_capped_to_candidates():
    x, _ = random_data(5, 3, 2, seed=6)
    _, idx = knn(x, 10)
    assert idx.shape == (5, 4)
    _, idx = knn(x, 10, x[:3])
    assert idx.shape == (5, 3)


def test_singletons_convention():
    # Classes 7 and 8 have one item: R = 0. Recall counts them as misses; MAP@R,
    # R-precision and P@1 leave them out.
    x = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.7, 0.7], [-1.0, 0.0]]), dim=1
    )
    y = torch.tensor([0, 0, 1, 1, 7, 8])
    m = retrieval_metrics(x, y, ks=(1, 5), nmi=False)
    assert m["recall@1"] == pytest.approx(4 / 6)
    assert m["recall@5"] == pytest.approx(4 / 6)
    assert m["map@r"] == m["r_precision"] == m["precision@1"] == 1.0
    ref = brute_force(x, y, ks=(1, 5))
    assert m["recall@1"] == pytest.approx(ref["recall"][1])
    # Only singletons: nothing to average, 0.0 by convention.
    m = retrieval_metrics(x, torch.arange(6), ks=(1,), nmi=False)
    assert m == {"recall@1": 0.0, "map@r": 0.0, "r_precision": 0.0, "precision@1": 0.0}


def test_single_item_and_inputs():
    one = torch.tensor([[1.0, 0.0]])
    assert recall_at_k(one, [3], ks=(1,)) == {1: 0.0}
    assert map_at_r(one, [3]) == 0.0
    x, y = random_data(40, 5, 6, seed=7)
    ref = recall_at_k(x, y)
    assert recall_at_k(x.numpy(), y.numpy()) == ref  # numpy in
    assert recall_at_k(x.double(), y) == ref  # float64 kept
    xg = x.clone().requires_grad_()  # straight from a model: no graph is built
    assert recall_at_k(xg, y) == ref
    assert retrieval_metrics(xg, y)["nmi"] == retrieval_metrics(x, y)["nmi"]
    with pytest.raises(ValueError):
        recall_at_k(x, y[:-1])
    with pytest.raises(ValueError):
        recall_at_k(x, y, x)  # gallery without labels
    with pytest.raises(ValueError):
        recall_at_k(x, y, ks=(0,))
    with pytest.raises(ValueError):
        recall_at_k(x, y, backend="annoy")


# --------------------------------------------------------------------- faiss


@pytest.mark.parametrize("make", [random_data, tied_data])
def test_faiss_backend_agrees(make):
    pytest.importorskip("faiss")
    x, y = make(173, 8, 30, seed=8)
    ks = (1, 2, 4, 8, 100)
    for args in ((x, y), (x[:60], y[:60], x[60:], y[60:])):
        ref = brute_force(*args, ks=ks)
        check(
            recall_at_k(*args, ks=ks, backend="faiss", chunk_size=50),
            map_at_r(*args, backend="faiss", chunk_size=50),
            ref,
        )
    _, i_faiss = knn(x, 12, backend="faiss", chunk_size=50)
    _, i_torch = knn(x, 12)
    assert torch.equal(i_faiss, i_torch)
    assert recall_at_k(x, y, backend="auto") == recall_at_k(x, y)


# ----------------------------------------------------------------------- NMI


def test_nmi_score_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n_true, n_pred in ((5, 5), (3, 9), (12, 2)):
        a, b = rng.integers(0, n_true, 300), rng.integers(0, n_pred, 300)
        assert nmi_score(a, b) == pytest.approx(sk.normalized_mutual_info_score(a, b), abs=1e-12)
    a = np.array([0, 0, 1, 1, 2, 2])
    assert nmi_score(a, np.array([5, 5, 9, 9, 1, 1])) == pytest.approx(1.0)  # relabelled
    assert nmi_score(a, np.array([0, 1, 0, 1, 0, 1])) == pytest.approx(
        sk.normalized_mutual_info_score(a, [0, 1, 0, 1, 0, 1]), abs=1e-12
    )
    assert nmi_score([1, 1, 1], [0, 0, 0]) == 1.0


def test_kmeans_on_known_clustering():
    sk = pytest.importorskip("sklearn.metrics")
    x, y = random_data(300, 16, 6, seed=9, noise=0.1)  # well separated
    assign = kmeans(x, 6, seed=0)
    assert nmi_score(y, assign) == pytest.approx(1.0)
    # Noisier data: k-means is imperfect; our NMI equals sklearn's on the same clustering,
    # and the same seed gives the same clustering.
    x, y = random_data(300, 16, 6, seed=9, noise=1.5)
    a1, a2 = kmeans(x, 6, seed=3), kmeans(x, 6, seed=3)
    assert torch.equal(a1, a2)
    m = retrieval_metrics(x, y, nmi=True, seed=3)
    assert m["nmi"] == pytest.approx(sk.normalized_mutual_info_score(y.numpy(), a1.numpy()))
    assert 0.0 < m["nmi"] < 1.0
    a3 = kmeans(x, 6, seed=3, init="random", chunk_size=7)
    assert a3.shape == (300,) and a3.max() < 6


# ----------------------------------------------------------------------- PML


@pytest.mark.parametrize("gallery", [False, True])
def test_agrees_with_pytorch_metric_learning(gallery):
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = random_data(400, 16, 50, seed=10, noise=1.2)
    calc = acc.AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision", "precision_at_1"), k="max_bin_count"
    )
    if gallery:
        q, ql, g, gl = x[:150], y[:150], x[150:], y[150:]
        theirs = calc.get_accuracy(q, ql, g, gl, ref_includes_query=False)
        ours = retrieval_metrics(q, ql, g, gl, nmi=False)
    else:
        theirs = calc.get_accuracy(x, y)
        ours = retrieval_metrics(x, y, nmi=False)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)


# ------------------------------------------------------------------ reporting


def test_retrieval_metrics_keys_and_table():
    x, y = random_data(120, 8, 12, seed=11)
    m = retrieval_metrics(x, y, ks=(1, 10))
    assert list(m) == ["recall@1", "recall@10", "map@r", "r_precision", "precision@1", "nmi"]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())
    table = format_table({"dmlray": m, "raw pixels": {"recall@1": 0.123}}, ks=(1, 10))
    lines = table.splitlines()
    assert lines[0].split() == ["method", "R@1", "R@10", "MAP@R", "RP", "P@1", "NMI"]
    assert lines[2].split()[1] == f"{100 * m['recall@1']:.1f}"
    assert lines[3].split() == ["raw", "pixels", "12.3", "-", "-", "-", "-", "-"]
    assert not math.isnan(m["nmi"])


def test_imports_without_optional_dependencies():
    code = (
        "import sys, dmlray.evaluation; "
        "bad = {'ray', 'boto3', 'prometheus_client', 'faiss', 'sklearn', 'matplotlib'}"
        " & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluation_report_imports_without_ray_boto3_or_prometheus():
    """The one test-evaluation path (training's final evaluation and `dmlray eval`) is library code."""
    code = (
        "import sys\n"
        "for name in ('ray', 'boto3', 'prometheus_client'):\n    sys.modules[name] = None\n"
        "from dmlray.evaluation.report import TestPlan, evaluate_test, write_evaluation_pictures\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
