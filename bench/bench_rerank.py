"""Benchmark: k-reciprocal re-ranking of one query against a fixed gallery, as the search
service does it (``KReciprocalGallery``: the gallery's structures built once, a query
recomputing the rows it touches) against the dense re-ranking of that query alone
(``k_reciprocal_distances(q[None], gallery)``, |P|² memory, |P|³ time), the peer.

    python bench/bench_rerank.py            # galleries of 1,000 / 2,000 / 4,000 items
    python bench/bench_rerank.py --quick    # 500 / 1,000

Clustered unit vectors (a trained embedding has classes; isotropic noise has no reciprocal
neighbours to speak of). Per size: the one-off build, the median per-query time of both,
their ratio, and the largest difference between the two distance vectors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dmlray.evaluation.kreciprocal_gallery import KReciprocalGallery
from dmlray.evaluation.rerank import k_reciprocal_distances


def clustered(n: int, dim: int, classes: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    x = centres[rng.integers(0, classes, n)] * 2.5 + rng.standard_normal((n, dim))
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="galleries of 500 and 1,000 items")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a replica's share; the peer gets the same thread
    sizes = (500, 1000) if args.quick else (1000, 2000, 4000)
    print(f"k-reciprocal (k1=20, k2=6, λ=0.3), {args.dim}-d clustered unit vectors, 1 thread, {args.queries} queries")
    print(f"{'gallery':>8} {'build s':>8} {'per query ms':>13} {'dense ms':>9} {'dense/ours':>10} {'max |diff|':>10}")
    for n in sizes:
        gallery = clustered(n, args.dim, max(n // 40, 2), seed=0)
        queries = clustered(args.queries, args.dim, max(n // 40, 2), seed=1)
        index, build = timed(KReciprocalGallery, gallery)
        ours, dense, diff = [], [], 0.0
        for query in queries:
            got, took = timed(index.distances, query)
            expected, took_dense = timed(k_reciprocal_distances, query[None], gallery)
            ours.append(took)
            dense.append(took_dense)
            diff = max(diff, float((got - expected[0]).abs().max()))
        mine, peer = statistics.median(ours) * 1e3, statistics.median(dense) * 1e3
        print(f"{n:>8} {build:>8.2f} {mine:>13.1f} {peer:>9.0f} {peer / mine:>10.1f} {diff:>10.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
