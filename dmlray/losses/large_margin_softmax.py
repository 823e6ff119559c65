"""L-Softmax and SphereFace: a multiplicative angular margin on the target class."""

from __future__ import annotations

import math

import torch

from dmlray.losses.margin_softmax import MarginSoftmaxLoss
from dmlray.losses.registry import register


def multiplicative_angular_margin(cos: torch.Tensor, margin: int) -> torch.Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k, k = ⌊mθ/π⌋ (monotone in θ), from c = cos θ.

    cos(mθ) = Σ_n (−1)^n C(m, 2n) c^{m−2n} (1 − c²)^n (the multiple-angle formula): a
    polynomial in c, so the gradient never goes through acos (k is piecewise constant).
    """
    c = cos.clamp(-1.0, 1.0)
    cos_m = torch.zeros_like(c)
    for n in range(margin // 2 + 1):  # m/2 + 1 terms of a polynomial, not a loop over anchors
        cos_m = cos_m + (-1) ** n * math.comb(margin, 2 * n) * c ** (margin - 2 * n) * (1.0 - c * c) ** n
    with torch.no_grad():
        k = torch.floor(torch.acos(c) / (math.pi / margin))
    return (1.0 - 2.0 * torch.remainder(k, 2)) * cos_m - 2.0 * k


@register("large_margin_softmax")
class LargeMarginSoftmaxLoss(MarginSoftmaxLoss):
    """L_i = −log softmax_c(s·‖w_c‖·‖x_i‖·(ψ(θ_{i,y_i}) on c = y_i, cos θ_{i,c} elsewhere))[y_i].

    ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m]; mean over anchors. Paper:
    "Large-Margin Softmax Loss for Convolutional Neural Networks", Liu et al., ICML 2016.
    Defaults (pytorch-metric-learning's): m = 4 (an integer), s = 1.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: int = 4, scale: float = 1.0):
        if int(margin) != margin or margin < 1:
            raise ValueError(f"margin must be a positive integer (the angle multiplier m), got {margin!r}")
        super().__init__(num_classes, embedding_dim, margin=int(margin), scale=scale)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return multiplicative_angular_margin(cos, int(self.margin))

    def scale_logits(self, logits: torch.Tensor, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return logits * weight.norm(dim=1).unsqueeze(0) * embeddings.norm(dim=1).unsqueeze(1) * self.scale


@register("sphereface")
class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """L-Softmax on normalised class weights (A-Softmax): logits s·‖x_i‖·(ψ(θ) or cos θ).

    Paper: "SphereFace: Deep Hypersphere Embedding for Face Recognition", Liu et al., CVPR
    2017. Defaults (pytorch-metric-learning's): m = 4, s = 1.
    """

    def scale_logits(self, logits: torch.Tensor, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return logits * embeddings.norm(dim=1).unsqueeze(1) * self.scale
