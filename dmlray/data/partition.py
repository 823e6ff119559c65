"""Which classes and shards each rank and DataLoader worker of the P×K stream owns.

The training stream guarantees that a step's global batch is P·R distinct classes × K
distinct images, each class on one rank. It gets there by partitioning *classes*, not
sampling them independently per rank:

- A class is **eligible** when it has at least K images (after the optional class filter,
  e.g. the validation hold-out). Classes with fewer are left out and counted.
- The eligible classes, in the order the shards store them, are rotated by a seeded
  offset and cut into R contiguous ranges of equal size (±1 class): rank r draws only from
  range r, for the whole run. Because shards hold whole classes in order, a contiguous
  range lives in a contiguous run of shards, so each rank reads only its own shards and
  at most the R−1 boundary shards are read by two ranks: read amplification
  (S + R − 1) / S for S shards (1.14 for SOP's ~50 shards on 8 ranks). A small dataset
  with fewer shards than ranks is read by several ranks, each keeping its own classes.
- Inside a rank, the range is cut again among the DataLoader workers the same way, when
  it holds at least P classes per worker; otherwise the workers share the rank's range
  (each reads all of the rank's shards: small datasets only).

Everything here is a pure function of the manifest's per-shard class counts, the seed and
the world size: every rank computes the same partition without talking to the others.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class DatasetTooSmall(ValueError):
    """The dataset cannot fill the requested P×K batch on every rank."""


@dataclass(frozen=True)
class ShardLayout:
    """One shard as the stream plans with it: where it is and what it holds."""

    url: str
    classes: tuple[tuple[int, int], ...]
    """(class, samples) runs in the order the shard stores them."""
    bytes: int = 0
    """Size of the shard (0 = unknown); only for reporting read amplification."""

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.classes)


@dataclass(frozen=True)
class Eligibility:
    """The classes a P×K stream can draw, and those it leaves out."""

    counts: dict[int, int]
    """Eligible class → images, in the order the shards store the classes."""
    excluded: dict[int, int]
    """Classes with fewer than K images → their image count."""
    samples_per_class: int
    """K, the threshold used."""

    def describe_excluded(self) -> str:
        n = len(self.excluded)
        if not n:
            return "every class has enough images"
        return (
            f"{n} class(es) with fewer than K={self.samples_per_class} images left out "
            f"({sum(self.excluded.values())} images)"
        )


@dataclass(frozen=True)
class Slot:
    """What one rank, or one DataLoader worker of a rank, reads and draws from."""

    classes: tuple[int, ...]
    """Classes drawn, in the order the shards store them."""
    shards: tuple[int, ...]
    """Indices (into the layout list) of the shards holding those classes, in order."""
    shared: bool = False
    """True when another worker of the same rank draws the same classes (small datasets)."""


def eligible_classes(
    layouts: Iterable[ShardLayout], samples_per_class: int, class_filter: Callable[[int], bool] | None = None
) -> Eligibility:
    """Per-class image counts over all shards; classes below K are excluded."""
    counts: dict[int, int] = {}
    for layout in layouts:
        for label, n in layout.classes:
            if class_filter is None or class_filter(label):
                counts[label] = counts.get(label, 0) + n
    eligible = {c: n for c, n in counts.items() if n >= samples_per_class}
    excluded = {c: n for c, n in counts.items() if n < samples_per_class}
    return Eligibility(eligible, excluded, samples_per_class)


def check_fillable(eligibility: Eligibility, classes_per_batch: int, world_size: int, where: str = "") -> None:
    """Raise :class:`DatasetTooSmall` when P·R distinct eligible classes do not exist."""
    P, K, R = classes_per_batch, eligibility.samples_per_class, world_size
    have = len(eligibility.counts)
    if have >= P * R:
        return
    source = f" in {where}" if where else ""
    excluded = f"; {len(eligibility.excluded)} more have fewer than K images" if eligibility.excluded else ""
    raise DatasetTooSmall(
        f"the training data{source} has {have} eligible classes (at least K={K} images each){excluded}, "
        f"but a global batch needs P·R = {P}·{R} = {P * R} distinct classes "
        f"(data.classes_per_batch={P}, data.samples_per_class={K}, {R} rank(s)): "
        f"lower data.classes_per_batch or data.samples_per_class, or train on fewer workers"
    )


def contiguous_ranges(ordered: list[int], parts: int, offset: int) -> list[list[int]]:
    """``ordered`` rotated left by ``offset`` and cut into ``parts`` contiguous pieces whose
    sizes differ by at most one."""
    rotated = ordered[offset:] + ordered[:offset]
    base, extra = divmod(len(rotated), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append(rotated[start : start + size])
        start += size
    return out


def _shards_of(layouts: list[ShardLayout], classes: Iterable[int]) -> tuple[int, ...]:
    wanted = set(classes)
    return tuple(i for i, layout in enumerate(layouts) if any(c in wanted for c, _ in layout.classes))


def _offset(seed: int, what: str, n: int) -> int:
    return random.Random(f"pk-partition/{seed}/{what}").randrange(n) if n else 0


def rank_slot(
    layouts: list[ShardLayout], eligibility: Eligibility, classes_per_batch: int, rank: int, world_size: int, seed: int
) -> Slot:
    """The classes and shards of one rank (disjoint across ranks, fixed for the run)."""
    check_fillable(eligibility, classes_per_batch, world_size)
    ordered = list(eligibility.counts)
    ranges = contiguous_ranges(ordered, world_size, _offset(seed, f"R{world_size}", len(ordered)))
    mine = set(ranges[rank])
    return Slot(tuple(c for c in ordered if c in mine), _shards_of(layouts, mine))


def worker_slot(
    layouts: list[ShardLayout],
    rank: Slot,
    classes_per_batch: int,
    worker: int,
    num_workers: int,
    seed: int,
    rank_index: int,
) -> Slot:
    """One DataLoader worker's part of its rank's slot (the whole slot when too small to split)."""
    if num_workers <= 1:
        return rank
    if len(rank.classes) < classes_per_batch * num_workers:
        return Slot(rank.classes, rank.shards, shared=True)
    ordered = list(rank.classes)
    ranges = contiguous_ranges(ordered, num_workers, _offset(seed, f"r{rank_index}/W{num_workers}", len(ordered)))
    mine = set(ranges[worker])
    return Slot(tuple(c for c in ordered if c in mine), _shards_of(layouts, mine))


def read_amplification(layouts: list[ShardLayout], slots: list[Slot]) -> float:
    """Bytes (or samples, where sizes are unknown) read per epoch by all slots together,
    over the dataset's size: 1.0 means every byte is read by exactly one slot."""

    def size(i: int) -> int:
        return layouts[i].bytes or layouts[i].samples

    total = sum(size(i) for i in range(len(layouts)))
    read = sum(size(i) for slot in slots for i in slot.shards)
    return read / max(total, 1)
