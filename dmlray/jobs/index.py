"""What ``dmlray index`` does: embed a split with a run's model and write a gallery index
into the run folder, with the approximate kind's recall and speed measured against exact."""

from __future__ import annotations

import os
from dataclasses import asdict

import torch

from dmlray.data import storage
from dmlray.evaluation.index import GalleryIndex, IndexParams, build_index, measure, save_index
from dmlray.jobs.run_model import RunModel, load_run_model

MEASURE_K = 10


def index_url(run: str, split: str, kind: str) -> str:
    """Where ``dmlray index`` puts an index: ``<run>/index-<split>-<kind>``."""
    return storage.join(run, f"index-{split}-{kind}")


def embed_gallery(
    loaded: RunModel,
    data_url: str,
    split: str,
    device: torch.device,
    progress: bool,
    workers: int | None = 0,
    gpus_per_worker: float = 0,
) -> dict:
    """{'embeddings', 'labels', 'keys'} of every sample of ``split``, checked against its manifest.

    ``workers``: 0 embeds in this process; N > 0 with N Ray actors (on RAY_ADDRESS's cluster,
    else a local one); None with one actor per CPU of RAY_ADDRESS's cluster when it is set,
    else in this process. The rows come in the same order either way."""
    from dmlray.data.shards import read_manifest
    from dmlray.evaluation.report import embed_manifest_split

    manifest = read_manifest(data_url)
    if split not in manifest.splits:
        raise ValueError(f"{data_url} has no split {split!r} (it has {', '.join(manifest.splits)})")
    on_cluster = workers is None and bool(os.environ.get("RAY_ADDRESS"))
    if workers or on_cluster:
        from dmlray.jobs.launch import ensure_ray
        from dmlray.jobs.ray_embedding import default_workers, embed_split_on_ray

        ensure_ray()
        count = workers or default_workers(len(manifest.shard_urls(split)))  # the cluster's CPUs
        return embed_split_on_ray(loaded.checkpoint, manifest, split, count, gpus_per_worker, progress)
    batch_size = loaded.cfg.data.eval_batch_size
    return embed_manifest_split(
        loaded.model, manifest, split, loaded.transform, batch_size, device, pixels=False, progress=progress
    )


def build_run_index(
    path: str,
    data: str | None = None,
    split: str | None = None,
    kind: str = "exact",
    params: IndexParams | None = None,
    out: str | None = None,
    progress: bool = True,
    workers: int | None = 0,
    gpus_per_worker: float = 0,
) -> tuple[GalleryIndex, str]:
    """(index, URL written): the split (default: the run's gallery split, else its test
    split) embedded with the run's latest checkpoint (by Ray workers: ``embed_gallery``),
    indexed, measured and saved."""
    if workers is not None and workers < 0:
        raise ValueError(f"the number of embedding workers must be >= 0, got {workers}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_run_model(path, device)
    data_url = data or loaded.cfg.data.url
    split = split or loaded.cfg.data.gallery_split or loaded.cfg.data.test_split
    embedded = embed_gallery(loaded, data_url, split, device, progress, workers, gpus_per_worker)
    meta = {
        "run": loaded.run,
        "checkpoint": loaded.checkpoint,
        "step": loaded.step,
        "data_url": data_url,
        "split": split,
        "model": asdict(loaded.cfg.model),
        "image_size": loaded.cfg.data.image_size,
        "channels": loaded.cfg.data.channels,
    }
    index = build_index(embedded["embeddings"], embedded["labels"], embedded["keys"], kind, params, meta)
    if len(index) > 1:
        index.meta["measured"] = measure(index, k=MEASURE_K)
    url = out or index_url(loaded.run, split, kind)
    save_index(index, url)
    return index, url


def index_and_report(path: str, **kwargs) -> str:
    """``dmlray index``: build, save and print what was measured; returns the index URL."""
    index, url = build_run_index(path, **kwargs)
    print(f"indexed {len(index)} items of split {index.meta['split']!r} ({index.kind}, dim {index.dim})")
    measured = index.meta.get("measured")
    if measured:
        k = int(measured["k"])
        print(f"{'':24}{'recall@' + str(k) + ' vs exact':>20}{'queries/s':>12}")
        print(f"{'exact (dmlray knn)':24}{1.0:>20.4f}{measured['exact_qps']:>12.0f}")
        if index.kind != "exact":
            print(f"{index.kind:24}{measured[f'recall@{k}_vs_exact']:>20.4f}{measured['qps']:>12.0f}")
    print(f"wrote {url}")
    return url
