"""Row-wise pair losses and the chunked engine that computes them.

Most pair losses are row-wise: anchor i's loss depends only on row i of the (B, M)
similarity matrix (its mining thresholds included). For those the engine

1. computes S = E·Rᵀ once (the unavoidable product),
2. walks S in chunks of rows small enough to stay in cache, computing each chunk's
   per-anchor losses *and* their gradient dL_i/ds_ij, which overwrites the chunk in place,
3. in backward, turns that (B, M) gradient into dE = J·R and dR = Jᵀ·E (two products).

So a (B, M) block is allocated once — no autograd graph of B×M temporaries is kept, which
is what makes a 55k-entry cross-batch memory cheap. The per-chunk gradient comes from
autograd on the chunk unless the loss supplies a closed form (``block_value_and_grad``).
Losses own no parameters here (their gradient would be lost); those use plain autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dmlray.losses.base import (
    PairLoss,
    Pairs,
    compute_dtype,
    pairs_from_sim,
    resolve_references,
    similarity,
)
from dmlray.losses.miners import check_mining, mine_pairs

Values = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Block:
    """A chunk of anchors' similarity rows and what is needed to build their masks."""

    sim: torch.Tensor
    """(b, M) similarities of the chunk's anchors (a view into the full matrix)."""
    labels: torch.Tensor
    """(b,) the chunk's anchor labels."""
    ref_labels: torch.Tensor
    """(M,) reference labels."""
    self_index: torch.Tensor | None
    """(b,) each anchor's own column or -1; None: every pair is formed."""
    dim: int
    """Embedding dimension."""
    shared: dict = field(default_factory=dict)
    """Per-forward cache shared by all chunks (e.g. reference labels in another dtype)."""

    def pairs(self, sim: torch.Tensor | None = None) -> Pairs:
        """The contract's masks for this chunk, around ``sim`` (default: the chunk's own)."""
        return pairs_from_sim(self.sim if sim is None else sim, self.labels, self.ref_labels, self.self_index, self.dim)


