"""Pictures of a retrieval evaluation, written into the run folder: a retrieval grid
(queries and their top-k, right/wrong marked) and Recall@K curves."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from dmlray.data.stream import iter_shard
from dmlray.data.transforms import decode_image


def pick_queries(n: int, count: int) -> list[int]:
    """Evenly spaced query indices: deterministic, and spread over many classes."""
    if n == 0:
        return []
    step = max(1, n // count)
    return list(range(0, n, step))[:count]


def top_k(query: dict, gallery: dict | None, rows: list[int], k: int) -> torch.Tensor:
    """Top-k gallery indices of the chosen queries (itself excluded in leave-one-out)."""
    g = (gallery or query)["embeddings"]
    sims = query["embeddings"][rows] @ g.T
    if gallery is None:
        sims[torch.arange(len(rows)), torch.tensor(rows)] = float("-inf")
    return sims.topk(min(k, sims.shape[1]), dim=1).indices


def load_images(
    urls: Sequence[str], keys: set[str], channels: int, read_shard: Callable[[str], Iterator] = iter_shard
) -> dict:
    """Decoded images of the given sample keys (stops reading once all are found)."""
    found: dict = {}
    for url in urls:
        for key, _, data in read_shard(url):
            if key in keys:
                found[key] = decode_image(data, channels)
        if len(found) == len(keys):
            break
    return found


def write_pictures(
    folder,
    query: dict,
    gallery: dict | None,
    query_urls: Sequence[str],
    gallery_urls: Sequence[str] | None,
    channels: int,
    curves: dict[str, dict],
    k: int = 5,
    queries: int = 8,
) -> list[str]:
    """retrieval_grid.png and recall_at_k.png in the run folder; returns their URLs."""
    from dmlray.evaluation.plots import recall_curves, retrieval_grid

    written = []
    curve_data = {
        name: {int(key.split("@")[1]): v for key, v in m.items() if key.startswith("recall@")}
        for name, m in curves.items()
        if m
    }
    written.append(folder.write_png("recall_at_k.png", lambda p: recall_curves(p, curve_data)))
    rows = pick_queries(len(query["keys"]), queries)
    if rows:
        idx = top_k(query, gallery, rows, k)
        g = gallery or query
        wanted_q = {query["keys"][r] for r in rows}
        wanted_g = {g["keys"][int(i)] for i in idx.flatten()}
        if gallery is None:
            images = load_images(query_urls, wanted_q | wanted_g, channels)
            q_images = g_images = images
        else:
            q_images = load_images(query_urls, wanted_q, channels)
            g_images = load_images(gallery_urls or [], wanted_g, channels)
        order = sorted({int(i) for i in idx.flatten()})
        position = {gi: n for n, gi in enumerate(order)}
        written.append(
            folder.write_png(
                "retrieval_grid.png",
                lambda p: retrieval_grid(
                    p,
                    [q_images[query["keys"][r]] for r in rows],
                    [int(query["labels"][r]) for r in rows],
                    [g_images[g["keys"][gi]] for gi in order],
                    [int(g["labels"][gi]) for gi in order],
                    torch.tensor([[position[int(i)] for i in row] for row in idx]),
                    title="queries (left) and their nearest neighbours: green right class, red wrong",
                ),
            )
        )
    return written
