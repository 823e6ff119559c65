"""Losses that are a mean over positive pairs of log(1 + Σ_n e^{ℓ_an − ℓ_ap}).

Each positive pair (a, p) is scored against all the negatives of its anchor:
softplus(log Σ_{n∈N_a} e^{ℓ(s_an)} − ℓ⁺(s_ap)). The negatives' log-sum-exp is shared by
all positives of an anchor, so a row costs O(M), not O(|P_a|·|N_a|): NT-Xent and the
tuplet margin loss differ only in the logits ℓ and ℓ⁺.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlray.losses.base import Pairs, masked_logsumexp
from dmlray.losses.rowwise import RowwiseLoss


class PositivePairSoftmaxLoss(RowwiseLoss):
    """Base class: mean over positive pairs (a, p) of softplus(LSE_{n∈N_a} ℓ(s_an) − ℓ⁺(s_ap)).

    A pair whose anchor has no negative contributes 0 and still counts in the mean (as in
    pytorch-metric-learning, whose MeanReducer averages over the positive pairs).
    """

    pair_mean = True  # a mean over positive pairs: distributed steps normalise by the global count

    def negative_logits(self, sim: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """ℓ(s) of the negatives."""
        raise NotImplementedError

    def positive_logits(self, sim: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """ℓ⁺(s) of the positives."""
        raise NotImplementedError

    def per_anchor(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        neg_lse, has_neg = masked_logsumexp(self.negative_logits(pairs.sim), pairs.neg)
        per_pair = F.softplus(neg_lse.unsqueeze(1) - self.positive_logits(pairs.sim))
        keep = pairs.pos & has_neg.unsqueeze(1)
        value = torch.where(keep, per_pair, torch.zeros_like(per_pair)).sum(dim=1)
        return value, pairs.pos.sum(dim=1).to(value.dtype)

    def reduce(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return values.sum() / weights.sum().clamp(min=1)
