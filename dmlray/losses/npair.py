"""N-pair and angular losses: one (anchor, positive) tuple per class of the batch.

Both are defined on N-pair tuples, a construction on the batch itself, so they do not
pair with references (``supports_references = False``; references other than the anchors
raise ValueError). The tuple of a class is its first two samples in batch order
(deterministic, where the CBML code draws two at random); classes with one sample form no
tuple. The negatives of a tuple are the positives of the other tuples.
"""

from __future__ import annotations

import math

import torch

from dmlray.losses.base import WithinBatchLoss, masked_logsumexp_plus_one, similarity
from dmlray.losses.registry import register

ANGULAR_TUPLES = ("npair", "all")


def npair_tuples(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) bool: sample is a tuple's anchor; (B,) its positive's index; (B,) bool: tuple positive.

    A class's anchor is its first sample, its positive the second — found with masks,
    without a host sync.
    """
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    earlier = torch.tril(same, diagonal=-1).sum(dim=1)  # same-class samples before this one
    is_second = earlier == 1
    partner = same & is_second.unsqueeze(0)
    is_anchor = (earlier == 0) & partner.any(dim=1)
    return is_anchor, partner.to(torch.int8).argmax(dim=1), is_second


def _npair_term(
    sim: torch.Tensor, is_anchor: torch.Tensor, positive: torch.Tensor, is_second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample log(1 + Σ_{j≠own} e^{s_a p_j − s_a p_own}) (0 off anchors) and #tuples."""
    own = sim.gather(1, positive.unsqueeze(1))
    others = is_second.unsqueeze(0) & (
        torch.arange(sim.shape[1], device=sim.device).unsqueeze(0) != positive.unsqueeze(1)
    )
    value = masked_logsumexp_plus_one(sim - own, others & is_anchor.unsqueeze(1))
    return value, is_anchor.sum().clamp(min=1).to(sim.dtype)


def _l2_term(
    embeddings: torch.Tensor, is_anchor: torch.Tensor, positive: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Σ_tuples (‖a‖² + ‖p‖²) / #tuples: a constant 2 for unit vectors (kept for the seed's value)."""
    sq = (embeddings * embeddings).sum(dim=1)
    return ((sq + sq[positive]) * is_anchor.to(sq.dtype)).sum() / count


@register("npair")
class NPairLoss(WithinBatchLoss):
    """L = mean over tuples of log(1 + Σ_{j≠i} e^{a_i·p_j − a_i·p_i}) + r·mean(‖a‖² + ‖p‖²).

    Paper: "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", Sohn,
    NIPS 2016. Default (CBML code base): r = 0.02 (on unit vectors the L2 term is the
    constant 2r: it changes the value, not the gradient through the normalisation).
    """

    rank_decomposable = False  # tuples are formed across the whole batch

    def __init__(self, l2_reg: float = 0.02):
        super().__init__()
        self.l2_reg = l2_reg

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = similarity(embeddings, embeddings)
        is_anchor, positive, is_second = npair_tuples(labels)
        value, count = _npair_term(sim, is_anchor, positive, is_second)
        loss = value.sum() / count
        if self.l2_reg:
            loss = loss + self.l2_reg * _l2_term(embeddings.to(sim.dtype), is_anchor, positive, count)
        return loss


@register("angular")
class AngularLoss(WithinBatchLoss):
    """L_ang = mean over tuples of log(1 + Σ_n e^{4t(a+p)·n − 2(1+t)a·p}), t = tan²α.

    ``tuples="npair"`` (default, CBML code base): n ranges over the other tuples'
    positives. ``tuples="all"``: every positive pair (a, p) with every negative of a —
    pytorch-metric-learning's AngularLoss — in a (B, B, B) tensor, fine for a batch.
    ``with_npair=True`` gives the paper's L_npair + λ·L_ang; plus r·mean(‖a‖² + ‖p‖²) over
    the tuples. Paper: "Deep Metric Learning with Angular Loss", Wang et al., ICCV 2017.
    Defaults (CBML code base): angle bound t = tan²α = 1 (α = 45°), λ = 2 (used only with
    ``with_npair``, as there), r = 0.02.
    """

    rank_decomposable = False  # tuples are formed across the whole batch

    def __init__(
        self,
        angle_bound: float = 1.0,
        lambda_ang: float = 2.0,
        l2_reg: float = 0.02,
        with_npair: bool = False,
        tuples: str = "npair",
    ):
        super().__init__()
        if tuples not in ANGULAR_TUPLES:
            raise ValueError(f"angular tuples must be one of {ANGULAR_TUPLES}, got {tuples!r}")
        self.angle_bound = angle_bound
        self.lambda_ang = lambda_ang
        self.l2_reg = l2_reg
        self.with_npair = with_npair
        self.tuples = tuples

    @classmethod
    def angle_bound_from_degrees(cls, degrees: float) -> float:
        """tan²α for α in degrees (pytorch-metric-learning's ``alpha``)."""
        return math.tan(math.radians(degrees)) ** 2

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = similarity(embeddings, embeddings)
        is_anchor, positive, is_second = npair_tuples(labels)
        count = is_anchor.sum().clamp(min=1).to(sim.dtype)
        t = self.angle_bound
        if self.tuples == "npair":
            loss = self._npair_tuples(sim, is_anchor, positive, is_second, t).sum() / count
        else:
            loss = self._all_pairs(sim, labels, t)
        if self.with_npair:
            npair, _ = _npair_term(sim, is_anchor, positive, is_second)
            loss = npair.sum() / count + self.lambda_ang * loss
        if self.l2_reg:
            loss = loss + self.l2_reg * _l2_term(embeddings.to(sim.dtype), is_anchor, positive, count)
        return loss

    @staticmethod
    def _npair_tuples(
        sim: torch.Tensor, is_anchor: torch.Tensor, positive: torch.Tensor, is_second: torch.Tensor, t: float
    ) -> torch.Tensor:
        # (a + p)·p_j for every sample a (rows) and candidate p_j (columns)
        ap_with = sim + sim[positive]
        ap = sim.gather(1, positive.unsqueeze(1))
        logits = 4.0 * t * ap_with - 2.0 * (1.0 + t) * ap
        cols = torch.arange(sim.shape[1], device=sim.device).unsqueeze(0)
        others = is_second.unsqueeze(0) & (cols != positive.unsqueeze(1)) & is_anchor.unsqueeze(1)
        return masked_logsumexp_plus_one(logits, others)

    @staticmethod
    def _all_pairs(sim: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        pos = same & ~eye  # (a, p)
        # logits[a, p, n] = 4t(s_an + s_pn) − 2(1+t)s_ap, n a negative of a
        logits = 4.0 * t * (sim.unsqueeze(1) + sim.unsqueeze(0)) - 2.0 * (1.0 + t) * sim.unsqueeze(2)
        neg = (~same).unsqueeze(1).expand_as(logits)
        flat = masked_logsumexp_plus_one(logits.reshape(-1, sim.shape[0]), neg.reshape(-1, sim.shape[0]))
        per_pair = flat.view_as(sim)
        return torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum() / pos.sum().clamp(min=1)
