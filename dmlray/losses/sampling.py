"""Reproducible sampling for the losses that draw random numbers (margin's triplets, manifold's meta-classes)."""

from __future__ import annotations

from typing import Any

import torch


class SeededSampling:
    """Mixin of a loss module: a generator created from ``seed`` on first use, checkpointed.

    ``seed`` None draws from torch's global RNG (as pytorch-metric-learning does). With a
    seed every rank draws the same numbers, and the generator's state travels in the
    loss's ``state_dict`` (extra state), so a resumed run continues the stream.
    """

    seed: int | None
    _generator: torch.Generator | None
    _pending_state: torch.Tensor | None

    def init_sampling(self, seed: int | None) -> None:
        self.seed = seed
        self._generator = None
        self._pending_state = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The sampling generator on ``device`` (created from ``seed`` on first use)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def get_extra_state(self) -> Any:
        state = self._generator.get_state() if self._generator is not None else self._pending_state
        return {"seed": self.seed, "generator": state}

    def set_extra_state(self, state: Any) -> None:
        self.seed = state["seed"]
        self._generator = None
        self._pending_state = state["generator"]
