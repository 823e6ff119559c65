"""What ``dmlray train`` and ``dmlray eval`` do, as functions (the CLI only parses)."""

from __future__ import annotations

import json
import logging

import torch

from dmlray.config import Config, config_from_dict
from dmlray.data import storage
from dmlray.runfolder import RunFolder

log = logging.getLogger(__name__)


def results_table(result: dict) -> str:
    """The retrieval table of a result.json: the model and, when measured, raw pixels."""
    from dmlray.evaluate import format_table

    rows = {"dmlray": result["metrics"]}
    if result.get("baseline_raw_pixels"):
        rows["raw pixels (k-NN)"] = result["baseline_raw_pixels"]
    return format_table(rows, ks=result.get("ks") or (1, 2, 4, 8))


def write_training_plot(folder: RunFolder) -> str | None:
    """training.png (Recall@1 and loss against step) from metrics.jsonl."""
    history = folder.read_metrics()
    if not history:
        return None
    from dmlray.plots import training_curves

    return folder.write_png("training.png", lambda path: training_curves(path, history))


def train_and_report(cfg: Config) -> dict:
    """Launch training, then print the results table and where everything is."""
    from dmlray.launch import launch

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
    return result


def find_checkpoint(url: str) -> tuple[str, str]:
    """(checkpoint folder, run folder) from either of them; the latest checkpoint of a run."""
    url = url.rstrip("/")
    if storage.exists(storage.join(url, "state.pt")):
        return url, url.rsplit("/", 1)[0]
    checkpoints = [n for n in storage.list_dir(url) if n.startswith("checkpoint_")]
    if not checkpoints:
        raise FileNotFoundError(f"{url} is neither a checkpoint (no state.pt) nor a run folder with checkpoint_* folders")
    return storage.join(url, sorted(checkpoints)[-1]), url


def eval_and_report(path: str, data: str | None = None, split: str | None = None) -> dict:
    """Evaluate a checkpoint in this process: print the table, write eval.json beside it."""
    import io

    from dmlray.data.shards import read_manifest
    from dmlray.data.transforms import ImageTransform
    from dmlray.extract import embed_split, score
    from dmlray.worker import build_model

    checkpoint, run = find_checkpoint(path)
    import yaml

    cfg = config_from_dict(yaml.safe_load(storage.read_bytes(storage.join(run, "config.yaml"))))
    if data:
        cfg.data.url = data
    split = split or cfg.data.test_split
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(checkpoint, "state.pt"))), map_location="cpu", weights_only=False)
    model = build_model(cfg.model, cfg.data.channels)
    model.load_state_dict(state["model"])
    manifest = read_manifest(cfg.data.url)
    tf = ImageTransform(cfg.data.image_size, cfg.data.channels, train=False)
    device = torch.device("cpu")
    query = embed_split(model, manifest.shard_urls(split), tf, cfg.data.eval_batch_size, device,
                        expected=manifest.num_samples(split), pixels=cfg.eval.baseline)
    gallery = None
    if cfg.data.gallery_split:
        gallery = embed_split(model, manifest.shard_urls(cfg.data.gallery_split), tf, cfg.data.eval_batch_size, device,
                              expected=manifest.num_samples(cfg.data.gallery_split), pixels=cfg.eval.baseline)
    result = {"run": cfg.run.name, "steps": state["step"], "test_split": split, "ks": cfg.eval.ks,
              "checkpoint": checkpoint, "metrics": score(query, cfg.eval.ks, gallery)}
    if cfg.eval.baseline:
        result["baseline_raw_pixels"] = score(query, cfg.eval.ks, gallery, key="pixels")
    storage.write_bytes(storage.join(run, "eval.json"), json.dumps(result, indent=1).encode())
    print(f"Retrieval on split {split!r} of {cfg.data.url} (checkpoint {checkpoint}, step {state['step']}):")
    print(results_table(result))
    print(f"wrote {storage.join(run, 'eval.json')}")
    return result
