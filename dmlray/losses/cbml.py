"""Contrastive Bayesian metric learning loss (CBML), vectorised."""

from __future__ import annotations

import torch

from dmlray.losses.base import Pairs, masked_logsumexp_plus_one, masked_mean
from dmlray.losses.miners import ms_mine
from dmlray.losses.registry import register
from dmlray.losses.rowwise import RowwiseLoss

CBML_TYPES = ("log", "sqrt", "const")


@register("cbml")
class CBMLLoss(RowwiseLoss):
    """L_i = g(f_p) + g(f_n) + w·σ_i, f_p = 1 + Σ_{P'_i} e^{−(s−a_p)/b_p}, f_n = 1 + Σ_{N'_i} e^{(s−a_n)/b_n}.

    g is log (``type="log"``) or sqrt (``"sqrt"``); ``"const"`` uses (1 + w_p Σ…) + (1 + w_n Σ…).
    P'_i is MS-mined (ε); N'_i is MS-mined too (``adaptive_neg``) or the
    ``num_hard_negatives`` most similar negatives. μ_i = h·mean_{P_i} s + (1−h)·mean_{N_i} s
    and σ_i = Σ_{N_i} (s_in − μ_i)² use all pairs. An anchor with an empty P_i, N_i, P'_i
    or N'_i contributes 0 (mean over all anchors). Paper: "Contrastive Bayesian Analysis
    for Deep Metric Learning", Kan et al., IEEE TPAMI 2023. Defaults: a_p = 0.5, b_p = 0.5,
    a_n = 1.0, b_n = 0.01, ε = 0.1, w = 1.0, h = 0.1, w_p = w_n = 0.25, type log, adaptive
    negatives (else top 100). The sums are log-sum-exp forms, finite at 1/b_n = 100.
    """

    def __init__(
        self,
        pos_a: float = 0.5,
        pos_b: float = 0.5,
        neg_a: float = 1.0,
        neg_b: float = 0.01,
        margin: float = 0.1,
        weight: float = 1.0,
        hyper_weight: float = 0.1,
        type: str = "log",  # noqa: A002 - the name of the option in the CBML code and configs
        weight_p: float = 0.25,
        weight_n: float = 0.25,
        adaptive_neg: bool = True,
        num_hard_negatives: int = 100,
    ):
        super().__init__()
        if type not in CBML_TYPES:
            raise ValueError(f"cbml type must be one of {CBML_TYPES}, got {type!r}")
        if num_hard_negatives < 1:
            raise ValueError("num_hard_negatives must be at least 1")
        self.pos_a, self.pos_b = pos_a, pos_b
        self.neg_a, self.neg_b = neg_a, neg_b
        self.margin = margin
        self.weight = weight
        self.hyper_weight = hyper_weight
        # the option keeps its CBML name and is read back as loss.type (configs, tests); it
        # shadows nn.Module.type(), a dtype cast no loss uses (losses are cast with .to)
        self.type = type  # type: ignore[method-assign, assignment]
        self.weight_p, self.weight_n = weight_p, weight_n
        self.adaptive_neg = adaptive_neg
        self.num_hard_negatives = num_hard_negatives

    def per_anchor(self, pairs: Pairs) -> torch.Tensor:
        s = pairs.sim
        hard_pos, hard_neg = ms_mine(s, pairs.pos, pairs.neg, self.margin)
        if not self.adaptive_neg:
            hard_neg = self._most_similar(s, pairs.neg)
        has_all = pairs.pos.any(dim=1) & pairs.neg.any(dim=1)
        valid = has_all & hard_pos.any(dim=1) & hard_neg.any(dim=1)

        h = self.hyper_weight
        mean = h * masked_mean(s, pairs.pos) + (1.0 - h) * masked_mean(s, pairs.neg)
        spread = torch.where(pairs.neg, (s - mean.unsqueeze(1)) ** 2, torch.zeros_like(s)).sum(dim=1)

        # log f = log(1 + Σ e^x): stable whatever 1/b_n
        log_fp = masked_logsumexp_plus_one(-(s - self.pos_a) / self.pos_b, hard_pos)
        log_fn = masked_logsumexp_plus_one((s - self.neg_a) / self.neg_b, hard_neg)
        if self.type == "log":
            terms = log_fp + log_fn
        elif self.type == "sqrt":
            terms = torch.exp(0.5 * log_fp) + torch.exp(0.5 * log_fn)
        else:
            # 1 + w·Σ e^x = 1 + w·(f − 1), with f − 1 = expm1(log f) exact for small sums
            terms = 2.0 + self.weight_p * torch.expm1(log_fp) + self.weight_n * torch.expm1(log_fn)
        value = terms + self.weight * spread
        return torch.where(valid, value, torch.zeros_like(value))

    def _most_similar(self, s: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """(B, M) mask of each anchor's ``num_hard_negatives`` most similar negatives."""
        k = min(self.num_hard_negatives, s.shape[1])
        masked = torch.where(neg, s.detach(), torch.full_like(s, float("-inf")))
        top = masked.topk(k, dim=1).indices
        chosen = torch.zeros_like(neg)
        chosen.scatter_(1, top, True)
        # fewer than k negatives: topk also returned non-negatives, drop them
        return chosen & neg
