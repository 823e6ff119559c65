"""SoftTriple loss (Qian et al., ICCV 2019): K learnable centres per class.

Centres replace the references, so ``supports_references = False`` (references other than
the anchors themselves raise ValueError). Labels are class indices in [0, num_classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.losses.base import WithinBatchLoss, class_logits_inputs
from dmlray.losses.registry import register


@register("softtriple")
class SoftTripleLoss(WithinBatchLoss):
    """L = CE(λ(S_i,c − δ·[c = y_i]), y_i) + τ·R,  S_i,c = Σ_k softmax_k(x_i·w_c^k / γ) x_i·w_c^k.

    R = Σ_c Σ_{k<k'} sqrt(2 + 1e-5 − 2 w_c^k·w_c^{k'}) / (C·K·(K−1)) pulls a class's
    centres together (only when τ > 0 and K > 1). Paper: "SoftTriple Loss: Deep Metric
    Learning Without Triplet Sampling", Qian et al., ICCV 2019. Defaults (CBML code base):
    λ = 20, γ = 0.1, τ = 0.2, δ = 0.01, K = 2; centres Kaiming-uniform as there, stored
    (D, C·K) with centre k of class c in column c·K + k.
    """

    needs_classes = True

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        centers_per_class: int = 2,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = gamma
        self.tau = tau
        self.margin = margin
        self.fc = nn.Parameter(torch.empty(embedding_dim, num_classes * centers_per_class))
        nn.init.kaiming_uniform_(self.fc, a=math.sqrt(5))

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, fc = class_logits_inputs(embeddings, self.fc)
        centers = F.normalize(fc, dim=0)
        per_center = (x @ centers).view(-1, self.num_classes, self.centers_per_class)
        weight = F.softmax(per_center / self.gamma, dim=2)
        per_class = (weight * per_center).sum(dim=2)
        margin = F.one_hot(labels.long(), self.num_classes).to(per_class.dtype) * self.margin
        loss = F.cross_entropy(self.la * (per_class - margin), labels.long()) if x.shape[0] else per_class.sum() * 0.0
        if self.tau > 0 and self.centers_per_class > 1:
            loss = loss + self.tau * self._center_spread(centers)
        return loss

    def _center_spread(self, centers: torch.Tensor) -> torch.Tensor:
        k = self.centers_per_class
        grouped = centers.T.reshape(self.num_classes, k, -1)
        gram = grouped @ grouped.transpose(1, 2)  # (C, K, K): centres of one class
        upper = torch.ones(k, k, dtype=torch.bool, device=gram.device).triu(diagonal=1)
        dist = torch.sqrt(2.0 + 1e-5 - 2.0 * gram[:, upper])
        return dist.sum() / (self.num_classes * k * (k - 1.0))
