"""The P×K training stream: endless batches of P classes × K images from class-grouped shards.

What it guarantees, for any world size R and any number of DataLoader workers (the
README's "Semantics you can rely on" says the same):

1. **Distinct, globally.** Every step's global batch is P·R distinct classes × K distinct
   images, each class on one rank: classes are partitioned across ranks and workers
   (:mod:`dmlray.data.partition`), and a batch takes one draw from each of P classes.
2. **Coverage.** A class's images, sorted by key, sit in a seeded cyclic order; its i-th
   draw of the run takes the K positions after window i (:func:`ticket_windows`). Every
   image is used before any is used again, and all equally often (within one).
3. **Any size.** Classes with fewer than K images are left out and counted; a dataset
   without P·R eligible classes raises :class:`DatasetTooSmall` at construction.
4. **Deterministic, resumable.** Nothing depends on timing: shards are read in a seeded
   order, ``open_shards`` at a time, one sample from each in turn. ``start_batch``
   continues the sequence: whole epochs are simulated from the shard layouts (no I/O),
   the classes carried over from the last one are read again, and the current epoch is
   read without decoding the batches already trained on.
5. **A stream.** Each worker reads its shards once per epoch. Memory is the pool of
   classes waiting to be drawn: about ``class_buffer / 2`` classes, at most
   ``max_per_class`` encoded images each (a seeded sample above that).

The pool: when a class has been read whole it brings ``n // K`` draws. Batches take one
draw from each of the P classes with the most draws left (classes carried over from an
epoch's end first among equals, ties at random), once ``class_buffer / 2`` classes are
ready (so a batch mixes shards) and P times the largest class's draws wait (so a class read
last can still be used whole). At an epoch's end the pool is drawn down while P classes
remain; the fewer than P left carry into the next epoch.

Bad data: a shard that fails to read or its checksum is excluded for the rest of the run
and counted (``stats.bad_shards``); a sample that does not decode too (its batch is
dropped, the next one used). From then on the sequence differs from the simulated one.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dmlray.data.health import StreamStats
from dmlray.data.partition import DatasetTooSmall, ShardLayout, Slot, eligible_classes, rank_slot, worker_slot
from dmlray.data.shards import class_runs
from dmlray.data.stream import RawSample, iter_shard
from dmlray.data.tario import ShardError
from dmlray.data.transforms import collate, decode

__all__ = ["DatasetTooSmall", "PKBatches", "stream_seed", "ticket_windows"]

Item = tuple[str, bytes]  # key, encoded image


def stream_seed(*parts: int | str) -> int:
    """A seed unique to its parts; unlike ``hash`` it does not depend on PYTHONHASHSEED."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def ticket_windows(first: int, draws: int, stride: int = 1, offset: int = 0) -> list[int]:
    """Window indices of a class's draws ``first .. first + draws − 1`` of the run; with
    ``stride`` workers sharing a class, worker ``offset`` takes every stride-th window."""
    return [(first + j) * stride + offset for j in range(draws)]


def class_order(label: int, n: int, seed: int) -> list[int]:
    """The seeded cyclic order of a class's n images (the same in every epoch)."""
    return random.Random(stream_seed(seed, "class-order", label)).sample(range(n), n)


@dataclass
class Ticket:
    """One draw of one class: K images taken from its cycle at window ``window``."""

    window: int
    epoch: int
    """Epoch whose read supplied the images (a class above max_per_class keeps a different
    sample each epoch)."""
    items: list[Item] | None
    """The K (key, bytes); None in a simulated epoch."""

    def read_items(self) -> list[Item]:
        """The K (key, bytes) of a draw from shards that were read."""
        if self.items is None:
            raise RuntimeError("a ticket of a simulated epoch holds no images")
        return self.items


Draw = list[tuple[int, Ticket]]  # one batch: P × (class, ticket)


class _ClassBuffer:
    """A class's samples as one epoch reads them: all of them, or, for a class larger than
    ``limit``, the ``limit`` with the smallest seeded key hashes (a uniform sample that does
    not depend on the order the samples arrive in)."""

    def __init__(self, limit: int, sample: bool, seed: int, label: int, epoch: int, simulated: bool = False):
        self.limit, self.sample, self.simulated = limit, sample, simulated
        self.salt = f"{seed}/keep/{label}/{epoch}/"
        self.kept: list = []
        self.count = 0
        """Samples of the class read (kept or not)."""

    def add(self, key: str, data: bytes | None) -> None:
        """One sample read; ``data`` None: known bad, counted but never drawn."""
        self.count += 1
        if self.simulated or data is None:
            return
        if not self.sample:
            self.kept.append((key, data))
            return
        priority = -random.Random(self.salt + key).random()
        if len(self.kept) < self.limit:
            heapq.heappush(self.kept, (priority, key, data))
        elif priority > self.kept[0][0]:
            heapq.heapreplace(self.kept, (priority, key, data))

    def size(self) -> int:
        """Images the class's draws are made from."""
        if self.simulated:
            return min(self.count, self.limit) if self.sample else self.count
        return len(self.kept)

    def items(self) -> list[Item] | None:
        """The kept samples sorted by key (None when simulated)."""
        if self.simulated:
            return None
        return sorted((k, d) for *_, k, d in self.kept) if self.sample else sorted(self.kept)

    def read_items(self) -> list[Item]:
        """``items()`` of a buffer of shards that were read."""
        items = self.items()
        if items is None:
            raise RuntimeError("a simulated class buffer holds no images")
        return items


