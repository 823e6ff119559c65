"""Benchmark: the search service's latency and throughput, and its index against exact search.

    python bench/bench_serve.py            # 2000 requests, 16 concurrent clients
    python bench/bench_serve.py --quick    # 300 requests

Packs a 40-class glyph subset on local disk, trains a tiny run in local mode (seconds),
indexes its test split (exact, ivf, hnsw: Recall@10 relative to exact and queries per
second, as ``dmlray index`` reports them), then starts the Ray Serve application on a
local cluster on loopback and sends single-image ``POST /search`` requests from
``--clients`` threads. Prints p50/p99 latency, throughput and the batch sizes the replica
formed (``@serve.batch``), for one replica.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def train_tiny_run(root: str) -> str:
    from dmlray.cli import main
    from dmlray.data.pack import Recipe, pack
    from dmlray.devtools.ports import free_ports

    data = os.path.join(root, "glyphs40")
    pack(Recipe(dataset="glyphs", shard_bytes=64 * 1024, options={"max_classes": 40}), data, progress=False)
    overrides = [
        f"data.url={data}",
        f"run.storage_path={root}",
        "run.name=bench",
        "run.num_workers=0",
        f"run.metrics_port={free_ports(1)[0]}",
        "train.steps=60",
        "train.eval_every=60",
        "data.classes_per_batch=8",
        "data.class_buffer=16",
        "memory.size=128",
        "memory.start=10",
        "optim.milestones=[]",
    ]
    if main(["train", "demo", *overrides]) != 0:
        raise RuntimeError("training the benchmark run failed")
    return os.path.join(root, "bench")


def index_table(run: str) -> str:
    from dmlray.jobs.index import build_run_index

    print(f"\n{'kind':<8}{'items':>7}{'recall@10 vs exact':>20}{'q/s':>10}{'exact q/s':>11}")
    url = ""
    for kind in ("exact", "ivf", "hnsw"):
        index, written = build_run_index(run, kind=kind, progress=False)
        m = index.meta["measured"]
        print(f"{kind:<8}{len(index):>7}{m['recall@10_vs_exact']:>20.3f}{m['qps']:>10.0f}{m['exact_qps']:>11.0f}")
        url = written if kind == "exact" else url
    return url


def query_images(run: str) -> list[bytes]:
    import yaml

    from dmlray.data.shards import read_manifest
    from dmlray.data.stream import iter_shard

    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    urls = read_manifest(cfg["data"]["url"]).shard_urls(cfg["data"]["test_split"])
    return [data for url in urls for _, _, data in iter_shard(url)]


def post(url: str, data: bytes) -> tuple[float, int]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return time.perf_counter() - start, int(body["batch"])


def load_test(url: str, images: list[bytes], requests: int, clients: int) -> None:
    for data in images[:20]:  # warm-up: the replica's first requests pay for lazy set-up
        post(url, data)
    lock, done = threading.Lock(), []

    def one(i: int) -> None:
        result = post(url, images[i % len(images)])
        with lock:
            done.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latency = np.array([d[0] for d in done]) * 1000
    batches = np.array([d[1] for d in done])
    print(f"\n{requests} requests, {clients} concurrent clients, 1 replica (CPU), k = 5")
    print(f"{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}{'mean batch':>12}{'max batch':>11}")
    print(
        f"{np.percentile(latency, 50):>8.1f}{np.percentile(latency, 99):>8.1f}{requests / wall:>8.0f}"
        f"{batches.mean():>12.1f}{batches.max():>11d}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 requests (a smoke run)")
    parser.add_argument("--requests", type=int, default=0, help="requests (default 2000; 300 with --quick)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    from dmlray.devtools.ports import free_ports
    from dmlray.jobs.launch import ensure_ray
    from dmlray.serving.app import build_app

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        run = train_tiny_run(root)
        index = index_table(run)
        images = query_images(run)
        ensure_ray(num_cpus=2)
        port = free_ports(1)[0]
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(run, index), name="bench-search", route_prefix="/")
            requests = args.requests or (300 if args.quick else 2000)
            load_test(f"http://127.0.0.1:{port}/search?k=5", images, requests, args.clients)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
