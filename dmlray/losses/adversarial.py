"""Adversarial auxiliary loss between two embedding branches (MIC, Roth et al., ICCV 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.losses.base import PairLoss
from dmlray.losses.registry import register


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """x, with its gradient negated on the way back."""
    return _ReverseGrad.apply(x)


@register("adversarial")
class AdversarialLoss(PairLoss):
    """L = −mean_i mean_d ( x̂_i ⊙ normalize(R(ĝ_i)) )²_d, both inputs through gradient reversal.

    x is the class embedding, g the auxiliary branch's embedding, R a learnable linear
    regressor (aux_dim → proj_dim → embedding_dim) that tries to predict x from g; the
    reversed gradients push the two branches to carry different information. Paper:
    "MIC: Mining Interclass Characteristics for Improved Metric Learning", Roth et al.,
    ICCV 2019 (as in the CBML code base; weight it, e.g. 0.01, beside a main loss).

    API: the auxiliary embeddings are a keyword argument,
    ``loss(embeddings, labels, aux_embeddings=g)`` (labels are unused), or call
    ``loss.between(x, g)``. It owns the regressor (``needs_classes = True`` so the trainer
    passes ``embedding_dim``; ``num_classes`` is accepted and unused) and pairs nothing
    with references (``supports_references = False``). In a run it is a ``loss.terms`` term
    with ``head`` (x) and ``other_head`` (g) on a model with two heads (``model.heads``);
    alone (``loss.name``) the config refuses it (``trainable_alone = False``).
    """

    needs_classes = True
    supports_references = False
    trainable_alone = False

    def __init__(
        self, num_classes: int | None = None, embedding_dim: int = 512, aux_dim: int | None = None, proj_dim: int = 256
    ):
        super().__init__()
        aux_dim = embedding_dim if aux_dim is None else aux_dim
        self.regressor = nn.Sequential(nn.Linear(aux_dim, proj_dim), nn.Linear(proj_dim, embedding_dim))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
        *,
        aux_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.reject_references(embeddings, ref_embeddings)
        if aux_embeddings is None:
            raise ValueError("AdversarialLoss needs the auxiliary branch: loss(embeddings, labels, aux_embeddings=...)")
        return self.between(embeddings, aux_embeddings)

    def between(self, embeddings: torch.Tensor, aux_embeddings: torch.Tensor) -> torch.Tensor:
        """The loss between the class embeddings and the auxiliary embeddings (B, D_aux)."""
        if aux_embeddings.shape[0] != embeddings.shape[0]:
            raise ValueError("embeddings and aux_embeddings must have the same batch size")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = next(self.regressor.parameters()).dtype  # the first layer's weight
            x = F.normalize(reverse_gradient(embeddings.to(dtype)), dim=-1)
            g = F.normalize(reverse_gradient(aux_embeddings.to(dtype)), dim=-1)
            predicted = F.normalize(self.regressor(g), dim=-1)
            if x.shape[0] == 0:
                return predicted.sum() * 0.0
            return -((x * predicted) ** 2).mean(dim=1).mean()
