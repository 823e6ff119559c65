"""dmlray.evaluation.plots: figures render to valid PNGs without touching pyplot's global state."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlray.evaluation.knn import knn
from dmlray.evaluation.plots import recall_curves, retrieval_grid, training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def tmp_png() -> Path:
    return Path(tempfile.mkdtemp()) / "a.png"


def pixels(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))


def test_import_has_no_side_effects():
    # A fresh interpreter: importing dmlray.evaluation.plots loads no matplotlib at all (so no
    # backend is chosen), and drawing does not load pyplot.
    code = (
        "import sys, dmlray.evaluation.plots as p; assert 'matplotlib' not in sys.modules; "
        "p.recall_curves(sys.argv[1], {'a': {1: 0.5, 2: 0.7}}); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_png())], check=True)


@pytest.mark.parametrize("layout", ["chw_float", "hwc_uint8", "grey"])
def test_retrieval_grid(tmp_path, layout):
    g = torch.Generator().manual_seed(0)
    n = 12
    labels = torch.arange(n) % 4
    # Each class a flat colour, so right answers are easy to see in the picture.
    base = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    imgs = base[labels][:, :, None, None].expand(n, 3, 16, 16) + 0.1 * torch.randn(n, 3, 16, 16, generator=g)
    if layout == "hwc_uint8":
        imgs = (imgs.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    elif layout == "grey":
        imgs = imgs.mean(1)
    emb = torch.nn.functional.normalize(base[labels] + 0.5 * torch.randn(n, 3, generator=g), dim=1)
    _, idx = knn(emb, 4)
    out = retrieval_grid(tmp_path / "sub" / "grid.png", imgs, labels, imgs, labels, idx, max_queries=3, title="test")
    w, h = png_size(out)
    assert w > h > 0  # 3 rows x 5 columns
    # Both border colours are present exactly when there are right and wrong answers.
    px = pixels(out)[..., :3]
    right = labels[idx[:3]] == labels[:3, None]
    green = np.all(np.abs(px - np.array([0x1A, 0x96, 0x41]) / 255) < 0.02, axis=-1).any()
    red = np.all(np.abs(px - np.array([0xD7, 0x19, 0x1C]) / 255) < 0.02, axis=-1).any()
    assert green == bool(right.any()) and red == bool((~right).any())


def test_retrieval_grid_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        retrieval_grid(tmp_path / "x.png", [np.zeros((4, 4))], [0], [np.zeros((4, 4))], [0], np.array([0, 0]))


def test_recall_curves(tmp_path):
    out = recall_curves(
        tmp_path / "recall.png",
        {
            "dmlray": {1: 0.62, 2: 0.74, 4: 0.83, 8: 0.9},
            "raw pixels": {1: 0.2, 2: 0.28, 4: 0.37, 8: 0.47},
        },
    )
    assert png_size(out) == (500, 360)
    out = recall_curves(tmp_path / "sop.png", {"x": {1: 0.7, 10: 0.85, 100: 0.93, 1000: 0.98}})
    assert out.exists()


def test_training_curves(tmp_path):
    history = [{"step": s, "loss": 2.0 / (1 + s / 50)} for s in range(0, 300, 5)]
    for h in history:
        if h["step"] % 50 == 0:
            h["recall@1"] = min(0.9, 0.2 + h["step"] / 400)
    out = training_curves(tmp_path / "train.png", history)
    assert png_size(out) == (900, 340)
    # No evaluation yet: still draws, with a note.
    out = training_curves(tmp_path / "early.png", history[:3] and [{"step": 0, "loss": 1.0}])
    assert out.exists()
    with pytest.raises(ValueError):
        training_curves(tmp_path / "none.png", [])
