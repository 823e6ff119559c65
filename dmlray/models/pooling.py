"""Global pooling of a feature map to one vector per image, chosen by name."""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("avg", "max", "avgmax")


class GlobalPool(nn.Module):
    """(N, C, H, W) → (N, C) by global average, global max, or their sum ("avgmax").

    "avgmax" adds the two poolings rather than concatenating them, so the feature size stays
    ``C`` and pretrained heads and ``out_dim`` are unchanged; this is how the DML recipes
    (e.g. Proxy-Anchor's ResNet/BN-Inception code) combine them.
    """

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
