"""Backbones (by name) and the embedding model.

``build_backbone(name, **kwargs)`` returns an ``nn.Module`` with ``out_dim``;
``EmbeddingModel(backbone, embedding_dim)`` adds the head and L2 normalisation.
"""

from dmlray.models.head import EmbeddingHead, EmbeddingModel
from dmlray.models.registry import backbone_names, build_backbone, register_backbone

# importing a module registers its backbones
from dmlray.models import glyph_cnn  # noqa: F401

__all__ = ["EmbeddingHead", "EmbeddingModel", "backbone_names", "build_backbone", "register_backbone"]
