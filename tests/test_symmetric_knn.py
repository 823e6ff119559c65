"""The leave-one-out k-NN from half the similarity product (dmlray.evaluation.symmetric_knn)
against a full float64 stable sort (ties to the lower index) and against knn's
full-product path.

Integer-valued embeddings make every dot product exact in float32 whatever the summation
order, so there the half product must give the reference's neighbours and scores
exactly, ties included; with real values, scores agree to float32 rounding.
"""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from knn_data import random_unit, reference, results_from_threads, tied_data, torch_threads

from dmlray.evaluation import knn

knn_module = importlib.import_module("dmlray.evaluation.knn")
sym = importlib.import_module("dmlray.evaluation.symmetric_knn")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """One chunk at a time, or two in flight (each on its own thread)."""
    with torch_threads(request.param):
        yield request.param


@pytest.fixture(params=["by-size", "whole", "groups"])
def column_reads(request, monkeypatch):
    """A column part compared whole or only its picked groups read back: as sized by
    _GATHER_SHARE, or forced one way."""
    if request.param == "whole":
        monkeypatch.setattr(sym, "_GATHER_SHARE", 10**9)
    elif request.param == "groups":
        monkeypatch.setattr(sym, "_GATHER_SHARE", 0)
    return request.param


@pytest.mark.parametrize(
    "n, dim, k, rows",
    [
        (1500, 24, 1, None),  # two chunks of 1024 rows, N not a multiple of the group
        (1500, 24, 4, 64),  # 24 chunks: the running top k forms, few groups are read
        (1500, 24, 16, 128),
        (1100, 8, 40, 64),  # k large for the chunk: rows raised to 2k, rounded to 128
        (700, 8, 3, 64),  # 64 rows of 6 groups of 10: the last 4 rows in no group
        (200, 4, 150, 64),  # k near N: the last rows' row parts are shorter than k
    ],
)
def test_tied_data_equal_the_full_sort(n, dim, k, rows, threads, column_reads):
    x = tied_data(n, dim, seed=n + k)
    v, i = sym.symmetric_knn(x, k, rows)
    rv, ri = reference(x, x, k, loo=True)
    assert torch.equal(i, ri)
    assert torch.equal(v.double(), rv)


@pytest.mark.parametrize("path", ["threshold", "grouped"])
def test_row_parts_through_either_selection(path, monkeypatch):
    """The row parts go through knn's block top-k: the threshold one (CPU float32) or the
    grouped levels."""
    if path == "grouped":
        monkeypatch.setattr(knn_module, "_THRESHOLD_ON_CPU", False)
    x = tied_data(1300, 16, seed=7)
    v, i = sym.symmetric_knn(x, 5, 128)
    rv, ri = reference(x, x, 5, loo=True)
    assert torch.equal(i, ri) and torch.equal(v.double(), rv)


def test_real_values_agree_with_the_full_product_to_rounding(threads):
    x = random_unit(3000, 128, seed=3)
    v, i = sym.symmetric_knn(x, 4, 256)
    # the full product: query-vs-gallery search of the same items, each row's own entry dropped
    sv, si = knn(x, 5, x)
    keep = si != torch.arange(3000)[:, None]
    keep[keep.all(1), 4] = False
    fv, fi = sv[keep].view(3000, 4), si[keep].view(3000, 4)
    assert torch.allclose(v, fv, atol=1e-6)
    differ = i != fi
    assert differ.float().mean() < 1e-3
    assert torch.all((v - fv).abs()[differ] < 1e-6)
    rv, ri = reference(x, x, 4, loo=True)
    assert torch.allclose(v.double(), rv, atol=1e-6)
    assert (i == ri).float().mean() > 0.999


def test_knn_takes_it_where_it_applies(monkeypatch):
    calls = []
    real = sym.symmetric_knn
    monkeypatch.setattr(sym, "symmetric_knn", lambda *a: calls.append(a[1:]) or real(*a))
    x = tied_data(1000, 128, seed=1)
    v, i = knn(x, 4)
    assert calls == [(4, None)]
    rv, ri = reference(x, x, 4, loo=True)
    assert torch.equal(i, ri) and torch.equal(v.double(), rv)
    knn(x, 4, chunk_size=100)
    assert calls[-1] == (4, 100)
    calls.clear()
    nan = x.clone()
    nan[3, 0] = float("nan")
    for args, kwargs in [
        ((x, 5), {}),  # k > dim / 32
        ((x[:, :32], 1), {}),  # dim below 64
        ((x.double(), 4), {}),  # float64
        ((x, 4, x), {}),  # a gallery: not leave-one-out
        ((x, 4), {"backend": "faiss"}),
        ((x[:300], 4), {}),  # one chunk
        ((nan, 4), {}),  # NaN scores: the other path ranks them
    ]:
        if kwargs.get("backend") == "faiss" and not knn_module._faiss_available():
            continue
        knn(*args, **kwargs)
    assert calls == []


def test_bad_k_is_named():
    with pytest.raises(ValueError, match=r"k must be in \[1, 9\] for 10 items, got 10"):
        sym.symmetric_knn(tied_data(10, 4, 0), 10)


def _knn_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dmlray-knn")]


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def test_thread_count_restored_after_success_and_failure(two_threads, monkeypatch):
    x = tied_data(1500, 16, seed=2)
    sym.symmetric_knn(x, 3, 64)
    assert torch.get_num_threads() == 2 and not _knn_threads()
    calls = []

    def failing(block, *args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("chunk failed")
        return real(block, *args)

    real = sym._topk_of_sims
    monkeypatch.setattr(sym, "_topk_of_sims", failing)
    with pytest.raises(RuntimeError, match="chunk failed"):
        sym.symmetric_knn(x, 3, 64)
    assert torch.get_num_threads() == 2 and not _knn_threads()


def test_concurrent_searches_are_exact(two_threads):
    """Only one search at a time halves torch's threads; the others run one chunk at a
    time meanwhile. All results stay exact."""
    x = tied_data(1500, 16, seed=4)
    _, ri = reference(x, x, 5, loo=True)
    results = results_from_threads(lambda: sym.symmetric_knn(x, 5, 64)[1])
    assert all(torch.equal(r, ri) for r in results)
    assert torch.get_num_threads() == 2
