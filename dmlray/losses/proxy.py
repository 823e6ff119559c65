"""Proxy losses: one learnable proxy per class (ProxyNCA, Proxy-Anchor).

Proxies are ``nn.Parameter`` (the trainer optimises and checkpoints them); labels must be
class indices in [0, num_classes). Proxies replace the references: pairing anchors with
a memory or a gathered batch is not meaningful, so ``supports_references = False`` and
passing references raises ValueError (the anchors passed as their own references are
accepted, as a trainer at world size 1 does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.losses.base import WithinBatchLoss, class_logits_inputs, masked_logsumexp_plus_one
from dmlray.losses.registry import register


@register("proxy_nca")
class ProxyNCALoss(WithinBatchLoss):
    """L_i = −Σ_c T_ic log softmax_c(−‖s_x x_i − s_p p̂_c‖²); mean over anchors.

    T is the one-hot label smoothed to 1 − ε on the class and ε/(C−1) elsewhere; p̂ the
    normalised proxies. Paper: "No Fuss Distance Metric Learning using Proxies",
    Movshovitz-Attias et al., ICCV 2017 (this form, with smoothing and the positive in the
    denominator, as in the CBML code base). Defaults: s_x = s_p = 3, ε = 0.1; proxies
    initialised N(0, 1/64) as there.
    """

    needs_classes = True

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scaling_x: float = 3.0,
        scaling_p: float = 3.0,
        smoothing: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.scaling_x = scaling_x
        self.scaling_p = scaling_p
        self.smoothing = smoothing
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim) / 8)

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, proxies = class_logits_inputs(embeddings, self.proxies)
        p = F.normalize(proxies, dim=-1)
        # ‖a x − b p‖² of unit vectors = a² + b² − 2ab·cos: no (B, C, D) difference tensor
        sq_dist = self.scaling_x**2 + self.scaling_p**2 - 2 * self.scaling_x * self.scaling_p * (x @ p.T)
        log_prob = F.log_softmax(-sq_dist, dim=1)
        target = self._smoothed_targets(labels, log_prob)
        return -(target * log_prob).sum(dim=1).mean() if x.shape[0] else log_prob.sum() * 0.0

    def _smoothed_targets(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / (self.num_classes - 1) if self.num_classes > 1 else 0.0
        target = torch.full_like(like, off)
        target.scatter_(1, labels.long().unsqueeze(1), 1.0 - self.smoothing if self.num_classes > 1 else 1.0)
        return target


@register("proxy_anchor")
class ProxyAnchorLoss(WithinBatchLoss):
    """L = 1/|P⁺| Σ_{c∈P⁺} log(1 + Σ_{x∈X_c⁺} e^{−α(s(x,c)−δ)}) + 1/C Σ_c log(1 + Σ_{x∈X_c⁻} e^{α(s(x,c)+δ)}).

    s is the cosine with the proxy of class c, X_c⁺ / X_c⁻ the batch's embeddings of /
    not of class c, P⁺ the classes present in the batch. Paper: "Proxy Anchor Loss for
    Deep Metric Learning", Kim et al., CVPR 2020. Defaults: δ = 0.1, α = 32; proxies
    initialised Kaiming-normal (fan out) as the authors' code.
    """

    needs_classes = True
    rank_decomposable = False  # a mean over proxies of sums over the whole batch

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        self.num_classes = num_classes
        self.margin = margin
        self.alpha = alpha
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, proxies = class_logits_inputs(embeddings, self.proxies)
        cos = F.normalize(proxies, dim=-1) @ x.T  # (C, B): one row per proxy
        member = labels.long().unsqueeze(0) == torch.arange(self.num_classes, device=labels.device).unsqueeze(1)
        pos_term = masked_logsumexp_plus_one(-self.alpha * (cos - self.margin), member)
        neg_term = masked_logsumexp_plus_one(self.alpha * (cos + self.margin), ~member)
        num_present = member.any(dim=1).sum().clamp(min=1)
        return pos_term.sum() / num_present + neg_term.sum() / max(self.num_classes, 1)
