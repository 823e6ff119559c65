"""Embedding heads and the full embedding model (backbone → head(s) → L2 normalisation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class HeadSpec:
    """One head of a model with several: its name, embedding size and MLP width (0 = linear)."""

    name: str
    dim: int
    hidden_dim: int = 0


class EmbeddingModel(nn.Module):
    """Images → L2-normalised embeddings, of one head or of several side by side.

    With several heads (``heads``) the output is the concatenation of every head's own
    L2-normalised embedding, in order (``columns(name)`` says where each lies); the
    first head keeps the single-head model's parameter names (``head.*``), the others
    live in ``extra_heads``, so a one-head checkpoint loads unchanged. ``view(name)``
    embeds with one head only (evaluation, indexing, serving).
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, hidden_dim: int = 0, *, heads: Sequence[HeadSpec] = ()):
        super().__init__()
        self.backbone = backbone
        out_dim = backbone.out_dim
        if not isinstance(out_dim, int):
            raise TypeError(f"backbone {type(backbone).__name__} must have an integer out_dim, got {out_dim!r}")
        specs = tuple(heads) or (HeadSpec("embedding", embedding_dim, hidden_dim),)
        if len({s.name for s in specs}) != len(specs):
            raise ValueError(f"head names must differ, got {[s.name for s in specs]}")
        self.head_specs = specs
        self.head = EmbeddingHead(out_dim, specs[0].dim, specs[0].hidden_dim)
        if len(specs) > 1:
            self.extra_heads = nn.ModuleDict({s.name: EmbeddingHead(out_dim, s.dim, s.hidden_dim) for s in specs[1:]})
        self.embedding_dim = sum(s.dim for s in specs)  # the width of the output (all heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        first = F.normalize(self.head(features), dim=1)
        if len(self.head_specs) == 1:
            return first
        rest = [F.normalize(head(features), dim=1) for head in self.extra_heads.values()]
        return torch.cat([first, *rest], dim=1)

    def columns(self, name: str = "") -> slice:
        """The output columns of head ``name`` (empty = the first head)."""
        start = 0
        for spec in self.head_specs:
            if spec.name == (name or self.head_specs[0].name):
                return slice(start, start + spec.dim)
            start += spec.dim
        raise KeyError(f"unknown head {name!r}; heads: {', '.join(s.name for s in self.head_specs)}")

    def view(self, name: str = "") -> nn.Module:
        """The model embedding with one head: itself when it has one head, else a HeadView."""
        if len(self.head_specs) == 1:
            self.columns(name)  # an unknown name is still an error
            return self
        return HeadView(self, self.columns(name))

    def param_groups(self, backbone_lr: float, head_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: backbone at ``backbone_lr``, head(s) at ``head_lr``
        (``backbone_lr`` when None). The DML recipes train a freshly initialised head faster
        than a pretrained backbone. Parameters without grad (frozen BatchNorm) are left out,
        so the optimizer neither holds state for them nor applies weight decay to them.
        Both groups are always returned, in this order, each with a ``name`` ("backbone",
        "head"), so schedulers and loggers can rely on their positions.
        """
        head_lr = backbone_lr if head_lr is None else head_lr
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [self.head, *(self.extra_heads.values() if len(self.head_specs) > 1 else [])]
        head_params = [p for head in heads for p in head.parameters() if p.requires_grad]
        return [
            {"name": "backbone", "params": backbone_params, "lr": backbone_lr},
            {"name": "head", "params": head_params, "lr": head_lr},
        ]


class HeadView(nn.Module):
    """One head's embeddings of a multi-head EmbeddingModel (its columns of the output)."""

    def __init__(self, model: EmbeddingModel, columns: slice):
        super().__init__()
        self.model = model
        self.cols = columns
        self.embedding_dim = columns.stop - columns.start

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone  # the input convention lives there (build_transforms)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[:, self.cols].contiguous()
