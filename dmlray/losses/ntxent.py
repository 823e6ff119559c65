"""NT-Xent (the normalised temperature-scaled cross-entropy of SimCLR), supervised form."""

from __future__ import annotations

import torch

from dmlray.losses.positive_pair_softmax import PositivePairSoftmaxLoss
from dmlray.losses.registry import register


@register("ntxent")
class NTXentLoss(PositivePairSoftmaxLoss):
    """L = mean over positive pairs (a, p) of −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n∈N_a} e^{s_an/τ})).

    Every same-label pair is a positive (with labels = augmentation-pair ids it is
    SimCLR's loss). Papers: "A Simple Framework for Contrastive Learning of Visual
    Representations", Chen et al., ICML 2020; also InfoNCE (van den Oord et al., 2018).
    Default (pytorch-metric-learning's): τ = 0.07.
    """

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def negative_logits(self, sim: torch.Tensor) -> torch.Tensor:
        return sim / self.temperature

    def positive_logits(self, sim: torch.Tensor) -> torch.Tensor:
        return sim / self.temperature
