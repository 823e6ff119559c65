"""Embedding head and the full embedding model (backbone → head → L2 normalisation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Linear projection to the embedding size, optionally through a small MLP."""

    def __init__(self, in_dim: int, embedding_dim: int, hidden_dim: int = 0):
        super().__init__()
        if hidden_dim > 0:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, embedding_dim))
        else:
            self.proj = nn.Linear(in_dim, embedding_dim)

    def forward(self, x):
        return self.proj(x)


class EmbeddingModel(nn.Module):
    """Images → L2-normalised embeddings."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, hidden_dim: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(backbone.out_dim, embedding_dim, hidden_dim)
        self.embedding_dim = embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)
