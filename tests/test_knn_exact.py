"""The exact kind's neighbours (knn, shared by recall_at_k and the exact index) against a
full stable sort and against faiss IndexFlatIP, at sizes where the grouped top-k is used.

Ties: dmlray ranks equal scores by the lower gallery index, also at the top-k boundary.
faiss does not promise an order: its heaps list a run of equal scores highest index first,
and which of the items tied at the k-th score it keeps depends on its block scan (a later
block may displace an earlier one). So against faiss the score lists must be identical and
the indices identical except inside runs of equal scores (there faiss's rows are put in
(score desc, index asc) order and only the kept set may differ, never the scores).
Integer-valued embeddings make every dot product exact in float32 whatever the summation
order, so ties are real ties for both libraries.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from knn_data import random_unit, reference, results_from_threads, tied_data

from dmlray.evaluation import knn, recall_at_k

faiss = pytest.importorskip("faiss")
knn_module = importlib.import_module("dmlray.evaluation.knn")


@pytest.fixture(autouse=True, params=["threshold", "grouped", "full-row"])
def grouping(request, monkeypatch):
    """Runs each test three times: with the default on CPU (the threshold top-k wherever
    k + 1 groups fit in a row, as at these sizes), with the grouped levels (GPUs, float64)
    and with torch's full-row top-k only."""
    assert (17 + 1) * knn_module._GROUP * knn_module._GROUPED_MAX_SHARE <= 1500, "the sizes below take the grouped path"
    assert knn_module._THRESHOLD_ON_CPU, "float32 on CPU takes the threshold top-k by default"
    if request.param != "threshold":
        monkeypatch.setattr(knn_module, "_THRESHOLD_ON_CPU", False)
    if request.param == "full-row":
        monkeypatch.setattr(knn_module, "_GROUPED_MAX_SHARE", 10**9)


def faiss_knn(q: torch.Tensor, g: torch.Tensor, k: int, loo: bool) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g.numpy())
    d, i = index.search(q.numpy(), k + (1 if loo else 0))
    if loo:  # drop each query's own entry; if ties pushed it out, the last (k+1-th) one
        own = i == np.arange(q.shape[0])[:, None]
        drop = np.where(own.any(1), own.argmax(1), i.shape[1] - 1)
        keep = np.ones_like(own)
        keep[np.arange(q.shape[0]), drop] = False
        d, i = d[keep].reshape(q.shape[0], k), i[keep].reshape(q.shape[0], k)
    order = np.lexsort((i, -d), axis=1)
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def assert_same_as_faiss(v: torch.Tensor, i: torch.Tensor, fv: np.ndarray, fi: np.ndarray) -> None:
    """Identical scores; indices identical wherever the score is not tied within the row."""
    assert np.array_equal(fv, v.numpy())
    vn = v.numpy()
    tied = np.zeros_like(vn, dtype=bool)
    tied[:, 1:] |= vn[:, 1:] == vn[:, :-1]
    tied[:, :-1] |= vn[:, :-1] == vn[:, 1:]
    tied |= vn == vn[:, -1:]  # may tie with items just past the k-th
    assert np.array_equal(fi[~tied], i.numpy()[~tied])
    assert tied.any(), "the tied data must exercise ties"


@pytest.mark.parametrize("k", [1, 4, 17])
@pytest.mark.parametrize("chunk", [None, 97])
def test_leave_one_out_ties_equal_reference_and_faiss(k, chunk):
    x = tied_data(1500, 24, seed=k)  # not a multiple of the group width
    v, i = knn(x, k, chunk_size=chunk)
    rv, ri = reference(x, x, k, loo=True)
    assert torch.equal(i, ri)
    assert torch.equal(v.double(), rv)
    assert_same_as_faiss(v, i, *faiss_knn(x, x, k, loo=True))


@pytest.mark.parametrize("k", [1, 9, 33])
def test_query_vs_gallery_ties_identical_to_faiss(k):
    g = tied_data(2500, 16, seed=100 + k)
    q = tied_data(300, 16, seed=200 + k)
    v, i = knn(q, k, g)
    rv, ri = reference(q, g, k, loo=False)
    assert torch.equal(i, ri) and torch.equal(v.double(), rv)
    assert_same_as_faiss(v, i, *faiss_knn(q, g, k, loo=False))


@pytest.mark.parametrize("k", [1, 10, 33])
def test_random_unit_vectors_equal_faiss(k):
    """Real-valued data: same neighbours as faiss; where the order differs, the two
    similarities are equal to float32 rounding (the libraries sum products differently)."""
    x = random_unit(2500, 32, seed=k)
    v, i = knn(x, k, chunk_size=500)
    rv, ri = reference(x, x, k, loo=True)
    assert (i == ri).float().mean() > 0.999
    assert torch.allclose(v.double(), rv, atol=1e-6)
    fv, fi = faiss_knn(x, x, k, loo=True)
    diff = fi != i.numpy()
    assert np.all(np.abs(fv - v.numpy())[diff] < 1e-5)
    assert diff.mean() < 1e-3


