"""Retrieval metrics: Recall@K, MAP@R, R-precision and precision@1 from one chunked pass.

Definitions and conventions (leave-one-out vs query-vs-gallery, ties, R = 0 queries) are
those of :mod:`dmlray.evaluation.knn`; NMI's clustering is in :mod:`dmlray.evaluation.clustering`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from dmlray.evaluation.clustering import kmeans, nmi_score
from dmlray.evaluation.knn import ArrayLike, _iter_topk, _prepare, as_embeddings, as_labels, resolve_backend

__all__ = ["recall_at_k", "map_at_r", "retrieval_metrics", "format_table"]

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
        sub = rows[a : a + _COUNT_ROWS]
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
        out[a : a + _COUNT_ROWS] = rank
    return out


def _checked_ks(ks: Sequence[int]) -> list[int]:
    """The distinct Ks, ascending; an error naming any K below 1."""
    out = sorted({int(k) for k in ks})
    if any(k < 1 for k in out):
        raise ValueError(f"every K must be >= 1, got {out}")
    return out


def _chunk_depth(a: int, b: int, *, r: torch.Tensor, need_r: bool, keep_top: int, counting: bool, max_k: int) -> int:
    """How deep the neighbour table of queries a..b must go."""
    # MAP@R needs each query's top R; asking per chunk keeps one large class from
    # inflating k (and memory) for every other chunk.
    k = max(int(r[a:b].max()) if need_r else 0, keep_top, 1)
    return k if counting else max(k, max_k)


def _first_correct(
    match: torch.Tensor,
    rr: torch.Tensor,
    block: torch.Tensor | None,
    start: int,
    query_labels: torch.Tensor,
    classes: _ClassIndex | None,
) -> torch.Tensor:
    """Rank (0-based) of each chunk query's first correct neighbour; recall@K counts first < K.

    Not in the table: rank >= table depth >= max K (or no positive at all), so an
    "infinite" rank marks a miss for every K, unless ``classes`` (the counting torch
    backend) ranks it exactly from the chunk's similarity ``block``.
    """
    found = match.any(1)
    first = torch.where(found, match.to(torch.uint8).argmax(1), _NO_HIT)
    if classes is not None:
        assert block is not None, "the counting (torch) backend yields similarity blocks"
        deep = (~found & (rr > 0)).nonzero().flatten()
        if deep.numel():
            first[deep] = _first_hit_rank(block, deep, start, query_labels, classes)
    return first


def _precision_sums(match: torch.Tensor, rr: torch.Tensor) -> tuple[float, float, float]:
    """(sum of AP@R, of R-precision, of P@1) over the chunk's queries with R > 0."""
    if int(rr.max()) <= 0:
        return 0.0, 0.0, 0.0
    kr = min(match.shape[1], int(rr.max()))  # MAP@R never looks past rank R
    ranks = torch.arange(1, kr + 1, device=match.device)
    rel = (match[:, :kr] & (ranks[None, :] <= rr[:, None])).to(torch.float64)
    prec = rel.cumsum(dim=1) / ranks  # precision at each rank
    valid = rr > 0
    denom = rr.clamp(min=1).to(torch.float64)
    return (
        float(((prec * rel).sum(1) / denom)[valid].sum()),
        float((rel.sum(1) / denom)[valid].sum()),
        float(match[:, 0][valid].sum()),
    )


@dataclass
class _Sums:
    """What one pass adds up over the query chunks."""

    hits: dict[int, float]
    """Queries whose first correct neighbour ranks below K, per K."""
    precision: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Sums of AP@R, R-precision and P@1 (see ``_precision_sums``)."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(similarities, indices) of each chunk's first neighbours, when asked for."""

    def add_precision(self, sums: tuple[float, float, float]) -> None:
        self.precision = [a + b for a, b in zip(self.precision, sums, strict=True)]


def _summary(sums: _Sums, r: torch.Tensor, need_r: bool, keep_top: int) -> dict[str, Any]:
    """The metrics of a pass from its sums (see ``_score``)."""
    n = r.shape[0]
    n_with_match = int((r > 0).sum())
    out: dict[str, Any] = {
        "recall": {k: h / n for k, h in sums.hits.items()},
        "n_queries": n,
        "n_without_match": n - n_with_match,
    }
    if keep_top:
        out["neighbour_sims"] = torch.cat([v for v, _ in sums.kept])
        out["neighbours"] = torch.cat([i for _, i in sums.kept])
    if need_r:
        d = max(n_with_match, 1)
        ap, rp, p1 = sums.precision
        out.update(map_at_r=ap / d, r_precision=rp / d, precision_at_1=p1 / d)
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
    ks = _checked_ks(ks)
    r = _class_counts(ql, gl, loo)
    max_k = ks[-1] if ks else 0
    # The torch backend ranks the first correct neighbour by counting over the chunk's
    # similarity block, so a large K (SOP's 1000) needs no top-1000 selection: top-k only
    # has to reach R for MAP@R. faiss returns neighbour tables only, so it searches K deep.
    counting = resolve_backend(backend) == "torch" and max_k > _TOPK_FOR_RECALL
    classes = _ClassIndex(gl) if counting else None
    depth = partial(_chunk_depth, r=r, need_r=need_r, keep_top=keep_top, counting=counting, max_k=max_k)
    sums = _Sums(hits={k: 0.0 for k in ks})
    for a, b, sims, idx, block in _iter_topk(q, g, loo, depth, chunk_size, backend):
        if keep_top:
            sums.kept.append((sims[:, :keep_top].clone(), idx[:, :keep_top].clone()))
        if idx.shape[1] == 0:  # a single-item set: nothing to retrieve
            continue
        match = gl[idx] == ql[a:b, None]  # (chunk, k)
        first = _first_correct(match, r[a:b], block, a, ql, classes)
        for k in ks:
            sums.hits[k] += float((first < k).sum())
        if need_r:
            sums.add_precision(_precision_sums(match, r[a:b]))
    return _summary(sums, r, need_r, keep_top)


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
    return _score(embeddings, labels, gallery_embeddings, gallery_labels, ks, False, chunk_size, backend)["recall"]


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
    return _score(embeddings, labels, gallery_embeddings, gallery_labels, (), True, chunk_size, backend)["map_at_r"]


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
    s = _score(embeddings, labels, gallery_embeddings, gallery_labels, ks, True, chunk_size, backend)
    out: dict[str, float] = {f"recall@{k}": v for k, v in s["recall"].items()}
    out["map@r"] = s["map_at_r"]
    out["r_precision"] = s["r_precision"]
    out["precision@1"] = s["precision_at_1"]
    if nmi:
        q = as_embeddings(embeddings, "embeddings")
        y = as_labels(labels, q.shape[0], "labels", q.device)
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
    lines = ["  ".join([f"{'method':<{name_w}}"] + [f"{h:>{w}}" for (_, h), w in zip(cols, widths, strict=True)])]
    lines.append("-" * len(lines[0]))
    for name, r in rows.items():
        cells = [f"{100 * r[key]:.1f}" if r.get(key) is not None else "-" for key, _ in cols]
        lines.append("  ".join([f"{name:<{name_w}}"] + [f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)]))
    return "\n".join(lines)
