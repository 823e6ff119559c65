"""Pictures of retrieval results and training runs, saved as PNG.

Figures are drawn with matplotlib's object API on an Agg canvas created inside each
function: nothing happens at import, pyplot's global state and the process-wide backend
are left alone (safe in Ray workers and on headless machines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["retrieval_grid", "recall_curves", "training_curves"]

_RIGHT, _WRONG, _QUERY = "#1a9641", "#d7191c", "#2b83ba"


def _new_figure(width: float, height: float) -> Any:
    # Imported here, not at module import: matplotlib is only needed when drawing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _to_hwc(image: Any) -> np.ndarray:
    """One image as an (H, W, 3) float array in [0, 1], whatever it came as.

    Accepts torch tensors or arrays in CHW or HWC layout, grey (HW, 1HW, HW1), uint8 or
    float, and PIL images. Float images outside [0, 1] (e.g. mean/std normalised network
    inputs) are min-max rescaled per image, which is enough to recognise them.
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]  # drop alpha
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"cannot display an image of shape {np.shape(image)}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def _label(labels: Any, i: int) -> Any:
    v = labels[i]
    return v.item() if hasattr(v, "item") else v


def retrieval_grid(
    path: str | Path,
    query_images: Sequence[Any],
    query_labels: Sequence[Any],
    gallery_images: Sequence[Any],
    gallery_labels: Sequence[Any],
    topk_indices: Any,
    *,
    k: int | None = None,
    max_queries: int = 8,
    query_ids: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """One row per query: the query (blue border), then its top-k gallery items, with a
    green border where the retrieved item has the query's label and red where not.

    ``topk_indices[i]`` are gallery positions for query i, best first (e.g. from
    ``dmlray.evaluation.knn.knn``; in leave-one-out pass the same set as query and gallery).
    ``query_ids`` picks which queries to show (default: the first ``max_queries``).
    """
    idx = np.asarray(topk_indices.detach().cpu() if hasattr(topk_indices, "detach") else topk_indices)
    if idx.ndim != 2:
        raise ValueError(f"topk_indices must be (n_queries, k), got shape {idx.shape}")
    k = idx.shape[1] if k is None else min(k, idx.shape[1])
    rows = list(query_ids) if query_ids is not None else list(range(min(max_queries, len(idx))))
    if not rows or k < 1:
        raise ValueError("nothing to draw: no queries or k < 1")
    cell = 1.3
    fig = _new_figure(cell * (k + 1) + 0.3, cell * len(rows) + (0.5 if title else 0.2))
    axes = fig.subplots(len(rows), k + 1, squeeze=False)
    for r, qi in enumerate(rows):
        q_label = _label(query_labels, qi)
        panels = [(query_images[qi], _QUERY, f"query\n{q_label}")]
        for j in range(k):
            gi = int(idx[qi, j])
            g_label = _label(gallery_labels, gi)
            colour = _RIGHT if g_label == q_label else _WRONG
            panels.append((gallery_images[gi], colour, f"#{j + 1}: {g_label}"))
        for c, (image, colour, caption) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(_to_hwc(image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(caption, fontsize=7, color=colour if c else "black", pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def recall_curves(
    path: str | Path,
    curves: Mapping[str, Mapping[int, float]],
    *,
    title: str = "Recall@K",
) -> Path:
    """Recall@K against K (log scale), one line per method; recall given as fractions."""
    if not curves:
        raise ValueError("no curves to draw")
    fig = _new_figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    all_k: set[int] = set()
    for name, rec in curves.items():
        ks = sorted(int(k) for k in rec)
        all_k.update(ks)
        ax.plot(ks, [100.0 * rec[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2 if max(all_k) <= 64 else 10)
    ax.set_xticks(sorted(all_k))
    ax.set_xticklabels([str(k) for k in sorted(all_k)])
    ax.minorticks_off()
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(
    path: str | Path,
    history: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = ("recall@1",),
    title: str | None = None,
) -> Path:
    """Loss (left panel) and evaluation metrics (right panel, in %) against step.

    ``history`` entries have ``step`` and ``loss``; evaluation keys such as ``recall@1``
    appear only on evaluation steps, so each series is drawn from the entries that have it.
    """
    if not history:
        raise ValueError("empty history")
    fig = _new_figure(9.0, 3.4)
    ax_loss, ax_m = fig.subplots(1, 2)
    pts = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    if pts:
        ax_loss.plot(*zip(*pts, strict=True), lw=1, color="#555555")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(True, alpha=0.3)
    drawn = False
    for key in metrics:
        pts = [(h["step"], 100.0 * h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_m.plot(*zip(*pts, strict=True), marker="o", ms=3, label=key)
            drawn = True
    if drawn:
        ax_m.legend(fontsize=8)
    else:
        ax_m.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_m.transAxes, color="grey")
    ax_m.set_xlabel("step")
    ax_m.set_ylabel("%")
    ax_m.set_title("evaluation")
    ax_m.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
