"""Cross-batch memory (XBM, Wang et al. 2020): a ring buffer of recent (embedding, label) pairs.

Entries are detached: the memory supplies references, never gradients. In distributed
training the trainer enqueues the *global* batch in rank order, so every rank holds the
same memory after every step.
"""

from __future__ import annotations

import torch


class CrossBatchMemory:
    """Ring buffer of the most recent ``size`` embeddings of dimension ``dim``."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.size = size
        self.dim = dim
        self.embeddings = torch.zeros(size, dim, dtype=dtype, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write
        self.filled = 0  # valid entries (<= size)

    def __len__(self) -> int:
        return self.filled

    def to(self, device: torch.device | str) -> CrossBatchMemory:
        self.embeddings = self.embeddings.to(device)
        self.labels = self.labels.to(device)
        return self

    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write a batch, overwriting the oldest entries; returns each row's slot.

        A row whose slot is overwritten later in the same call (a batch larger than the
        memory) gets -1: it is not in the memory.
        """
        n = embeddings.shape[0]
        if embeddings.shape[1:] != (self.dim,):
            raise ValueError(f"memory holds {self.dim}-d embeddings, got shape {tuple(embeddings.shape)}")
        slots = (self.ptr + torch.arange(n, device=self.embeddings.device)) % self.size
        keep = torch.arange(n, device=slots.device) >= n - self.size  # only the last `size` rows survive
        kept = slots[keep]
        self.embeddings[kept] = embeddings.detach()[keep.to(embeddings.device)].to(self.embeddings)
        self.labels[kept] = labels[keep.to(labels.device)].to(self.labels)
        self.ptr = int((self.ptr + n) % self.size)
        self.filled = min(self.size, self.filled + n)
        return torch.where(keep, slots, torch.full_like(slots, -1))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, labels) of the valid entries; slot i is row i."""
        return self.embeddings[: self.filled], self.labels[: self.filled]

    def state_dict(self) -> dict:
        return {
            "embeddings": self.embeddings.clone(),
            "labels": self.labels.clone(),
            "ptr": self.ptr,
            "filled": self.filled,
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["embeddings"].shape) != (self.size, self.dim):
            raise ValueError(
                f"memory state has shape {tuple(state['embeddings'].shape)}, expected {(self.size, self.dim)}"
            )
        self.embeddings.copy_(state["embeddings"])
        self.labels.copy_(state["labels"])
        self.ptr = int(state["ptr"])
        self.filled = int(state["filled"])
