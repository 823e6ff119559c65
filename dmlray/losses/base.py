"""What every loss shares: the pair contract and the similarity/mask construction.

Contract (ARCHITECTURE.md): ``loss(embeddings, labels, ref_embeddings=None,
ref_labels=None, self_index=None)`` returns a scalar. Anchors are ``embeddings``; pairs
are formed against the references, which default to the anchors themselves.
``self_index[i]`` is anchor i's own position among the references (or -1) and that pair
is never formed; references given without ``self_index`` form every pair. Self-pairs are
excluded by identity, never by a similarity threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Pairs:
    """Similarities between anchors and references with the masks every loss needs."""

    sim: torch.Tensor
    """(B, M) cosine similarities, float32 or float64 (never half: exponentials overflow)."""
    pos: torch.Tensor
    """(B, M) bool: same class, not the anchor itself."""
    neg: torch.Tensor
    """(B, M) bool: other class."""
    ref_labels: torch.Tensor
    """(M,) labels of the references."""
    not_self: torch.Tensor
    """(B, M) bool: False only at each anchor's own position."""
    dim: int = 0
    """Embedding dimension (distance-weighted sampling needs it); 0 when unknown."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resolve_references(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    self_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Apply the contract's defaults: no references means the anchors, self excluded."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must be ({embeddings.shape[0]},) to match embeddings, got {tuple(labels.shape)}")
    if ref_embeddings is None:
        if ref_labels is not None:
            raise ValueError("ref_labels given without ref_embeddings")
        if self_index is not None:
            raise ValueError("self_index given without ref_embeddings")
        self_index = torch.arange(embeddings.shape[0], device=embeddings.device)
        return embeddings, labels, self_index
    if ref_labels is None:
        raise ValueError("ref_embeddings given without ref_labels")
    if ref_embeddings.dim() != 2 or ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_embeddings must be (M, {embeddings.shape[1]}), got {tuple(ref_embeddings.shape)}")
    if ref_labels.shape != (ref_embeddings.shape[0],):
        raise ValueError(f"ref_labels must be ({ref_embeddings.shape[0]},), got {tuple(ref_labels.shape)}")
    if self_index is not None and self_index.shape != (embeddings.shape[0],):
        raise ValueError(f"self_index must be ({embeddings.shape[0]},), got {tuple(self_index.shape)}")
    return ref_embeddings, ref_labels, self_index


def self_mask(self_index: torch.Tensor | None, num_anchors: int, num_refs: int, device) -> torch.Tensor:
    """(B, M) bool, True where reference j is anchor i itself (self_index -1 matches nothing)."""
    if self_index is None:
        return torch.zeros(num_anchors, num_refs, dtype=torch.bool, device=device)
    cols = torch.arange(num_refs, device=device)
    return cols.unsqueeze(0) == self_index.to(device).long().unsqueeze(1)


def not_self_mask(self_index: torch.Tensor | None, num_anchors: int, num_refs: int, device) -> torch.Tensor:
    """(B, M) bool, False only at each anchor's own position (``~self_mask``, built by scatter).

    A scatter touches B entries where a comparison against ``arange(M)`` touches B·M.
    """
    keep = torch.ones(num_anchors, num_refs, dtype=torch.bool, device=device)
    if self_index is None or num_refs == 0:
        return keep
    index = self_index.to(device).long()
    # rows with -1 write True (a no-op) into column 0; the others write False at their own column
    keep.scatter_(1, index.clamp(min=0).unsqueeze(1), (index < 0).unsqueeze(1))
    return keep


def pairs_from_sim(
    sim: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    dim: int = 0,
) -> Pairs:
    """Masks for a (B, M) similarity block whose rows are the anchors ``labels``."""
    not_self = not_self_mask(self_index, sim.shape[0], sim.shape[1], sim.device)
    same = labels.unsqueeze(1) == ref_labels.to(labels.device).unsqueeze(0)
    return Pairs(sim=sim, pos=same & not_self, neg=~same & not_self, ref_labels=ref_labels, not_self=not_self, dim=dim)


def similarity(embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """(B, M) cosine similarities in float32 (float64 stays float64), whatever autocast says."""
    dtype = compute_dtype(embeddings)
    # autocast would run the product in bf16; similarities feed exp(50·s), so keep fp32
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return embeddings.to(dtype) @ refs.to(dtype).T


def build_pairs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> Pairs:
    """Similarity matrix and positive/negative masks under the loss contract."""
    refs, ref_labels, self_index = resolve_references(embeddings, labels, ref_embeddings, ref_labels, self_index)
    sim = similarity(embeddings, refs)
    return pairs_from_sim(sim, labels, ref_labels, self_index, dim=embeddings.shape[1])


def masked_logsumexp_plus_one(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + Σ_{mask} e^x), stable for large x, exactly 0 for an empty row.

    Shifted by m = max(0, max_mask x): m + log(e^{-m} + Σ e^{x-m}). No (B, M+1) copy is made.
    """
    masked = x.masked_fill(~mask, float("-inf"))
    shift = masked.detach().amax(dim=1).clamp(min=0) if x.shape[1] else x.new_zeros(x.shape[0])
    total = torch.exp(masked - shift.unsqueeze(1)).sum(dim=1) + torch.exp(-shift)
    return shift + torch.log(total)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log Σ_{mask} e^x and whether the row had any entry (0 where empty, no nan)."""
    neg_inf = torch.finfo(x.dtype).min
    masked = torch.where(mask, x, torch.full_like(x, neg_inf))
    has_any = mask.any(dim=1)
    if x.shape[1] == 0:
        return x.sum(dim=1) * 0, has_any
    lse = torch.logsumexp(masked, dim=1)
    return torch.where(has_any, lse, torch.zeros_like(lse)), has_any


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise mean of x over mask; 0 for an empty row (gradient 0 there, never nan)."""
    count = mask.sum(dim=1)
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=1)
    return total / count.clamp(min=1).to(x.dtype)


