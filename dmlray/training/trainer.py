"""The per-worker training loop: a small Trainer that knows nothing of Ray.

A step embeds the local P×K batch, gathers embeddings and labels from every rank (in
rank order), and minimises ``L(local, global batch) + w · L(local, memory)``; the memory
holds the detached global batches, so it is identical on every rank. Losses that are not
sums of per-anchor terms (``rank_decomposable = False``) are computed over the whole
global batch on every rank instead; both ways give the one-process gradient. With
``accumulate = n`` micro-batches (exact mode), the same holds for the n·R·b rows of all
micro-batches of all ranks (dmlray.training.accumulation).

The loss may also be a weighted sum of terms (``LossTerm``), each on its head's columns
of the model output, with its own memory, on class or pseudo-labels, each by the rules
above; their sum's gradient is then the one-process gradient too.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dmlray.losses.base import PairLoss
from dmlray.training import preemption
from dmlray.training.accumulation import backward_through_model, embed_without_graph, gradient_sync
from dmlray.training.distributed import all_gather_no_grad, all_gather_with_grad, world
from dmlray.training.memory import CrossBatchMemory


@dataclass
class StepResult:
    """What one step computed (tensors stay on device: no host sync in the step)."""

    loss: torch.Tensor
    batch_loss: torch.Tensor
    memory_loss: torch.Tensor | None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each loss term's value (before its weight), by term key; empty for a single loss."""

    def detached(self) -> StepResult:
        return StepResult(
            self.loss.detach(),
            self.batch_loss.detach(),
            None if self.memory_loss is None else self.memory_loss.detach(),
            {k: v.detach() for k, v in self.terms.items()},
        )


@dataclass
class LossTerm:
    """One weighted term of the training loss, reading its head's columns of the model output."""

    key: str
    """The term's name: metrics ``loss/<key>``, checkpoint entries."""
    loss_fn: PairLoss
    weight: float = 1.0
    columns: slice = field(default_factory=lambda: slice(None))
    """Columns of the model output the term reads (its head; all for a one-head model)."""
    other_columns: slice | None = None
    """A second head's columns, for two-branch terms (adversarial: ``aux_embeddings``).
    Such a term is a mean over rows, each rank its own (no gather)."""
    memory: CrossBatchMemory | None = None
    """The term's cross-batch memory (of its head's embeddings), or None."""
    pseudo_labels: bool = False
    """Pair on the batch's pseudo-labels (MIC's clusters) instead of its class labels."""


