"""Streaming shards into training batches (P×K, resampled) and evaluation passes (exactly once).

Training: every (rank, DataLoader worker) draws its own seeded, resampled sequence of
shards — seeded by (seed, rank, worker, epoch), so workers need no shard assignment: they
draw different orders from the same list, and the stream is endless (the trainer takes
exactly ``steps`` batches, so every rank runs the same number of steps whatever the shard
sizes). It reads ``open_shards`` shards interleaved into a buffer of class groups; a batch
is P ready classes × K instances drawn without replacement. Memory is bounded by
``class_buffer`` classes × ``max_per_class`` encoded images (a reservoir sample when a
class has more); images are decoded only when drawn, and a class's leftovers (fewer than
K, no longer fed by a shard) are dropped at once, so the buffer holds useful samples.

Robustness: a read that fails mid-shard is resumed from its byte offset after a backoff
(S3 range requests); a truncated or corrupt shard, or one failing its sha256 (checked when
the manifest's checksums are given: while streaming, or before any sample with
``verify``), is cut short; a sample that fails to decode is skipped. All are counted in
``stats`` (shared with DataLoader workers: publish ``stream.skipped`` as a metric) and
logged once with shard and key; training continues. Wrong credentials or a missing object
are not transient: they raise.

Evaluation: shard i belongs to rank i mod world_size and is read once; nothing is
resampled, duplicated or lost (:func:`iter_eval_batches`, or :class:`EvalStream` to split
a rank's shards over DataLoader workers).
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
from collections import OrderedDict
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dmlray.data import storage
from dmlray.data.health import StreamStats
from dmlray.data.tario import ResumableReader, ShardError, iter_grouped, iter_members
from dmlray.data.transforms import collate, decode

log = logging.getLogger(__name__)

RawSample = tuple[str, int, bytes]  # key, label, encoded image
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")


def _spooled(url: str, reader: ResumableReader) -> Callable[[str, int], object]:
    """Read the whole object into a spooled temporary file; an opener replaying it."""
    spool = tempfile.SpooledTemporaryFile(max_size=32 * 2**20)
    while chunk := reader.read_chunk(1 << 20):
        spool.write(chunk)

    def open_at(_: str, start: int):
        spool.seek(start)
        return _Unclosable(spool)

    return open_at


class _Unclosable:
    """A view of the spool whose close() leaves the spool open (the reader closes views)."""

    def __init__(self, f):
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def close(self) -> None:
        pass


def iter_shard(
    url: str,
    *,
    sha256: str | None = None,
    verify: bool = False,
    stats: StreamStats | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    open_at: Callable[[str, int], object] = storage.open_read,
) -> Iterator[RawSample]:
    """(key, label, image bytes) of every sample of one tar shard, streamed.

    With ``sha256``, the bytes are hashed as they stream and checked at the end (the
    samples are already out by then: a mismatch is counted and logged); with ``verify``
    too, the shard is read whole first and skipped entirely on a mismatch. Without
    ``stats`` a bad shard raises :class:`ShardError` (the eval pass must not silently
    lose samples); with it, the shard is cut short and counted, and training goes on.
    """
    hasher = hashlib.sha256() if sha256 else None
    reader = ResumableReader(url, open_at=open_at, retries=retries, backoff=backoff, hasher=hasher,
                             on_retry=(lambda: stats.add("retries")) if stats is not None else None)
    try:
        if verify and sha256:
            replay = _spooled(url, reader)
            if hasher.hexdigest() != sha256:
                raise ShardError(url, f"sha256 {hasher.hexdigest()[:12]}… differs from the manifest's {sha256[:12]}…", checksum=True)
            reader.close()
            reader = ResumableReader(url, open_at=replay, retries=0)
            hasher = None
        for sample in iter_grouped(iter_members(reader)):
            key = str(sample["__key__"])
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            try:
                label = int(sample["cls"])
            except (KeyError, ValueError):
                label = None
            if ext is None or label is None:
                reason = "no image" if ext is None else "no integer cls"
                if stats is not None:
                    stats.skip_sample(url, key, reason)
                else:
                    log.warning("shard %s: sample %s has %s; skipped", url, key, reason)
                continue
            if stats is not None:
                stats.add("samples_read")
            yield key, label, sample[ext]
        if hasher is not None:
            reader.drain()
            if hasher.hexdigest() != sha256:
                raise ShardError(url, f"sha256 {hasher.hexdigest()[:12]}… differs from the manifest's {sha256[:12]}… "
                                 "(its samples were already used)", checksum=True)
    except ShardError as exc:
        if stats is None:
            raise
        stats.skip_shard(url, exc.reason, checksum=exc.checksum)
    finally:
        reader.close()


def stream_seed(seed: int, rank: int, worker: int, epoch: int = 0) -> int:
    """A seed unique to (run seed, rank, worker, epoch) (tuples of ints hash the same in
    every process: no PYTHONHASHSEED dependence)."""
    return hash((seed, rank, worker, epoch)) & 0x7FFFFFFF


class _Feed:
    """One open shard and the class it is currently delivering."""

    def __init__(self, url: str, samples: Iterator[RawSample]):
        self.url = url
        self.samples = samples
        self.label: int | None = None
        self.delivered = 0


class PKBatches(IterableDataset):
    """Endless P×K batches ``(images (P·K, C, H, W), labels (P·K,))`` from class-grouped shards.

    ``checksums`` ({url: sha256}, e.g. ``Manifest.shard_checksums(split)``) turns on the
    checksum check; ``class_filter(label) -> bool`` keeps only some classes. A custom
    ``read_shard(url)`` is supported; its :class:`ShardError` s are counted and skipped.
    ``uint8`` yields uint8 images that ``transform.normalise`` turns into the float batch
    on the training device (natural transform only): a quarter of the bytes through the
    DataLoader's shared memory and to the GPU, and no float pages to fault in per batch.
    """

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
        *,
        epoch: int = 0,
        max_per_class: int = 64,
        checksums: dict[str, str] | None = None,
        verify: bool = False,
        stats: StreamStats | None = None,
        class_filter: Callable[[int], bool] | None = None,
        uint8: bool = False,
    ):
        if not shard_urls:
            raise ValueError("PKBatches needs at least one shard")
        self.shard_urls = list(shard_urls)
        self.P = classes_per_batch
        self.K = samples_per_class
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.epoch = epoch
        self.class_buffer = max(class_buffer, classes_per_batch)
        self.open_shards = open_shards
        self.read_shard = read_shard
        self.max_per_class = max(max_per_class, samples_per_class)
        self.checksums = checksums or {}
        self.verify = verify
        self.stats = stats if stats is not None else StreamStats()
        self.class_filter = class_filter
        self.uint8 = uint8
        # wait for this many ready classes before drawing: a batch then mixes shards
        self.ready_pool = max(self.P, self.class_buffer // 2)

    @property
    def skipped(self) -> int:
        """Samples and shards skipped so far, across this stream's DataLoader workers."""
        return self.stats.skipped

    def set_epoch(self, epoch: int) -> None:
        """Reseed the next iteration (each epoch draws a different, reproducible order)."""
        self.epoch = epoch

    def _open(self, url: str) -> Iterator[RawSample]:
        if self.read_shard is iter_shard:
            return iter_shard(url, sha256=self.checksums.get(url), verify=self.verify, stats=self.stats)
        return self._guarded(url, self.read_shard(url))

    def _guarded(self, url: str, samples: Iterator[RawSample]) -> Iterator[RawSample]:
        try:
            yield from samples
        except ShardError as exc:
            self.stats.skip_shard(url, exc.reason, checksum=exc.checksum)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(stream_seed(self.seed, self.rank, worker, self.epoch))
        feeds: list[_Feed] = []
        groups: OrderedDict[int, list[tuple[str, int, bytes, str]]] = OrderedDict()
        seen: dict[int, int] = {}  # samples of a class offered to its group (reservoir)
        ready: set[int] = set()
        barren = 0  # shards in a row that gave nothing: all broken means a broken dataset

        def open_next() -> _Feed:
            url = rng.choice(self.shard_urls)
            return _Feed(url, self._open(url))

        def release(label: int | None) -> None:
            """A feed moved past ``label``: leftovers too few for a batch are useless."""
            if label is None or label in ready or any(f.label == label for f in feeds):
                return
            groups.pop(label, None)
            seen.pop(label, None)

        feeds = [open_next() for _ in range(self.open_shards)]
        turn = 0
        while True:
            turn = (turn + 1) % len(feeds)
            feed = feeds[turn]
            try:
                key, label, data = next(feed.samples)
            except StopIteration:
                barren = 0 if feed.delivered else barren + 1
                if barren > 2 * len(self.shard_urls) + 8:
                    raise RuntimeError(f"no samples from {barren} shards in a row; stream stats: {self.stats.as_dict()}")
                finished = feed.label
                feeds[turn] = open_next()
                release(finished)
                continue
            feed.delivered += 1  # before the filter: a shard of filtered classes is not broken
            if self.class_filter is not None and not self.class_filter(label):
                continue
            if label != feed.label:
                previous, feed.label = feed.label, label
                release(previous)
            group = groups.setdefault(label, [])
            groups.move_to_end(label)
            count = seen[label] = seen.get(label, 0) + 1
            item = (key, label, data, feed.url)
            if len(group) < self.max_per_class:
                group.append(item)
            else:  # reservoir: a uniform sample of the class within bounded memory
                j = rng.randrange(count)
                if j < self.max_per_class:
                    group[j] = item
            if len(group) >= self.K:
                ready.add(label)
            if len(groups) > self.class_buffer:
                evicted, _ = groups.popitem(last=False)  # least recently fed class
                ready.discard(evicted)
                seen.pop(evicted, None)
            if len(ready) >= self.ready_pool:
                batch = self._draw(groups, ready, seen, rng, {f.label for f in feeds})
                if batch is not None:
                    yield batch

    def _draw(self, groups, ready: set[int], seen: dict[int, int], rng: random.Random,
              feeding: set) -> tuple[torch.Tensor, torch.Tensor] | None:
        """P ready classes × K decoded images. A class with undecodable images is replaced
        by another ready class; when too few classes succeed, their good samples go back
        to the buffer and None tells the caller to read on. Every failure removes at least
        one bad sample for good, so bad data cannot stall the stream."""
        chosen: list[tuple[int, list, list[torch.Tensor]]] = []
        for label in rng.sample(sorted(ready), len(ready)):
            if len(chosen) == self.P:
                break
            group = groups[label]
            rng.shuffle(group)
            items, tensors = [], []
            while len(items) < self.K and group:
                item = group.pop()
                try:
                    tensors.append(decode(self.transform, item[2], rng))
                    items.append(item)
                except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
                    self.stats.skip_sample(item[3], item[0], f"cannot decode: {exc}")
            if len(items) == self.K:
                chosen.append((label, items, tensors))
            else:
                group.extend(items)  # too few good ones: they wait for more of their class
            self._settle(label, groups, ready, seen, feeding)
        if len(chosen) < self.P:
            for label, items, _ in chosen:
                group = groups.setdefault(label, [])
                group.extend(items)
                if len(group) >= self.K:
                    ready.add(label)
            return None
        self.stats.add("samples_used", self.P * self.K)
        images = [t for _, _, tensors in chosen for t in tensors]
        labels = [label for label, items, _ in chosen for _ in items]
        return collate(self.transform, images, self.uint8), torch.tensor(labels, dtype=torch.long)

    def _settle(self, label: int, groups, ready: set[int], seen: dict[int, int], feeding: set) -> None:
        """After a draw from ``label``: not ready below K; dropped if nothing will refill it."""
        group = groups[label]
        if len(group) < self.K:
            ready.discard(label)
            if label not in feeding:
                del groups[label]
                seen.pop(label, None)


