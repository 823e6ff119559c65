"""Input conventions: how a backbone's pretrained weights expect pixels to arrive.

Every backbone carries ``input_convention``, a name in ``INPUT_CONVENTIONS``, so the data
pipeline can prepare images to match: torchvision weights take ImageNet-normalised RGB,
timm's AugReg ViTs mean = std = 0.5 RGB, and the converted Caffe BN-Inception BGR pixels
in [0, 255] minus a per-channel mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class InputConvention:
    """``(pixel · scale − mean) / std`` per channel, in ``order`` ("RGB" or "BGR")."""

    order: str  # channel order the network expects
    scale: float  # 1.0 for [0, 1] pixels, 255.0 for [0, 255]
    mean: tuple[float, float, float]  # in the network's channel order and pixel scale
    std: tuple[float, float, float]

    def from_rgb(
        self,
        images: torch.Tensor,
        rgb_mean: Sequence[float] | None = None,
        rgb_std: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Convert (N, 3, H, W) RGB images in [0, 1] to this convention.

        If the images were already normalised as ``(x − rgb_mean) / rgb_std`` (e.g. by a
        torchvision ``Normalize``), pass those values and the normalisation is undone first.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
        if (rgb_mean is None) != (rgb_std is None):
            raise ValueError("give both rgb_mean and rgb_std, or neither")
        x = images
        if rgb_mean is not None and rgb_std is not None:
            x = x * _channels(rgb_std, x) + _channels(rgb_mean, x)
        if self.order == "BGR":
            x = x.flip(1)
        return (x * self.scale - _channels(self.mean, x)) / _channels(self.std, x)


def _channels(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


INPUT_CONVENTIONS: dict[str, InputConvention] = {
    "rgb_imagenet": InputConvention(order="RGB", scale=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "rgb_inception": InputConvention(order="RGB", scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # Caffe BN-Inception as converted by Cadene's pretrainedmodels and used by the MS-loss
    # and CBML code bases: BGR, [0, 255], mean (B, G, R) = (104, 117, 128), no std scaling
    "bgr255": InputConvention(order="BGR", scale=255.0, mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0)),
}


def input_convention(name: str) -> InputConvention:
    """The convention registered as ``name``; an unknown name lists the known ones."""
    if name not in INPUT_CONVENTIONS:
        raise ValueError(f"unknown input convention {name!r}; known: {', '.join(INPUT_CONVENTIONS)}")
    return INPUT_CONVENTIONS[name]
