"""Exact, chunked k-nearest-neighbour search: the one neighbour search of dmlray's evaluation.

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
      only as deep as MAP@R needs (max R in the chunk). On a CPU the top-k is found by
      threshold (``_threshold_topk``): one max pass over groups of 64 columns gives each
      row a score that k+1 items reach, and only those few candidates are ranked, so
      torch's slow full-row top-k is never run. On a GPU (and for float64) the grouped
      levels of ``_grouped_candidates`` do the same job in torch calls. The threshold
      top-k is mostly single-threaded numpy, so on a CPU with several threads, where it
      weighs (a gallery over 16 MiB, or k so large that the whole block is compared), two
      chunks are searched at once, each in its own thread on half of torch's threads
      (``_chunk_workers``): one chunk's selection overlaps the other's product. torch's
      thread count is process wide: meanwhile, torch calls of other threads get half too.
      Against faiss IndexFlatIP on the same threads see bench/bench_eval.py --knn and the
      README: about its time (0.95-1.12x) where the product is most of the work, faster
      for a small gallery at small k; the product itself is the floor. Recall@K for K
      above 64 (SOP's K = 1000) is not read from a K-deep table: the rank of each
      query's best positive is counted directly in the similarity block, which is exact
      and far cheaper. ``knn`` without a gallery (leave-one-out), where the dimension is
      large against k (k <= dim / 32, float32 on a CPU), computes only half of the
      symmetric product instead (``symmetric_knn``): 0.57-0.90x faiss's time at
      10,000 x 512 and SOP size for k = 1-16 (2 threads).
    * "faiss": IndexFlatIP exact search (CPU) for the same candidates; ties and the query
      itself are handled as above; results match "torch" except where two similarities
      differ by float32 rounding only (faiss sums the products in another order).
      (faiss itself does not promise a tie order: it lists equal scores highest index
      first and which items tied at the k-th score it keeps depends on its block scan;
      this backend re-ranks its candidates, so it follows the convention above.)
    * "auto": faiss when importable, else torch.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

__all__ = ["knn", "as_embeddings", "as_labels", "auto_chunk", "resolve_backend"]

ArrayLike = Any  # torch.Tensor or numpy array

# Bytes of similarity scores one query chunk may hold (chunk x N_gallery x itemsize), and
# bounds on its rows. On a GPU 128 MiB (the SOP test set, 60k: ~550 queries per chunk). On
# a CPU, for a small gallery, a block of 10 MiB whatever the thread count: measured on a
# Xeon with the threshold top-k (MKL, 20k x 128, k = 1 / 33), 128-row chunks (10 MiB) took
# 1.07 / 1.26 s at 1 thread and 0.57 / 0.71 s at 2, against 1.26 / 1.48 s and 0.67 / 0.86 s
# for 512 rows. A gallery larger than _CACHED_GALLERY_BYTES keeps the large blocks, where
# the product gains more than the top-k loses, up to 512 rows: 10k x 512 (20 MB) took
# 1.04 / 1.06 / 1.15x faiss's time (k = 1 / 10 / 100, 2 threads) in 512-row chunks, against
# 1.12 / 1.13 / 1.21x in 256 rows and 1.06 / 1.11 / 1.24x in 1024 (1 thread: 0.93 / 1.02 s
# for k = 1 / 100 in 512 rows, 0.89 / 1.05 s in 1024); at SOP size (60k x 512, 2 threads)
# 86- and 256-row chunks took 13% and 5% more CPU time than 554-row ones.
_DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024
_CPU_CHUNK_BYTES = 10 * 1024 * 1024
_MIN_CPU_CHUNK_ROWS = 64
_CACHED_GALLERY_BYTES = 16 * 1024 * 1024
_MAX_CHUNK_ROWS = 1024
_MAX_CPU_CHUNK_ROWS = 512
# Columns per group of the grouped top-k (``_grouped_candidates``): 64 keeps the max pass
# at memory speed while (k + 1) x 64 candidates stay few next to N for small k.
_GROUP = 64
# Each level of the grouped top-k splits the selected groups into this many sub-groups.
_FANOUT = 8
# Grouping is used while the candidates ((k + 1) x group) are at most 1 / this of a row;
# measured (bench_eval --knn, 1 thread): grouping is faster than the full-row top-k up
# to there (k = 100 at N = 10k: 1.43 s against 1.54 s; k = 33 at 20k: 1.50 against 1.87).
_GROUPED_MAX_SHARE = 1
# On CPU, float32 blocks take the threshold top-k (``_threshold_topk``); the grouped levels
# stay for GPUs and float64 (and for tests of that path).
_THRESHOLD_ON_CPU = True
# The threshold top-k reads back only the groups that may hold candidates while they are at
# most 1 / this of a row, else compares the whole block (measured at 10k x 512, 1 thread:
# for k = 10 the groups took 0.024 s against 0.035 s, for k = 100 0.14 s against 0.086 s).
_READ_GROUPS_SHARE = 4
# When the whole block is compared, t comes from the maxima of finer groups: 16 items each,
# columns width / 16 apart (a max across the rows of a (16, width / 16) view, no slower
# than the 64-column max). Their (k+1)-th maximum lies nearer the (k+1)-th score, so fewer
# items pass (k = 100, 2 threads, 10k x 32 quantised: 1.14-1.15 against 1.28-1.31x
# faiss's time; 10k x 512: 1.15-1.17 against 1.19-1.20x; 8 items a group: no better).
_STRIDED_GROUP_ITEMS = 16


# --------------------------------------------------------------------------- inputs


def as_embeddings(x: ArrayLike, name: str) -> torch.Tensor:
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


def as_labels(y: ArrayLike, n: int, name: str, device: torch.device) -> torch.Tensor:
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
    q = as_embeddings(embeddings, "embeddings")
    ql = as_labels(labels, q.shape[0], "labels", q.device)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("give both gallery_embeddings and gallery_labels, or neither")
    if gallery_embeddings is None:
        return q, ql, q, ql, True
    g = as_embeddings(gallery_embeddings, "gallery_embeddings").to(q.device)
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery dim {g.shape[1]} != query dim {q.shape[1]}")
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    gl = as_labels(gallery_labels, g.shape[0], "gallery_labels", q.device)
    return q, ql, g, gl, False


def auto_chunk(
    n_gallery: int, itemsize: int, chunk_size: int | None, device: torch.device | None = None, dim: int = 0
) -> int:
    """Query rows per chunk: ``chunk_size`` if given, else sized for the device and the
    gallery's ``n_gallery`` x ``dim`` (see _CPU_CHUNK_BYTES); ``device`` None sizes as for a GPU."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    row_bytes = max(1, n_gallery * itemsize)
    if device is None or device.type != "cpu":
        return max(1, min(_MAX_CHUNK_ROWS, _DEFAULT_CHUNK_BYTES // row_bytes))
    if n_gallery * dim * itemsize <= _CACHED_GALLERY_BYTES:
        return max(_MIN_CPU_CHUNK_ROWS, min(_MAX_CHUNK_ROWS, _CPU_CHUNK_BYTES // row_bytes))
    return max(1, min(_MAX_CPU_CHUNK_ROWS, _DEFAULT_CHUNK_BYTES // row_bytes))


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
    needs fixing. Where they tie, the boundary may have cut the tie arbitrarily: those rows
    keep their candidates above the tied score t (every item above t is a candidate) and
    take the rest from the lowest columns scoring exactly t in the full row, given by
    ``sims_of_rows(row_ids)`` (``_fill_tie_at_kth``). Rows whose k-th score is NaN (a
    diverged model: NaNs never compare equal) are recomputed by a full stable sort.
    """
    vals, idx = _order_topk(cand_vals, cand_idx)
    kth = vals[:, k - 1]
    nan_rows = kth.isnan().nonzero().flatten()
    tied = (kth == vals[:, k]).nonzero().flatten()
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if tied.numel():
        _fill_tie_at_kth(sims_of_rows(tied), vals, idx, tied, k)
    if nan_rows.numel():
        _sort_into(sims_of_rows(nan_rows), vals, idx, nan_rows, k)
    return vals, idx


def _sort_into(full: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, k: int) -> None:
    """In place: ``rows``' top k from a full stable sort of ``full`` (those rows' whole
    similarity rows), the exact order whatever the scores (NaN first, as in torch)."""
    v, i = torch.sort(full, dim=1, descending=True, stable=True)
    vals[rows] = v[:, :k]
    idx[rows] = i[:, :k]


def _fill_tie_at_kth(full: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, k: int) -> None:
    """In place, for ``rows`` whose k-th score t ties the next one: after their candidates
    above t (already first, in order; NaN counts as above), the lowest columns of ``full``
    (those rows' whole similarity rows) that score exactly t. One comparison and one
    running count over the rows instead of a sort of them: with quantised embeddings most
    rows tie at the k-th score (float64 k-NN of 10,000 such 32-d embeddings, 2 threads:
    0.31 / 0.67 s at k = 1 / 10, against 1.01 / 2.91 s with the sort)."""
    head = vals[rows]
    t = head[:, k - 1]
    above = ((head > t[:, None]) | head.isnan()).sum(1)  # NaN ranks first, as in torch's sort
    need = k - above
    at_t = full == t[:, None]
    # the first `need` columns scoring t in each row: ascending, by their running count
    wanted = at_t & (at_t.cumsum(1, dtype=torch.int32) <= need[:, None])
    which, columns = wanted.nonzero(as_tuple=True)
    starts = torch.cumsum(need, 0) - need
    slot = above[which] + torch.arange(which.numel(), device=which.device) - starts[which]
    idx[rows[which], slot] = columns
    vals[rows[which], slot] = t[which]


def _padded_gallery(g: torch.Tensor, group: int) -> torch.Tensor:
    """The gallery with zero rows appended up to a multiple of ``group`` rows.

    The padding makes each similarity row a whole number of groups, so the grouped top-k
    can view a row as (groups, group) without a copy; its columns are set to -inf after
    every matmul (``_torch_chunk_sims``). The extra matmul work is < group / N.
    """
    extra = -g.shape[0] % group
    return g if extra == 0 else torch.cat([g, g.new_zeros(extra, g.shape[1])])


def _torch_chunk_sims(
    q: torch.Tensor,
    g_padded: torch.Tensor,
    n_gallery: int,
    start: int,
    leave_one_out: bool,
    buf: torch.Tensor,
    numpy_blas: bool = False,
) -> torch.Tensor:
    """Similarities of a query chunk (rows start.. of the query set) to the padded gallery.

    Written into ``buf`` (reused across chunks: a fresh chunk x N allocation every chunk
    costs page faults comparable to the matmul itself on CPU). Padding columns (index
    >= ``n_gallery``) are -inf, so they rank below every real item.
    """
    sims = buf[: q.shape[0]]
    if numpy_blas and sims.dtype == torch.float32:
        # numpy's OpenBLAS sgemm measured ~9% faster than torch's MKL on AMD EPYC, one
        # thread (the similarity product is ~80% of the search); see _blas_threads.
        np.matmul(q.detach().numpy(), g_padded.detach().numpy().T, out=sims.numpy())
    else:
        torch.mm(q, g_padded.T, out=sims)
    if g_padded.shape[0] > n_gallery:
        sims[:, n_gallery:] = float("-inf")
    if leave_one_out:
        rows = torch.arange(q.shape[0], device=q.device)
        # -inf sorts the query itself below every real item, so it is never retrieved
        # while fewer than all other items are asked for (k is capped at N - 1).
        sims[rows, rows + start] = float("-inf")
    return sims


@functools.cache
def intel_cpu() -> bool:
    """Whether this machine's CPU is an Intel one (its vendor id in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in info)
    except OSError:
        return False


@contextlib.contextmanager
def _blas_threads(device: torch.device) -> Iterator[bool]:
    """Yields whether the similarity product may run in numpy's BLAS: on CPU with one torch
    thread, numpy's BLAS then limited to that one thread meanwhile (threadpoolctl; the
    limit is process wide). Otherwise, or without threadpoolctl, it stays with torch.mm."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    # Single-threaded only: with several threads, OpenBLAS's workers spin-wait after the
    # product while torch's OpenMP workers run the top-k on the same cores (measured on
    # 2 cores: 1.24-1.44 s against 1.05-1.13 s with torch.mm at 20k x 128).
    # On Intel CPUs torch's MKL is the faster one (measured on an AVX-512 Xeon, 1 thread,
    # 20k x 128 in 128-row chunks: 0.72 s against OpenBLAS's 0.93 s).
    if device.type != "cpu" or threadpool_limits is None or torch.get_num_threads() != 1 or intel_cpu():
        yield False
        return
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        yield True


def _grouped_candidates(sims: torch.Tensor, m: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest similarities of each row (any order, ties cut arbitrarily), by levels.

    A row is cut into groups of ``group`` consecutive columns; only the m groups with the
    largest maxima can hold the row's m largest values. Proof: if an item x of the top m
    lay in an unselected group, each of the m selected groups would have a maximum >= x,
    m distinct items >= x; so the *values* of the top m are always found, and where the
    m-th value is tied the caller's tie check (``_select_exact``) settles the order.
    The same argument applies again inside the selected groups: their sub-groups of
    group / _FANOUT columns are ranked by maximum, and so on down to single columns.
    Cost: one vectorised max pass over the row (memory bound, ~0.2 ns an item) and a few
    top-ks over ~m x _FANOUT items, instead of a top-k over the full row (torch's CPU
    top-k costs 2-10 ns an item).
    """
    rows, width = sims.shape
    row_ids = torch.arange(rows, device=sims.device)[:, None]
    maxima = sims.view(rows, width // group, group).amax(2)
    size = group
    picked = torch.topk(maxima, m, dim=1, sorted=False).indices  # group ids at this size
    while True:
        per_row = width // size
        content = sims.view(rows * per_row, size).index_select(0, (picked + row_ids * per_row).flatten())
        sub = max(1, size // _FANOUT)
        ratio = size // sub
        maxima = content.view(rows, m * ratio, sub)
        maxima = maxima.amax(2) if sub > 1 else maxima.view(rows, m * ratio)
        vals, pos = torch.topk(maxima, m, dim=1, sorted=False)
        picked = torch.gather(picked, 1, pos // ratio) * ratio + pos % ratio
        size = sub
        if size == 1:
            return vals, picked


_SIGN_BIT = np.uint32(0x80000000)
_LOW_32 = np.uint64(0xFFFFFFFF)
_NO_KEY = np.uint64(2**64 - 1)


def _descending_keys(values: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is (value descending, column ascending).

    The high half holds the float32's bits mapped to unsigned integers in the order of
    the floats (sign bit set for positives, all bits flipped for negatives), then
    inverted; the low half holds the column. One integer sort then gives the ranking
    with the lower-index tie-break, and the column is read back from the key.
    """
    bits = values.view(np.uint32)
    ordered = np.where(bits & _SIGN_BIT, ~bits, bits | _SIGN_BIT)
    return ((~ordered).astype(np.uint64) << np.uint64(32)) | columns.astype(np.uint64)


def _keys_per_row(row: np.ndarray, keys: np.ndarray, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (``keys[j]`` belongs to row ``row[j]``, ``row`` ascending) laid out one row
    each in a (rows, max(width, most keys of a row)) array, from column 0, _NO_KEY after
    them; and how many keys each row has."""
    counts = np.bincount(row, minlength=rows)
    starts = np.cumsum(counts) - counts
    laid = np.full((rows, max(width, int(counts.max(initial=0)))), _NO_KEY)
    laid[row, np.arange(row.size) - starts[row]] = keys
    return laid, counts


def _compares_whole_block(k: int, group: int, width: int) -> bool:
    """Whether the threshold top-k compares a whole row with t rather than reading back
    the groups of ``group`` columns that may hold candidates (see _READ_GROUPS_SHARE)."""
    return (k + 1) * group * _READ_GROUPS_SHARE > width


def _threshold_topk(sims: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a float32 CPU similarity block, ties to the lower index, by threshold.

    A row is cut into groups and t is the (k+1)-th largest group maximum: the k+1 groups
    whose maxima are >= t hold k+1 distinct items >= t, so every item of the row's top k+1
    is >= t, and it lies in a group whose maximum is >= t. Every item >= t is kept
    (``_ranked_columns``): for small k the groups are ``group`` consecutive columns and
    only those with a maximum >= t are read; for large k, where most such groups would
    be read anyway, the whole block is compared with t, and t comes from finer groups
    (``_STRIDED_GROUP_ITEMS``). On clustered embeddings about 1.1-1.6 (k+1) items a row
    are kept. The kept items are ranked by (score desc, column asc), so ties at the k-th
    score, even ties with t itself, are settled exactly. Only rows with NaN scores (NaN
    ranks first, as in torch's sort) are redone by a full stable sort.
    Measured against the levels of ``_grouped_candidates`` (10k x 512, 1 thread): 0.26 s
    against 0.51 s for k = 100.
    """
    rows, width = sims.shape
    if not _compares_whole_block(k, group, width):  # few groups hold candidates
        maxima = sims.view(rows, width // group, group).amax(2)
        read_group = group
    else:
        maxima = sims.view(rows, _STRIDED_GROUP_ITEMS, width // _STRIDED_GROUP_ITEMS).amax(1)
        read_group = 0
    columns, incomplete = _ranked_columns(sims.numpy(), maxima.numpy(), k, read_group)
    idx = torch.from_numpy(columns)
    vals = torch.gather(sims, 1, idx)
    redo = torch.from_numpy(incomplete).nonzero().flatten()
    if redo.numel():
        _sort_into(sims[redo], vals, idx, redo, k)
    return vals, idx


def _ranked_columns(scores: np.ndarray, maxima: np.ndarray, k: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``scores`` (with the maxima of a split of it into groups): the
    columns of its k best items in (score desc, column asc) order, found among its items
    >= t, and whether the row has a NaN score, which no comparison keeps (see
    ``_threshold_topk``). With ``group`` > 0 the maxima are of ``group`` consecutive
    columns and only the groups whose maximum is >= t are read; with 0, any split, and
    the whole block is compared with t."""
    rows, width = scores.shape
    n_groups = maxima.shape[1]
    t = np.partition(maxima, n_groups - k - 1, axis=1)[:, n_groups - k - 1]
    if group:
        # few groups hold candidates: read back only those
        picked = np.flatnonzero(maxima >= t[:, None])  # row * n_groups + group, ascending
        blocks = scores.reshape(-1, group)[picked]
        row_of_block = picked // n_groups
        hits = np.flatnonzero(blocks >= t[row_of_block][:, None])
        block = hits // group
        row = row_of_block[block]
        keys = _descending_keys(blocks.reshape(-1)[hits], (picked[block] % n_groups) * group + hits % group)
    else:
        # most groups do: one vectorised comparison of the whole block costs less
        hits = np.flatnonzero(scores >= t[:, None])
        row = hits // width
        keys = _descending_keys(scores.reshape(-1)[hits], hits % width)
    ranked, counts = _keys_per_row(row, keys, rows, k)
    ranked.sort(axis=1)
    columns = np.minimum(ranked[:, :k] & _LOW_32, width - 1).astype(np.int64)
    return columns, (counts < k) | np.isnan(maxima).any(1)


def _topk_of_sims(sims: torch.Tensor, k: int, n_valid: int, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a similarity block, ties to the lower index.

    ``sims`` may carry -inf padding columns past the real gallery (whole groups of
    ``group``); they are never returned while k < ``n_valid``.
    """
    if k >= n_valid:
        v, i = torch.sort(sims, dim=1, descending=True, stable=True)
        return v[:, :k], i[:, :k]
    if (
        _THRESHOLD_ON_CPU
        and group
        and sims.device.type == "cpu"
        and sims.dtype == torch.float32
        and k + 1 <= sims.shape[1] // group
    ):
        return _threshold_topk(sims, k, group)
    if group and (k + 1) * group * _GROUPED_MAX_SHARE <= sims.shape[1]:
        cand_vals, cand_idx = _grouped_candidates(sims, k + 1, group)
    else:
        cand_vals, cand_idx = torch.topk(sims, k + 1, dim=1, largest=True, sorted=False)
    return _select_exact(lambda r: sims[r], cand_vals, cand_idx, k)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
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

    def chunk_topk(self, q: torch.Tensor, start: int, k: int, leave_one_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n_g = self._g.shape[0]
        n_valid = n_g - (1 if leave_one_out else 0)
        own = torch.arange(start, start + q.shape[0], device=q.device)

        def exact_rows(rows: torch.Tensor) -> torch.Tensor:
            s = q[rows] @ self._g.T
            if leave_one_out:
                s[torch.arange(rows.numel(), device=q.device), own[rows]] = float("-inf")
            return s

        if k >= n_valid:  # everything is wanted: a full sort is exact and no slower
            v, i = torch.sort(
                exact_rows(torch.arange(q.shape[0], device=q.device)), dim=1, descending=True, stable=True
            )
            return v[:, :k], i[:, :k]
        want = k + 1 + (1 if leave_one_out else 0)
        qa = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
        found_sims, found_idx = self.index.search(qa, want)
        vals = torch.from_numpy(found_sims).to(q.device, q.dtype)
        idx = torch.from_numpy(found_idx).to(q.device)
        if leave_one_out:
            # Drop the query itself; if faiss did not return it (ties with duplicates
            # pushed it out), drop the last candidate instead so every row keeps k+1.
            is_self = idx == own[:, None]
            drop = torch.where(is_self.any(1), is_self.float().argmax(1), torch.full_like(own, want - 1))
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
    backend = resolve_backend(backend)
    chunk = min(auto_chunk(g.shape[0], g.element_size(), chunk_size, g.device, g.shape[1]), q.shape[0])
    n_valid = g.shape[0] - (1 if leave_one_out else 0)
    starts = range(0, q.shape[0], chunk)
    depths = [max(min(int(k_for_chunk(a, min(a + chunk, q.shape[0]))), n_valid), 0) for a in starts]
    if backend == "torch":
        yield from _iter_torch_topk(q, g, leave_one_out, starts, depths)
        return
    faiss_index = _FaissIndex(g)
    with torch.no_grad():
        for start, k in zip(starts, depths, strict=True):
            stop = min(start + chunk, q.shape[0])
            if k == 0:
                v = torch.empty(stop - start, 0, dtype=q.dtype, device=q.device)
                yield start, stop, v, v.long(), None
                continue
            v, i = faiss_index.chunk_topk(q[start:stop], start, k, leave_one_out)
            yield start, stop, v, i, None


def _chunk_workers(sims_dtype: torch.dtype, device: torch.device, gallery_bytes: int, width: int, k: int) -> int:
    """Chunks searched at once: 2 where the selection is a large part of the work on a
    multi-threaded CPU, else 1.

    The threshold top-k of a float32 CPU block is mostly single-threaded numpy, so while
    one chunk is being selected a product on several threads would leave all but one
    core idle. Two chunks in flight, each on half the threads, keep them busy; but each
    product then runs on fewer threads, and for a small gallery in small chunks at small
    k that costs more than the overlap gains. Measured on 2 cores, one stream against two
    interleaved in one process (median of 9; SOP size 3), as ratios to faiss IndexFlatIP's
    time: 10,000 x 512 k = 1 / 10 / 100 1.05 / 1.07 / 1.21 -> 1.02 / 0.99 / 0.99, SOP
    size (60,502 x 512) k = 1 / 16 1.09 / 1.13 -> 0.99 / 1.00, 10,000 x 32 quantised
    k = 100 1.14 -> 0.93; but 20,000 x 128 k = 1 / 33 0.91 / 0.91 -> 1.07 / 1.01 and
    10,000 x 32 quantised k = 1 0.79 -> 0.98, which stay at one stream.
    """
    if device.type != "cpu" or sims_dtype != torch.float32 or torch.get_num_threads() < 2:
        return 1
    return 2 if _compares_whole_block(k, _GROUP, width) or gallery_bytes > _CACHED_GALLERY_BYTES else 1


# Held while a search has changed torch's thread count (``_torch_threads``).
_THREAD_COUNT_CHANGE = threading.Lock()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[bool]:
    """torch's intra-op thread count set to ``n`` meanwhile; yields whether it was set.

    The count is process wide (torch calls of other threads get ``n`` too meanwhile), so
    only one search at a time changes it: a search that runs while another holds the
    change yields False and keeps to one stream. The count is restored by the thread
    that set it, since OpenMP keeps a copy per thread.
    """
    if not _THREAD_COUNT_CHANGE.acquire(blocking=False):
        yield False
        return
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        yield True
    finally:
        torch.set_num_threads(before)
        _THREAD_COUNT_CHANGE.release()


@contextlib.contextmanager
def _chunk_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """``workers`` threads for chunk searches, torch's threads split between them; None
    (one stream, in the caller's thread) where ``workers`` is 1 or another search holds
    the change of torch's thread count (``_torch_threads``)."""
    if workers < 2:
        yield None
        return
    threads = max(1, torch.get_num_threads() // workers)
    with _torch_threads(threads) as changed:
        if not changed:  # another search has halved torch's threads: run as one stream
            yield None
            return
        # Each worker sets its own OpenMP thread count: a new thread starts from the default.
        with ThreadPoolExecutor(workers, "dmlray-knn", initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            yield pool


def _in_order(pool: ThreadPoolExecutor, tasks: Iterable[tuple[Any, ...]], depth: int) -> Iterator[Any]:
    """Each task (a function and its arguments) run in ``pool``, at most ``depth`` at
    once, their results yielded in order. A task is taken from ``tasks`` only once the
    oldest result in flight has been consumed, so it may reuse that one's buffer or depend
    on what the consumer did with it. A consumer that stops early, or a task that fails,
    cancels the rest."""
    pending: deque[Future] = deque()
    remaining = iter(tasks)
    try:
        while True:
            if len(pending) == depth:
                yield pending.popleft().result()
            task = next(remaining, None)
            if task is None:
                break
            pending.append(pool.submit(*task))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _iter_torch_topk(
    q: torch.Tensor,
    g: torch.Tensor,
    leave_one_out: bool,
    starts: range,
    depths: list[int],
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """_iter_topk's torch backend for the query chunks starting at ``starts`` (top
    ``depths[i]`` each): per chunk one product into a reused buffer, then the exact top-k;
    on a multi-core CPU two chunks at a time, each on its own thread (``_chunk_workers``),
    and yielded in order."""
    g_padded = _padded_gallery(g, _GROUP)
    workers = _chunk_workers(g.dtype, g.device, g.numel() * g.element_size(), g_padded.shape[0], max(depths))
    with _chunk_pool(workers) as pool:
        streams = 1 if pool is None else workers
        # One buffer per chunk in flight: chunk i reuses chunk i - streams' buffer, which the
        # consumer has released by asking for the chunk after it.
        buffers = [torch.empty(starts.step, g_padded.shape[0], dtype=g.dtype, device=g.device) for _ in range(streams)]
        if pool is None:
            with _blas_threads(g.device) as numpy_blas:
                for start, k in zip(starts, depths, strict=True):
                    yield _search_chunk(q, g_padded, g.shape[0], leave_one_out, start, k, buffers[0], numpy_blas)
            return
        tasks = (
            (_search_chunk, q, g_padded, g.shape[0], leave_one_out, start, k, buffers[i % streams])
            for i, (start, k) in enumerate(zip(starts, depths, strict=True))
        )
        yield from _in_order(pool, tasks, streams)


@torch.no_grad()
def _search_chunk(
    q: torch.Tensor,
    g_padded: torch.Tensor,
    n_gallery: int,
    leave_one_out: bool,
    start: int,
    k: int,
    buf: torch.Tensor,
    numpy_blas: bool = False,
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query chunk (``buf``'s rows from ``start``): its top k and its similarity block."""
    stop = min(start + buf.shape[0], q.shape[0])
    sims = _torch_chunk_sims(q[start:stop], g_padded, n_gallery, start, leave_one_out, buf, numpy_blas)
    n_valid = n_gallery - (1 if leave_one_out else 0)
    v, idx = _topk_of_sims(sims, k, n_valid, _GROUP)
    return start, stop, v, idx, sims[:, :n_gallery]


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
    by index); where the dimension is large against k, from half of the symmetric
    similarity product (``symmetric_knn``). Returns (similarities, indices), both
    (N_query, k') with k' = min(k, number of candidates), sorted best first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = as_embeddings(embeddings, "embeddings")
    loo = gallery_embeddings is None
    if loo and q.shape[0] > 1 and resolve_backend(backend) == "torch":
        # imported here: symmetric_knn builds on this module's selection
        from dmlray.evaluation import symmetric_knn

        depth = min(k, q.shape[0] - 1)
        if symmetric_knn.applies(q, depth, chunk_size):
            return symmetric_knn.symmetric_knn(q, depth, chunk_size)
    g = q if loo else as_embeddings(gallery_embeddings, "gallery_embeddings").to(q.device, q.dtype)
    parts = [p[:4] for p in _iter_topk(q, g, loo, lambda a, b: k, chunk_size, backend)]
    return torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
