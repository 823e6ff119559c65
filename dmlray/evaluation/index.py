"""A gallery index: embeddings, labels and sample keys, searched exactly or approximately.

Kinds
    * ``exact``: the project's own chunked search (:func:`dmlray.evaluation.knn.knn`), so
      an exact index answers exactly what the evaluation scores.
    * ``ivf``: faiss ``IndexIVFFlat`` (inner product): the gallery split into ``nlist``
      k-means cells, ``nprobe`` of them scanned per query.
    * ``hnsw``: faiss ``IndexHNSWFlat`` (inner product): a navigable small-world graph.

On storage an index is a folder of three kinds of file, none of which can execute code
when read back: ``index.json`` (kind, parameters, provenance, measurements),
``gallery.npz`` (read with ``allow_pickle=False``) and, for approximate kinds,
``faiss.index`` (``faiss.serialize_index`` bytes).

Similarity is the dot product of L2-normalised embeddings, as everywhere in dmlray.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dmlray.data import storage
from dmlray.evaluation.knn import knn

KINDS = ("exact", "ivf", "hnsw")
FORMAT = 1
META_FILE = "index.json"
GALLERY_FILE = "gallery.npz"
FAISS_FILE = "faiss.index"


@dataclass(kw_only=True)
class IndexParams:
    """How an approximate index is built and searched (``exact`` uses none of them)."""

    nlist: int = 0
    """ivf: number of k-means cells; 0 = 4·sqrt(N), capped so every cell trains on 39+ points."""
    nprobe: int = 0
    """ivf: cells scanned per query; 0 = nlist / 16 (at least 1)."""
    hnsw_m: int = 32
    """hnsw: graph neighbours per node."""
    ef_construction: int = 80
    """hnsw: candidate list size while building."""
    ef_search: int = 128
    """hnsw: candidate list size while searching."""


@dataclass
class GalleryIndex:
    """The searchable gallery; ``meta`` is provenance (run, checkpoint, model config, ...)."""

    kind: str
    embeddings: np.ndarray
    labels: np.ndarray
    keys: list[str]
    params: IndexParams = field(default_factory=IndexParams)
    meta: dict[str, Any] = field(default_factory=dict)
    faiss_index: Any = None

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, gallery indices), both (Q, min(k, N)), best first; -1 marks a slot an
        approximate index could not fill."""
        q = _as_queries(queries, self.dim)
        k = min(int(k), len(self))
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.kind == "exact":
            scores, idx = knn(torch.from_numpy(q), k, torch.from_numpy(self.embeddings))
            return scores.numpy(), idx.numpy()
        scores, idx = self.faiss_index.search(q, k)
        return scores, idx


def _as_queries(queries: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().cpu().numpy()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}), got shape {q.shape}")
    return q


def default_nlist(n: int) -> int:
    """4·sqrt(N) cells, but no more than N/39: faiss wants 39+ training points per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def resolved_params(params: IndexParams, n: int) -> IndexParams:
    """``params`` with the automatic (0) values filled in for a gallery of ``n`` items."""
    nlist = params.nlist or default_nlist(n)
    nprobe = params.nprobe or max(1, nlist // 16)
    return IndexParams(
        nlist=nlist,
        nprobe=min(nprobe, nlist),
        hnsw_m=params.hnsw_m,
        ef_construction=params.ef_construction,
        ef_search=params.ef_search,
    )


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency of the ray extra
        raise ImportError("approximate indexes need faiss (pip install faiss-cpu)") from exc
    return faiss


def _build_faiss(kind: str, emb: np.ndarray, params: IndexParams) -> Any:
    faiss = _faiss()
    dim = emb.shape[1]
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.add(emb)
    else:
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.add(emb)
    _set_search_params(index, kind, params)
    return index


def _set_search_params(index: Any, kind: str, params: IndexParams) -> None:
    if kind == "ivf":
        index.nprobe = params.nprobe
    elif kind == "hnsw":
        index.hnsw.efSearch = params.ef_search


def build_index(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    keys: Sequence[str],
    kind: str = "exact",
    params: IndexParams | None = None,
    meta: dict[str, Any] | None = None,
) -> GalleryIndex:
    """An index of ``kind`` over the gallery; approximate kinds build their faiss index here."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    if lab.shape[0] != emb.shape[0] or len(keys) != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings, {lab.shape[0]} labels and {len(keys)} keys: they must match")
    params = resolved_params(params or IndexParams(), emb.shape[0])
    faiss_index = None if kind == "exact" else _build_faiss(kind, emb, params)
    return GalleryIndex(kind, emb, lab, [str(k) for k in keys], params, dict(meta or {}), faiss_index)


# ------------------------------------------------------------------- measuring


