"""torchvision backbones: ResNet-18/34/50/101/152 and GoogLeNet, without their classifier.

Each builder returns the torchvision network itself with ``fc`` (and GoogLeNet's dropout)
replaced by ``nn.Identity`` and the average pool replaced by ``GlobalPool``, so the
backbone's state-dict keys are torchvision's minus ``fc.*``: a torchvision ImageNet
checkpoint loads as is (its ``fc.*`` / GoogLeNet ``aux1.*``/``aux2.*`` keys are ignored on
purpose), and a backbone's own state dict round-trips. Inputs are RGB images normalised
with the ImageNet mean and std, as for torchvision's weights.
"""

from __future__ import annotations

import torchvision
from torch import nn

from dmlray.models.frozen_bn import freeze_batchnorm
from dmlray.models.pooling import GlobalPool
from dmlray.models.pretrained import load_pretrained
from dmlray.models.registry import describe_backbone, register_backbone


def _finish(
    model: nn.Module, out_dim: int, pretrained: str | None, ignore: tuple[str, ...], frozen_bn: bool
) -> nn.Module:
    """Load weights, then freeze BN (after loading, so the frozen statistics are the pretrained ones)."""
    describe_backbone(model, out_dim, "rgb_imagenet")
    if pretrained:
        load_pretrained(model, pretrained, ignore_prefixes=ignore)
    if frozen_bn:
        freeze_batchnorm(model)
    return model


def _resnet(arch: str, pretrained: str | None, pooling: str, frozen_bn: bool) -> nn.Module:
    model = getattr(torchvision.models, arch)(weights=None)
    out_dim = model.fc.in_features
    model.avgpool = GlobalPool(pooling)  # ResNet.forward flattens after avgpool; (N, C) passes through
    model.fc = nn.Identity()
    return _finish(model, out_dim, pretrained, ("fc.",), frozen_bn)


@register_backbone("resnet18")
def resnet18(pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False) -> nn.Module:
    """ResNet-18, 512-d features."""
    return _resnet("resnet18", pretrained, pooling, frozen_bn)


@register_backbone("resnet34")
def resnet34(pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False) -> nn.Module:
    """ResNet-34, 512-d features."""
    return _resnet("resnet34", pretrained, pooling, frozen_bn)


@register_backbone("resnet50")
def resnet50(pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False) -> nn.Module:
    """ResNet-50, 2048-d features."""
    return _resnet("resnet50", pretrained, pooling, frozen_bn)


@register_backbone("resnet101")
def resnet101(pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False) -> nn.Module:
    """ResNet-101, 2048-d features."""
    return _resnet("resnet101", pretrained, pooling, frozen_bn)


@register_backbone("resnet152")
def resnet152(pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False) -> nn.Module:
    """ResNet-152, 2048-d features."""
    return _resnet("resnet152", pretrained, pooling, frozen_bn)


@register_backbone("googlenet")
def googlenet(
    pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False, transform_input: bool = True
) -> nn.Module:
    """GoogLeNet (Inception v1, torchvision's variant with BatchNorm), 1024-d features.

    ``transform_input=True`` (the default, as for torchvision's ImageNet weights, which were
    ported from a network trained on [-1, 1] inputs) lets the model take the same
    ImageNet-normalised RGB as the ResNets and rescale internally.
    """
    model = torchvision.models.googlenet(
        weights=None, aux_logits=False, transform_input=transform_input, init_weights=True
    )
    model.avgpool = GlobalPool(pooling)
    # features are taken before the classifier's dropout, as the DML code bases do
    model.dropout = nn.Identity()
    model.fc = nn.Identity()
    return _finish(model, 1024, pretrained, ("fc.", "aux1.", "aux2."), frozen_bn)
