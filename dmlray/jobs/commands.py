"""What ``dmlray train`` and ``dmlray eval`` do, as functions (the CLI only parses)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import TYPE_CHECKING

from dmlray.config import Config, config_from_dict
from dmlray.data import storage
from dmlray.jobs.run_folder import RunFolder
from dmlray.training.checkpoints import STATE_FILE, latest_checkpoint, load_state_file

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


def results_table(result: dict) -> str:
    """The retrieval table of a result.json: the model and, when measured, raw pixels."""
    from dmlray.evaluation.metrics import format_table

    rows = {"dmlray": result["metrics"]}
    if result.get("baseline_raw_pixels"):
        rows["raw pixels (k-NN)"] = result["baseline_raw_pixels"]
    return format_table(rows, ks=result.get("ks") or (1, 2, 4, 8))


def write_training_plot(folder: RunFolder) -> str | None:
    """training.png (Recall@1 and loss against step) from metrics.jsonl."""
    history = folder.read_metrics()
    if not history:
        return None
    from dmlray.evaluation.plots import training_curves

    return folder.write_png("training.png", lambda path: training_curves(path, history))


def train_and_report(cfg: Config) -> dict:
    """Launch training, then print the results table and where everything is."""
    from dmlray.jobs.launch import launch

    result = launch(cfg)
    folder = RunFolder(cfg.run.storage_path, cfg.run.name)
    plot = write_training_plot(folder)
    print()
    print(f"Retrieval on the held-out {result['test_split']!r} classes after {result['steps']} steps:")
    print(results_table(result))
    print()
    print(f"run folder: {folder.url}")
    if plot:
        print(f"plot:       {plot}")
    for name in ("retrieval_grid.png", "recall_at_k.png"):
        if storage.exists(folder.file(name)):
            print(f"picture:    {folder.file(name)}")
    return result


def find_checkpoint(url: str) -> tuple[str, str]:
    """(checkpoint folder, run folder) from either of them; a run's latest complete checkpoint
    in the order the run wrote them (see ``dmlray.training.checkpoints.latest_checkpoint``)."""
    url = url.rstrip("/")
    if storage.exists(storage.join(url, STATE_FILE)):
        return url, url.rsplit("/", 1)[0]
    checkpoint = latest_checkpoint(url)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{url} is neither a checkpoint (no {STATE_FILE}) nor a run folder with a complete checkpoint_* folder"
        )
    return checkpoint, url


def export_embeddings(run: str, name: str, embedded: dict) -> list[str]:
    """<name>.npz (embeddings, labels, keys) and <name>.parquet beside the run, for a vector index."""
    import numpy as np

    emb = embedded["embeddings"].cpu().numpy()
    labels = embedded["labels"].cpu().numpy()
    keys = np.asarray(embedded["keys"])
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=emb, labels=labels, keys=keys)
    storage.write_bytes(storage.join(run, f"{name}.npz"), buffer.getvalue())
    written = [storage.join(run, f"{name}.npz")]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    table = pa.table({"key": keys.tolist(), "label": labels, "embedding": list(emb)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(run, f"{name}.parquet"), buffer.getvalue())
    return written + [storage.join(run, f"{name}.parquet")]


def load_checkpoint_model(run: str, checkpoint: str, data: str | None) -> tuple[Config, dict, nn.Module]:
    """(config, checkpoint state, model with the checkpoint's weights) of a run; ``data``
    replaces the config's shard root. A model with several heads embeds with
    ``model.eval_head`` (the first by default)."""
    import yaml

    from dmlray.jobs.worker import build_model

    cfg = config_from_dict(yaml.safe_load(storage.read_bytes(storage.join(run, "config.yaml"))))
    if data:
        cfg.data.url = data
    state = load_state_file(storage.join(checkpoint, STATE_FILE))  # tensors and plain values only
    model = build_model(cfg.model, cfg.data.channels)
    model.load_state_dict(state["model"])
    return cfg, state, model.view(cfg.model.eval_head)


def eval_and_report(
    path: str,
    data: str | None = None,
    split: str | None = None,
    export: bool = False,
    rerank: str | None = None,
    html: bool = False,
) -> dict:
    """Evaluate a checkpoint in this process: print the table, write eval.json, pictures and
    (with ``export``) the embeddings beside it."""
    import torch

    from dmlray.data.shards import read_manifest
    from dmlray.evaluation.report import evaluate_test, write_evaluation_pictures
    from dmlray.jobs.worker import build_transforms, test_plan

    checkpoint, run = find_checkpoint(path)
    cfg, state, model = load_checkpoint_model(run, checkpoint, data)
    split = split or cfg.data.test_split
    manifest = read_manifest(cfg.data.url)
    _, tf = build_transforms(cfg, model)
    plan = dataclasses.replace(test_plan(cfg), test_split=split)
    evaluation = evaluate_test(model, manifest, plan, tf, torch.device("cpu"), progress=True)
    result = {
        "run": cfg.run.name,
        "steps": state["step"],
        "test_split": split,
        "ks": cfg.eval.ks,
        "checkpoint": checkpoint,
        "metrics": evaluation.metrics,
    }
    if evaluation.baseline is not None:
        result["baseline_raw_pixels"] = evaluation.baseline
    if rerank:
        result["reranked"] = {"method": rerank, "metrics": reranked_scores(rerank, evaluation, cfg.eval.ks)}
    storage.write_bytes(storage.join(run, "eval.json"), json.dumps(result, indent=1).encode())
    pictures = write_evaluation_pictures(RunFolder.at(run), manifest, plan, evaluation)
    if html:
        pictures.append(write_report_page(run, cfg, manifest, plan, evaluation, result, pictures))
    print(f"Retrieval on split {split!r} of {cfg.data.url} (checkpoint {checkpoint}, step {state['step']}):")
    print(results_table(result))
    if rerank:
        from dmlray.evaluation.metrics import format_table

        print(f"re-ranked ({rerank}):")
        print(format_table({f"dmlray + {rerank}": result["reranked"]["metrics"]}, ks=cfg.eval.ks))
    print(f"wrote {storage.join(run, 'eval.json')}")
    for url in pictures:
        print(f"wrote {url}")
    if export:
        for url in export_embeddings(run, f"embeddings-{split}", evaluation.query):
            print(f"wrote {url}")
        if evaluation.gallery is not None:
            for url in export_embeddings(run, f"embeddings-{cfg.data.gallery_split}", evaluation.gallery):
                print(f"wrote {url}")
    return result


def reranked_scores(method: str, evaluation, ks: list[int]) -> dict[str, float]:
    """The test evaluation's metrics after re-ranking (α-query expansion or k-reciprocal)."""
    from dmlray.evaluation.rerank import reranked_metrics

    query, gallery = evaluation.query, evaluation.gallery
    return reranked_metrics(
        method,
        query["embeddings"],
        query["labels"],
        None if gallery is None else gallery["embeddings"],
        None if gallery is None else gallery["labels"],
        ks,
    )


def write_report_page(run: str, cfg: Config, manifest, plan, evaluation, result: dict, pictures: list[str]) -> str:
    """report.html beside the PNG pictures: metrics, the worst queries, per-class Recall@1, the grid."""
    from dmlray.evaluation.html_report import write_html_report

    metrics = {"dmlray": result["metrics"]}
    if result.get("baseline_raw_pixels"):
        metrics["raw pixels"] = result["baseline_raw_pixels"]
    if result.get("reranked"):
        metrics[f"dmlray + {result['reranked']['method']}"] = result["reranked"]["metrics"]
    return write_html_report(
        storage.join(run, "report.html"),
        title=f"{cfg.run.name}: retrieval on {plan.test_split} (step {result['steps']})",
        metrics=metrics,
        query=evaluation.query,
        gallery=evaluation.gallery,
        query_urls=manifest.shard_urls(plan.test_split),
        gallery_urls=manifest.shard_urls(plan.gallery_split) if plan.gallery_split else None,
        channels=plan.channels,
        grid_url=next((url for url in pictures if url.endswith("retrieval_grid.png")), None),
    )
