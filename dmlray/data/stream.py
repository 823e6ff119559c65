"""Streaming shards into training batches (P×K, resampled) and evaluation passes (exactly once).

Training: every (rank, DataLoader worker) draws its own seeded, resampled sequence of
shards, reads ``open_shards`` of them interleaved, and fills a bounded buffer of class
groups; a batch is P ready classes × K instances, drawn without replacement from the
buffer. The stream is endless: the trainer takes exactly ``steps`` batches, so every
rank runs the same number of steps whatever the shard sizes.

Evaluation: shard i belongs to rank i mod world_size and is read once; nothing is
resampled, duplicated or lost.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dmlray.data import storage

log = logging.getLogger(__name__)

RawSample = tuple[str, int, bytes]  # key, label, encoded image


def iter_shard(url: str) -> Iterator[RawSample]:
    """(key, label, image bytes) of every sample of one tar shard, streamed."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = storage.open_read(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        for sample in group_by_keys(files):
            image_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
            if image_ext is None or "cls" not in sample:
                log.warning("shard %s: sample %s has no image or no cls; skipped", url, sample.get("__key__"))
                continue
            yield sample["__key__"], int(sample["cls"]), sample[image_ext]
    finally:
        stream.close()


def stream_seed(seed: int, rank: int, worker: int, epoch: int = 0) -> int:
    """A seed unique to (run seed, rank, worker, epoch)."""
    return hash((seed, rank, worker, epoch)) & 0x7FFFFFFF


class PKBatches(IterableDataset):
    """Endless P×K batches ``(images (P·K, C, H, W), labels (P·K,))`` from class-grouped shards."""

    def __init__(
        self,
        shard_urls: list[str],
        classes_per_batch: int,
        samples_per_class: int,
        transform: Callable[[bytes, random.Random], torch.Tensor],
        seed: int = 0,
        rank: int = 0,
        class_buffer: int = 128,
        open_shards: int = 4,
        read_shard: Callable[[str], Iterator[RawSample]] = iter_shard,
    ):
        if not shard_urls:
            raise ValueError("PKBatches needs at least one shard")
        self.shard_urls = list(shard_urls)
        self.P = classes_per_batch
        self.K = samples_per_class
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.class_buffer = max(class_buffer, classes_per_batch)
        self.open_shards = open_shards
        self.read_shard = read_shard
        # wait for this many ready classes before drawing: a batch then mixes shards
        self.ready_pool = max(self.P, self.class_buffer // 2)

    def _shard_sequence(self, rng: random.Random) -> Iterator[Iterator[RawSample]]:
        while True:
            yield self.read_shard(rng.choice(self.shard_urls))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(stream_seed(self.seed, self.rank, worker))
        shards = self._shard_sequence(rng)
        readers = [next(shards) for _ in range(self.open_shards)]
        groups: OrderedDict[int, list[RawSample]] = OrderedDict()
        ready: set[int] = set()
        turn = 0
        while True:
            turn = (turn + 1) % len(readers)
            try:
                sample = next(readers[turn])
            except StopIteration:
                readers[turn] = next(shards)
                continue
            label = sample[1]
            group = groups.setdefault(label, [])
            group.append(sample)
            groups.move_to_end(label)
            if len(group) >= self.K:
                ready.add(label)
            if len(groups) > self.class_buffer:
                evicted, _ = groups.popitem(last=False)  # least recently fed class
                ready.discard(evicted)
            if len(ready) >= self.ready_pool:
                yield self._draw(groups, ready, rng)

    def _draw(self, groups, ready, rng: random.Random):
        images, labels = [], []
        for label in rng.sample(sorted(ready), self.P):
            group = groups[label]
            rng.shuffle(group)
            take, groups[label] = group[: self.K], group[self.K :]
            if len(groups[label]) < self.K:
                ready.discard(label)
            if not groups[label]:
                del groups[label]
            for key, lab, data in take:
                images.append(self.transform(data, rng))
                labels.append(lab)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def rank_shards(shard_urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards one rank reads in an evaluation pass (round-robin, disjoint, complete)."""
    return shard_urls[rank::world_size]


def iter_eval_batches(
    shard_urls: list[str],
    transform: Callable[[bytes, random.Random | None], torch.Tensor],
    batch_size: int,
    read_shard: Callable[[str], Iterator[RawSample]] = iter_shard,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Every sample of the given shards exactly once, in order, as (images, labels, keys)."""
    images, labels, keys = [], [], []
    for url in shard_urls:
        for key, label, data in read_shard(url):
            images.append(transform(data, None))
            labels.append(label)
            keys.append(key)
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long), keys
                images, labels, keys = [], [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long), keys
