"""What ``dmlray train`` and ``dmlray eval`` do, as functions (the CLI only parses)."""

from __future__ import annotations

import io
import json
import logging

from dmlray.config import Config, config_from_dict
from dmlray.data import storage
from dmlray.jobs.run_folder import RunFolder
from dmlray.training.checkpoints import STATE_FILE, latest_checkpoint, load_state_file

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


def eval_and_report(
    path: str, data: str | None = None, split: str | None = None, export: bool = False, rerank: str | None = None
) -> dict:
    """Evaluate a checkpoint in this process: print the table, write eval.json, pictures and
    (with ``export``) the embeddings beside it."""
    from dmlray.data.shards import read_manifest
    from dmlray.evaluation.embedding import embed_split, score
    from dmlray.jobs.worker import build_model, build_transforms

    checkpoint, run = find_checkpoint(path)
    import yaml

    cfg = config_from_dict(yaml.safe_load(storage.read_bytes(storage.join(run, "config.yaml"))))
    if data:
        cfg.data.url = data
    split = split or cfg.data.test_split
    state = load_state_file(storage.join(checkpoint, STATE_FILE))  # tensors and plain values only
    model = build_model(cfg.model, cfg.data.channels)
    model.load_state_dict(state["model"])
    manifest = read_manifest(cfg.data.url)
    _, tf = build_transforms(cfg, model)
    import torch

    device = torch.device("cpu")
    query = embed_split(
        model,
        manifest.shard_urls(split),
        tf,
        cfg.data.eval_batch_size,
        device,
        expected=manifest.num_samples(split),
        pixels=cfg.eval.baseline,
        progress=True,
        checksums=manifest.shard_checksums(split),
    )
    gallery = None
    if cfg.data.gallery_split:
        gallery = embed_split(
            model,
            manifest.shard_urls(cfg.data.gallery_split),
            tf,
            cfg.data.eval_batch_size,
            device,
            expected=manifest.num_samples(cfg.data.gallery_split),
            pixels=cfg.eval.baseline,
            progress=True,
            checksums=manifest.shard_checksums(cfg.data.gallery_split),
        )
    result = {
        "run": cfg.run.name,
        "steps": state["step"],
        "test_split": split,
        "ks": cfg.eval.ks,
        "checkpoint": checkpoint,
        "metrics": score(query, cfg.eval.ks, gallery),
    }
    if cfg.eval.baseline:
        result["baseline_raw_pixels"] = score(query, cfg.eval.ks, gallery, key="pixels")
    if rerank:
        from dmlray.evaluation.rerank import reranked_metrics

        result["reranked"] = {
            "method": rerank,
            "metrics": reranked_metrics(
                rerank,
                query["embeddings"],
                query["labels"],
                None if gallery is None else gallery["embeddings"],
                None if gallery is None else gallery["labels"],
                cfg.eval.ks,
            ),
        }
    storage.write_bytes(storage.join(run, "eval.json"), json.dumps(result, indent=1).encode())
    from dmlray.evaluation.pictures import write_pictures

    folder = RunFolder.at(run)
    pictures = write_pictures(
        folder,
        query,
        gallery,
        manifest.shard_urls(split),
        manifest.shard_urls(cfg.data.gallery_split) if cfg.data.gallery_split else None,
        cfg.data.channels,
        {"dmlray": result["metrics"], "raw pixels": result.get("baseline_raw_pixels") or {}},
    )
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
        for url in export_embeddings(run, f"embeddings-{split}", query):
            print(f"wrote {url}")
        if gallery is not None:
            for url in export_embeddings(run, f"embeddings-{cfg.data.gallery_split}", gallery):
                print(f"wrote {url}")
    return result
