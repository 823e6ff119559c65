"""Embedding head and the full embedding model (backbone → head → L2 normalisation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Linear projection to the embedding size, optionally through a small MLP."""

    def __init__(self, in_dim: int, embedding_dim: int, hidden_dim: int = 0):
        super().__init__()
        self.proj: nn.Module
        if hidden_dim > 0:
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, embedding_dim)
            )
        else:
            self.proj = nn.Linear(in_dim, embedding_dim)

    def forward(self, x):
        return self.proj(x)


class EmbeddingModel(nn.Module):
    """Images → L2-normalised embeddings."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, hidden_dim: int = 0):
        super().__init__()
        self.backbone = backbone
        out_dim = backbone.out_dim
        if not isinstance(out_dim, int):
            raise TypeError(f"backbone {type(backbone).__name__} must have an integer out_dim, got {out_dim!r}")
        self.head = EmbeddingHead(out_dim, embedding_dim, hidden_dim)
        self.embedding_dim = embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def param_groups(self, backbone_lr: float, head_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: backbone at ``backbone_lr``, head at ``head_lr``
        (``backbone_lr`` when None). The DML recipes train a freshly initialised head faster
        than a pretrained backbone. Parameters without grad (frozen BatchNorm) are left out,
        so the optimizer neither holds state for them nor applies weight decay to them.
        Both groups are always returned, in this order, each with a ``name`` ("backbone",
        "head"), so schedulers and loggers can rely on their positions.
        """
        head_lr = backbone_lr if head_lr is None else head_lr
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        head_params = [p for p in self.head.parameters() if p.requires_grad]
        return [
            {"name": "backbone", "params": backbone_params, "lr": backbone_lr},
            {"name": "head", "params": head_params, "lr": head_lr},
        ]
