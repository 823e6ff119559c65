"""CosFace: an additive cosine margin on the target class."""

from __future__ import annotations

import torch

from dmlray.losses.margin_softmax import MarginSoftmaxLoss
from dmlray.losses.registry import register


@register("cosface")
class CosFaceLoss(MarginSoftmaxLoss):
    """L_i = −log softmax_c(s·(cos θ_{i,c} − m·[c = y_i]))[y_i]; mean over anchors.

    Paper: "CosFace: Large Margin Cosine Loss for Deep Face Recognition", Wang et al.,
    CVPR 2018. Defaults (pytorch-metric-learning's): m = 0.35, s = 64.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.35, scale: float = 64.0):
        super().__init__(num_classes, embedding_dim, margin=margin, scale=scale)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.margin