class RowwiseLoss(PairLoss):
    """A pair loss defined by ``per_anchor(pairs)`` on rows of the similarity matrix.

    ``per_anchor`` returns the (b,) losses of the chunk's anchors, or a pair
    ``(losses, weights)`` where weights (no gradient) feed ``reduce``; the default
    reduction is the mean over all B anchors (empty anchors count, as the seed codes do).
    """

    mining: str | None = None
    """Pair mining of the losses that take one (``dmlray.losses.miners.mine_pairs``); None: none."""

    @property
    def rank_decomposable(self) -> bool:
        # distance-weighted mining samples per call: one draw over the global batch
        return self.mining != "distance_weighted"

    chunk_elements: int = 1 << 18
    """Similarities per chunk (1 MiB of fp32: stays in L2); 0 computes the whole matrix
    with plain autograd instead (slower, more memory, but twice-differentiable)."""

    def per_anchor(self, pairs: Pairs) -> torch.Tensor | Values:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_value_and_grad(self, block: Block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, weights, dΣvalues/dsim) of a chunk; may overwrite ``block.sim`` in place.

        The default differentiates ``per_anchor`` with autograd; override with a closed form
        where one is cheaper.
        """
        sim = block.sim.detach().requires_grad_(True)
        with torch.enable_grad():
            values, weights = _split(self.per_anchor(block.pairs(sim)))
            grad = None
            if values.requires_grad:
                (grad,) = torch.autograd.grad(values.sum(), sim, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(sim)
        return values.detach(), weights.detach(), grad

    def reduce(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Batch loss from per-anchor values: the mean over anchors by default."""
        return values.sum() / max(values.shape[0], 1)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        values, weights = rowwise_values(self, embeddings, labels, ref_embeddings, ref_labels, self_index)
        return self.reduce(values, weights)

    def sum_and_count(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        self_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-anchor values, number of terms) for losses that average over
        pairs (``pair_mean``): the trainer divides by the count summed over ranks, so a
        distributed step averages over the global pairs, as one process would."""
        values, weights = rowwise_values(self, embeddings, labels, ref_embeddings, ref_labels, self_index)
        return values.sum(), weights.sum()


def _split(out: torch.Tensor | Values) -> Values:
    if isinstance(out, tuple):
        return out
    return out, torch.zeros_like(out.detach())


def rowwise_values(
    loss: RowwiseLoss,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> Values:
    """Per-anchor (values, weights) of a row-wise loss under the pair contract."""
    refs, ref_labels, self_index = resolve_references(embeddings, labels, ref_embeddings, ref_labels, self_index)
    ref_labels = ref_labels.to(labels.device)
    num_anchors, num_refs = embeddings.shape[0], refs.shape[0]
    if num_anchors == 0 or num_refs == 0:
        # nothing to pair: zeros that still reach the inputs' graph
        zero = (embeddings.sum() + refs.sum()) * 0.0
        values = zero.expand(num_anchors).to(compute_dtype(embeddings))
        return values, torch.zeros_like(values.detach())
    if loss.chunk_elements <= 0:
        pairs = pairs_from_sim(similarity(embeddings, refs), labels, ref_labels, self_index, embeddings.shape[1])
        return _split(loss.per_anchor(pairs))
    rows = max(1, loss.chunk_elements // num_refs)
    need_grad = torch.is_grad_enabled() and (embeddings.requires_grad or refs.requires_grad)
    if not need_grad:
        with torch.no_grad():
            sim = similarity(embeddings, refs)
            return _chunked(loss, sim, labels, ref_labels, self_index, rows, embeddings.shape[1], False)
    values, weights = _RowwiseFunction.apply(embeddings, refs, loss, labels, ref_labels, self_index, rows)
    return values, weights


def _chunked(
    loss: RowwiseLoss,
    sim: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor,
    self_index: torch.Tensor | None,
    rows: int,
    dim: int,
    with_grad: bool,
) -> Values:
    """Walk ``sim`` in row chunks; with_grad overwrites it with dΣvalues/dsim."""
    num_anchors = sim.shape[0]
    values = sim.new_empty(num_anchors)
    weights = sim.new_zeros(num_anchors)
    shared: dict = {}
    for start in range(0, num_anchors, rows):
        stop = min(start + rows, num_anchors)
        own = None if self_index is None else self_index[start:stop]
        block = Block(sim[start:stop], labels[start:stop], ref_labels, own, dim, shared)
        if with_grad:
            value, weight, grad = loss.block_value_and_grad(block)
            if grad.data_ptr() != block.sim.data_ptr():
                block.sim.copy_(grad)
        else:
            value, weight = _split(loss.per_anchor(block.pairs()))
        values[start:stop] = value
        weights[start:stop] = weight
    return values, weights


class _RowwiseFunction(torch.autograd.Function):
    """(E, R) → per-anchor values; backward is two products with the stored dvalues/dS."""

    @staticmethod
    def forward(
        ctx,
        embeddings: torch.Tensor,
        refs: torch.Tensor,
        loss: RowwiseLoss,
        labels: torch.Tensor,
        ref_labels: torch.Tensor,
        self_index: torch.Tensor | None,
        rows: int,
    ) -> Values:
        device_type = embeddings.device.type
        dtype = compute_dtype(embeddings)
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            emb = embeddings.detach().to(dtype)
            ref = refs.detach().to(dtype)
            sim = emb @ ref.T
            values, weights = _chunked(loss, sim, labels, ref_labels, self_index, rows, emb.shape[1], True)
        ctx.save_for_backward(emb, ref, sim)
        ctx.dtypes = (embeddings.dtype, refs.dtype)
        # no references: the anchors are both sides of S, and one product serves both
        ctx.symmetric = refs is embeddings
        ctx.mark_non_differentiable(weights)
        return values, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: torch.Tensor, grad_weights: torch.Tensor):
        emb, ref, jac = ctx.saved_tensors
        scale = grad_values.to(jac.dtype).unsqueeze(1)
        grad_emb = grad_ref = None
        with torch.autocast(device_type=emb.device.type, enabled=False):
            if ctx.symmetric:
                # d/dE of S = E·Eᵀ: G·E + Gᵀ·E = (G + Gᵀ)·E with G = diag(scale)·J
                weighted = jac * scale
                grad_emb = ((weighted + weighted.T) @ emb).to(ctx.dtypes[0])
                return grad_emb, None, None, None, None, None, None
            if ctx.needs_input_grad[0]:
                # rows scale after the product: a (B, D) multiply instead of (B, M)
                grad_emb = ((jac @ ref) * scale).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_ref = (jac.T @ (emb * scale)).to(ctx.dtypes[1])
        return grad_emb, grad_ref, None, None, None, None, None


class MinedRowwiseLoss(RowwiseLoss):
    """A row-wise loss summing over the pairs that ``mining`` keeps (all of them without).

    ``mining`` is one of ``dmlray.losses.miners.MINING_METHODS`` (checked here, at
    construction) and ``mining_margin`` is MS mining's ε.
    """

    def __init__(self, mining: str | None = None, mining_margin: float = 0.1):
        super().__init__()
        check_mining(mining)
        self.mining = mining
        self.mining_margin = mining_margin
        self.generator: torch.Generator | None = None
        """Seeds distance-weighted mining; None uses the global RNG."""

    def mined(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) masks of the pairs the loss sums over."""
        return mine_pairs(
            self.mining,
            pairs.sim,
            pairs.pos,
            pairs.neg,
            margin=self.mining_margin,
            dim=pairs.dim,
            generator=self.generator,
        )
