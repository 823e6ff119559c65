"""Leave-one-out k-NN from the upper block triangle of X·Xᵀ: half the similarity product.

In leave-one-out every item queries all the others, so the similarity matrix X·Xᵀ is
symmetric and half of it holds every score. The rows are cut into chunks [s, e), and
chunk i computes the block X[s:e]·X[s:]ᵀ once. The block serves twice:

* its *row part*: the chunk's own rows against every column >= s, searched by the
  exact top-k of ``knn._topk_of_sims``;
* its *column part*, the columns >= e read downwards: the scores of every later row
  against this chunk's rows, which those rows' own blocks no longer compute.

So a row of chunk j meets the columns < s_j through the column parts of chunks 0..j-1,
and the columns >= s_j through its own row part: every pair exactly once. For the
column parts each later row keeps a running top k (``_merge_candidates``); a chunk only
offers it the items that can still enter (``_column_candidates``). Every ranking uses the
keys of ``knn._descending_keys`` (score descending, then index ascending), so ties go to
the lower index exactly as in the other paths.

It pays where the product is most of the work: a dimension that is large against k
(``applies``). Against faiss IndexFlatIP on the same threads (bench/bench_eval.py --knn,
the README's "Measured"): 0.57-0.90x its time at 10,000 x 512 and SOP size for k <= 16
on 2 threads, 0.61-0.69x on 1. A score is the same dot
product whichever of its two items is the query, but it may be summed in another order
than the full product would: scores agree with the other paths to float32 rounding, and
exactly where the products are exact (integer-valued embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dmlray.evaluation.knn import (
    _GROUP,
    _LOW_32,
    _NO_KEY,
    _SIGN_BIT,
    _chunk_pool,
    _descending_keys,
    _in_order,
    _keys_per_row,
    _padded_gallery,
    _topk_of_sims,
)

# The half product is used where k <= dim / this (and dim >= _MIN_DIM): the selection's
# passes over each block cost about the same whatever the dimension, while the product
# saved grows with it, and the running top k of the column parts costs more as k grows.
# Measured on 2 cores (median of 5), half against full product: 10,000 x 512, k = 1 / 10
# / 16: 0.27 / 0.35 / 0.37 s against 0.42 s, but k = 33: 0.47 against 0.44 and k = 100:
# 0.80 against 0.46; 10,000 x 128, k = 1 / 4 / 8: 0.12 / 0.14 / 0.17 against 0.14 / 0.14
# / 0.15; 20,000 x 128, k = 1 / 10: 0.42 / 0.62 against 0.52 / 0.54; 10,000 x 32
# (quantised), k = 1: 0.086 against 0.075.
_DIMS_PER_K = 32
_MIN_DIM = 64
# Rows per chunk by default (a multiple of _GROUP, so each row part stays whole groups).
_MAX_ROWS = 512
# Bytes of one block at most (rows x padded N x 4), as auto_chunk for a large gallery.
_MAX_BLOCK_BYTES = 128 * 1024 * 1024
# Rows per group of a column part's maxima, at most: a column's k-th largest group
# maximum bounds its k-th best item in the chunk from below.
_MAX_ROWS_PER_GROUP = 16
# The column part is compared whole when the groups to read back hold over 1 / this of it.
_GATHER_SHARE = 4
# Inputs whose magnitude stays below this keep every product finite (no inf or NaN score).
_FINITE_BOUND = 1e15

# A chunk's block searched: (s, e, its rows' top-k keys over the columns >= s, the column
# part's (later row - e, key) candidates, None for the last chunk).
BlockResult = tuple[int, int, np.ndarray, tuple[np.ndarray, np.ndarray] | None]


def applies(x: torch.Tensor, k: int, rows: int | None = None) -> bool:
    """Whether ``symmetric_knn`` serves the leave-one-out top ``k`` of ``x`` in chunks of
    ``rows``: float32 on a CPU, a dimension large against k, at least two chunks, finite
    scores."""
    n, dim = x.shape
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and dim >= _MIN_DIM
        and k * _DIMS_PER_K <= dim
        and n > chunk_rows(n, k, rows)
    ):
        return False
    low, high = torch.aminmax(x)
    return bool(-_FINITE_BOUND < low and high < _FINITE_BOUND)  # also False for NaN


def chunk_rows(n: int, k: int, requested: int | None = None) -> int:
    """Rows per chunk: ``requested`` (or up to _MAX_ROWS within _MAX_BLOCK_BYTES) rounded
    up to whole groups of _GROUP, and at least 2k so each column part has 2k groups."""
    padded = n + (-n % _GROUP)
    rows = requested if requested is not None else min(_MAX_ROWS, _MAX_BLOCK_BYTES // (4 * padded))
    need = max(rows, 2 * k, 1)
    return need + (-need % _GROUP)


@torch.no_grad()
def symmetric_knn(x: torch.Tensor, k: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact leave-one-out top ``k`` of every row of ``x`` (float32, CPU, finite), ties to
    the lower index: (similarities, indices), each (N, k), best first. ``rows`` per chunk
    (see ``chunk_rows``); two chunks at a time on a CPU with several threads."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} items, got {k}")
    rows = chunk_rows(n, k, rows)
    x_padded = _padded_gallery(x, _GROUP)
    running = np.full((n, k), _NO_KEY)  # later rows' top k so far, from the column parts
    final = np.empty((n, k), np.uint64)
    workers = 2 if torch.get_num_threads() >= 2 else 1
    with _chunk_pool(workers) as pool:
        streams = 1 if pool is None else workers
        buffers = [torch.empty(rows * x_padded.shape[0]) for _ in range(streams)]
        # chunk i reuses chunk i - streams' buffer, whose block has been searched by then
        tasks = (
            (_search_block, x, x_padded, s, rows, k, buffers[i % streams], _kth_scores(running, min(s + rows, n)))
            for i, s in enumerate(range(0, n, rows))
        )
        results: Iterator[BlockResult]
        if pool is None:
            results = (task[0](*task[1:]) for task in tasks)
        else:
            # a block's candidates are filtered by the running top k as it was when the
            # block was submitted (a lower bound, one chunk behind), merged against the
            # current one
            results = _in_order(pool, tasks, streams)
        for result in results:
            _gather_chunk(result, running, final)
    scores = _scores_of(final)
    return torch.from_numpy(scores), torch.from_numpy((final & _LOW_32).astype(np.int64))


def _kth_scores(running: np.ndarray, start: int) -> np.ndarray:
    """The k-th best score so far of rows start.. (-inf while fewer than k are known)."""
    kth = running[start:, -1]
    return np.where(kth == _NO_KEY, np.float32(-np.inf), _scores_of(kth))


def _scores_of(keys: np.ndarray) -> np.ndarray:
    """The float32 scores of ``_descending_keys`` keys (the inverse of their high half)."""
    ordered = ~(keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ordered & _SIGN_BIT, ordered ^ _SIGN_BIT, ~ordered)
    return bits.view(np.float32)


def _search_block(
    x: torch.Tensor, x_padded: torch.Tensor, s: int, rows: int, k: int, buf: torch.Tensor, floor: np.ndarray
) -> BlockResult:
    """Block of chunk [s, e): (s, e, its rows' top-k keys over the columns >= s, the
    column part's candidates for the rows >= e) -- see ``_column_candidates``."""
    n = x.shape[0]
    e = min(s + rows, n)
    width = x_padded.shape[0] - s
    block = buf[: (e - s) * width].view(e - s, width)
    torch.mm(x[s:e], x_padded[s:].T, out=block)
    block[:, n - s :] = float("-inf")  # padding columns
    own = torch.arange(e - s)
    block[own, own] = float("-inf")  # each row's own item, as in knn's other paths
    scores, columns = _topk_of_sims(block, k, n - s - 1, _GROUP)
    row_keys = _descending_keys(scores.numpy(), columns.numpy() + s)
    candidates = _column_candidates(block.numpy(), s, e - s, n - e, k, floor) if e < n else None
    return s, e, row_keys, candidates


def _column_candidates(
    block: np.ndarray, s: int, rows: int, width: int, k: int, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(later row relative to e, key) of the column part's items that may enter those
    rows' top k: the items >= max(floor, the k-th largest maximum of the column's groups
    of rows). An item below the first has k better ones already; one below the second has
    k better ones in this chunk (k groups with larger maxima). Few groups reach that
    threshold once the running top k has formed: then only those are read back."""
    part = block[:, rows : rows + width]  # (rows, width): column m is later row e + m
    per_group = max(1, min(_MAX_ROWS_PER_GROUP, rows // (2 * k)))
    groups = rows // per_group
    maxima = part[: groups * per_group].reshape(groups, per_group, width).max(axis=1)
    threshold = np.maximum(np.partition(maxima, groups - k, axis=0)[groups - k], floor)
    picked = np.flatnonzero(maxima >= threshold)
    if groups * per_group < rows or picked.size * per_group * _GATHER_SHARE > rows * width:
        hits = np.flatnonzero(part >= threshold)
        row, later = hits // width, hits % width
        values = part[row, later]
    else:
        group, later = picked // width, picked % width
        stride = block.shape[1]
        flat = (group * per_group * stride + rows + later)[:, None] + np.arange(per_group) * stride
        values = block.reshape(-1)[flat]
        which, offset = np.nonzero(values >= threshold[later][:, None])
        values, later, row = values[which, offset], later[which], group[which] * per_group + offset
    return later, _descending_keys(values, row + s)


def _gather_chunk(
    result: BlockResult,
    running: np.ndarray,
    final: np.ndarray,
) -> None:
    """Chunk [s, e)'s rows are complete (their column-part top k merged with their row
    part's); its column part's candidates join the later rows' running top k."""
    s, e, row_keys, candidates = result
    both = np.concatenate([running[s:e], row_keys], axis=1)
    both.sort(axis=1)
    final[s:e] = both[:, : final.shape[1]]
    if candidates is not None:
        _merge_candidates(running[e:], *candidates)


def _merge_candidates(running: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> None:
    """In place: each of ``running``'s rows (ascending keys, the k best so far) keeps the
    k smallest of its keys and its candidates (``keys[j]`` for row ``rows[j]``)."""
    k = running.shape[1]
    better = keys < running[rows, k - 1]
    rows, keys = rows[better], keys[better]
    if rows.size == 0:
        return
    counts = np.bincount(rows)
    order = np.argsort(rows, kind="stable")
    touched = np.flatnonzero(counts)
    line = np.cumsum(counts > 0) - 1  # row -> its line among the touched rows
    offered, _ = _keys_per_row(line[rows[order]], keys[order], touched.size, 0)
    merged = np.concatenate([running[touched], offered], axis=1)
    merged.sort(axis=1)
    running[touched] = merged[:, :k]
