"""Retrieval metrics for metric learning: Recall@K, MAP@R, R-precision, precision@1, NMI.

Definitions follow "A Metric Learning Reality Check" (Musgrave et al., 2020) and the
Recall@K of the seed papers. All neighbour search is exact and chunked: a block of
``chunk`` queries is compared with the whole gallery at a time, so memory is
O(chunk x N_gallery), never N x N, and it runs on the device of the input embeddings.

Protocols
    * leave-one-out (no gallery given): every embedding queries all the *other*
      embeddings of the same set (CUB, Cars, SOP). A query never retrieves itself; it is
      excluded by index identity, not by similarity, so a duplicate of the query (another
      item with identical embedding) is still retrieved.
    * query-vs-gallery (gallery given): queries search the gallery (In-Shop).

Conventions
    * Similarity is the dot product (embeddings are expected to be L2-normalised).
    * Ties in similarity are broken by gallery index: among equally similar items the one
      with the lower gallery index ranks first (what a stable descending sort gives).
      This holds exactly, also at the top-k boundary, for both backends.
    * R for a query = number of gallery items with the query's label (in leave-one-out,
      not counting the query itself).
    * Queries with R = 0 (a class of size one in leave-one-out, or a query label absent
      from the gallery) have no correct answer. Recall@K counts them, as misses, so the
      denominator is always the number of queries, as in the seed papers' code. MAP@R,
      R-precision and precision@1 exclude them, as pytorch-metric-learning does (they are
      undefined for R = 0). When every query has R = 0 those three metrics are 0.0.
    * Metrics are fractions in [0, 1]; ``format_table`` prints percentages.

Backends
    * "torch" (default): per chunk one matmul into a reused buffer, then an exact top-k
      only as deep as MAP@R needs (max R in the chunk). Recall@K for K above 64 (SOP's
      K = 1000) is not read from a K-deep table: the rank of each query's best positive is
      counted directly in the similarity block, which is exact and far cheaper.
    * "faiss": IndexFlatIP exact search (CPU) for the same candidates; ties and the query
      itself are handled as above; results match "torch" except where two similarities
      differ by float32 rounding only (faiss sums the products in another order).
    * "auto": faiss when importable, else torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "knn",
    "recall_at_k",
    "map_at_r",
    "retrieval_metrics",
    "kmeans",
    "nmi_score",
    "format_table",
]

ArrayLike = Any  # torch.Tensor or numpy array

# Bytes of similarity scores one query chunk may hold (chunk x N_gallery x itemsize), and
# a cap on its rows. 128 MiB gives the SOP test set (60k) ~550 queries per chunk: already
# at full BLAS speed on CPU (larger blocks measured no faster), and far below 2 GB peak.
_DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024
_MAX_CHUNK_ROWS = 1024


# --------------------------------------------------------------------------- inputs


def _as_embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    # float64 stays float64 (exact tests); anything else is scored in float32, since
    # half-precision dot products over 512 dims lose enough to reorder neighbours.
    if t.dtype != torch.float64:
        t = t.float()
    return t


def _as_labels(y: ArrayLike, n: int, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(y).to(device=device).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries for {n} embeddings")
    return t.long()


def _prepare(
    embeddings: ArrayLike,
    labels: ArrayLike,
    gallery_embeddings: ArrayLike | None,
    gallery_labels: ArrayLike | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Returns (query, query_labels, gallery, gallery_labels, leave_one_out)."""
    q = _as_embeddings(embeddings, "embeddings")
    ql = _as_labels(labels, q.shape[0], "labels", q.device)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("give both gallery_embeddings and gallery_labels, or neither")
    if gallery_embeddings is None:
        return q, ql, q, ql, True
    g = _as_embeddings(gallery_embeddings, "gallery_embeddings").to(q.device)
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery dim {g.shape[1]} != query dim {q.shape[1]}")
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    gl = _as_labels(gallery_labels, g.shape[0], "gallery_labels", q.device)
    return q, ql, g, gl, False


