"""Reading shards: every sample of a tar shard, streamed and checked, and evaluation passes
that see every sample exactly once. The P×K training stream built on these is
:mod:`dmlray.data.pk_batches`.

Robustness: a read that fails mid-shard is resumed from its byte offset after a backoff
(S3 range requests); a truncated or corrupt shard, or one failing its sha256 (checked when
the manifest's checksums are given: while streaming, or before any sample with
``verify``), is cut short; a sample that fails to decode is skipped. All are counted in
``stats`` (shared with DataLoader workers: publish ``stream.skipped`` as a metric) and
logged once with shard and key. Wrong credentials or a missing object are not transient:
they raise.

Evaluation: shard i belongs to rank i mod world_size and is read once; nothing is
resampled, duplicated or lost (:func:`iter_eval_batches`, or :class:`EvalStream` to split
a rank's shards over DataLoader workers).
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dmlray.data import storage
from dmlray.data.health import StreamStats
from dmlray.data.partition import ShardLayout
from dmlray.data.shards import class_runs
from dmlray.data.tario import Readable, ResumableReader, ShardError, iter_grouped, iter_members
from dmlray.data.transforms import collate, decode

log = logging.getLogger(__name__)

RawSample = tuple[str, int, bytes]  # key, label, encoded image
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")


def _spooled(url: str, reader: ResumableReader) -> Callable[[str, int], Readable]:
    """Read the whole object into a spooled temporary file; an opener replaying it."""
    spool = tempfile.SpooledTemporaryFile(max_size=32 * 2**20)
    while chunk := reader.read_chunk(1 << 20):
        spool.write(chunk)

    def open_at(_: str, start: int) -> Readable:
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


def _checksum_error(url: str, actual: str, expected: str, note: str = "") -> ShardError:
    return ShardError(url, f"sha256 {actual[:12]}… differs from the manifest's {expected[:12]}…{note}", checksum=True)


def iter_shard(
    url: str,
    *,
    sha256: str | None = None,
    verify: bool = False,
    stats: StreamStats | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    open_at: Callable[[str, int], Readable] = storage.open_read,
    on_bad: Callable[[str], None] | None = None,
) -> Iterator[RawSample]:
    """(key, label, image bytes) of every sample of one tar shard, streamed.

    With ``sha256``, the bytes are hashed as they stream and checked at the end (the
    samples are already out by then: a mismatch is counted and logged); with ``verify``
    too, the shard is read whole first and skipped entirely on a mismatch. Without
    ``stats`` a bad shard raises :class:`ShardError` (the eval pass must not silently
    lose samples); with it, the shard is cut short and counted (and ``on_bad(url)`` told),
    and training goes on.
    """
    hasher = hashlib.sha256() if sha256 else None
    reader = ResumableReader(
        url,
        open_at=open_at,
        retries=retries,
        backoff=backoff,
        hasher=hasher,
        on_retry=(lambda: stats.add("retries")) if stats is not None else None,
    )
    try:
        if verify and sha256 and hasher is not None:
            replay = _spooled(url, reader)
            if hasher.hexdigest() != sha256:
                raise _checksum_error(url, hasher.hexdigest(), sha256)
            reader.close()
            reader = ResumableReader(url, open_at=replay, retries=0)
            hasher = None
        for key, sample in iter_grouped(iter_members(reader)):
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
        if sha256 and hasher is not None:
            reader.drain()
            if hasher.hexdigest() != sha256:
                raise _checksum_error(url, hasher.hexdigest(), sha256, " (its samples were already used)")
    except ShardError as exc:
        if stats is None:
            raise
        stats.skip_shard(url, exc.reason, checksum=exc.checksum)
        if on_bad is not None:
            on_bad(url)
    finally:
        reader.close()


def scan_layouts(urls: list[str], read_shard: Callable[[str], Iterator[RawSample]] = iter_shard) -> list[ShardLayout]:
    """Shard layouts by reading the shards (no decoding): for manifests written before
    they listed per-class counts, and for shards without a manifest. Bad shards raise."""
    return [
        ShardLayout(url, tuple((c, n) for c, n in class_runs(label for _, label, _ in read_shard(url)))) for url in urls
    ]


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

    def __init__(
        self,
        shard_urls: list[str],
        transform: Callable,
        batch_size: int,
        stats: StreamStats | None = None,
        checksums: dict[str, str] | None = None,
    ):
        self.shard_urls = list(shard_urls)
        self.transform = transform
        self.batch_size = batch_size
        self.stats = stats
        self.checksums = checksums

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        info = get_worker_info()
        urls = self.shard_urls if info is None else rank_shards(self.shard_urls, info.id, info.num_workers)
        return iter_eval_batches(urls, self.transform, self.batch_size, stats=self.stats, checksums=self.checksums)
