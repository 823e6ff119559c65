"""A small CNN for the built-in glyphs dataset (32×32 grey images); trains in minutes on a CPU."""

from __future__ import annotations

import itertools

from torch import nn

from dmlray.models.registry import register_backbone


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"glyph_cnn norm must be batch, group or none, got {kind!r}")


class GlyphCNN(nn.Module):
    """Four conv blocks (32→64→128→128 channels), global average pool; out_dim = width·4."""

    def __init__(self, in_channels: int = 1, width: int = 32, norm: str = "batch"):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(chans)):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
                _norm(norm, cout),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


@register_backbone("glyph_cnn")
def glyph_cnn(in_channels: int = 1, width: int = 32, norm: str = "batch", pretrained: str | None = None) -> GlyphCNN:
    if pretrained:
        raise ValueError("glyph_cnn has no pretrained weights; leave model.pretrained empty")
    return GlyphCNN(in_channels=in_channels, width=width, norm=norm)
