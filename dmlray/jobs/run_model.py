"""A trained run's model, ready to embed: config, weights of its latest checkpoint, eval transform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dmlray.config import Config


@dataclass
class RunModel:
    """What embedding with a run needs, and where it came from."""

    cfg: Config
    """the run's resolved configuration (config.yaml)"""
    model: torch.nn.Module
    """the embedding model in eval mode, with the checkpoint's weights"""
    transform: Any
    """the evaluation transform: encoded image bytes -> input tensor"""
    run: str
    """the run folder URL"""
    checkpoint: str
    """the checkpoint folder URL the weights came from"""
    step: int
    """the training step of that checkpoint"""


def load_run_model(path: str, device: torch.device | None = None) -> RunModel:
    """The model of a run folder (its latest complete checkpoint) or of one checkpoint folder.

    Weights are read with ``weights_only`` (``load_state_file``): nothing read runs code.
    """
    from dmlray.jobs.commands import find_checkpoint, load_checkpoint_model
    from dmlray.jobs.worker import build_transforms

    checkpoint, run = find_checkpoint(path)
    cfg, state, model = load_checkpoint_model(run, checkpoint, None)
    model.eval().to(device or torch.device("cpu"))
    _, transform = build_transforms(cfg, model)
    return RunModel(cfg, model, transform, run, checkpoint, int(state["step"]))
