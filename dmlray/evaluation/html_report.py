"""A self-contained HTML retrieval report: the metrics, the worst queries with their nearest
neighbours, per-class Recall@1 and the retrieval grid, every image inlined (``data:`` URLs), so
the one file opens anywhere, offline, and can be attached to a ticket.

"Worst" is measured, not sampled: queries are ranked by the position of their first correct
neighbour (not found in the top ``depth`` counts as ``depth``), then by how similar the wrong
top-1 neighbour was. Class names and labels are escaped; nothing in the page runs script.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmlray.evaluation.knn import knn


@dataclass
class QueryRow:
    """One query of the report and its top neighbours."""

    index: int
    """Row of the query in the test split's embedding."""
    first_correct: int
    """0-based rank of the first neighbour of the query's class; ``depth`` where none is in the top."""
    neighbours: list[int]
    """Gallery rows of the top neighbours, best first."""
    similarities: list[float]
    """Their similarities to the query."""


def ranked_queries(query: dict, gallery: dict | None, depth: int = 50) -> list[QueryRow]:
    """Every query with its top ``depth`` neighbours, worst first (see the module docstring)."""
    g = gallery or query
    sims, idx = knn(query["embeddings"], depth, None if gallery is None else gallery["embeddings"])
    labels = torch.as_tensor(query["labels"]).long()
    glabels = torch.as_tensor(g["labels"]).long()
    correct = glabels[idx] == labels.unsqueeze(1)
    found = correct.any(dim=1)
    first = torch.where(found, correct.float().argmax(dim=1), torch.full_like(labels, idx.shape[1]))
    wrong_top = torch.where(correct[:, 0], torch.full_like(sims[:, 0], -2.0), sims[:, 0])
    order = sorted(range(len(labels)), key=lambda i: (-int(first[i]), -float(wrong_top[i]), i))
    return [QueryRow(i, int(first[i]), idx[i].tolist(), sims[i].tolist()) for i in order]


def per_class_recall(rows: Sequence[QueryRow], query_labels: Sequence[int]) -> dict[int, tuple[float, int]]:
    """Recall@1 of each query class and its number of queries."""
    hits: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        hits[int(query_labels[row.index])].append(int(row.first_correct == 0))
    return {c: (sum(h) / len(h), len(h)) for c, h in sorted(hits.items())}


def png_data_url(image) -> str:
    """A decoded image (tensor, array or PIL; any layout plots accept) as a PNG ``data:`` URL."""
    from PIL import Image

    from dmlray.evaluation.plots import _to_hwc

    pixels = (np.clip(_to_hwc(image), 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
.query { display: flex; gap: 0.4em; align-items: flex-start; margin: 0.4em 0; }
figure { margin: 0; text-align: center; font-size: 0.75em; }
figure img { width: 72px; height: 72px; image-rendering: pixelated; border: 3px solid #888; }
figure.right img { border-color: #2a2; } figure.wrong img { border-color: #c22; }
figure.query-image img { border-color: #000; }
"""


def _metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    names = sorted({k for m in metrics.values() for k in m})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{html.escape(model)}</th>"
        + "".join(f"<td>{m[n]:.4f}</td>" if n in m else "<td></td>" for n in names)
        + "</tr>"
        for model, m in metrics.items()
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _figure(url: str, caption: str, kind: str) -> str:
    text = html.escape(caption)
    return f'<figure class="{kind}"><img src="{url}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def render_report(
    *,
    title: str,
    metrics: Mapping[str, Mapping[str, float]],
    worst: Sequence[QueryRow],
    query: dict,
    gallery: dict | None,
    images: Mapping[str, str],
    class_recall: Mapping[int, tuple[float, int]],
    grid_png: bytes | None = None,
    top: int = 5,
) -> str:
    """The whole page. ``images`` maps sample keys to ``data:`` URLs (missing keys are skipped)."""
    g = gallery or query
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>Metrics</h2>",
        _metrics_table(metrics),
        f"<h2>The {len(worst)} worst queries</h2>",
        "<p>Ranked by the position of the first neighbour of the right class; black: the query, "
        "green: right class, red: wrong class.</p>",
    ]
    for row in worst:
        qkey, qlabel = query["keys"][row.index], int(query["labels"][row.index])
        found = "not in the top" if row.first_correct >= len(row.neighbours) else f"at rank {row.first_correct + 1}"
        cells = [_figure(images.get(qkey, ""), f"class {qlabel} (first right {found})", "query-image")]
        for gi, sim in list(zip(row.neighbours, row.similarities, strict=True))[:top]:
            glabel = int(g["labels"][gi])
            kind = "right" if glabel == qlabel else "wrong"
            cells.append(_figure(images.get(g["keys"][gi], ""), f"class {glabel} · {sim:.3f}", kind))
        parts.append(f"<div class='query'>{''.join(cells)}</div>")
    parts.append("<h2>Recall@1 per class (worst first)</h2><table><tr><th>class</th><th>R@1</th><th>queries</th></tr>")
    for c, (r, n) in sorted(class_recall.items(), key=lambda item: (item[1][0], item[0])):
        parts.append(f"<tr><td>{c}</td><td>{r:.3f}</td><td>{n}</td></tr>")
    parts.append("</table>")
    if grid_png:
        grid = "data:image/png;base64," + base64.b64encode(grid_png).decode()
        parts.append(f"<h2>Retrieval grid</h2><img src='{grid}' alt='retrieval grid' style='max-width:100%'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(
    url: str,
    *,
    title: str,
    metrics: Mapping[str, Mapping[str, float]],
    query: dict,
    gallery: dict | None,
    query_urls: Sequence[str],
    gallery_urls: Sequence[str] | None,
    channels: int,
    grid_url: str | None = None,
    worst: int = 12,
    top: int = 5,
) -> str:
    """Rank the queries, read the images the page shows from the shards, and store the page at ``url``."""
    from dmlray.data import storage
    from dmlray.evaluation.pictures import load_images

    rows = ranked_queries(query, gallery, depth=max(top, 50))
    shown = rows[:worst]
    g = gallery or query
    qkeys = {query["keys"][r.index] for r in shown}
    gkeys = {g["keys"][i] for r in shown for i in r.neighbours[:top]}
    if gallery is None:
        decoded = load_images(query_urls, qkeys | gkeys, channels)
    else:
        decoded = {**load_images(query_urls, qkeys, channels), **load_images(gallery_urls or [], gkeys, channels)}
    images = {key: png_data_url(image) for key, image in decoded.items()}
    grid = storage.read_bytes(grid_url) if grid_url and storage.exists(grid_url) else None
    page = render_report(
        title=title,
        metrics=metrics,
        worst=shown,
        query=query,
        gallery=gallery,
        images=images,
        class_recall=per_class_recall(rows, [int(v) for v in query["labels"]]),
        grid_png=grid,
        top=top,
    )
    storage.write_bytes(url, page.encode())
    return url
