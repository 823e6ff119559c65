"""timm Vision Transformers: ViT-S/16 and ViT-B/16, without their classifier.

timm is imported inside the builders, so ``dmlray.models`` imports without it (install the
``models`` extra to use these). The models are built with ``pretrained=False`` — timm never
downloads anything — and weights come from the user's URL: a timm state dict (ImageNet-21k
AugReg, DeiT, DINO, ...) loads as is, its ``head.*`` classifier ignored on purpose; timm's
own checkpoint filter adapts other layouts (OpenCLIP, DINOv2) and resamples the position
embedding when ``img_size`` differs from the checkpoint's.

The final LayerNorm stays before pooling (``fc_norm=False``) whatever the pooling, so the
checkpoints' ``norm.*`` weights keep their meaning with "avg"/"max" pooling too.
"""

from __future__ import annotations

from torch import nn

from dmlray.models.inputs import input_convention as _check_convention
from dmlray.models.pretrained import load_pretrained
from dmlray.models.registry import describe_backbone, register_backbone

# our pooling name → timm's global_pool; "token" is the class token, as in the DML ViT papers
_POOLINGS = {"token": "token", "avg": "avg", "max": "max", "avgmax": "avgmax"}


def _vit(
    arch: str,
    pretrained: str | None,
    pooling: str,
    frozen_bn: bool,
    img_size: int,
    drop_path_rate: float,
    input_convention: str,
) -> nn.Module:
    if frozen_bn:
        # a ViT has LayerNorm only; refuse rather than silently ignore a recipe's setting
        raise ValueError(f"{arch} has no BatchNorm to freeze; set frozen_bn to false")
    if pooling not in _POOLINGS:
        raise ValueError(f"{arch} pooling must be one of {', '.join(_POOLINGS)}, got {pooling!r}")
    _check_convention(input_convention)
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    model = timm.create_model(
        arch,
        pretrained=False,
        num_classes=0,  # classifier replaced by Identity: forward returns pooled features
        global_pool=_POOLINGS[pooling],
        fc_norm=False,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
    )
    if not isinstance(model, VisionTransformer):  # every vit_* architecture is one
        raise TypeError(f"timm built a {type(model).__name__} for {arch}, not a VisionTransformer")
    describe_backbone(model, int(model.num_features), input_convention)
    if pretrained:
        load_pretrained(
            model, pretrained, ignore_prefixes=("head.",), convert=lambda state: checkpoint_filter_fn(state, model)
        )
    return model


@register_backbone("vit_small_patch16_224")
def vit_small_patch16_224(
    pretrained: str | None = None,
    pooling: str = "token",
    frozen_bn: bool = False,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    input_convention: str = "rgb_imagenet",
) -> nn.Module:
    """ViT-S/16, 384-d features. ``input_convention`` labels the normalisation the weights
    expect: "rgb_imagenet" for DINO/DeiT, "rgb_inception" (mean = std = 0.5) for AugReg."""
    return _vit("vit_small_patch16_224", pretrained, pooling, frozen_bn, img_size, drop_path_rate, input_convention)


@register_backbone("vit_base_patch16_224")
def vit_base_patch16_224(
    pretrained: str | None = None,
    pooling: str = "token",
    frozen_bn: bool = False,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    input_convention: str = "rgb_imagenet",
) -> nn.Module:
    """ViT-B/16, 768-d features; arguments as for ``vit_small_patch16_224``."""
    return _vit("vit_base_patch16_224", pretrained, pooling, frozen_bn, img_size, drop_path_rate, input_convention)