def _drop_self(idx: np.ndarray, scores: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of k+1 results without the query's own gallery index (or the last one)."""
    is_self = idx == own[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), idx.shape[1] - 1)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(idx.shape[0]), drop] = False
    return idx[keep].reshape(-1, k), scores[keep].reshape(-1, k)


def neighbours_of_members(index: GalleryIndex, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(indices, scores, seconds): the k nearest *other* gallery items of gallery items
    ``query_ids`` (each excludes itself, as the leave-one-out evaluation does)."""
    k = min(k, len(index) - 1)
    start = time.perf_counter()
    scores, idx = index.search(index.embeddings[query_ids], k + 1)
    seconds = time.perf_counter() - start
    idx, scores = _drop_self(idx, scores, query_ids, k)
    return idx, scores, seconds


def recall_against_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    k = exact.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.sum(hits) / (k * exact.shape[0]))


def measure(
    index: GalleryIndex, k: int = 10, max_queries: int = 2000, seed: int = 0, exact: GalleryIndex | None = None
) -> dict[str, float]:
    """Recall@k of ``index`` relative to exact search and both query rates, measured with
    (at most ``max_queries``, seeded) members of the gallery as queries."""
    n = len(index)
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(n, size=min(n, max_queries), replace=False))
    exact = exact or GalleryIndex("exact", index.embeddings, index.labels, index.keys)
    exact_idx, _, exact_s = neighbours_of_members(exact, query_ids, k)
    approx_idx, _, approx_s = neighbours_of_members(index, query_ids, k)
    q = len(query_ids)
    return {
        "k": float(exact_idx.shape[1]),
        "queries": float(q),
        f"recall@{exact_idx.shape[1]}_vs_exact": recall_against_exact(approx_idx, exact_idx),
        "qps": q / max(approx_s, 1e-9),
        "exact_qps": q / max(exact_s, 1e-9),
    }


# --------------------------------------------------------------------- storage


def save_index(index: GalleryIndex, url: str) -> list[str]:
    """Writes the index folder at ``url`` (path, file:// or s3://); the metadata last, so a
    half-written index is never readable. Returns the URLs written."""
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=index.embeddings, labels=index.labels, keys=np.asarray(index.keys, dtype=str))
    written = [storage.join(url, GALLERY_FILE)]
    storage.write_bytes(written[0], buffer.getvalue())
    if index.faiss_index is not None:
        data = _faiss().serialize_index(index.faiss_index)
        written.append(storage.join(url, FAISS_FILE))
        storage.write_bytes(written[-1], np.asarray(data).tobytes())
    meta = {
        "format": FORMAT,
        "kind": index.kind,
        "count": len(index),
        "dim": index.dim,
        "params": asdict(index.params),
        **index.meta,
    }
    written.append(storage.join(url, META_FILE))
    storage.write_bytes(written[-1], json.dumps(meta, indent=1).encode())
    return written


def read_meta(url: str) -> dict[str, Any]:
    meta = json.loads(storage.read_bytes(storage.join(url, META_FILE)))
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise ValueError(f"{url}: not a dmlray index of format {FORMAT} (kind {meta.get('kind')!r})")
    return meta


def load_index(url: str, gpu: bool = False) -> GalleryIndex:
    """The index saved at ``url``; with ``gpu`` an IVF index moves to a GPU when faiss has one."""
    meta = read_meta(url)
    with np.load(io.BytesIO(storage.read_bytes(storage.join(url, GALLERY_FILE))), allow_pickle=False) as data:
        emb, labels, keys = data["embeddings"], data["labels"], data["keys"].tolist()
    if emb.shape != (meta["count"], meta["dim"]) or not len(labels) == len(keys) == emb.shape[0]:
        raise ValueError(f"{url}: {GALLERY_FILE} holds {emb.shape}, {META_FILE} says ({meta['count']}, {meta['dim']})")
    params = IndexParams(**meta["params"])
    faiss_index = None
    if meta["kind"] != "exact":
        faiss = _faiss()
        raw = np.frombuffer(storage.read_bytes(storage.join(url, FAISS_FILE)), dtype=np.uint8)
        faiss_index = faiss.deserialize_index(raw)
        if faiss_index.ntotal != emb.shape[0]:
            raise ValueError(f"{url}: {FAISS_FILE} holds {faiss_index.ntotal} vectors, the gallery {emb.shape[0]}")
        if gpu and meta["kind"] == "ivf" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            faiss_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss_index)
        _set_search_params(faiss_index, meta["kind"], params)
    rest = {k: v for k, v in meta.items() if k not in ("format", "kind", "count", "dim", "params")}
    return GalleryIndex(meta["kind"], emb, labels, keys, params, rest, faiss_index)
