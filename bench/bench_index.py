"""Benchmark: approximate gallery indexes (faiss IVF, HNSW) against dmlray's exact search.

    python bench/bench_index.py            # 200,000 random unit vectors of 128 dims
    python bench/bench_index.py --quick    # 20,000

Builds each kind of ``dmlray.evaluation.index`` over the same seeded vectors and measures,
with ``--queries`` gallery members as queries (each excluding itself, as the leave-one-out
evaluation does): build time, Recall@10 relative to exact search (the share of the exact
top 10 that the index returns) and queries per second, exact and approximate, in the same
process. Random isotropic vectors are the hard case for approximate search (no cluster
structure to exploit); a trained embedding (bench_serve.py) is the easy one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dmlray.evaluation.index import IndexParams, build_index, measure


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 vectors (a smoke run)")
    parser.add_argument("--n", type=int, default=0, help="gallery size (default 200,000; 20,000 with --quick)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, default=0, help="ivf cells scanned (0 = nlist/16)")
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 200_000)
    x = unit_vectors(n, args.dim, seed=0)
    labels, keys = np.zeros(n, dtype=np.int64), [str(i) for i in range(n)]
    exact = build_index(x, labels, keys, "exact")
    print(f"{n} random unit vectors, dim {args.dim}, {args.queries} queries, k = 10")
    print(f"{'kind':<8}{'params':<26}{'build s':>9}{'recall@10':>11}{'q/s':>10}{'exact q/s':>11}{'speed-up':>10}")
    for kind in ("ivf", "hnsw"):
        start = time.perf_counter()
        index = build_index(x, labels, keys, kind, IndexParams(nprobe=args.nprobe))
        built = time.perf_counter() - start
        m = measure(index, k=10, max_queries=args.queries, exact=exact)
        p = index.params
        params = f"nlist={p.nlist} nprobe={p.nprobe}" if kind == "ivf" else f"M={p.hnsw_m} efSearch={p.ef_search}"
        print(
            f"{kind:<8}{params:<26}{built:>9.1f}{m['recall@10_vs_exact']:>11.3f}{m['qps']:>10.0f}"
            f"{m['exact_qps']:>11.0f}{m['qps'] / m['exact_qps']:>9.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