@dataclass
class _SlotState:
    """What carries from one epoch of a slot to the next."""

    key: tuple[int, int, int, int]
    """(rank, world size, worker, workers): seeds the slot's epochs."""
    window: tuple[int, int]
    """(worker, workers) sharing the slot's classes, or (0, 1)."""
    used: Counter = field(default_factory=Counter)
    """Class → draws used so far: where its cycle continues."""
    carried: Counter = field(default_factory=Counter)
    """Class → epoch ends at which it was left in the pool: first among equals next time."""
    pool: dict[int, deque] = field(default_factory=dict)
    """Class → its tickets not yet drawn (insertion-ordered: deterministic)."""

    def copy(self) -> _SlotState:
        pool = {label: deque(tickets) for label, tickets in self.pool.items()}
        return _SlotState(self.key, self.window, Counter(self.used), Counter(self.carried), pool)

    def waiting(self) -> int:
        return sum(len(tickets) for tickets in self.pool.values())


class PKBatches(IterableDataset):
    """Endless P×K batches ``(images (P·K, C, H, W), labels (P·K,), keys)``; see the module
    docstring for what they guarantee.

    ``shards`` are :class:`~dmlray.data.partition.ShardLayout` s (``Manifest.layouts``), or
    URLs, which are read once (not decoded) to learn their layouts. ``rank`` of
    ``world_size`` selects this rank's classes; ``start_batch`` continues the rank's batch
    sequence there (DataLoader workers deliver the rank's batches in turn). ``checksums``
    ({url: sha256}) turns on checksum checks; ``class_filter(label) -> bool`` keeps only
    some classes; a custom ``read_shard(url)`` is supported (its :class:`ShardError` s are
    counted and the shard excluded). ``uint8`` yields uint8 images that
    ``transform.normalise`` finishes on the training device.
    """

    def __init__(
        self,
        shards: list[ShardLayout] | list[str],
        classes_per_batch: int,
        samples_per_class: int,
        transform: Callable[[bytes, random.Random], torch.Tensor],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        class_buffer: int = 128,
        open_shards: int = 4,
        read_shard: Callable[[str], Iterator[RawSample]] = iter_shard,
        *,
        start_batch: int = 0,
        max_per_class: int = 128,
        checksums: dict[str, str] | None = None,
        verify: bool = False,
        stats: StreamStats | None = None,
        class_filter: Callable[[int], bool] | None = None,
        uint8: bool = False,
    ):
        if not shards:
            raise ValueError("PKBatches needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.stats = stats if stats is not None else StreamStats()
        self.read_shard = read_shard
        self.layouts = [s if isinstance(s, ShardLayout) else self._scan(s) for s in shards]
        self.P, self.K = classes_per_batch, samples_per_class
        self.transform = transform
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.class_buffer = max(class_buffer, classes_per_batch)
        self.open_shards = max(1, open_shards)
        self.start_batch = start_batch
        self.max_per_class = max(max_per_class, samples_per_class)
        self.checksums = checksums or {}
        self.verify = verify
        self.uint8 = uint8
        self.eligibility = eligible_classes(self.layouts, samples_per_class, class_filter)
        self.slot = rank_slot(self.layouts, self.eligibility, classes_per_batch, rank, world_size, seed)
        self._bad_shards: set[str] = set()
        self._bad_keys: set[str] = set()

    @property
    def skipped(self) -> int:
        """Samples and shards skipped so far, across this stream's DataLoader workers."""
        return self.stats.skipped

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(worker, workers)

    def batches(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """The decoded batches DataLoader worker ``worker`` of ``num_workers`` delivers."""
        for index, draw in self.draws(worker, num_workers):
            batch = self._decode(draw, stream_seed(self.seed, "augment", self.rank, worker, num_workers, index))
            if batch is not None:
                yield batch

    def draws(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, Draw]]:
        """(index among this worker's batches, draw) from ``start_batch`` on, not decoded."""
        slot = worker_slot(self.layouts, self.slot, self.P, worker, num_workers, self.seed, self.rank)
        state = _SlotState(
            (self.rank, self.world_size, worker, num_workers), (worker, num_workers) if slot.shared else (0, 1)
        )
        skip = max(0, -(-(self.start_batch - worker) // num_workers))  # this worker's batches before start_batch
        index = skip
        state, skip, first_epoch = self._skip_epochs(slot, state, skip)
        if state.pool:
            self._reload(slot, state)
        empty = 0
        for epoch in itertools.count(first_epoch):
            n = 0
            for draw in self._epoch(slot, epoch, state):
                n += 1
                if skip:  # already trained on: read again, not decoded
                    skip -= 1
                    continue
                yield index, draw
                index += 1
            empty = 0 if n else empty + 1
            if empty >= 3:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: three epochs in a row gave no batch (all of "
                    f"its {len(slot.shards)} shard(s) unreadable?); stream stats: {self.stats.as_dict()}"
                )

    def _skip_epochs(self, slot: Slot, state: _SlotState, skip: int) -> tuple[_SlotState, int, int]:
        """(state, batches still to skip, epoch) after the whole epochs among the first
        ``skip`` batches, simulated from the layouts: nothing is read."""
        epoch = 0
        while skip:
            trial = state.copy()
            n = sum(1 for _ in self._epoch(slot, epoch, trial, simulated=True))
            if n == 0 or n > skip:
                break  # this epoch is read for real, from its start
            state, skip, epoch = trial, skip - n, epoch + 1
        return state, skip, epoch

    # ------------------------------------------------------------------ one epoch of one slot

    def _epoch(self, slot: Slot, epoch: int, state: _SlotState, simulated: bool = False) -> Iterator[Draw]:
        """The draws of one epoch of a slot: its shards read, or only their layouts counted."""
        rng = random.Random(stream_seed(self.seed, "epoch", *state.key, epoch))
        expected = {c: self.eligibility.counts[c] for c in slot.classes}
        ready_pool = min(max(self.P, self.class_buffer // 2), len(slot.classes))
        reserve = self._reserve(expected)
        unread = len(expected)
        order = list(slot.shards)
        rng.shuffle(order)
        buffers: dict[int, _ClassBuffer] = {}
        waiting = state.waiting()
        for label, buffer in self._complete_classes(order, expected, buffers, epoch, simulated):
            waiting += self._enqueue(state, label, buffer, epoch)
            unread -= 1
            while len(state.pool) >= ready_pool and (unread >= ready_pool or waiting - self.P >= reserve):
                waiting -= self.P
                yield self._take(state, rng)
        for label, buffer in buffers.items():  # classes cut short by a bad shard
            self._enqueue(state, label, buffer, epoch)
        while len(state.pool) >= self.P:
            yield self._take(state, rng)
        for label in state.pool:  # fewer than P classes left: they carry into the next epoch
            state.carried[label] += 1

    def _reserve(self, expected: dict[int, int]) -> int:
        """Draws kept waiting near an epoch's end.

        A class read last brings all its draws at once, each needing P−1 other classes
        beside it: near the epoch's end (fewer classes left to read than the pool holds),
        keep P times the largest class's draws waiting. Only then: holding them all epoch
        long makes a worker read in bursts, which stalls a DataLoader's in-order delivery.
        """
        return self.P * max(min(n, self.max_per_class) // self.K for n in expected.values())

    def _complete_classes(
        self, order: list[int], expected: dict[int, int], buffers: dict[int, _ClassBuffer], epoch: int, simulated: bool
    ) -> Iterator[tuple[int, _ClassBuffer]]:
        """(label, buffer) of each class as its last expected sample is read from the
        shards in ``order``; ``buffers`` keeps the classes not complete (yet)."""
        open_shard = self._virtual_shard if simulated else self._read
        for key, label, data in _Feeds(order, open_shard, self.open_shards):
            if label not in expected:
                continue
            buffer = buffers.get(label)
            if buffer is None:
                buffer = buffers[label] = self._buffer(label, epoch, expected[label], simulated)
            buffer.add(key, None if key in self._bad_keys else data)
            if buffer.count == expected[label]:
                yield label, buffers.pop(label)

    def _buffer(self, label: int, epoch: int, expected: int, simulated: bool = False) -> _ClassBuffer:
        return _ClassBuffer(self.max_per_class, expected > self.max_per_class, self.seed, label, epoch, simulated)

    def _enqueue(self, state: _SlotState, label: int, buffer: _ClassBuffer, epoch: int) -> int:
        """Add a class's draws of this epoch to the pool; returns how many."""
        n = buffer.size()
        if n < self.K:
            return 0
        pending = state.pool.setdefault(label, deque())
        worker, workers = state.window
        items = buffer.items()
        for window in ticket_windows(state.used[label] + len(pending), n // self.K, workers, worker):
            pending.append(Ticket(window, epoch, None if items is None else self._ticket_items(items, label, window)))
        return n // self.K

    def _ticket_items(self, items: list[Item], label: int, window: int) -> list[Item]:
        n = len(items)
        order = class_order(label, n, self.seed)
        return [items[order[(window * self.K + t) % n]] for t in range(self.K)]

    def _take(self, state: _SlotState, rng: random.Random) -> Draw:
        """One draw from each of the P classes with the most draws left, those carried over
        from epoch ends first among equals, ties broken at random: the pool drains evenly."""
        keyed = sorted(((len(t), state.carried[c], rng.random(), c) for c, t in state.pool.items()), reverse=True)
        out = []
        for *_, label in keyed[: self.P]:
            out.append((label, state.pool[label].popleft()))
            state.used[label] += 1
            if not state.pool[label]:
                del state.pool[label]
        return out

    def _reload(self, slot: Slot, state: _SlotState) -> None:
        """Images for the tickets a simulated epoch carried over: their classes read again."""
        labels = set(state.pool)
        samples: dict[int, list[Item]] = {label: [] for label in labels}
        for index in slot.shards:
            if any(c in labels for c, _ in self.layouts[index].classes):
                for key, label, data in self._read(index):
                    if label in labels:
                        samples[label].append((key, data))
        for label, tickets in state.pool.items():
            for ticket in tickets:
                buffer = self._buffer(label, ticket.epoch, self.eligibility.counts[label])
                for key, data in samples[label]:
                    buffer.add(key, data)
                ticket.items = self._ticket_items(buffer.read_items(), label, ticket.window)

    # ------------------------------------------------------------------ reading and decoding

    def _scan(self, url: str) -> ShardLayout:
        """A shard's layout by reading it (a bad shard gives what could be read)."""

        def labels() -> Iterator[int]:
            try:
                for _, label, _ in self.read_shard(url):
                    yield label
            except ShardError:
                return  # the stream finds the shard bad again when it reads it, and counts it

        return ShardLayout(url, tuple((c, n) for c, n in class_runs(labels())))

    def _read(self, index: int) -> Iterator[RawSample]:
        url = self.layouts[index].url
        if url in self._bad_shards:
            return iter(())
        if self.read_shard is iter_shard:
            return iter_shard(
                url, sha256=self.checksums.get(url), verify=self.verify, stats=self.stats, on_bad=self._bad_shards.add
            )
        return self._guarded(url, self.read_shard(url))

    def _guarded(self, url: str, samples: Iterator[RawSample]) -> Iterator[RawSample]:
        try:
            yield from samples
        except ShardError as exc:
            self._bad_shards.add(url)
            self.stats.skip_shard(url, exc.reason, checksum=exc.checksum)

    def _virtual_shard(self, index: int) -> Iterator[RawSample]:
        """A shard's labels as its layout lists them, without reading it (keys are dummies:
        a simulated epoch only counts)."""
        for label, n in self.layouts[index].classes:
            for _ in range(n):
                yield "", label, b""

    def _decode(self, draw: Draw, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        rng = random.Random(seed)  # per batch: augmentation does not depend on skipped batches
        images, labels, keys = [], [], []
        for label, ticket in draw:
            for key, data in ticket.read_items():
                try:
                    images.append(decode(self.transform, data, rng))
                except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
                    self._bad_keys.add(key)
                    self.stats.skip_sample(self._shard_of(label), key, f"cannot decode: {exc}")
                    return None
                labels.append(label)
                keys.append(key)
        self.stats.add("samples_used", len(images))
        return collate(self.transform, images, self.uint8), torch.tensor(labels, dtype=torch.long), keys

    def _shard_of(self, label: int) -> str:
        return next((layout.url for layout in self.layouts if any(c == label for c, _ in layout.classes)), "?")


class _Feeds:
    """Up to ``width`` shards read at once, one sample from each in turn (deterministic:
    the interleaving depends on the shards' contents, never on timing)."""

    def __init__(self, order: list[int], open_shard: Callable[[int], Iterator[RawSample]], width: int):
        self.pending = list(reversed(order))
        self.open_shard = open_shard
        self.active: list[Iterator[RawSample]] = []
        while self.pending and len(self.active) < width:
            self.active.append(open_shard(self.pending.pop()))

    def __iter__(self) -> Iterator[RawSample]:
        turn = 0
        while self.active:
            turn %= len(self.active)
            try:
                sample = next(self.active[turn])
            except StopIteration:
                if self.pending:
                    self.active[turn] = self.open_shard(self.pending.pop())
                else:
                    self.active.pop(turn)
                continue
            turn += 1
            yield sample
