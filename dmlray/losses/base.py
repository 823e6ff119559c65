"""What every loss shares: the pair contract and the similarity/mask construction.

Contract (ARCHITECTURE.md): ``loss(embeddings, labels, ref_embeddings=None,
ref_labels=None, self_index=None)`` returns a scalar. Anchors are ``embeddings``; pairs
are formed against the references, which default to the anchors themselves.
``self_index[i]`` is anchor i's own position among the references (or -1) and that pair
is never formed; references given without ``self_index`` form every pair. Self-pairs are
excluded by identity, never by a similarity threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        raise ValueError(
            f"labels must be ({embeddings.shape[0]},) to match embeddings, got {tuple(labels.shape)}"
        )
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
        raise ValueError(
            f"ref_embeddings must be (M, {embeddings.shape[1]}), got {tuple(ref_embeddings.shape)}"
        )
    if ref_labels.shape != (ref_embeddings.shape[0],):
        raise ValueError(
            f"ref_labels must be ({ref_embeddings.shape[0]},), got {tuple(ref_labels.shape)}"
        )
    if self_index is not None and self_index.shape != (embeddings.shape[0],):
        raise ValueError(
            f"self_index must be ({embeddings.shape[0]},), got {tuple(self_index.shape)}"
        )
    return ref_embeddings, ref_labels, self_index


def self_mask(self_index: torch.Tensor | None, num_anchors: int, num_refs: int, device) -> torch.Tensor:
    """(B, M) bool, True where reference j is anchor i itself (self_index -1 matches nothing)."""
    if self_index is None:
        return torch.zeros(num_anchors, num_refs, dtype=torch.bool, device=device)
    cols = torch.arange(num_refs, device=device)
    return cols.unsqueeze(0) == self_index.to(device).long().unsqueeze(1)


def build_pairs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> Pairs:
    """Similarity matrix and positive/negative masks under the loss contract."""
    refs, ref_labels, self_index = resolve_references(
        embeddings, labels, ref_embeddings, ref_labels, self_index
    )
    dtype = compute_dtype(embeddings)
    # autocast would run the product in bf16; similarities feed exp(50·s), so keep fp32
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        sim = embeddings.to(dtype) @ refs.to(dtype).T
    is_self = self_mask(self_index, embeddings.shape[0], refs.shape[0], embeddings.device)
    same = labels.unsqueeze(1) == ref_labels.to(labels.device).unsqueeze(0)
    not_self = ~is_self
    return Pairs(sim=sim, pos=same & not_self, neg=~same & not_self, ref_labels=ref_labels, not_self=not_self)


def masked_logsumexp_plus_one(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + Σ_{mask} e^x), stable for large x, exactly 0 for an empty row."""
    neg_inf = torch.finfo(x.dtype).min
    masked = torch.where(mask, x, torch.full_like(x, neg_inf))
    zeros = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return torch.logsumexp(torch.cat([zeros, masked], dim=1), dim=1)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log Σ_{mask} e^x and whether the row had any entry (0 where empty, no nan)."""
    neg_inf = torch.finfo(x.dtype).min
    masked = torch.where(mask, x, torch.full_like(x, neg_inf))
    has_any = mask.any(dim=1)
    lse = torch.logsumexp(masked, dim=1)
    return torch.where(has_any, lse, torch.zeros_like(lse)), has_any


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A zero on like's device that is still attached to the graph (backward works)."""
    return like.sum() * 0.0


class PairLoss(nn.Module):
    """Base class: subclasses implement ``forward`` under the pair contract.

    Class attributes describe how the trainer must build and use the loss.
    """

    needs_classes: bool = False
    """True when the loss owns per-class parameters and takes num_classes and embedding_dim."""
    supports_references: bool = True
    """False when pairing against references (memory, gathered batch) is meaningless."""

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