def euclidean_from_sim(sim: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """‖x − y‖ of unit vectors from their cosine: sqrt(2 − 2s), clamped so the gradient is finite."""
    return torch.sqrt((2.0 - 2.0 * sim).clamp(min=eps))


def class_logits_inputs(embeddings: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and a parameter in the loss's compute dtype (float32 under bf16 autocast)."""
    dtype = compute_dtype(embeddings)
    return embeddings.to(dtype), weight.to(dtype)


class PairLoss(nn.Module):
    """Base class of every loss: subclasses implement ``forward`` under the pair contract.

    The capability attributes below tell the trainer, the worker and the config how to
    build and use a loss. They are read as plain attributes: a loss declares the ones
    that differ from the documented default, the others it inherits. The class-level
    ones (``ClassVar``) are readable from ``loss_class(name)`` before any loss is built.
    """

    needs_classes: ClassVar[bool] = False
    """True when the loss owns per-class parameters and takes num_classes and embedding_dim."""
    supports_references: ClassVar[bool] = True
    """False when pairing against references (memory, gathered batch) is meaningless."""
    pair_mean: ClassVar[bool] = False
    """True when the loss is a mean over pairs, not anchors; it then implements ``sum_and_count``."""
    sum_and_count: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    """Of ``pair_mean`` losses only: (sum of the terms, number of terms) under the pair
    contract, so a distributed step can divide by the count summed over ranks."""
    trainable_alone: ClassVar[bool] = True
    """False for auxiliary terms that need a second embedding head (MIC's adversarial
    loss): the config refuses them as ``loss.name`` and takes them in ``loss.terms`` with
    ``other_head``."""

    @property
    def rank_decomposable(self) -> bool:
        """False when ranks cannot each compute their own anchors' share of the global loss
        (batch-wide statistics, tuples or clusters formed across the batch, random sampling):
        the trainer then computes the whole global batch's loss on every rank, exact at R×
        the cost of the loss (not of the network).

        An instance property because it may depend on the loss's options (a row-wise loss
        with random mining); a loss for which it never does overrides it with a class
        attribute ``rank_decomposable = False``.
        """
        return True

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reject_references(self, embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None) -> None:
        """For ``supports_references = False`` losses: refuse references other than the anchors.

        The anchors passed again as their own references (what a trainer at world size 1
        hands over: the gathered batch *is* the local batch) mean "no references" and pass.
        """
        if ref_embeddings is None or ref_embeddings is embeddings:
            return
        raise ValueError(
            f"{type(self).__name__} does not pair anchors with references (memory or gathered "
            "batch); call it with embeddings and labels only"
        )


class WithinBatchLoss(PairLoss):
    """A loss that pairs anchors only with its own parameters (proxies, class weights,
    centres) or with the batch itself: ``supports_references = False``.

    ``forward`` refuses references and runs ``batch_loss`` with autocast off, so the
    subclass computes in the embeddings' compute dtype (float32 under bf16 autocast).
    """

    supports_references = False

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.reject_references(embeddings, ref_embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.batch_loss(embeddings, labels)

    def batch_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The loss of the batch (embeddings (B, D), labels (B,)), autocast off."""
        raise NotImplementedError
