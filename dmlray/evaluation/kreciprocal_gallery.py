"""k-reciprocal re-ranking of one query at a time against a fixed gallery (for a service).

:func:`dmlray.evaluation.rerank.k_reciprocal_distances` re-ranks a set of queries together
over dense |P| x |P| matrices (P = the queries, then the gallery): its cost grows with |P|³,
and a query's answer depends on the queries asked with it. A service answers each query on
its own, exactly as ``k_reciprocal_distances(q[None], gallery)`` would (P = {q} ∪ G).

Adding one item to a fixed gallery changes few of the gallery's neighbour structures, so
:class:`KReciprocalGallery` computes them once and a query recomputes only the rows it
touches, everything else being reused:

* rows whose k1+1 (or k1/2+1) nearest now include q, and the item each of them pushed out;
* rows whose k1-reciprocal set holds a row whose k1/2-reciprocal set changed (they may
  expand differently);
* rows for which q is farther than every gallery item: their distances are scaled by
  that maximum, as in the authors' code.

The Jaccard distance then needs the averaged vectors V(g) only on the columns where V(q)
is non-zero, hence only for the gallery rows whose k2 nearest hold such a column.
Indices below are P's: 0 is the query, gallery item j is j + 1. Equal to the dense
computation (tests/test_rerank.py) up to ties that rounding creates or breaks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from dmlray.evaluation.knn import _topk_of_sims
from dmlray.evaluation.rerank import _float


@dataclass
class _QueryRows:
    """The rows' top lists and vectors v as one query sees them: the rows it changed (the
    overlays' own items), then the gallery's."""

    top: _Overlay
    v: _Overlay


class KReciprocalGallery:
    """A gallery's neighbour structures, computed once; :meth:`distances` re-ranks a query."""

    def __init__(self, gallery: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, chunk: int = 1024):
        self.g = _float(gallery).cpu().double()
        n = self.g.shape[0]
        if n < 1:
            raise ValueError("k-reciprocal re-ranking needs a gallery of at least one item")
        n_all = n + 1  # the gallery and one query
        self.k1, self.half = min(k1, n_all - 1), min(int(round(k1 / 2)), n_all - 1)
        self.k2, self.average = min(k2, n_all), k2 > 1
        self.lambda_value = lambda_value
        # each row's nearest, deep enough to hold every list once q is inserted
        self.need = max(self.k1 + 1, self.half + 1, self.k2)
        self.top: list[list[int]] = [[]]  # row 0, the query, is made per query
        raw_top, row_max = [], []
        for start in range(0, n, chunk):
            raw = (2 - 2 * self.g[start : start + chunk] @ self.g.T).clamp_min(0)
            high = raw.max(1).values
            # each row's `need` nearest in a stable ascending sort's order (ties to the lower
            # index): the exact top-k of the negated distances, not a sort of every row
            order = _topk_of_sims(-(raw / high[:, None].clamp_min(1e-12)), self.need, n)[1]
            self.top.extend((order + 1).tolist())
            raw_top.append(raw.gather(1, order))
            row_max.append(high)
        self.raw_top = torch.cat(raw_top)  # (n, depth) raw distances of each row's list
        self.row_max = torch.cat(row_max)  # (n,) the farthest gallery item of each row
        self.r1: list[frozenset[int]] = [frozenset()] + [
            self._reciprocal(p, self.k1, self.top) for p in range(1, n_all)
        ]
        self.rh: list[frozenset[int]] = [frozenset()] + [
            self._reciprocal(p, self.half, self.top) for p in range(1, n_all)
        ]
        self.expanded: list[list[int]] = [[]]
        self.expanded += [self._expand(p, self.r1.__getitem__, self.rh.__getitem__) for p in range(1, n_all)]
        self.raw_expanded = [torch.empty(0)] + [self._raw(p, cols) for p, cols in enumerate(self.expanded) if p]
        self.v: list[dict[int, float]] = [{}] + [
            self._vector(self.expanded[p], self.raw_expanded[p], self.row_max[p - 1]) for p in range(1, n_all)
        ]
        # the gallery's averaged vectors V as one sparse matrix (columns sliced per query), and
        # which rows each row's V averages over (a row whose v a query changes changes theirs)
        self.averaged_by: dict[int, set[int]] = defaultdict(set)
        for p in range(1, n_all):
            for nb in self._k2_nearest(p, self.top):
                self.averaged_by[nb].add(p)
        self.averages = self._average_matrix()

    def _average_matrix(self) -> sparse.csc_matrix:
        """V = A @ v over P x P (row and column 0, the query's, empty): A averages each row's
        k2 nearest, v holds each row's vector."""
        size = len(self) + 1
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for p in range(1, size):
            rows.extend([p] * len(self.v[p]))
            cols.extend(self.v[p])
            vals.extend(self.v[p].values())
        vectors = sparse.csr_matrix((vals, (rows, cols)), shape=(size, size))
        nearest = [self._k2_nearest(p, self.top) for p in range(1, size)]
        a_rows = [p for p, nb in enumerate(nearest, start=1) for _ in nb]
        a_cols = [c for nb in nearest for c in nb]
        a_vals = [1 / len(nb) for nb in nearest for _ in nb]
        average = sparse.csr_matrix((a_vals, (a_rows, a_cols)), shape=(size, size))
        return (average @ vectors).tocsc()

    def __len__(self) -> int:
        return self.g.shape[0]

    # ------------------------------------------------------------------ one row's structures

    def _raw(self, p: int, cols: list[int]) -> torch.Tensor:
        """Raw distances 2 - 2·s of gallery row p to gallery columns ``cols``."""
        index = torch.tensor(cols, dtype=torch.long) - 1
        return (2 - 2 * self.g[index] @ self.g[p - 1]).clamp_min(0)

    @staticmethod
    def _reciprocal(p: int, k: int, top) -> frozenset[int]:
        """R(p, k): the items among p's k+1 nearest that hold p among theirs."""
        return frozenset(h for h in top[p][: k + 1] if p in top[h][: k + 1])

    @staticmethod
    def _expand(p: int, r1, rh) -> list[int]:
        """R(p, k1) expanded by each R(c, k1/2), c in it, that shares more than 2/3 of itself."""
        reciprocal = r1(p)
        out = set(reciprocal)
        for c in reciprocal:
            half = rh(c)
            if len(half & reciprocal) > (2 / 3) * len(half):
                out |= half
        return sorted(out)

    @staticmethod
    def _vector(cols: list[int], raw: torch.Tensor, row_max: torch.Tensor) -> dict[int, float]:
        """v(p): exp(-d) over the expanded set, d scaled by the row's maximum, summing to 1."""
        weights = torch.exp(-(raw / row_max.clamp_min(1e-12)))
        weights = weights / weights.sum()
        return dict(zip(cols, weights.tolist(), strict=True))

    def _k2_nearest(self, p: int, top) -> list[int]:
        return top[p][: self.k2] if self.average else [p]

    # ------------------------------------------------------------------ one query

    def distances(self, query: torch.Tensor) -> torch.Tensor:
        """Re-ranked distances (N,) of one query to every gallery item (smaller is closer)."""
        q = _float(query).cpu().double().reshape(-1)
        raw_q = (2 - 2 * self.g @ q).clamp_min(0)  # (n,) gallery item j to q
        row_max = torch.maximum(self.row_max, raw_q)  # q may be a row's new farthest item
        query_row = torch.cat([(2 - 2 * (q @ q)).clamp_min(0).reshape(1), raw_q])
        query_row = query_row / query_row.max().clamp_min(1e-12)  # q's own row over P
        rows = self._query_rows(raw_q, row_max, query_row)
        averaged = self._averaged(0, rows)
        columns = np.fromiter(averaged, dtype=np.int64, count=len(averaged))
        weights = np.fromiter(averaged.values(), dtype=np.float64, count=len(averaged))
        # sum over columns of min(V(q), V(g)): the gallery's V where q changed nothing ...
        block = self.averages[:, columns].tocoo()
        mass = np.bincount(block.row, np.minimum(block.data, weights[block.col]), minlength=len(self) + 1)
        mass = mass.astype(np.float64, copy=False)  # bincount of no weights counts in integers
        for g in self._changed_averages(rows):  # ... and the rows whose V it changed
            other = self._averaged(g, rows)
            mass[g] = sum(min(value, other.get(col, 0.0)) for col, value in averaged.items())
        shared = torch.from_numpy(mass[1:])
        jaccard = 1 - shared / (2 - shared)
        return (1 - self.lambda_value) * jaccard + self.lambda_value * query_row[1:]

    def _query_rows(self, raw_q: torch.Tensor, row_max: torch.Tensor, query_row: torch.Tensor) -> _QueryRows:
        """The top lists, reciprocal sets and vectors v that q changes."""
        # where q falls in each gallery row's list (ties: q first, its index 0 is the lowest)
        d_q = raw_q / row_max.clamp_min(1e-12)
        position = (self.raw_top / row_max[:, None].clamp_min(1e-12) < d_q[:, None]).sum(1)
        top = _Overlay({0: torch.sort(query_row, stable=True).indices[: self.need].tolist()}, self.top)
        dirty1, dirty_half = {0}, {0}
        for p in (position < self.need).nonzero().flatten().tolist():
            at, old = int(position[p]), self.top[p + 1]
            top[p + 1] = (old[:at] + [0] + old[at:])[: self.need]
            for dirty, k in ((dirty1, self.k1), (dirty_half, self.half)):
                if at <= k:
                    dirty.add(p + 1)
                    if len(old) > k:
                        dirty.add(old[k])  # pushed out of p's k+1 nearest
        r1 = {p: self._reciprocal(p, self.k1, top) for p in dirty1}
        rh = {p: self._reciprocal(p, self.half, top) for p in dirty_half}
        r1_of, rh_of = _Overlay(r1, self.r1).__getitem__, _Overlay(rh, self.rh).__getitem__
        reexpand = dirty1 | dirty_half
        for c in dirty_half:
            reexpand |= r1_of(c)
        v: dict[int, dict[int, float]] = {}
        rescaled = raw_q > self.row_max
        for p in reexpand:
            cols = self._expand(p, r1_of, rh_of)
            if p and cols == self.expanded[p] and not rescaled[p - 1]:
                continue  # the same set at the same scale: the same v
            if p == 0:
                raw = query_row[cols]  # already scaled: its maximum is 1 here
                v[0] = self._vector(cols, raw, torch.tensor(1.0, dtype=torch.float64))
            else:
                raw = self._raw(p, [c for c in cols if c])
                if cols and cols[0] == 0:  # q itself, at its distance in p's row
                    raw = torch.cat([raw_q[p - 1].reshape(1), raw])
                v[p] = self._vector(cols, raw, row_max[p - 1])
        for p in rescaled.nonzero().flatten().tolist():
            if p + 1 not in v:  # only rescaled: the same set, farther maximum
                v[p + 1] = self._vector(self.expanded[p + 1], self.raw_expanded[p + 1], row_max[p])
        return _QueryRows(top=top, v=_Overlay(v, self.v))

    def _averaged(self, p: int, rows: _QueryRows) -> dict[int, float]:
        """V(p): the mean of v over p's k2 nearest (local query expansion), as q changed them."""
        nearest = self._k2_nearest(p, rows.top)
        out: dict[int, float] = defaultdict(float)
        for nb in nearest:
            for col, value in rows.v[nb].items():
                out[col] += value
        return {col: value / len(nearest) for col, value in out.items()}

    def _changed_averages(self, rows: _QueryRows) -> set[int]:
        """Gallery rows whose V differs from the gallery's own: their k2 nearest now hold q, or
        a row whose v q changed."""
        changed = {g for p in rows.v for g in self.averaged_by.get(p, ())}
        if not self.average:
            changed |= set(rows.v)
        changed |= {p for p, top in rows.top.items() if 0 in top[: self.k2]}  # the changed rows only
        changed.discard(0)
        return changed


class _Overlay(dict):
    """A row lookup: this query's changed rows first, then the gallery's."""

    def __init__(self, changed: dict, base: list):
        super().__init__(changed)
        self.base = base

    def __missing__(self, key: int):
        return self.base[key]