def _auto_chunk(n_gallery: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, min(_MAX_CHUNK_ROWS, _DEFAULT_CHUNK_BYTES // max(1, n_gallery * itemsize)))


# ----------------------------------------------------------------------- neighbours


def _order_topk(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorders each row by (similarity desc, index asc): two stable sorts."""
    idx, perm = torch.sort(idx, dim=1, stable=True)
    vals = torch.gather(vals, 1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, torch.gather(idx, 1, perm)


def _select_exact(
    sims_of_rows: Callable[[torch.Tensor], torch.Tensor],
    cand_vals: torch.Tensor,
    cand_idx: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with index tie-break from k+1 candidates per row.

    ``cand_*`` hold the k+1 best candidates of each row in any order. Where the k-th and
    (k+1)-th best similarities differ, the top-k *set* is already exact and only its order
    needs fixing. Where they tie, the boundary may have cut a tie arbitrarily, so those
    rows (rare with real-valued embeddings) are recomputed by a full stable sort of the
    row's similarities, given by ``sims_of_rows(row_ids)``.
    """
    vals, idx = _order_topk(cand_vals, cand_idx)
    tied = (vals[:, k - 1] == vals[:, k]).nonzero().flatten()
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if tied.numel():
        full = sims_of_rows(tied)
        v, i = torch.sort(full, dim=1, descending=True, stable=True)
        vals[tied] = v[:, :k]
        idx[tied] = i[:, :k]
    return vals, idx


def _torch_chunk_sims(
    q: torch.Tensor, g: torch.Tensor, start: int, leave_one_out: bool, buf: torch.Tensor
) -> torch.Tensor:
    """Similarities of a query chunk (rows start.. of the query set) to the whole gallery.

    Written into ``buf`` (reused across chunks: a fresh chunk x N allocation every chunk
    costs page faults comparable to the matmul itself on CPU).
    """
    sims = torch.mm(q, g.T, out=buf[: q.shape[0]])
    if leave_one_out:
        rows = torch.arange(q.shape[0], device=q.device)
        # -inf sorts the query itself below every real item, so it is never retrieved
        # while fewer than all other items are asked for (k is capped at N - 1).
        sims[rows, rows + start] = float("-inf")
    return sims


def _topk_of_sims(sims: torch.Tensor, k: int, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a similarity block, ties to the lower index."""
    if k >= n_valid:
        v, i = torch.sort(sims, dim=1, descending=True, stable=True)
        return v[:, :k], i[:, :k]
    cand_vals, cand_idx = torch.topk(sims, k + 1, dim=1, largest=True, sorted=False)
    return _select_exact(lambda r: sims[r], cand_vals, cand_idx, k)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "faiss" if _faiss_available() else "torch"
    if backend not in ("torch", "faiss"):
        raise ValueError(f"backend must be 'torch', 'faiss' or 'auto', got {backend!r}")
    if backend == "faiss" and not _faiss_available():
        raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu)")
    return backend


class _FaissIndex:
    """Exact inner-product index over the gallery (faiss IndexFlatIP), built once."""

    def __init__(self, g: torch.Tensor) -> None:
        import faiss

        self._g = g
        arr = np.ascontiguousarray(g.detach().cpu().numpy(), dtype=np.float32)
        self.index = faiss.IndexFlatIP(arr.shape[1])
        self.index.add(arr)

    def chunk_topk(
        self, q: torch.Tensor, start: int, k: int, leave_one_out: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_g = self._g.shape[0]
        n_valid = n_g - (1 if leave_one_out else 0)
        own = torch.arange(start, start + q.shape[0], device=q.device)

        def exact_rows(rows: torch.Tensor) -> torch.Tensor:
            s = q[rows] @ self._g.T
            if leave_one_out:
                s[torch.arange(rows.numel(), device=q.device), own[rows]] = float("-inf")
            return s

        if k >= n_valid:  # everything is wanted: a full sort is exact and no slower
            v, i = torch.sort(exact_rows(torch.arange(q.shape[0], device=q.device)), dim=1,
                              descending=True, stable=True)
            return v[:, :k], i[:, :k]
        want = k + 1 + (1 if leave_one_out else 0)
        qa = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
        d, i = self.index.search(qa, want)
        vals = torch.from_numpy(d).to(q.device, q.dtype)
        idx = torch.from_numpy(i).to(q.device)
        if leave_one_out:
            # Drop the query itself; if faiss did not return it (ties with duplicates
            # pushed it out), drop the last candidate instead so every row keeps k+1.
            is_self = idx == own[:, None]
            drop = torch.where(is_self.any(1), is_self.float().argmax(1),
                               torch.full_like(own, want - 1))
            keep = torch.ones_like(idx, dtype=torch.bool)
            keep[torch.arange(idx.shape[0], device=q.device), drop] = False
            vals = vals[keep].view(-1, k + 1)
            idx = idx[keep].view(-1, k + 1)
        return _select_exact(exact_rows, vals, idx, k)


def _iter_topk(
    q: torch.Tensor,
    g: torch.Tensor,
    leave_one_out: bool,
    k_for_chunk: Callable[[int, int], int],
    chunk_size: int | None,
    backend: str,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yields (start, stop, sims, indices, block) per query chunk; k may vary per chunk.

    ``block`` is the chunk's full similarity row block (torch backend; None for faiss),
    valid only until the next chunk is requested: its buffer is reused.
    """
    backend = _resolve_backend(backend)
    chunk = min(_auto_chunk(g.shape[0], g.element_size(), chunk_size), q.shape[0])
    faiss_index = _FaissIndex(g) if backend == "faiss" else None
    buf = None if faiss_index is not None else torch.empty(chunk, g.shape[0], dtype=g.dtype,
                                                            device=g.device)
    n_valid = g.shape[0] - (1 if leave_one_out else 0)
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            stop = min(start + chunk, q.shape[0])
            k = min(int(k_for_chunk(start, stop)), n_valid)
            if faiss_index is not None:
                if k <= 0:
                    v = torch.empty(stop - start, 0, dtype=q.dtype, device=q.device)
                    yield start, stop, v, v.long(), None
                    continue
                v, i = faiss_index.chunk_topk(q[start:stop], start, k, leave_one_out)
                yield start, stop, v, i, None
            else:
                block = _torch_chunk_sims(q[start:stop], g, start, leave_one_out, buf)
                v, i = _topk_of_sims(block, max(k, 0), n_valid)
                yield start, stop, v, i, block


@torch.no_grad()
def knn(
    embeddings: ArrayLike,
    k: int,
    gallery_embeddings: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by dot product, ties broken by lower gallery index.

    Without a gallery, each embedding searches the others (leave-one-out, itself excluded
    by index). Returns (similarities, indices), both (N_query, k') with
    k' = min(k, number of candidates), sorted best first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _as_embeddings(embeddings, "embeddings")
    loo = gallery_embeddings is None
    g = q if loo else _as_embeddings(gallery_embeddings, "gallery_embeddings").to(q.device, q.dtype)
    parts = [p[:4] for p in _iter_topk(q, g, loo, lambda a, b: k, chunk_size, backend)]
    return torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])


# -------------------------------------------------------------------------- metrics


def _class_counts(query_labels: torch.Tensor, gallery_labels: torch.Tensor, loo: bool) -> torch.Tensor:
    """R per query: gallery items with the query's label, minus the query itself (loo)."""
    uniq, counts = torch.unique(gallery_labels, return_counts=True)
    pos = torch.searchsorted(uniq, query_labels).clamp(max=uniq.numel() - 1)
    r = torch.where(uniq[pos] == query_labels, counts[pos], torch.zeros_like(counts[pos]))
    return r - 1 if loo else r


# Recall@K up to this K is read off the top-k table; beyond it the torch backend counts.
_TOPK_FOR_RECALL = 64
# Rows per sub-block when counting ranks: bounds the temporaries to a few x 256 x N.
_COUNT_ROWS = 256
_NO_HIT = torch.iinfo(torch.long).max


class _ClassIndex:
    """Gallery indices grouped by label, for gathering each query's positives directly.

    A stable sort by label keeps each class's members in ascending gallery index, which
    is what makes "first maximum" mean "lowest index" below.
    """

    def __init__(self, gallery_labels: torch.Tensor) -> None:
        self.order = torch.sort(gallery_labels, stable=True).indices
        self.uniq, self.counts = torch.unique(gallery_labels, return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def members(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, valid): padded (len(labels), max class size) member table."""
        pos = torch.searchsorted(self.uniq, labels).clamp(max=self.uniq.numel() - 1)
        present = self.uniq[pos] == labels
        count = torch.where(present, self.counts[pos], 0)
        width = max(int(count.max()), 1)
        offs = torch.arange(width, device=labels.device)
        valid = offs[None, :] < count[:, None]
        flat = (self.starts[pos][:, None] + offs[None, :]).clamp(max=self.order.numel() - 1)
        return self.order[flat], valid


def _first_hit_rank(
    block: torch.Tensor,
    rows: torch.Tensor,
    start: int,
    query_labels: torch.Tensor,
    classes: _ClassIndex,
) -> torch.Tensor:
    """Exact 0-based rank of each row's best same-class item, by counting.

    The best positive is the most similar same-class item, the lowest index among equals;
    its rank is the number of items ranked before it under (similarity desc, index asc).
    Positives are gathered from the class table (R per row, not N), so the only full
    passes over a row are two comparisons. The query itself is -inf in ``block``
    (leave-one-out) and never wins or counts. Every row must have a positive.
    """
    out = torch.empty(rows.numel(), dtype=torch.long, device=block.device)
    for a in range(0, rows.numel(), _COUNT_ROWS):
        sub = rows[a:a + _COUNT_ROWS]
        s = block[sub]
        members, valid = classes.members(query_labels[start + sub])
        pos_sims = torch.gather(s, 1, members).masked_fill(~valid, float("-inf"))
        best = pos_sims.amax(1, keepdim=True)
        # max() does not promise the first of equal maxima; argmax of the equality does.
        arg = (pos_sims == best).to(torch.uint8).argmax(1, keepdim=True)
        best_idx = torch.gather(members, 1, arg)
        gt = (s > best).sum(1)
        ge = (s >= best).sum(1)
        rank = gt.clone()
        # Items tied with the best positive rank before it only at a lower index; such
        # ties are rare, so only the rows that have any are examined element by element.
        tied = (ge - gt > 1).nonzero().flatten()
        if tied.numel():
            cols = torch.arange(s.shape[1], device=s.device)
            rank[tied] += ((s[tied] == best[tied]) & (cols < best_idx[tied])).sum(1)
        out[a:a + _COUNT_ROWS] = rank
    return out


@torch.no_grad()
def _score(
    embeddings: ArrayLike,
    labels: ArrayLike,
    gallery_embeddings: ArrayLike | None,
    gallery_labels: ArrayLike | None,
    ks: Sequence[int],
    need_r: bool,
    chunk_size: int | None,
    backend: str,
    keep_top: int = 0,
) -> dict[str, Any]:
    """One chunked pass computing the sums behind every k-NN metric.

    ``keep_top`` > 0 also returns each query's first ``keep_top`` neighbours (indices and
    similarities), for checks such as the benchmark's comparison with faiss.
    """
    q, ql, g, gl, loo = _prepare(embeddings, labels, gallery_embeddings, gallery_labels)
    ks = sorted({int(k) for k in ks})
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")
    r = _class_counts(ql, gl, loo)
    max_k = ks[-1] if ks else 0

    # The torch backend ranks the first correct neighbour by counting over the chunk's
    # similarity block, so a large K (SOP's 1000) needs no top-1000 selection: top-k only
    # has to reach R for MAP@R. faiss returns neighbour tables only, so it searches K deep.
    counting = _resolve_backend(backend) == "torch" and max_k > _TOPK_FOR_RECALL
    classes = _ClassIndex(gl) if counting else None

    def k_for_chunk(a: int, b: int) -> int:
        # MAP@R needs each query's top R; asking per chunk keeps one large class from
        # inflating k (and memory) for every other chunk.
        k = max(int(r[a:b].max()) if need_r else 0, keep_top, 1)
        return k if counting else max(k, max_k)

    hits = {k: 0.0 for k in ks}
    ap_sum = rp_sum = p1_sum = 0.0
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for a, b, sims, idx, block in _iter_topk(q, g, loo, k_for_chunk, chunk_size, backend):
        if keep_top:
            kept.append((sims[:, :keep_top].clone(), idx[:, :keep_top].clone()))
        if idx.shape[1] == 0:  # a single-item set: nothing to retrieve
            continue
        rr = r[a:b]
        match = gl[idx] == ql[a:b, None]  # (chunk, k)
        # Rank (0-based) of the first correct neighbour; recall@K counts first < K.
        # Not in the table: rank >= table depth >= max K (or no positive at all), so an
        # "infinite" rank marks a miss for every K, unless it is counted below.
        found = match.any(1)
        first = torch.where(found, match.to(torch.uint8).argmax(1), _NO_HIT)
        if counting:
            deep = (~found & (rr > 0)).nonzero().flatten()
            if deep.numel():
                first[deep] = _first_hit_rank(block, deep, a, ql, classes)
        for k in ks:
            hits[k] += float((first < k).sum())
        if need_r and int(rr.max()) > 0:
            kr = min(match.shape[1], int(rr.max()))  # MAP@R never looks past rank R
            ranks = torch.arange(1, kr + 1, device=idx.device)
            rel = (match[:, :kr] & (ranks[None, :] <= rr[:, None])).to(torch.float64)
            prec = rel.cumsum(dim=1) / ranks  # precision at each rank
            valid = rr > 0
            denom = rr.clamp(min=1).to(torch.float64)
            ap_sum += float(((prec * rel).sum(1) / denom)[valid].sum())
            rp_sum += float((rel.sum(1) / denom)[valid].sum())
            p1_sum += float(match[:, 0][valid].sum())
    n = q.shape[0]
    n_with_match = int((r > 0).sum())
    out: dict[str, Any] = {
        "recall": {k: hits[k] / n for k in ks},
        "n_queries": n,
        "n_without_match": n - n_with_match,
    }
    if keep_top:
        out["neighbour_sims"] = torch.cat([v for v, _ in kept])
        out["neighbours"] = torch.cat([i for _, i in kept])
    if need_r:
        d = max(n_with_match, 1)
        out.update(map_at_r=ap_sum / d, r_precision=rp_sum / d, precision_at_1=p1_sum / d)
    return out


def recall_at_k(
    embeddings: ArrayLike,
    labels: ArrayLike,
    gallery_embeddings: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> dict[int, float]:
    """Recall@K: fraction of queries with at least one same-class item in their top K.

    Leave-one-out without a gallery, query-vs-gallery with one. Queries without any
    correct answer (R = 0) count as misses. K larger than the candidate count is capped.
    """
    return _score(embeddings, labels, gallery_embeddings, gallery_labels, ks, False,
                  chunk_size, backend)["recall"]


def map_at_r(
    embeddings: ArrayLike,
    labels: ArrayLike,
    gallery_embeddings: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> float:
    """MAP@R (Musgrave et al. 2020): mean over queries of (1/R) sum_{i<=R} P@i * rel_i.

    Queries with R = 0 are excluded (returns 0.0 when no query has R > 0).
    """
    return _score(embeddings, labels, gallery_embeddings, gallery_labels, (), True,
                  chunk_size, backend)["map_at_r"]


# --------------------------------------------------------------------------- NMI


def _cluster_sums(
    x: torch.Tensor, assign: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
        cs = torch.cumsum(x[order, d0:d0 + 64].double(), 0)
        cs = torch.cat([cs.new_zeros(1, cs.shape[1]), cs])
        sums[:, d0:d0 + 64] = cs[ends] - cs[ends - counts]
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
    x = _as_embeddings(x, "x")
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

    chunk = _auto_chunk(n_clusters, x.element_size(), chunk_size)
    assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        # argmin ||x - c||^2 == argmax (x.c - ||c||^2 / 2); chunked so memory is chunk x C.
        half_sq = 0.5 * (centres * centres).sum(1)
        new = torch.cat([(x[a:a + chunk] @ centres.T - half_sq).argmax(1)
                         for a in range(0, n, chunk)])
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


# ---------------------------------------------------------------------- reporting


def retrieval_metrics(
    embeddings: ArrayLike,
    labels: ArrayLike,
    gallery_embeddings: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = True,
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
    seed: int = 0,
) -> dict[str, float]:
    """All retrieval metrics in one chunked pass, as a flat dict of fractions.

    Keys: ``recall@K`` for each K, ``map@r``, ``r_precision``, ``precision@1`` and, if
    ``nmi``, ``nmi``: k-means on the query embeddings with one cluster per distinct query
    label, scored against those labels. See the module docstring for the conventions.

    Cost: the k-NN pass is one N_query x N_gallery x D matmul, done in chunks. NMI's k-means
    costs up to 25 such passes against the C class centres (N x C x D each): negligible for
    CUB or Cars (100 classes) but minutes on CPU for SOP (11k classes), where evaluation
    inside training may prefer ``nmi=False``.
    """
    s = _score(embeddings, labels, gallery_embeddings, gallery_labels, ks, True,
               chunk_size, backend)
    out: dict[str, float] = {f"recall@{k}": v for k, v in s["recall"].items()}
    out["map@r"] = s["map_at_r"]
    out["r_precision"] = s["r_precision"]
    out["precision@1"] = s["precision_at_1"]
    if nmi:
        q = _as_embeddings(embeddings, "embeddings")
        y = _as_labels(labels, q.shape[0], "labels", q.device)
        n_classes = int(torch.unique(y).numel())
        out["nmi"] = nmi_score(y, kmeans(q, n_classes, seed=seed, chunk_size=chunk_size))
    return out


_COLUMNS = (("map@r", "MAP@R"), ("r_precision", "RP"), ("precision@1", "P@1"), ("nmi", "NMI"))


def format_table(rows: dict[str, dict], ks: Sequence[int] = (1, 2, 4, 8)) -> str:
    """A plain-text results table in the style of the seed papers, values in percent.

    ``rows`` maps a method name to a ``retrieval_metrics`` dict. Columns are R@K for each
    K, then MAP@R, RP, P@1 and NMI when at least one row has them; a missing value is "-".
    """
    cols = [(f"recall@{k}", f"R@{k}") for k in ks]
    cols += [c for c in _COLUMNS if any(c[0] in r for r in rows.values())]
    name_w = max([len("method")] + [len(n) for n in rows])
    widths = [max(len(h), 5) for _, h in cols]
    lines = ["  ".join([f"{'method':<{name_w}}"] + [f"{h:>{w}}" for (_, h), w in zip(cols, widths)])]
    lines.append("-" * len(lines[0]))
    for name, r in rows.items():
        cells = [f"{100 * r[key]:.1f}" if r.get(key) is not None else "-" for key, _ in cols]
        lines.append("  ".join([f"{name:<{name_w}}"] + [f"{c:>{w}}" for c, w in zip(cells, widths)]))
    return "\n".join(lines)
