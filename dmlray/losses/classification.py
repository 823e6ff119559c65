"""Classification-style losses: normalised softmax cross-entropy and centre loss.

Both own one parameter row per class (``needs_classes``); labels are class indices in
[0, num_classes). Pairing with references is meaningless for them:
``supports_references = False`` and references other than the anchors raise ValueError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.losses.base import WithinBatchLoss, class_logits_inputs
from dmlray.losses.registry import register


@register("cross_entropy")
class NormalizedSoftmaxLoss(WithinBatchLoss):
    """L_i = −log softmax_c(x_i·ŵ_c / T)[y_i]; mean over anchors (ŵ_c: normalised class weights).

    Paper: "Classification is a Strong Baseline for Deep Metric Learning", Zhai & Wu,
    BMVC 2019 (the CBML code base's cross-entropy on a normalised classifier).
    Default: T = 0.05; weights initialised N(0, 1).
    """

    needs_classes = True

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim))

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) scaled cosines with the class weights."""
        x, weight = class_logits_inputs(embeddings, self.weight)
        return x @ F.normalize(weight, dim=1).T / self.temperature

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits(embeddings)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels.long())


@register("center")
class CenterLoss(WithinBatchLoss):
    """L_i = ‖x_i − c_{y_i}‖²; mean over anchors (learnable centres c).

    Paper: "A Discriminative Feature Learning Approach for Deep Face Recognition", Wen et
    al., ECCV 2016; usually an auxiliary term beside a classification loss. As in the CBML
    code base: no ½, centres initialised N(0, 1), and updated by the optimiser (not the
    paper's moving average).
    """

    needs_classes = True

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim))

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, centers = class_logits_inputs(embeddings, self.centers)
        diff = x - centers[labels.long()]
        return (diff * diff).sum() / max(x.shape[0], 1)
