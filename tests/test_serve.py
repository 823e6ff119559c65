"""After training, retrieval: one tiny glyphs run on SeaweedFS, indexed into its run folder
on S3 (exact and approximate), then served by a real Ray Serve application."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from dmlray.cli import main
from dmlray.data import storage

pytestmark = pytest.mark.slow

RUNS = "s3://dmlray-test/serve-runs"


@pytest.fixture(scope="module")
def s3_module(seaweed):
    """The SeaweedFS credentials in this process's environment for the whole module (the
    local Ray cluster started below inherits them; no runtime_env carries them)."""
    with seaweed.activated():
        yield seaweed


@pytest.fixture(scope="module")
def tiny_run(s3_module, glyphs_s3):
    """A glyphs run trained for a few seconds in local mode, its folder on S3."""
    from dmlray.devtools.ports import free_ports

    rc = main(
        [
            "train",
            "demo",
            f"data.url={glyphs_s3}",
            f"run.storage_path={RUNS}",
            "run.name=tiny",
            "run.num_workers=0",
            f"run.metrics_port={free_ports(1)[0]}",
            "train.steps=30",
            "train.eval_every=30",
            "train.log_every=10",
            "data.classes_per_batch=8",
            "data.class_buffer=16",
            "memory.size=128",
            "memory.start=10",
            "optim.milestones=[]",
        ]
    )
    assert rc == 0
    return f"{RUNS}/tiny"


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    """``dmlray eval --export`` of the run: the numbers and embeddings the index must match."""
    assert main(["eval", tiny_run, "--export"]) == 0
    result = json.loads(storage.read_bytes(f"{tiny_run}/eval.json"))
    with np.load(io.BytesIO(storage.read_bytes(f"{tiny_run}/embeddings-test.npz")), allow_pickle=False) as data:
        exported = {k: data[k] for k in data.files}
    return result, exported


def test_exact_index_on_s3_answers_what_the_evaluation_scored(tiny_run, evaluated, capsys):
    from dmlray.evaluation.index import load_index, neighbours_of_members
    from dmlray.evaluation.knn import knn
    from dmlray.evaluation.metrics import recall_at_k

    result, exported = evaluated
    assert main(["index", tiny_run, "--kind", "exact", "--no-progress"]) == 0
    assert f"wrote {tiny_run}/index-test-exact" in capsys.readouterr().out
    index = load_index(f"{tiny_run}/index-test-exact")
    assert index.meta["checkpoint"] == result["checkpoint"] and index.meta["split"] == "test"
    assert index.keys == exported["keys"].tolist()
    np.testing.assert_allclose(index.embeddings, exported["embeddings"], atol=1e-5)
    ids = np.arange(len(index))
    idx, _, _ = neighbours_of_members(index, ids, 8)
    _, ref = knn(index.embeddings, 8)  # the evaluation's leave-one-out search
    np.testing.assert_array_equal(idx, ref.numpy())
    labels = index.labels
    hits = {k: float(np.mean([(labels[idx[i, :k]] == labels[i]).any() for i in ids])) for k in (1, 2, 4, 8)}
    assert hits == pytest.approx(recall_at_k(index.embeddings, labels, ks=(1, 2, 4, 8)))
    assert hits[1] == pytest.approx(result["metrics"]["recall@1"], abs=1.5 / len(index))


def test_approximate_index_on_s3_reaches_its_reported_recall(tiny_run, capsys):
    from dmlray.evaluation.index import load_index, measure

    assert main(["index", tiny_run, "--kind", "hnsw", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "hnsw" in out and "recall@10 vs exact" in out
    index = load_index(f"{tiny_run}/index-test-hnsw")
    reported = index.meta["measured"]
    again = measure(index, k=10)
    assert again["recall@10_vs_exact"] >= reported["recall@10_vs_exact"] - 1e-9
    assert reported["recall@10_vs_exact"] > 0.9, reported
    listing = storage.list_dir(f"{tiny_run}/index-test-hnsw")
    assert listing == ["faiss.index", "gallery.npz", "index.json"]
