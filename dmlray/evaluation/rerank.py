"""Re-ranking a first retrieval: α-query expansion and k-reciprocal re-ranking.

* αQE (Radenović et al., TPAMI 2018): the query is replaced by the L2-normalised sum of
  itself and its ``n`` nearest gallery items, each weighted by ``max(s, 0)^α`` of its
  similarity ``s``, and the gallery searched again.
* k-reciprocal re-ranking (Zhong et al., CVPR 2017), as in the authors' code: over all
  items P (queries then gallery, or the one set in leave-one-out), distances
  d = ||p - g||² = 2 - 2·s are scaled by each row's maximum; R(p, k1) holds the
  k1-reciprocal neighbours of p (g in p's top k1+1 and p in g's), expanded by each
  candidate's R(c, round(k1/2)) that shares more than 2/3 of itself with R(p, k1);
  V[p] puts exp(-d(p, g)) on that set, normalised to sum 1, then averaged over p's k2
  nearest (local query expansion). The Jaccard distance is
  1 - Σ min(V[p], V[g]) / Σ max(V[p], V[g]) = 1 - m / (2 - m) with m = Σ min, and the
  final distance (1 - λ)·Jaccard + λ·d.

Leave-one-out (no gallery given): each item queries the others; it never retrieves itself.
k-reciprocal works on dense |P| x |P| matrices: for galleries up to some ten thousand items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dmlray.evaluation.knn import knn

METHODS = ("aqe", "kreciprocal")


def _float(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.double() if t.dtype == torch.float64 else t.float()


def alpha_query_expansion(
    query: torch.Tensor, gallery: torch.Tensor | None = None, n: int = 2, alpha: float = 3.0
) -> torch.Tensor:
    """The expanded queries (Q, D), L2-normalised. Leave-one-out without a gallery."""
    q = _float(query)
    g = q if gallery is None else _float(gallery).to(q.dtype)
    n = min(n, g.shape[0] - (1 if gallery is None else 0))
    if n < 1:
        return F.normalize(q, dim=1)
    sims, idx = knn(q, n) if gallery is None else knn(q, n, g)
    weights = sims.clamp_min(0) ** alpha
    return F.normalize(q + (weights.unsqueeze(2) * g[idx]).sum(1), dim=1)


def _ranks(dist: torch.Tensor) -> torch.Tensor:
    return torch.sort(dist, dim=1, stable=True).indices


def _neighbour_mask(rank: torch.Tensor, k: int) -> torch.Tensor:
    """mask[i, j]: j among i's k+1 nearest (i itself included, as in the authors' code)."""
    mask = torch.zeros(rank.shape, dtype=torch.bool)
    mask.scatter_(1, rank[:, : k + 1], True)
    return mask


def k_reciprocal_distances(
    query: torch.Tensor,
    gallery: torch.Tensor | None = None,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> torch.Tensor:
    """Re-ranked distances (Q, G) (smaller is closer); (N, N) in leave-one-out."""
    q = _float(query).cpu().double()
    everything = q if gallery is None else torch.cat([q, _float(gallery).cpu().double()])
    n_query, n_all = q.shape[0], everything.shape[0]
    dist = (2 - 2 * everything @ everything.T).clamp_min(0)
    dist = dist / dist.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    rank = _ranks(dist)
    k1, half = min(k1, n_all - 1), min(int(round(k1 / 2)), n_all - 1)
    forward = _neighbour_mask(rank, k1)
    reciprocal = forward & forward.T  # R(p, k1)
    forward_half = _neighbour_mask(rank, half)
    reciprocal_half = (forward_half & forward_half.T).double()  # R(c, k1/2)
    shared = reciprocal.double() @ reciprocal_half.T  # |R(c, k1/2) ∩ R(p, k1)|
    accept = reciprocal & (shared > (2 / 3) * reciprocal_half.sum(1)[None, :])
    expanded = reciprocal | ((accept.double() @ reciprocal_half) > 0)
    v = torch.where(expanded, torch.exp(-dist), torch.zeros_like(dist))
    v = v / v.sum(1, keepdim=True)
    if k2 > 1:
        v = v[rank[:, : min(k2, n_all)]].mean(1)
    jaccard = torch.empty(n_query, n_all, dtype=torch.float64)
    for i in range(n_query):  # V is sparse: only p's non-zero columns can share mass
        cols = v[i].nonzero().flatten()
        shared_mass = torch.minimum(v[i, cols][None, :], v[:, cols]).sum(1)
        jaccard[i] = 1 - shared_mass / (2 - shared_mass)
    final = (1 - lambda_value) * jaccard + lambda_value * dist[:n_query]
    return final if gallery is None else final[:, n_query:]


def rerank(
    method: str,
    query: torch.Tensor,
    gallery: torch.Tensor | None = None,
    k: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """Gallery indices (Q, k) best first after re-ranking (all candidates when ``k`` is
    None); in leave-one-out the query itself is never among them. Ties go to the lower index."""
    q = _float(query)
    g = q if gallery is None else _float(gallery).to(q.dtype)
    if method == "aqe":
        expanded = alpha_query_expansion(q, gallery, **params)
        score = -(expanded @ g.T)
    elif method == "kreciprocal":
        score = k_reciprocal_distances(q, gallery, **params).to(q.dtype)
    else:
        raise ValueError(f"re-ranking method must be one of {', '.join(METHODS)}, got {method!r}")
    if gallery is None:
        score = score.clone()
        score.fill_diagonal_(float("inf"))
    order = torch.sort(score, dim=1, stable=True).indices
    if gallery is None:
        order = order[:, :-1]  # the query itself sorts last
    return order if k is None else order[:, :k]


def ranking_metrics(
    order: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Recall@K and MAP@R of full rankings (each row: every candidate, best first), with the
    conventions of :mod:`dmlray.evaluation.metrics` (R = 0 queries: misses for Recall@K,
    left out of MAP@R)."""
    ql = torch.as_tensor(query_labels).long().reshape(-1)
    gl = ql if gallery_labels is None else torch.as_tensor(gallery_labels).long().reshape(-1)
    relevant = (gl[order] == ql[:, None]).double()
    out = {f"recall@{k}": float(relevant[:, :k].amax(1).mean()) for k in ks}
    r = relevant.sum(1)
    positions = torch.arange(1, order.shape[1] + 1, dtype=torch.float64)
    precision = relevant.cumsum(1) / positions
    within_r = positions[None, :] <= r[:, None]
    ap = (precision * relevant * within_r).sum(1) / r.clamp_min(1)
    has = r > 0
    out["map@r"] = float(ap[has].mean()) if has.any() else 0.0
    return out


def reranked_metrics(
    method: str,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    gallery_embeddings: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Recall@K and MAP@R after re-ranking with ``method`` (default parameters)."""
    order = rerank(method, embeddings.cpu(), None if gallery_embeddings is None else gallery_embeddings.cpu())
    return ranking_metrics(order, labels.cpu(), None if gallery_labels is None else gallery_labels.cpu(), ks)
