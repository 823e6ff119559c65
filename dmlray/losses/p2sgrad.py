"""P2SGrad: the mean squared error between class cosines and the one-hot labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlray.losses.margin_softmax import MarginSoftmaxLoss
from dmlray.losses.registry import register


@register("p2sgrad")
class P2SGradLoss(MarginSoftmaxLoss):
    """L = 1/(B·C) Σ_i Σ_c (cos θ_{i,c} − [c = y_i])²: its gradient is the paper's P2SGrad.

    Paper: "P2SGrad: Refined Gradients for Optimizing Deep Face Models", Zhang et al.,
    CVPR 2019. No hyper-parameters. As pytorch-metric-learning (after the authors'
    code), the class weights are projected back to unit norm at every call (an in-place
    update, not part of the graph: their gradient is the plain one of x̂·w), and weights
    start uniform in [−1, 1], renormalised.
    """

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__(num_classes, embedding_dim, margin=0.0, scale=1.0)
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self._project()

    def _project(self) -> None:
        # the authors' projection: renorm to 1e-5, times 1e5 (norm n/(n + 1e-7), not exactly 1)
        with torch.no_grad():
            self.weight.copy_(self.weight.renorm(2, 0, 1e-5).mul(1e5))

    def cosines(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (F.normalize(embeddings, dim=1) @ weight.T).clamp(-1.0, 1.0)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._project()
        return super().logits(embeddings, labels)

    def objective(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        target = F.one_hot(labels.long(), self.num_classes).to(logits.dtype)
        return F.mse_loss(logits, target)
