"""Clustering of embeddings: seeded Lloyd k-means and normalised mutual information (NMI)."""

from __future__ import annotations

import numpy as np
import torch

from dmlray.evaluation.knn import ArrayLike, as_embeddings, auto_chunk

__all__ = ["kmeans", "nmi_score"]

# --------------------------------------------------------------------------- NMI


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of x (float64) and counts, deterministic on any device.

    ``index_add_`` accumulates with atomics on CUDA, in an order that changes from run to
    run; prefix sums over the points sorted by cluster give the same bits every time.
    Done in column blocks so the float64 copy stays small.
    """
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=n_clusters)
    ends = torch.cumsum(counts, 0)
    sums = torch.empty(n_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    for d0 in range(0, x.shape[1], 64):
        cs = torch.cumsum(x[order, d0 : d0 + 64].double(), 0)
        cs = torch.cat([cs.new_zeros(1, cs.shape[1]), cs])
        sums[:, d0 : d0 + 64] = cs[ends] - cs[ends - counts]
    return sums, counts


@torch.no_grad()
def kmeans(
    x: ArrayLike,
    n_clusters: int,
    *,
    max_iter: int = 25,
    seed: int = 0,
    init: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Seeded, deterministic Lloyd k-means on the device of ``x``; returns cluster ids.

    ``init``: "k-means++" (D^2 sampling), "random" (distinct random points) or "auto"
    (k-means++ up to 1000 clusters, random above: k-means++ costs one pass over the data
    per centre, minutes for SOP's 11k classes). Stops after ``max_iter`` iterations (25,
    as faiss' default) or when no assignment changes. An empty cluster keeps its centre.
    Ties between centres go to the lower centre index (``argmax`` returns the first).
    """
    x = as_embeddings(x, "x")
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    if init == "auto":
        init = "k-means++" if n_clusters <= 1000 else "random"
    # The generator lives on the CPU so a seed gives the same start on any device.
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        centres = x[torch.randperm(n, generator=gen)[:n_clusters].to(x.device)].clone()
    elif init == "k-means++":
        centres = torch.empty(n_clusters, x.shape[1], dtype=x.dtype, device=x.device)
        first = int(torch.randint(n, (1,), generator=gen))
        centres[0] = x[first]
        d2 = ((x - centres[0]) ** 2).sum(1)
        for c in range(1, n_clusters):
            w = d2.double().cpu()
            # All points coincide with a centre: any choice is as good; take the first.
            pick = int(torch.multinomial(w, 1, generator=gen)) if float(w.sum()) > 0 else c
            centres[c] = x[pick]
            d2 = torch.minimum(d2, ((x - centres[c]) ** 2).sum(1))
    else:
        raise ValueError(f"init must be 'auto', 'k-means++' or 'random', got {init!r}")

    chunk = auto_chunk(n_clusters, x.element_size(), chunk_size)
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        # argmin ||x - c||^2 == argmax (x.c - ||c||^2 / 2); chunked so memory is chunk x C.
        half_sq = 0.5 * (centres * centres).sum(1)
        new = torch.cat([(x[a : a + chunk] @ centres.T - half_sq).argmax(1) for a in range(0, n, chunk)])
        if torch.equal(new, assign):
            break
        assign = new
        sums, counts = _cluster_sums(x, assign, n_clusters)
        filled = counts > 0
        centres[filled] = (sums[filled] / counts[filled, None]).to(x.dtype)
    return assign


def nmi_score(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (sklearn's default).

    NMI = I(U; V) / ((H(U) + H(V)) / 2); 1.0 when both labelings are a single cluster.
    """
    a = np.asarray(torch.as_tensor(labels_true).cpu()).reshape(-1)
    b = np.asarray(torch.as_tensor(labels_pred).cpu()).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.size} vs {b.size}")
    n = a.size
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    if ai.max(initial=0) == 0 and bi.max(initial=0) == 0:
        return 1.0
    # Sparse contingency table: only the non-empty (class, cluster) cells.
    cells, nij = np.unique(ai.astype(np.int64) * (bi.max() + 1) + bi, return_counts=True)
    ca, cb = np.bincount(ai).astype(np.float64), np.bincount(bi).astype(np.float64)
    ri, rj = cells // (bi.max() + 1), cells % (bi.max() + 1)
    nij = nij.astype(np.float64)
    mi = float(np.sum(nij / n * (np.log(nij * n) - np.log(ca[ri] * cb[rj]))))
    h_a = float(-np.sum(ca / n * np.log(ca / n)))
    h_b = float(-np.sum(cb / n * np.log(cb / n)))
    denom = 0.5 * (h_a + h_b)
    return max(0.0, mi / denom) if denom > 0 else 0.0
