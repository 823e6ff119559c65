"""ArcFace and its sub-centre variant: an additive angular margin on the target class."""

from __future__ import annotations

import math

import torch

from dmlray.losses.margin_softmax import MarginSoftmaxLoss
from dmlray.losses.registry import register


def additive_angular_margin(cos: torch.Tensor, margin_rad: float) -> torch.Tensor:
    """cos(θ + m) where θ + m ≤ π, else cos θ − m·sin m (keeps ψ decreasing in θ).

    Computed as c·cos m − sin θ·sin m with sin θ = sqrt(1 − c²): no acos, whose gradient
    is infinite at c = ±1 (sin θ is clamped away from 0 for the same reason).
    """
    c = cos.clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - c * c).clamp(min=1e-12))
    plus_margin = c * math.cos(margin_rad) - sin * math.sin(margin_rad)
    # θ ≤ π − m  ⟺  c ≥ cos(π − m) = −cos m
    return torch.where(c >= -math.cos(margin_rad), plus_margin, c - margin_rad * math.sin(margin_rad))


@register("arcface")
class ArcFaceLoss(MarginSoftmaxLoss):
    """L_i = −log softmax_c(s·(cos(θ_{i,y_i} + m) on c = y_i, cos θ_{i,c} elsewhere))[y_i]; mean over anchors.

    Paper: "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", Deng et al.,
    CVPR 2019. Defaults (pytorch-metric-learning's): m = 28.6° (``margin`` in degrees,
    0.5 rad), s = 64; past θ = π − m the target logit is cos θ − m·sin m.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 28.6, scale: float = 64.0):
        super().__init__(num_classes, embedding_dim, margin=margin, scale=scale)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return additive_angular_margin(cos, math.radians(self.margin))


@register("subcenter_arcface")
class SubCenterArcFaceLoss(ArcFaceLoss):
    """ArcFace with K sub-centres per class: cos θ_{i,c} = max_k cos(x_i, w_c^k).

    Paper: "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
    Faces", Deng et al., ECCV 2020. Defaults (pytorch-metric-learning's): K = 3,
    m = 28.6°, s = 64. (PML's ``get_outliers`` — dropping samples far from their dominant
    sub-centre — is a data-cleaning step, not part of the loss, and is not provided.)
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: float = 28.6, scale: float = 64.0, sub_centers: int = 3
    ):
        MarginSoftmaxLoss.__init__(self, num_classes, embedding_dim, margin, scale, sub_centers=sub_centers)
