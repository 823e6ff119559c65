"""BN-Inception (Ioffe & Szegedy, 2015), the backbone of most pre-2020 DML papers.

Not in torchvision. This is the Caffe network as converted by Cadene's ``pretrainedmodels``
(``bn_inception-52deb4733.pth``) and used by the MS-loss, XBM and CBML code bases:
conv1 7×7/2 (64) → max pool → conv2 1×1 (64) + 3×3 (192) → max pool → inception 3a, 3b,
3c (stride 2), 4a–4d, 4e (stride 2), 5a, 5b → global pooling → 1024-d.

Layer names follow that conversion exactly (``conv1_7x7_s2``, ``inception_3a_1x1_bn``, ...;
convolutions keep their Caffe biases), so the converted checkpoint loads as is; its
``last_linear.*`` classifier is ignored on purpose, and its BatchNorm tensors, stored with
a leading singleton dimension, are squeezed (the DML code bases squeeze or ``copy_`` them).
BatchNorm keeps PyTorch's momentum 0.1: the conversion's 0.9 is Caffe's convention
mistranslated, and would replace the running statistics at almost every step.

Inputs follow the Caffe convention: BGR, pixels in [0, 255], minus the per-channel mean
(104, 117, 128) — ``input_convention = "bgr255"``. Build with ``rgb_input=True`` to feed
ImageNet-normalised RGB like the other backbones; the model then converts internally.

Sizes: as in Caffe, the stride-2 blocks concatenate a convolution (floor) with a ceil-mode
max pool, which agree only when the map entering 3c and 4e has an even side: inputs of
224, 227 and 256 work (and 64 for tests); 299 does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.models.frozen_bn import freeze_batchnorm
from dmlray.models.inputs import IMAGENET_MEAN, IMAGENET_STD, INPUT_CONVENTIONS
from dmlray.models.pooling import GlobalPool
from dmlray.models.pretrained import load_pretrained
from dmlray.models.registry import register_backbone

# name, in, #1x1, #3x3 reduce, #3x3, #double-3x3 reduce, #double-3x3, pool, #pool proj.
# #1x1 == 0 marks the stride-2 blocks (3c, 4e): no 1x1 branch, and the max pool passes
# its input through unprojected.
_BLOCKS = (
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    ("3c", 320, 0, 128, 160, 64, 96, "max", 0),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    ("4e", 608, 0, 128, 192, 192, 256, "max", 0),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


class BNInception(nn.Module):
    """BN-Inception feature extractor: (N, 3, H, W) → (N, 1024). See the module docstring."""

    out_dim = 1024

    def __init__(self, pooling: str = "avg", rgb_input: bool = False):
        super().__init__()
        self.rgb_input = rgb_input
        self.input_convention = "rgb_imagenet" if rgb_input else "bgr255"
        self._unit("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self._unit("conv2_3x3_reduce", 64, 64, 1)
        self._unit("conv2_3x3", 64, 192, 3, padding=1)
        for name, cin, n1, n3r, n3, nd3r, nd3, _pool, nproj in _BLOCKS:
            p = f"inception_{name}_"
            stride = 1 if n1 else 2
            if n1:
                self._unit(p + "1x1", cin, n1, 1)
            self._unit(p + "3x3_reduce", cin, n3r, 1)
            self._unit(p + "3x3", n3r, n3, 3, stride=stride, padding=1)
            self._unit(p + "double_3x3_reduce", cin, nd3r, 1)
            self._unit(p + "double_3x3_1", nd3r, nd3, 3, padding=1)
            self._unit(p + "double_3x3_2", nd3, nd3, 3, stride=stride, padding=1)
            if nproj:
                self._unit(p + "pool_proj", cin, nproj, 1)
        self.global_pool = GlobalPool(pooling)
        self._init_weights()

    def _unit(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        # flat attributes named like the Caffe layers, so the converted state dict matches
        self.add_module(name, nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding))
        self.add_module(name + "_bn", nn.BatchNorm2d(cout))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:  # every conv here has one
                    nn.init.zeros_(m.bias)

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)), inplace=True)

    def _block(self, spec: tuple, x: torch.Tensor) -> torch.Tensor:
        name, _cin, n1, _n3r, _n3, _nd3r, _nd3, pool, nproj = spec
        p = f"inception_{name}_"
        branches = [self._run(p + "1x1", x)] if n1 else []
        branches.append(self._run(p + "3x3", self._run(p + "3x3_reduce", x)))
        double = self._run(p + "double_3x3_1", self._run(p + "double_3x3_reduce", x))
        branches.append(self._run(p + "double_3x3_2", double))
        if not n1:  # stride-2 block: the pooled input itself is the last branch
            branches.append(F.max_pool2d(x, 3, stride=2, ceil_mode=True))
        else:
            if pool == "avg":
                pooled = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
            else:
                pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
            branches.append(self._run(p + "pool_proj", pooled))
        return torch.cat(branches, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rgb_input:
            x = INPUT_CONVENTIONS["bgr255"].from_rgb(x, IMAGENET_MEAN, IMAGENET_STD)
        x = F.max_pool2d(self._run("conv1_7x7_s2", x), 3, stride=2, ceil_mode=True)
        x = self._run("conv2_3x3", self._run("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for spec in _BLOCKS:
            x = self._block(spec, x)
        return self.global_pool(x)


def bgr255_from_rgb(
    images: torch.Tensor, rgb_mean: Sequence[float] | None = None, rgb_std: Sequence[float] | None = None
) -> torch.Tensor:
    """RGB images in [0, 1] (optionally normalised with ``rgb_mean``/``rgb_std``, which is
    then undone) → BN-Inception's input: BGR in [0, 255] minus (104, 117, 128)."""
    return INPUT_CONVENTIONS["bgr255"].from_rgb(images, rgb_mean, rgb_std)


def squeeze_caffe_shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the leading singleton dimension of 2-d ``(1, C)`` tensors (the converted
    checkpoint's BatchNorm parameters and statistics); other tensors pass unchanged."""
    return {k: v[0] if v.ndim == 2 and v.shape[0] == 1 and "_bn." in k else v for k, v in state.items()}


@register_backbone("bn_inception")
def bn_inception(
    pretrained: str | None = None, pooling: str = "avg", frozen_bn: bool = False, rgb_input: bool = False
) -> BNInception:
    """BN-Inception, 1024-d features; ``pretrained`` is e.g. the converted Caffe checkpoint
    ``bn_inception-52deb4733.pth`` at a local path or s3:// URL."""
    model = BNInception(pooling=pooling, rgb_input=rgb_input)
    if pretrained:
        load_pretrained(model, pretrained, ignore_prefixes=("last_linear.", "fc."), convert=squeeze_caffe_shapes)
    if frozen_bn:  # after loading, so the frozen statistics are the pretrained ones
        freeze_batchnorm(model)
    return model
