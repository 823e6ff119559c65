"""Embedding a split across ranks, exactly once per sample, and scoring it.

Each rank embeds the shards it owns (round-robin); the results are gathered in rank
order, so every rank ends with the whole split, nothing lost or duplicated (the count is
checked against the manifest).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.data.stream import iter_eval_batches, iter_shard, rank_shards
from dmlray.training.distributed import all_gather_list, all_gather_variable, broadcast_object, world


@torch.no_grad()
def embed_split(
    model: nn.Module,
    shard_urls: list[str],
    transform: Callable,
    batch_size: int,
    device: torch.device,
    expected: int | None = None,
    pixels: bool = False,
    read_shard: Callable[[str], Iterator] = iter_shard,
    progress: bool = False,
    checksums: dict[str, str] | None = None,
) -> dict:
    """{'embeddings', 'labels', 'keys'} (and 'pixels': flattened, L2-normalised inputs) of a whole split.

    ``keys`` (sample keys, a list) follow the same rank order as the tensors. With
    ``checksums`` ({url: sha256}, ``Manifest.shard_checksums``) a shard that differs from
    its manifest entry is an error naming it: an evaluation never scores altered data.
    """
    rank, world_size = world()
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    embs, labels, raw, keys = [], [], [], []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        # rank 0 sees its own share; the others embed theirs at the same pace
        bar = tqdm(
            total=None if expected is None else -(-expected // world_size),
            desc="embed",
            unit=" img",
            file=sys.stderr,
            mininterval=0.5,
        )
    try:
        shards = rank_shards(shard_urls, rank, world_size)
        for images, y, batch_keys in iter_eval_batches(shards, transform, batch_size, read_shard, checksums=checksums):
            images = images.to(device=device, dtype=dtype)
            embs.append(model(images).float())
            labels.append(y.to(device))
            keys += batch_keys
            if pixels:
                raw.append(F.normalize(images.flatten(1).float(), dim=1))
            if bar is not None:
                bar.update(len(batch_keys))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    dim = getattr(model, "embedding_dim", 0) or getattr(getattr(model, "module", None), "embedding_dim", 0)
    local = {
        "embeddings": torch.cat(embs) if embs else torch.zeros(0, dim, device=device),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device),
    }
    if pixels:
        local["pixels"] = torch.cat(raw) if raw else torch.zeros(0, 1, device=device)
    out: dict = {k: all_gather_variable(v) for k, v in local.items()}
    out["keys"] = all_gather_list(keys)
    if expected is not None and out["labels"].shape[0] != expected:
        raise RuntimeError(f"evaluation embedded {out['labels'].shape[0]} samples, the manifest lists {expected}")
    return out


def score(
    embedded: dict[str, torch.Tensor],
    ks: Sequence[int],
    gallery: dict[str, torch.Tensor] | None = None,
    key: str = "embeddings",
    nmi: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of embedded data, computed on rank 0 and shared with every rank."""
    from dmlray.evaluation.metrics import retrieval_metrics

    rank, _ = world()
    metrics = None
    if rank == 0:
        metrics = retrieval_metrics(
            embedded[key].cpu(),
            embedded["labels"].cpu(),
            None if gallery is None else gallery[key].cpu(),
            None if gallery is None else gallery["labels"].cpu(),
            ks=tuple(ks),
            nmi=nmi,
        )
    return broadcast_object(metrics)