def test_recall_at_k_uses_the_same_neighbours():
    x = tied_data(2000, 12, seed=5)
    y = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(5))
    _, ri = reference(x, x, 8, loo=True)
    hit = (y[ri] == y[:, None]).cumsum(1) > 0
    want = {k: float(hit[:, k - 1].double().mean()) for k in (1, 2, 4, 8)}
    got = recall_at_k(x, y, ks=(1, 2, 4, 8))
    assert got == pytest.approx(want, abs=1e-12)


def test_similarity_product_runs_on_torchs_thread_count(monkeypatch):
    """The CPU product goes through numpy's BLAS only single-threaded and not on an Intel
    CPU (torch's MKL is faster there), its BLAS then on one thread too; with more torch
    threads it stays with torch.mm."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(knn_module, "intel_cpu", lambda: False)
    try:
        with knn_module._blas_threads(torch.device("cpu")) as numpy_blas:
            assert numpy_blas
            blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
            assert blas and all(p["num_threads"] == 1 for p in blas)
        monkeypatch.setattr(knn_module, "intel_cpu", lambda: True)
        with knn_module._blas_threads(torch.device("cpu")) as numpy_blas:
            assert not numpy_blas
        monkeypatch.setattr(knn_module, "intel_cpu", lambda: False)
        torch.set_num_threads(2)
        with knn_module._blas_threads(torch.device("cpu")) as numpy_blas:
            assert not numpy_blas
    finally:
        torch.set_num_threads(before)


def test_cpu_chunks_keep_a_cache_sized_block_for_a_small_gallery():
    """On a CPU, for a gallery of at most 16 MiB, a chunk holds about 10 MiB of scores
    (64 to 1024 rows) whatever the thread count; for a larger gallery up to 128 MiB in at
    most 512 rows, on a GPU up to 128 MiB in at most 1024 rows."""
    before = torch.get_num_threads()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert knn_module.auto_chunk(20_000, 4, None, cpu, 128) == 10 * 2**20 // 80_000 == 131
            assert knn_module.auto_chunk(100_000, 4, None, cpu, 16) == 64  # at least 64 rows
            assert knn_module.auto_chunk(1_000, 4, None, cpu, 128) == 1024  # at most 1024
        # a 20 MB gallery: the large blocks, capped at 512 rows on a CPU and 1024 on a GPU
        assert knn_module.auto_chunk(10_000, 4, None, cpu, 512) == 512
        assert knn_module.auto_chunk(10_000, 4, None, gpu) == 1024
        sop = 128 * 2**20 // (60_502 * 4)  # a 124 MB gallery: 554 rows
        assert (
            knn_module.auto_chunk(60_502, 4, None, cpu, 512) == 512
            and knn_module.auto_chunk(60_502, 4, None, gpu) == sop
        )
        assert knn_module.auto_chunk(20_000, 4, 7, cpu, 128) == 7  # an explicit size wins
    finally:
        torch.set_num_threads(before)


def test_a_nan_embedding_ranks_as_torchs_sort_does_and_nothing_else_moves():
    """NaN scores (a diverged model) rank first, as in torch's stable sort; knn neither
    fails nor loses a real neighbour."""
    x = tied_data(1200, 16, seed=3)  # exact products: the order is the reference's
    x[7] = float("nan")
    v, i = knn(x, 5)
    rv, ri = reference(x, x, 5, loo=True)
    assert torch.equal(i, ri)
    assert i[0, 0] == 7 and torch.equal(v.double().nan_to_num(9.0), rv.nan_to_num(9.0))


@pytest.mark.parametrize("k", [1, 5, 30])  # 5: reads back the picked groups; 30: compares the whole block
def test_threshold_topk_equals_a_full_stable_sort_of_the_block(k):
    """The threshold top-k itself, on a block with many exact ties and -inf padding."""
    width = 64 * 40
    assert (5 + 1) * 64 * knn_module._READ_GROUPS_SHARE <= width < (30 + 1) * 64 * knn_module._READ_GROUPS_SHARE
    g = torch.Generator().manual_seed(k)
    sims = torch.randint(-6, 7, (300, width), generator=g).float()
    sims[:, -50:] = float("-inf")  # the gallery's padding columns
    sims[3] = 2.0  # a row that is one long tie
    v, i = knn_module._threshold_topk(sims, k, 64)
    rv, ri = torch.sort(sims, dim=1, descending=True, stable=True)
    assert torch.equal(i, ri[:, :k]) and torch.equal(v, rv[:, :k])


@pytest.fixture
def streams(monkeypatch):
    """Forces the number of chunk streams of the torch backend (``_chunk_workers``)."""

    def force(n: int) -> None:
        monkeypatch.setattr(knn_module, "_chunk_workers", lambda *args: n)

    return force


def test_two_chunk_streams_give_the_single_streams_results(streams):
    """Two chunks in flight (each with its own buffer) change nothing: the same neighbours,
    scores and metrics, also where the consumer counts ranks in the chunk's similarity
    block (K > 64) while the next chunk is being computed into the other buffer."""
    from dmlray.evaluation import retrieval_metrics

    x = tied_data(700, 10, seed=11)
    y = torch.randint(0, 30, (700,), generator=torch.Generator().manual_seed(11))
    out = {}
    for n in (1, 2):
        streams(n)
        metrics = retrieval_metrics(x, y, ks=(1, 4, 100, 300), nmi=False, chunk_size=64)
        out[n] = (knn(x, 9, chunk_size=50), metrics)
    (v1, i1), m1 = out[1]
    (v2, i2), m2 = out[2]
    assert torch.equal(i1, i2) and torch.equal(v1, v2) and m1 == m2
    rv, ri = reference(x, x, 9, loo=True)
    assert torch.equal(i2, ri)
    # recall@300 from the reference's full ranking: the counting path read the right blocks
    _, order = reference(x, x, 699, loo=True)
    hit = (y[order] == y[:, None]).cumsum(1) > 0
    assert m2["recall@300"] == pytest.approx(float(hit[:, 299].double().mean()), abs=1e-12)


def test_two_chunk_streams_leave_torchs_threads_as_they_were(streams):
    """The streams run on half of torch's threads each; torch's thread count is restored
    when the search ends, when its consumer stops early and when a chunk fails, and no
    search thread is left running."""
    import threading

    streams(2)
    x = tied_data(600, 8, seed=4)
    before = torch.get_num_threads()
    knn(x, 3, chunk_size=64)
    assert torch.get_num_threads() == before
    chunks = knn_module._iter_topk(x, x, True, lambda a, b: 3, 64, "torch")
    next(chunks)
    chunks.close()
    assert torch.get_num_threads() == before
    real = knn_module._topk_of_sims

    def fails_on_a_later_chunk(sims, k, n_valid, group):
        if sims.shape[0] == 24:  # the last chunk of 600 rows in 64s
            raise RuntimeError("selection failed")
        return real(sims, k, n_valid, group)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn_module, "_topk_of_sims", fails_on_a_later_chunk)
        with pytest.raises(RuntimeError, match="selection failed"):
            knn(x, 3, chunk_size=64)
    assert torch.get_num_threads() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("dmlray-knn")]


def test_chunk_streams_where_the_selection_weighs():
    """Two streams on a multi-threaded CPU for float32 blocks where the selection is a large
    share (a gallery past the cached size, or k large enough that the whole block is
    compared), else one (a small gallery at small k, float64, one thread, a GPU)."""
    before = torch.get_num_threads()
    cpu, f32 = torch.device("cpu"), torch.float32
    big = knn_module._CACHED_GALLERY_BYTES + 1
    try:
        torch.set_num_threads(2)
        assert knn_module._chunk_workers(f32, cpu, big, 10_048, 1) == 2  # 10k x 512
        assert knn_module._chunk_workers(f32, cpu, 10_000 * 32 * 4, 10_048, 100) == 2  # whole block
        assert knn_module._chunk_workers(f32, cpu, 20_000 * 128 * 4, 20_032, 33) == 1  # groups read back
        assert knn_module._chunk_workers(torch.float64, cpu, big, 10_048, 1) == 1
        assert knn_module._chunk_workers(f32, torch.device("cuda"), big, 10_048, 100) == 1
        torch.set_num_threads(1)
        assert knn_module._chunk_workers(f32, cpu, big, 10_048, 100) == 1
    finally:
        torch.set_num_threads(before)


def test_concurrent_searches_share_torchs_threads_safely():
    """Searches from several threads at once (a service answering requests in a thread
    pool): each gives the exact neighbours, only one changes torch's thread count at a
    time, and the count is the caller's again when all have ended."""

    x = tied_data(900, 8, seed=8)
    want = reference(x, x, 5, loo=True)[1]
    before = torch.get_num_threads()
    results = results_from_threads(lambda: knn(x, 5, chunk_size=64)[1])
    assert all(torch.equal(r, want) for r in results)
    assert torch.get_num_threads() == before
    # only one search changes the count at a time; another meanwhile keeps it as it is
    torch.set_num_threads(2)
    try:
        with knn_module._torch_threads(1) as changed:
            assert changed and torch.get_num_threads() == 1
            with knn_module._torch_threads(1) as changed_again:
                assert not changed_again
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
