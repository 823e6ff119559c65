"""Exact gradient accumulation by gradient caching (GradCache, Gao et al. 2021).

Pair losses couple every row of a batch with every other, so summing the gradients of n
micro-batches that each see only themselves is not the gradient of the n-times larger
batch. Gradient caching is: embed every micro-batch without keeping activations, compute
the loss of the whole accumulated batch on those (detached) embeddings and its gradient
with respect to them, then run each micro-batch's forward again with activations and
back-propagate its slice of that gradient. Peak memory is one micro-batch's activations
plus the embeddings of the whole batch; the price is a second forward per micro-batch.

Both forwards of a micro-batch must compute the same function:

* RNG: the torch CPU generator and the device's CUDA generator are captured before each
  no-grad forward and restored before its replay (dropout, stochastic depth, any sampling
  inside the model), and left afterwards where the no-grad pass and the loss left them.
* Buffers (BatchNorm running statistics, ``num_batches_tracked``): all of the model's
  buffers are saved before the no-grad pass and restored after it, so only the replay
  updates them: once per micro-batch, from the same starting values, in the same order.
  Saving and restoring is exact for every momentum (momentum ``None``, the cumulative
  average, reads ``num_batches_tracked``, which a momentum-0 no-grad pass would still
  bump) and for any module that updates a buffer in its forward; it costs one copy of
  the buffers per step (a few KB for a ResNet). Running the no-grad pass in eval mode
  instead would change its output (running instead of batch statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RngState:
    """The generator states a forward pass may draw from: torch's CPU one and the device's."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def save_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every buffer of the model (running statistics and counters)."""
    return [b.detach().clone() for b in model.buffers()]


@torch.no_grad()
def restore_buffers(model: nn.Module, saved: Sequence[torch.Tensor]) -> None:
    for buffer, value in zip(model.buffers(), saved, strict=True):
        buffer.copy_(value)


def gradient_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` except on the last micro-batch's backward, which all-reduces once."""
    no_sync = getattr(model, "no_sync", None)  # DDP only
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


@dataclass
class CachedEmbeddings:
    """The no-grad embeddings of a step's micro-batches and how to replay each forward."""

    embeddings: torch.Tensor
    """(Σ b_i, D) leaf tensor requiring grad: the loss's gradient lands in ``.grad``."""
    sizes: list[int]
    """Rows of each micro-batch, in order."""
    rng: list[RngState]
    """Generator states before each micro-batch's forward."""


def embed_without_graph(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> CachedEmbeddings:
    """Embed every micro-batch keeping no activations; the model's buffers end as they began."""
    saved = save_buffers(model)
    rng, parts = [], []
    with torch.no_grad():
        for x in images:
            rng.append(RngState.capture(device))
            with autocast():
                parts.append(model(x))
    restore_buffers(model, saved)
    embeddings = torch.cat(parts).requires_grad_(True)
    return CachedEmbeddings(embeddings, [p.shape[0] for p in parts], rng)


def backward_through_model(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    cache: CachedEmbeddings,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Replay each micro-batch's forward with activations and back-propagate its gradient slice.

    ``cache.embeddings.grad`` must hold the loss's gradient. Under DDP only the last
    backward all-reduces (``no_sync`` before it). The generators end where they were
    when this was called.
    """
    if cache.embeddings.grad is None:
        raise RuntimeError("backward_through_model needs the loss's gradient in cache.embeddings.grad")
    after = RngState.capture(device)
    grads = cache.embeddings.grad.split(cache.sizes)
    for i, (x, grad, state) in enumerate(zip(images, grads, cache.rng, strict=True)):
        with gradient_sync(model, last=i == len(images) - 1):
            state.restore()
            with autocast():
                out = model(x)
            out.backward(grad.to(out.dtype))
    after.restore()
