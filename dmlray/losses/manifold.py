"""Manifold loss: similarities diffused by a random walk over the batch and K proxies (Aziere & Todorovic)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmlray.losses.base import WithinBatchLoss, class_logits_inputs, masked_logsumexp_plus_one
from dmlray.losses.registry import register
from dmlray.losses.sampling import SeededSampling

SIMILARITY_TEMPERATURE = 0.5
"""The graph's edge weights are exp(max(0, cos)/0.5), as in pytorch-metric-learning."""


@register("manifold")
class ManifoldLoss(SeededSampling, WithinBatchLoss):
    """L = mean_i log(1 + Σ_{k≠m_i, h_ik≥0} e^{h_ik}) [h = F_ik − F_im_i + δ] + λ_C · (the same on cos(F_i·, F_k·)).

    The graph: the N normalised embeddings and K normalised proxies, edge weights
    W = exp(max(0, cos)/0.5) with a zero diagonal, S̄ = D^{-1/2} W D^{-1/2}; the random
    walk's closed form F = (1 − α)(I − αS̄)⁻¹. Each embedding i gets a meta-class m_i (a
    proxy): every proxy once, the other N − K drawn uniformly, shuffled. The intrinsic term
    compares embedding-to-proxy manifold similarities F[i, N+k]; the context term the
    cosines between embedding i's and proxy k's rows of F. Paper: "Ensemble Deep Manifold
    Similarity Learning using Hard Proxies", Aziere & Todorovic, CVPR 2019. Defaults
    (pytorch-metric-learning's): K = 50, λ_C = 1, α = 0.8, δ = 5·10⁻⁴; proxies N(0, 1).

    As in PML the labels are not used (the meta-classes are drawn). A batch of fewer than
    K embeddings (which PML refuses) gives each a distinct proxy, drawn uniformly.
    ``embedding_dim`` is PML's ``l``; ``num_classes`` is accepted for the trainer's
    per-class-parameter contract and unused (the K proxies are not classes). λ_C = ∞
    keeps only the context term (PML returns ∞·loss there). ``seed`` makes the
    draws reproducible (see ``SeededSampling``); None uses torch's global RNG exactly as
    PML does (CPU ``randint`` then ``randperm``). The walk couples all samples and draws
    per call: no references (``supports_references = False``) and, across ranks, the
    global batch on every rank (``rank_decomposable = False``). The (N+K)² inverse is
    computed in float32 (float64 stays float64; PML inverts in float32 always).
    """

    needs_classes = True
    rank_decomposable = False

    def __init__(
        self,
        embedding_dim: int,
        K: int = 50,  # noqa: N803  (PML's name)
        lambdaC: float = 1.0,  # noqa: N803  (PML's name)
        alpha: float = 0.8,
        margin: float = 5e-4,
        num_classes: int | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if lambdaC < 0:
            raise ValueError(f"lambdaC must be non-negative, got {lambdaC}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if K < 1:
            raise ValueError(f"K (number of proxies) must be at least 1, got {K}")
        self.K = K
        self.lambdaC = lambdaC
        self.alpha = alpha
        self.margin = margin
        self.proxies = nn.Parameter(torch.randn(K, embedding_dim))
        self.init_sampling(seed)

    def meta_classes(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) each embedding's proxy: all K once, the rest uniform, shuffled (PML's draws, on the CPU)."""
        gen = self.generator(torch.device("cpu"))
        if n < self.K:  # PML fails here; distinct proxies, so no two embeddings share one
            meta = torch.randperm(self.K, generator=gen)[:n]
        else:
            extra = torch.randint(0, self.K, (n - self.K,), generator=gen)
            meta = torch.cat((torch.arange(self.K), extra))[torch.randperm(n, generator=gen)]
        if device.type == "cuda":  # a pinned copy does not wait for the GPU
            return meta.pin_memory().to(device, non_blocking=True)
        return meta.to(device)

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = embeddings.shape[0]
        if embeddings.dim() != 2 or embeddings.shape[1] != self.proxies.shape[1]:
            raise ValueError(f"embeddings must be (N, {self.proxies.shape[1]}), got {tuple(embeddings.shape)}")
        if n == 0:
            return embeddings.sum() * 0.0 + self.proxies.sum() * 0.0
        meta = self.meta_classes(n, embeddings.device)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x, proxies = class_logits_inputs(embeddings, self.proxies)
            walk = self.random_walk(torch.cat([x, F.normalize(proxies, dim=1)]))
            context = _hinge_softplus(F.normalize(walk[:n], dim=1) @ F.normalize(walk[n:], dim=1).T, meta, self.margin)
            if math.isinf(self.lambdaC):
                return context
            return _hinge_softplus(walk[:n, n:], meta, self.margin) + self.lambdaC * context

    def random_walk(self, nodes: torch.Tensor) -> torch.Tensor:
        """F = (1 − α)(I − αS̄)⁻¹ of the graph on unit-norm ``nodes``."""
        weights = torch.exp((nodes @ nodes.T).clamp(min=0) / SIMILARITY_TEMPERATURE)
        eye = torch.eye(nodes.shape[0], dtype=nodes.dtype, device=nodes.device)
        weights = weights - weights * eye
        scale = weights.sum(dim=1).rsqrt()
        normalised = scale.unsqueeze(1) * weights * scale.unsqueeze(0)
        # eigenvalues of S̄ lie in [−1, 1], so I − αS̄ has condition number ≤ (1+α)/(1−α)
        return (1 - self.alpha) * torch.linalg.inv(eye - self.alpha * normalised)


def _hinge_softplus(scores: torch.Tensor, meta: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_i log(1 + Σ_{k≠m_i, h_ik≥0} e^{h_ik}), h_ik = scores_ik − scores_im_i + margin."""
    hinge = scores - scores.gather(1, meta.unsqueeze(1)) + margin
    # a meta-class's own column is left out rather than computed as ``margin`` (PML's choice)
    active = (hinge >= 0) & (torch.arange(scores.shape[1], device=scores.device) != meta.unsqueeze(1))
    return masked_logsumexp_plus_one(hinge, active).mean()
