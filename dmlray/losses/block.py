"""Losses computed from the whole (B, M) similarity block at once, not row by row.

Batch-wide statistics (means over all the batch's pairs, histograms, rankings of every
anchor against every other sample) need the block in one piece. ``BlockLoss`` applies
the pair contract — references, or their refusal for ``supports_references = False`` —
and hands ``block_loss`` the block with its masks.
"""

from __future__ import annotations

import torch

from dmlray.losses.base import PairLoss, Pairs, pairs_from_sim, resolve_references, similarity


class BlockLoss(PairLoss):
    """Base class: the loss is ``block_loss(pairs, embeddings, refs)`` of the whole block."""

    def block_loss(
        self, pairs: Pairs, embeddings: torch.Tensor, refs: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """The batch loss from the (B, M) block (``pairs``) and the vectors it was built from."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.supports_references:
            self.reject_references(embeddings, ref_embeddings)
            ref_embeddings = ref_labels = self_index = None
        refs, ref_labels, self_index = resolve_references(embeddings, labels, ref_embeddings, ref_labels, self_index)
        sim = similarity(embeddings, refs)
        pairs = pairs_from_sim(sim, labels, ref_labels.to(labels.device), self_index, embeddings.shape[1])
        return self.block_loss(pairs, embeddings, refs)
