"""Re-ranking against loop implementations of the formulas on small examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlray.evaluation.metrics import map_at_r, recall_at_k
from dmlray.evaluation.rerank import alpha_query_expansion, k_reciprocal_distances, ranking_metrics, rerank


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loop_aqe(q: np.ndarray, g: np.ndarray, n: int, alpha: float, loo: bool) -> np.ndarray:
    out = []
    for i, qi in enumerate(q):
        sims = [(-float(qi @ gj), j) for j, gj in enumerate(g) if not (loo and j == i)]
        new = qi.copy()
        for s, j in sorted(sims)[:n]:
            new += max(-s, 0.0) ** alpha * g[j]
        out.append(new / np.linalg.norm(new))
    return np.array(out)


def loop_k_reciprocal(q: np.ndarray, g: np.ndarray | None, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s re_ranking, written out with loops over items and sets. P is the
    queries then the gallery, or (leave-one-out, ``g`` None) the query set alone."""
    p = q if g is None else np.concatenate([q, g])
    n_q, n = len(q), len(p)
    d = np.array([[float(np.sum((p[i] - p[j]) ** 2)) for j in range(n)] for i in range(n)])
    d = np.array([[d[i][j] / max(d[i]) for j in range(n)] for i in range(n)])
    rank = [list(np.argsort(d[i], kind="stable")) for i in range(n)]

    def reciprocal(i: int, k: int) -> set[int]:
        return {j for j in rank[i][: k + 1] if i in rank[j][: k + 1]}

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = set(r)
        for c in r:
            rc = reciprocal(c, int(round(k1 / 2)))
            if len(rc & r) > 2 / 3 * len(rc):
                expansion |= rc
        total = sum(np.exp(-d[i][j]) for j in expansion)
        for j in expansion:
            v[i][j] = np.exp(-d[i][j]) / total
    v = np.array([np.mean([v[j] for j in rank[i][:k2]], axis=0) for i in range(n)])
    columns = range(n) if g is None else range(n_q, n)
    out = np.zeros((n_q, len(columns)))
    for i in range(n_q):
        for col, j in enumerate(columns):
            low = sum(min(v[i][c], v[j][c]) for c in range(n))
            high = sum(max(v[i][c], v[j][c]) for c in range(n))
            out[i][col] = (1 - lam) * (1 - low / high) + lam * d[i][j]
    return out


@pytest.mark.parametrize("loo", [False, True])
def test_alpha_query_expansion_matches_the_loop(loo):
    q, g = unit(6, 5, 0), unit(15, 5, 1)
    ours = alpha_query_expansion(torch.from_numpy(q), None if loo else torch.from_numpy(g), n=3, alpha=3.0)
    ref = loop_aqe(q, q if loo else g, 3, 3.0, loo)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)


def test_k_reciprocal_matches_the_loop_with_a_gallery():
    q, g = unit(5, 4, 2), unit(25, 4, 3)
    ours = k_reciprocal_distances(torch.from_numpy(q), torch.from_numpy(g), k1=6, k2=3, lambda_value=0.3)
    np.testing.assert_allclose(ours.numpy(), loop_k_reciprocal(q, g, 6, 3, 0.3), atol=1e-12)


def test_k_reciprocal_leave_one_out_matches_the_loop_on_the_one_set():
    x = unit(20, 4, 4)
    ours = k_reciprocal_distances(torch.from_numpy(x), None, k1=5, k2=2, lambda_value=0.5)
    np.testing.assert_allclose(ours.numpy(), loop_k_reciprocal(x, None, 5, 2, 0.5), atol=1e-12)


def test_rerank_never_retrieves_the_query_in_leave_one_out_and_scores_like_the_metrics():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 6, 60)
    x = unit(6, 8, 6)[labels] + 0.5 * unit(60, 8, 7)
    x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    for method in ("aqe", "kreciprocal"):
        order = rerank(method, x)
        assert order.shape == (60, 59)
        assert not (order == torch.arange(60)[:, None]).any()
        assert all(sorted(row.tolist()) == [j for j in range(60) if j != i] for i, row in enumerate(order))
    # with no re-ranking (plain similarity order) ranking_metrics is the evaluation's metrics
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    plain = torch.sort(-sims, dim=1, stable=True).indices[:, :-1]
    ours = ranking_metrics(plain, torch.from_numpy(labels))
    ref = recall_at_k(x, labels, ks=(1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert ours[f"recall@{k}"] == pytest.approx(ref[k])
    assert ours["map@r"] == pytest.approx(map_at_r(x, labels))


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'dba'"):
        rerank("dba", torch.eye(3))


# ------------------------------------------------------------- one query at a time (the service's)


def clustered(n: int, dim: int, classes: int, seed: int) -> torch.Tensor:
    """Unit vectors around a few class centres: neighbourhoods with reciprocal structure."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    x = centres[rng.integers(0, classes, n)] / np.sqrt(dim) * 2.5 + rng.standard_normal((n, dim)) / np.sqrt(dim)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


@pytest.mark.parametrize("k1, k2", [(20, 6), (40, 10), (5, 1), (3, 3), (400, 6)])
def test_one_query_against_a_fixed_gallery_equals_the_dense_re_ranking_of_that_query_alone(k1, k2):
    """KReciprocalGallery reuses the gallery's neighbour structures and recomputes only the
    rows a query changes; its distances are those of k_reciprocal_distances(q[None], G):
    an ordinary query, one equal to a gallery item (ties), one farther from many items than
    any gallery item (their rows rescaled), and k1 beyond the gallery size."""
    from dmlray.evaluation.kreciprocal_gallery import KReciprocalGallery

    gallery = clustered(240, 8, 10, seed=3)
    queries = torch.cat(
        [
            clustered(3, 8, 10, seed=4),
            gallery[17:18],
            -torch.nn.functional.normalize(gallery.mean(0, keepdim=True), dim=1),
        ]
    )
    index = KReciprocalGallery(gallery, k1=k1, k2=k2)
    for query in queries:
        expected = k_reciprocal_distances(query[None], gallery, k1=k1, k2=k2)[0]
        got = index.distances(query)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        assert torch.equal(torch.sort(got, stable=True).indices[:30], torch.sort(expected, stable=True).indices[:30])


def test_a_query_changes_no_state_of_the_gallery():
    """Queries are answered on their own: asking one first does not change another's answer."""
    from dmlray.evaluation.kreciprocal_gallery import KReciprocalGallery

    gallery = clustered(150, 6, 8, seed=5)
    a, b = clustered(2, 6, 8, seed=6)
    index = KReciprocalGallery(gallery)
    before = index.distances(b)
    index.distances(a)
    assert torch.equal(index.distances(b), before)
