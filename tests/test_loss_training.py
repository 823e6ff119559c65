"""Training sanity: every pair loss, trained briefly on glyphs, beats the untrained network
on the held-out classes (Recall@1), through the real worker (stream, trainer, evaluation)."""

from __future__ import annotations

import pytest
import torch

from dmlray import losses
from dmlray.config import load_config
from dmlray.data.shards import read_manifest
from dmlray.data.transforms import ImageTransform
from dmlray.evaluation.embedding import embed_split, score
from dmlray.jobs.worker import WorkerContext, build_model, run_worker

pytestmark = pytest.mark.slow

PAIR_LOSSES = [n for n in losses.names() if losses.loss_class(n).supports_references]


def config(data_url: str, loss: str):
    return load_config(
        "demo",
        [
            f"data.url={data_url}",
            f"loss.name={loss}",
            "loss.params={}",
            "run.num_workers=0",
            "train.steps=60",
            "train.eval_every=60",
            "train.log_every=60",
            "data.classes_per_batch=8",
            "data.class_buffer=16",
            "memory.size=0",
            "optim.milestones=[]",
            "eval.baseline=false",
        ],
    )


@pytest.fixture(scope="module")
def untrained_recall(glyphs_small):
    cfg = config(glyphs_small, "multi_similarity")
    torch.manual_seed(cfg.train.seed)  # the same initial weights run_worker starts from
    model = build_model(cfg.model, cfg.data.channels)
    manifest = read_manifest(glyphs_small)
    embedded = embed_split(
        model, manifest.shard_urls("test"), ImageTransform(32, 1, train=False), 256, torch.device("cpu")
    )
    return score(embedded, [1], nmi=False)["recall@1"]


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_pair_loss_improves_held_out_recall(glyphs_small, untrained_recall, loss):
    torch.set_num_threads(1)
    final = run_worker(config(glyphs_small, loss), WorkerContext())
    assert final["step"] == 60
    assert final["recall@1"] > untrained_recall + 0.03, (
        f"{loss}: {final['recall@1']:.3f} vs untrained {untrained_recall:.3f}"
    )