def rank_shards(shard_urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards one rank reads in an evaluation pass (round-robin, disjoint, complete)."""
    return shard_urls[rank::world_size]


def iter_eval_batches(
    shard_urls: list[str],
    transform: Callable[[bytes, random.Random | None], torch.Tensor],
    batch_size: int,
    read_shard: Callable[[str], Iterator[RawSample]] = iter_shard,
    *,
    stats: StreamStats | None = None,
    checksums: dict[str, str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Every sample of the given shards exactly once, in order, as (images, labels, keys).

    Without ``stats`` anything bad raises (an evaluation must not quietly shrink); with
    it, bad shards and undecodable samples are skipped and counted.
    """
    images, labels, keys = [], [], []
    for url in shard_urls:
        if read_shard is iter_shard:
            samples = iter_shard(url, sha256=(checksums or {}).get(url), stats=stats)
        else:
            samples = read_shard(url)
        for key, label, data in samples:
            try:
                images.append(decode(transform, data, None))
            except Exception as exc:
                if stats is None:
                    raise ValueError(f"{url}: sample {key} cannot be decoded: {exc}") from exc
                stats.skip_sample(url, key, f"cannot decode: {exc}")
                continue
            labels.append(label)
            keys.append(key)
            if len(images) == batch_size:
                yield collate(transform, images), torch.tensor(labels, dtype=torch.long), keys
                images, labels, keys = [], [], []
    if images:
        yield collate(transform, images), torch.tensor(labels, dtype=torch.long), keys


class EvalStream(IterableDataset):
    """A rank's evaluation shards split over DataLoader workers (worker w of n reads
    shards w, w+n, ...): disjoint and complete, so the pass still sees every sample once;
    batches arrive in worker order, not shard order. Use ``batch_size=None`` in the loader."""

    def __init__(self, shard_urls: list[str], transform: Callable, batch_size: int,
                 stats: StreamStats | None = None, checksums: dict[str, str] | None = None):
        self.shard_urls = list(shard_urls)
        self.transform = transform
        self.batch_size = batch_size
        self.stats = stats
        self.checksums = checksums

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        info = get_worker_info()
        urls = self.shard_urls if info is None else rank_shards(self.shard_urls, info.id, info.num_workers)
        return iter_eval_batches(urls, self.transform, self.batch_size, stats=self.stats, checksums=self.checksums)
