"""Gallery indexes (exact and faiss) against the exact chunked search and loop references."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from dmlray.evaluation.index import (
    IndexParams,
    build_index,
    default_nlist,
    load_index,
    measure,
    neighbours_of_members,
    recall_against_exact,
    save_index,
)
from dmlray.evaluation.knn import knn


def clustered(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def loop_topk(x: np.ndarray, i: int, k: int) -> list[int]:
    """The k most similar other items of item i, ties to the lower index (a plain loop)."""
    sims = [(-float(np.dot(x[i].astype(np.float64), x[j])), j) for j in range(len(x)) if j != i]
    return [j for _, j in sorted(sims)[:k]]


def test_exact_index_neighbours_are_the_loop_reference_and_knn():
    x, y = clustered(300, 16, 10)
    index = build_index(x, y, [f"k{i}" for i in range(300)], "exact")
    idx, scores, _ = neighbours_of_members(index, np.arange(300), 5)
    for i in range(0, 300, 17):
        assert idx[i].tolist() == loop_topk(x, i, 5)
    ref_scores, ref_idx = knn(torch.from_numpy(x), 5)  # leave-one-out exact search
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_measures_recall_as_the_set_overlap_with_exact(kind):
    x, y = clustered(4000, 32, 40)
    index = build_index(x, y, [str(i) for i in range(4000)], kind)
    m = measure(index, k=10, max_queries=500)
    exact = build_index(x, y, [str(i) for i in range(4000)], "exact")
    ids = np.sort(np.random.default_rng(0).choice(4000, 500, replace=False))
    e, _, _ = neighbours_of_members(exact, ids, 10)
    a, _, _ = neighbours_of_members(index, ids, 10)
    overlap = np.mean([len(set(a[i]) & set(e[i])) / 10 for i in range(500)])
    assert m["recall@10_vs_exact"] == pytest.approx(overlap)
    assert m["recall@10_vs_exact"] > 0.8, m  # clustered data: both kinds find most neighbours
    assert m["qps"] > 0 and m["exact_qps"] > 0 and m["queries"] == 500


def test_recall_against_exact_counts_shared_neighbours():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 1, 9], [7, 8, 9]])
    assert recall_against_exact(approx, exact) == pytest.approx(2 / 6)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_index_round_trip_on_disk_answers_the_same_and_holds_no_pickle(tmp_path, kind):
    x, y = clustered(1000, 24, 20, seed=3)
    keys = [f"sample-{i:04d}" for i in range(1000)]
    index = build_index(x, y, keys, kind, IndexParams(nprobe=4), meta={"split": "test"})
    written = save_index(index, str(tmp_path / "ix"))
    assert (tmp_path / "ix" / "index.json").exists() and written[-1].endswith("index.json")
    assert (tmp_path / "ix" / "faiss.index").exists() == (kind != "exact")
    with zipfile.ZipFile(io.BytesIO((tmp_path / "ix" / "gallery.npz").read_bytes())) as z:
        for name in z.namelist():  # every array is plain data: loads with allow_pickle=False
            np.load(io.BytesIO(z.read(name)), allow_pickle=False)
    back = load_index(str(tmp_path / "ix"))
    assert back.kind == kind and back.keys == keys and back.meta["split"] == "test"
    np.testing.assert_array_equal(back.labels, y)
    s0, i0 = index.search(x[:50], 7)
    s1, i1 = back.search(x[:50], 7)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(s0, s1, rtol=1e-6)


def test_bad_inputs_name_what_is_wrong(tmp_path):
    x, y = clustered(100, 8, 5)
    with pytest.raises(ValueError, match="kind"):
        build_index(x, y, [str(i) for i in range(100)], "lsh")
    with pytest.raises(ValueError, match="keys"):
        build_index(x, y, ["a"], "exact")
    index = build_index(x, y, [str(i) for i in range(100)], "exact")
    with pytest.raises(ValueError, match=r"\(Q, 8\)"):
        index.search(np.zeros((2, 3)), 1)
    (tmp_path / "index.json").write_text('{"format": 99, "kind": "exact"}')
    with pytest.raises(ValueError, match="not a dmlray index"):
        load_index(str(tmp_path))


def test_default_nlist_leaves_every_cell_enough_training_points():
    assert default_nlist(320) == 8 and default_nlist(200_000) == int(4 * 200_000**0.5)
    assert default_nlist(10) == 1


def test_a_negative_worker_count_is_refused_before_anything_is_read(capsys):
    from dmlray.cli import main

    assert main(["index", "s3://dmlray-test/nowhere", "--workers", "-2"]) == 2
    assert "the number of embedding workers must be >= 0, got -2" in capsys.readouterr().err
