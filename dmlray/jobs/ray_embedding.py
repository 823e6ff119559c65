"""A split embedded by Ray actors (``dmlray index --workers N``).

Each actor loads the checkpoint once (the one the driver resolved, so every actor embeds
with the same weights even while a run goes on writing checkpoints); shards go to whichever
actor is free; the driver shows progress as shards come back and puts them in the
manifest's order, so the result equals the one-process embedding row for row. Actors read
the data and the checkpoint with their own environment's credentials (a local cluster
inherits this process's; a remote one has its own): nothing secret travels with the tasks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from dmlray.data.shards import Manifest


@dataclass
class ShardEmbedding:
    """One shard's rows, in the shard's order."""

    embeddings: np.ndarray
    labels: np.ndarray
    keys: list[str]


class ShardEmbedder:
    """A Ray actor holding a checkpoint's model: shard URL in, its embedded rows out."""

    def __init__(self, checkpoint: str, threads: int):
        from dmlray.jobs import output
        from dmlray.jobs.run_model import load_run_model

        output.quiet_library_loggers(False)
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_run_model(checkpoint, self.device)

    def embed(self, url: str, sha256: str | None) -> ShardEmbedding:
        from dmlray.evaluation.embedding import embed_split

        out = embed_split(
            self.loaded.model,
            [url],
            self.loaded.transform,
            self.loaded.cfg.data.eval_batch_size,
            self.device,
            checksums={url: sha256} if sha256 else None,
        )
        return ShardEmbedding(out["embeddings"].cpu().numpy(), out["labels"].cpu().numpy(), out["keys"])


def default_workers(shards: int) -> int:
    """One actor per CPU of the cluster Ray is connected to, no more than there are shards."""
    return max(1, min(shards, int(ray.cluster_resources().get("CPU", 1))))


def embed_split_on_ray(
    checkpoint: str,
    manifest: Manifest,
    split: str,
    workers: int,
    gpus_per_worker: float = 0,
    progress: bool = True,
) -> dict:
    """{'embeddings', 'labels', 'keys'} of ``split`` as ``embed_split`` gives them in one
    process, embedded by ``workers`` actors (1 CPU, and ``gpus_per_worker`` GPUs, each)."""
    urls, checksums = manifest.shard_urls(split), manifest.shard_checksums(split)
    actor: Any = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(ShardEmbedder)  # Ray's handles are untyped
    actors: list[Any] = [actor.remote(checkpoint, 1) for _ in range(max(1, min(workers, len(urls))))]
    bar = _progress(manifest.num_samples(split), len(actors)) if progress else None
    done: dict[str, ShardEmbedding] = {}
    try:
        pending: dict[Any, tuple[str, Any]] = {}
        queue = list(urls)
        for worker in actors:  # one shard each to start; then the next to whoever finishes
            if queue:
                url = queue.pop(0)
                pending[worker.embed.remote(url, checksums.get(url))] = (url, worker)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            url, worker = pending.pop(ready[0])
            done[url] = ray.get(ready[0])
            if bar is not None:
                bar.update(len(done[url].keys))
            if queue:
                following = queue.pop(0)
                pending[worker.embed.remote(following, checksums.get(following))] = (following, worker)
    finally:
        if bar is not None:
            bar.close()
        for worker in actors:
            ray.kill(worker)
    return _in_manifest_order(done, urls, manifest.num_samples(split))


def _progress(total: int, workers: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"embed ({workers} Ray workers)", unit=" img", file=sys.stderr, mininterval=0.5)


def _in_manifest_order(done: dict[str, ShardEmbedding], urls: list[str], expected: int) -> dict:
    parts = [done[url] for url in urls]
    labels = torch.from_numpy(np.concatenate([p.labels for p in parts]))
    if labels.shape[0] != expected:
        raise RuntimeError(f"the Ray workers embedded {labels.shape[0]} samples, the manifest lists {expected}")
    return {
        "embeddings": torch.from_numpy(np.concatenate([p.embeddings for p in parts])),
        "labels": labels,
        "keys": [key for p in parts for key in p.keys],
    }
