"""Backbones (by name) and the embedding model.

``build_backbone(name, **kwargs)`` returns an ``nn.Module`` with ``out_dim``;
``EmbeddingModel(backbone, embedding_dim)`` adds the head and L2 normalisation (or
several heads: ``heads=[HeadSpec(...), ...]``; ``view(name)`` embeds with one).
"""

# importing a module registers its backbones
from dmlray.models import (  # noqa: F401
    bn_inception,
    glyph_cnn,  # noqa: F401
    torchvision_backbones,
    vit,
)
from dmlray.models.frozen_bn import freeze_batchnorm
from dmlray.models.head import EmbeddingHead, EmbeddingModel, HeadSpec, HeadView
from dmlray.models.inputs import INPUT_CONVENTIONS, input_convention
from dmlray.models.pooling import GlobalPool
from dmlray.models.pretrained import StateDictMismatchError, load_pretrained, load_state_dict_from_url
from dmlray.models.registry import backbone_names, build_backbone, register_backbone

__all__ = [
    "EmbeddingHead",
    "EmbeddingModel",
    "GlobalPool",
    "HeadSpec",
    "HeadView",
    "INPUT_CONVENTIONS",
    "StateDictMismatchError",
    "backbone_names",
    "build_backbone",
    "freeze_batchnorm",
    "input_convention",
    "load_pretrained",
    "load_state_dict_from_url",
    "register_backbone",
]