class PseudoLabelSource(Protocol):
    """Pseudo-labels of training samples by key, refreshed as training goes (MIC)."""

    def update(self, step: int) -> None:
        """Recompute the labels when due before this step (identically on every rank)."""

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """The labels of these samples (LongTensor, in order)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def training_loss(
    model: nn.Module,
    loss_fn: PairLoss,
    images: torch.Tensor,
    labels: torch.Tensor,
    memory: CrossBatchMemory | None = None,
    memory_weight: float = 1.0,
) -> StepResult:
    """Forward pass and loss of one step (no backward), with the global gather and memory."""
    return embedding_loss(loss_fn, model(images), labels, memory, memory_weight)


def embedding_loss(
    loss_fn: PairLoss,
    local: torch.Tensor,
    labels: torch.Tensor,
    memory: CrossBatchMemory | None = None,
    memory_weight: float = 1.0,
) -> StepResult:
    """The loss of this rank's embeddings ``local``, with the global gather and memory.

    With memory given, the detached global batch is enqueued *before* the memory term is
    computed (as in XBM); each anchor's own freshly written slot is excluded by identity.

    The anchors are this rank's rows, except for losses that are not sums of per-anchor
    terms (``rank_decomposable = False``): there every rank takes the whole global batch
    as anchors and computes the same loss (same rows in rank order, same RNG stream:
    ranks start from one seed and run the same ops). The gather's backward sums the R
    identical gradients of each row and DDP's average divides by R: exactly the
    one-process gradient; loss parameters get identical gradients, which their
    all-reduce-mean keeps.
    """
    rank, world_size = world()
    b = local.shape[0]
    whole = world_size > 1 and not loss_fn.rank_decomposable
    references = loss_fn.supports_references
    if not references and not whole:
        # proxy and classification losses pair anchors with their own parameters: no
        # gather (DDP's gradient average of local means is already the global mean)
        loss = loss_fn(local, labels)
        return StepResult(loss, loss, None)
    global_emb = all_gather_with_grad(local)
    global_labels = all_gather_no_grad(labels)
    if whole:
        anchors, anchor_labels = global_emb, global_labels
        own = torch.arange(world_size * b, device=local.device)
    else:
        anchors, anchor_labels = local, labels
        own = torch.arange(b, device=local.device) + rank * b
    if not references:
        loss = loss_fn(anchors, anchor_labels)
        return StepResult(loss, loss, None)
    batch_loss = _rank_loss(loss_fn, anchors, anchor_labels, global_emb, global_labels, own)
    if memory is None:
        return StepResult(batch_loss, batch_loss, None)
    slots = memory.enqueue(global_emb.detach(), global_labels)
    mem_emb, mem_labels = memory.contents()
    memory_loss = _rank_loss(loss_fn, anchors, anchor_labels, mem_emb, mem_labels, slots[own])
    return StepResult(batch_loss + memory_weight * memory_loss, batch_loss, memory_loss)


def terms_loss(
    terms: Sequence[LossTerm],
    output: torch.Tensor,
    labels: torch.Tensor,
    pseudo_labels: torch.Tensor | None = None,
    use_memory: bool = True,
    memory_weight: float = 1.0,
) -> StepResult:
    """The weighted sum of the terms on this rank's model output, each by ``embedding_loss``'s
    rules (gather, memory, whole-batch losses) on its own head and labels."""
    values: dict[str, torch.Tensor] = {}
    total, batch, memory_parts = [], [], []
    for term in terms:
        x = output[:, term.columns]
        if term.other_columns is not None:
            value = term.loss_fn(x, labels, aux_embeddings=output[:, term.other_columns])
            result = StepResult(value, value, None)
        else:
            y = pseudo_labels if term.pseudo_labels else labels
            if y is None:
                raise ValueError(f"loss term {term.key!r} reads pseudo-labels; the trainer has no pseudo_labels source")
            memory = term.memory if use_memory else None
            result = embedding_loss(term.loss_fn, x, y, memory, memory_weight)
        values[term.key] = result.loss
        total.append(term.weight * result.loss)
        batch.append(term.weight * result.batch_loss)
        if result.memory_loss is not None:
            memory_parts.append(term.weight * result.memory_loss)
    return StepResult(_sum(total), _sum(batch), _sum(memory_parts) if memory_parts else None, values)


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def _rank_loss(loss_fn: PairLoss, *args) -> torch.Tensor:
    """This rank's share of the loss, such that DDP's average over ranks is the global loss.

    Anchor means need nothing (equal local batches). A mean over pairs divides this
    rank's sum by the pair count of all ranks (times R, undone by DDP's average).
    """
    _, world_size = world()
    if world_size == 1 or not loss_fn.pair_mean:
        return loss_fn(*args)
    total, count = loss_fn.sum_and_count(*args)
    count = count.detach().clone()
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return total * world_size / count.clamp(min=1)


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).sum() / len(values)


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce-mean gradients of parameters outside DDP (loss proxies, centres)."""
    _, world_size = world()
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)


def rng_state() -> dict:
    """The process's RNG states as tensors and plain values, so a checkpoint loads with
    ``torch.load(weights_only=True)`` (numpy's state holds an ndarray, which it refuses)."""
    version, internal, gauss = random.getstate()
    # the legacy tuple (name, keys, pos, has_gauss, cached), typed as a union with the dict form
    name, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss),
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )


class Trainer:
    """Runs ``steps`` optimisation steps, evaluating and reporting every ``eval_every``.

    ``report(record, history, state)`` receives the new metrics record and the whole
    history at each log step (state None), and at each evaluation also the full
    checkpoint state; ``evaluate(step)`` returns metrics. ``batches(start_step)`` yields
    ``(images, labels[, keys])`` from that step on (``accumulate`` of them per step).

    The loss is ``loss_fn`` (with ``memory``), or the weighted sum of ``terms``, each then
    recorded as ``loss/<key>``; terms on pseudo-labels look the batch's keys up in
    ``pseudo_labels``, which is updated before every step and checkpointed.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: PairLoss | None = None,
        terms: Sequence[LossTerm] = (),
        pseudo_labels: PseudoLabelSource | None = None,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        batches: Callable[[int], Iterator[tuple]],
        steps: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        memory: CrossBatchMemory | None = None,
        memory_start: int = 0,
        memory_weight: float = 1.0,
        memory_ramp_steps: int = 0,
        evaluate: Callable[[int], dict] | None = None,
        eval_every: int = 100,
        log_every: int = 10,
        checkpoint_every: int = 0,
        accumulate: int = 1,
        accumulate_mode: str = "exact",
        clip_grad_norm: float = 0.0,
        amp: str = "none",
        channels_last: bool = False,
        report: Callable[[dict, list[dict], dict | None], None] = lambda record, history, state: None,
        raw_model: nn.Module | None = None,
        extra_metrics: Callable[[], dict] = dict,
    ):
        self.model = model
        self.raw_model = raw_model if raw_model is not None else model  # unwrapped (no DDP) for state
        if (loss_fn is None) == (not terms):
            raise ValueError("give the Trainer either loss_fn (and memory) or terms")
        if terms and memory is not None:
            raise ValueError("with terms, each LossTerm holds its own memory; memory must be None")
        self.named_terms = bool(terms)  # recorded one by one (loss/<key>)
        self.terms = list(terms) or [LossTerm("loss", cast(PairLoss, loss_fn), memory=memory)]
        keys = [t.key for t in self.terms]
        if len(set(keys)) != len(keys):
            raise ValueError(f"loss term keys must differ, got {keys}")
        # one module holding every loss parameter (optimiser, averaging, checkpoints)
        self.loss_fn: nn.Module = loss_fn if loss_fn is not None else nn.ModuleDict({t.key: t.loss_fn for t in terms})
        self.pseudo_labels = pseudo_labels
        self.memories = [t.memory for t in self.terms if t.memory is not None]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batches = batches
        self.steps = steps
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self.memory_start = memory_start
        self.memory_weight = memory_weight
        self.memory_ramp_steps = memory_ramp_steps
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.accumulate = accumulate
        if accumulate_mode not in ("exact", "independent"):
            raise ValueError(f"accumulate_mode must be exact or independent, got {accumulate_mode!r}")
        self.accumulate_mode = accumulate_mode
        self.clip_grad_norm = clip_grad_norm
        self.amp = amp
        self.channels_last = channels_last
        self.report = report
        self.extra_metrics = extra_metrics  # e.g. the data stream's skip counters
        self.step = 0
        self.restarts = 0
        self.resumed_from = 0  # the step this attempt started from: a restart's lost steps show in it
        self.history: list[dict] = []
        self.loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]

    def memory_weight_at(self, step: int) -> float:
        """The memory term's weight at a step: 0 before start, then ramped up if asked.

        A linear ramp avoids the loss jump users report when a full-weight memory
        switches on.
        """
        if not self.memories or step < self.memory_start:
            return 0.0
        if self.memory_ramp_steps <= 0:
            return self.memory_weight
        return self.memory_weight * min(1.0, (step - self.memory_start + 1) / self.memory_ramp_steps)

    def _autocast(self):
        if self.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, labels, pseudo-labels or None) of a ``(images, labels[, keys])`` batch."""
        images, labels, *rest = batch
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        pseudo = None
        if self.pseudo_labels is not None:
            if not rest:
                raise ValueError("pseudo-labels need the batches' sample keys: (images, labels, keys)")
            pseudo = self.pseudo_labels.lookup(rest[0]).to(self.device)
        return images, labels.to(self.device, non_blocking=True), pseudo

    def train_step(self, micro_batches: list[tuple]) -> StepResult:
        """One optimisation step over ``accumulate`` micro-batches.

        ``exact`` (the default) computes the loss of the whole accumulated global batch by
        gradient caching (dmlray.training.accumulation): the gradient of one batch n times
        larger. ``independent`` gathers and losses each micro-batch on its own and averages
        their gradients: one forward instead of two, but pairs only form within a micro-batch.
        """
        # flush the gradients as soon as we can, no need for this memory anymore
        self.optimizer.zero_grad(set_to_none=True)
        if self.pseudo_labels is not None:
            self.pseudo_labels.update(self.step)
        if self.accumulate_mode == "exact" and len(micro_batches) > 1:
            result = self._exact_step([self._to_device(b) for b in micro_batches])
        else:
            result = self._independent_step(micro_batches)
        average_gradients(self.loss_params)
        if self.clip_grad_norm > 0:
            # after DDP's all-reduce and the loss parameters' average: every rank clips the same norm
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return result

    def _exact_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> StepResult:
        """Gradient caching: the loss of all micro-batches' embeddings at once, then one
        replayed forward and backward per micro-batch for the model's gradient.

        The concatenated local embeddings go through the same ``embedding_loss`` as one
        big batch would: one gather of all n·b local rows (rank-major order), the memory
        enqueued once with the n·R·b global rows, pair means over the global count.
        """
        use_memory = self.step >= self.memory_start
        images = [x for x, _, _ in micro_batches]
        cache = embed_without_graph(self.model, images, self.device, self._autocast)
        labels = torch.cat([y for _, y, _ in micro_batches])
        pseudo = None if self.pseudo_labels is None else torch.cat([p for _, _, p in micro_batches if p is not None])
        with self._autocast():
            result = terms_loss(
                self.terms, cache.embeddings, labels, pseudo, use_memory, self.memory_weight_at(self.step)
            )
        result.loss.backward()  # into the cached embeddings and, once, the loss parameters
        backward_through_model(self.model, images, cache, self.device, self._autocast)
        return result.detached()

    def _independent_step(self, micro_batches: list[tuple]) -> StepResult:
        """Each micro-batch gathered and lossed on its own; gradients averaged."""
        use_memory = self.step >= self.memory_start
        weight = self.memory_weight_at(self.step)
        results = []
        for i, batch in enumerate(micro_batches):
            images, labels, pseudo = self._to_device(batch)
            with gradient_sync(self.model, last=i == len(micro_batches) - 1):
                with self._autocast():
                    result = terms_loss(self.terms, self.model(images), labels, pseudo, use_memory, weight)
                (result.loss / len(micro_batches)).backward()
            results.append(result.detached())
        memory_losses = [r.memory_loss for r in results if r.memory_loss is not None]
        return StepResult(
            _mean([r.loss for r in results]),
            _mean([r.batch_loss for r in results]),
            _mean(memory_losses) if memory_losses else None,
            {key: _mean([r.terms[key] for r in results]) for key in results[0].terms},
        )

    def train(self) -> list[dict]:
        """Run from the current step to ``steps``; returns the metrics history."""
        rank, world_size = world()
        stream = iter(self.batches(self.step))
        window_start, window_samples, wait = time.perf_counter(), 0, 0.0
        while self.step < self.steps:
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(self.accumulate)]
            wait += time.perf_counter() - t0
            result = self.train_step(micro)
            self.step += 1
            window_samples += sum(batch[1].shape[0] for batch in micro) * world_size
            is_eval = self.step % self.eval_every == 0 or self.step == self.steps
            # a preemption notice on any rank: all ranks checkpoint this step, then stop
            stop = preemption.stop_agreed(self.device) and self.step < self.steps
            is_checkpoint = is_eval or stop or (self.checkpoint_every > 0 and self.step % self.checkpoint_every == 0)
            if self.step % self.log_every == 0 or is_checkpoint:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                record = {
                    "step": self.step,
                    "loss": float(result.loss.detach()),
                    "batch_loss": float(result.batch_loss.detach()),
                    "memory_loss": None if result.memory_loss is None else float(result.memory_loss.detach()),
                    "samples_per_second": window_samples / elapsed,
                    "data_wait_fraction": wait / elapsed,
                    "memory_fill": len(self.memories[0]) if self.memories else 0,
                    "memory_weight": self.memory_weight_at(self.step - 1),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "restarts": self.restarts,
                    "resumed_from": self.resumed_from,
                    **({f"loss/{k}": float(v) for k, v in result.terms.items()} if self.named_terms else {}),
                    **self.extra_metrics(),
                }
                window_start, window_samples, wait = time.perf_counter(), 0, 0.0
                if is_eval and self.evaluate is not None:
                    record.update(self.evaluate(self.step))
                if stop:
                    record["preempted"] = True
                self.history.append(record)
                self.report(record, self.history, self.state_dict() if is_checkpoint else None)
            if stop:
                raise preemption.Preempted(self.step)
        return self.history

    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "memory": self.memory.state_dict() if self.memory is not None else None,
            # the terms' memories by term key (the single loss keeps "memory" above)
            "term_memories": {t.key: t.memory.state_dict() for t in self.terms if t.memory is not None}
            if self.named_terms
            else {},
            "pseudo_labels": self.pseudo_labels.state_dict() if self.pseudo_labels is not None else None,
            "step": self.step,
            "restarts": self.restarts,
            "history": list(self.history),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])
        saved_memories = state.get("term_memories") or {}
        for term in self.terms:
            if self.named_terms and term.memory is not None and term.key in saved_memories:
                term.memory.load_state_dict(saved_memories[term.key])
        if self.pseudo_labels is not None and state.get("pseudo_labels") is not None:
            self.pseudo_labels.load_state_dict(state["pseudo_labels"])
        self.step = self.resumed_from = int(state["step"])
        self.restarts = int(state.get("restarts", 0)) + 1  # loading a checkpoint is a restart
        self.history = list(state.get("history", []))
        set_rng_state(state["rng"])
