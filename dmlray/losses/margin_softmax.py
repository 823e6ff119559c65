"""The margin-softmax family's shared part: cosine logits against normalised class weights.

ArcFace, CosFace, SphereFace, L-Softmax and their sub-centre variant differ only in how
they change the target class's cosine and how they scale the logits; the class weights,
the (B, C) cosines (the maximum over each class's sub-centres) and the cross-entropy are
computed here once. Like every classification loss they own one weight row per class
(``needs_classes``; labels are class indices in [0, num_classes)) and pairing with
references is meaningless (``supports_references = False``).

Weights are stored (num_classes · sub_centers, embedding_dim), row c·K + k for sub-centre
k of class c (pytorch-metric-learning's ``W`` transposed), initialised N(0, 1) as there.
Everything runs in float32 (float64 stays float64), whatever autocast says: scales of 64
make exponentials that half precision cannot hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.losses.base import WithinBatchLoss, class_logits_inputs


def class_cosines(embeddings: torch.Tensor, weight: torch.Tensor, sub_centers: int = 1) -> torch.Tensor:
    """(B, C) cosines of the embeddings with each class: the largest over its sub-centres."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    if sub_centers == 1:
        return cos
    return cos.view(cos.shape[0], -1, sub_centers).amax(dim=2)


class MarginSoftmaxLoss(WithinBatchLoss):
    """Base class: L_i = −log softmax_c(scale(ψ(cos θ_{i,c}) if c = y_i else cos θ_{i,c}))[y_i].

    Subclasses define ψ (``target_logit``) and may rescale the logits (``scale_logits``);
    the loss is the mean over anchors.
    """

    needs_classes = True

    def __init__(self, num_classes: int, embedding_dim: int, margin: float, scale: float, sub_centers: int = 1):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1 or sub_centers < 1:
            raise ValueError(
                f"num_classes, embedding_dim and sub_centers must be positive, got "
                f"{num_classes}, {embedding_dim}, {sub_centers}"
            )
        self.num_classes = num_classes
        self.margin = margin
        self.scale = scale
        self.sub_centers = sub_centers
        self.weight = nn.Parameter(torch.randn(num_classes * sub_centers, embedding_dim))

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """ψ(cos θ) for the target class's (B,) cosines."""
        raise NotImplementedError

    def scale_logits(self, logits: torch.Tensor, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The logits the softmax sees; by default ``scale`` times the (margined) cosines."""
        return logits * self.scale

    def cosines(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines with the classes."""
        return class_cosines(embeddings, weight, self.sub_centers)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C) logits with the margin on each anchor's own class (float32 or float64)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x, weight = class_logits_inputs(embeddings, self.weight)
            cos = self.cosines(x, weight)
            target = labels.long().unsqueeze(1)
            margined = self.target_logit(cos.gather(1, target).squeeze(1))
            return self.scale_logits(cos.scatter(1, target, margined.unsqueeze(1)), x, weight)

    def objective(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch loss from the logits: cross-entropy, mean over anchors."""
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels.long())

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must be ({embeddings.shape[0]},) to match embeddings, got {tuple(labels.shape)}")
        return self.objective(self.logits(embeddings, labels), labels)
