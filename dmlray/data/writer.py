"""Writing the shards of every split in parallel, resumably, reporting bad input.

The main thread walks each split's samples (only listing files, for file-based readers)
and cuts them into shards with :func:`shards.plan_shards`; a thread pool writes the
shards: it reads the images (Pillow and file reads release the GIL), builds the tar,
hashes it and publishes it (a rename on disk, a multipart upload to S3). Shards of
different splits overlap in the pool. Names and contents depend only on the plan, never
on thread timing, so two runs produce identical shards.

Resuming: after each shard is published, ``<dst>/_partial/<split>.json`` records it with
the fingerprint of its planned content. A re-run that plans a shard with the same
fingerprint, and finds the object with the recorded size, reuses it without reading or
writing anything. The manifest is still written last, by the caller.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from dmlray.data import storage
from dmlray.data.records import Sample
from dmlray.data.shards import MANIFEST_NAME, ShardInfo, class_runs, plan_shards, shard_name, write_tar
from dmlray.data.sources import BadInputError

log = logging.getLogger(__name__)

PARTIAL_DIR = "_partial"


def default_workers() -> int:
    """Threads writing shards: enough to overlap reading, encoding and uploading."""
    return max(2, min(8, os.cpu_count() or 2))


class PartialLog:
    """``<dst>/_partial/<split>.json``: the shards of a split known to be complete."""

    def __init__(self, dst: str, split: str, known: dict[str, dict] | None = None):
        self.url = storage.join(dst, PARTIAL_DIR, f"{split}.json")
        self.lock = threading.Lock()
        self.done: dict[str, dict] = dict(known or {})
        try:
            self.done.update(json.loads(storage.read_bytes(self.url))["shards"])
        except storage.StorageError as exc:
            if not exc.missing:
                raise
        except (ValueError, KeyError):
            log.warning("%s is unreadable; shards of this split are written again", self.url)

    def reusable(self, name: str, fingerprint: str, url: str) -> dict | None:
        """The recorded entry of a complete shard with this planned content, if any."""
        entry = self.done.get(name)
        if entry is None or entry.get("fingerprint") != fingerprint:
            return None
        if entry["samples"] and not entry.get("class_counts"):
            return None  # recorded before per-class counts: written again to get them
        return entry if storage.size(url) == entry["bytes"] else None

    def record(self, name: str, entry: dict) -> None:
        with self.lock:  # whole-file rewrite: a crash leaves the previous version
            self.done[name] = entry
            storage.write_bytes(self.url, json.dumps({"shards": self.done}, indent=1).encode())

    def remove(self) -> None:
        storage.delete(self.url)


def known_shards(dst: str) -> dict[str, dict]:
    """Shards listed by an existing manifest at ``dst`` (also reusable when re-packing)."""
    try:
        data = json.loads(storage.read_bytes(storage.join(dst, MANIFEST_NAME)))
    except (storage.StorageError, ValueError):
        return {}
    out = {}
    for split in data.get("splits", {}).values():
        skipped = split.get("skipped", [])
        for shard in split.get("shards", []):
            if shard.get("fingerprint"):
                out[shard["name"]] = dict(shard, skipped=[s for s in skipped if s.get("shard") == shard["name"]])
    return out


def fingerprint(salt: str, name: str, samples: list[Sample]) -> str:
    digest = hashlib.sha256(f"{salt}\n{name}\n".encode())
    for sample in samples:
        digest.update(sample.fingerprint().encode() + b"\n")
    return digest.hexdigest()


@dataclass
class SplitResult:
    """What was written for one split."""

    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    """Bad inputs left out: {"path", "error", "shard"}."""
    reused: int = 0
    """Shards found complete from an earlier run and not written again."""


def _checked(samples: Iterable[Sample], skip_bad: bool, skipped: list[dict]) -> Iterator[Sample]:
    """Samples whose file exists (sizing it now); a missing one is an error or listed."""
    for sample in samples:
        try:
            sample.size_hint()
        except BadInputError as exc:
            if not skip_bad:
                raise
            log.warning("skipped: %s", exc)
            skipped.append({"path": exc.path, "error": str(exc), "shard": ""})
            continue
        yield sample


def _reused(entry: dict) -> tuple[ShardInfo, list[dict], bool]:
    """A recorded complete shard as ``_write_shard`` returns it."""
    keys = ("name", "url", "samples", "bytes", "classes", "sha256", "fingerprint", "class_counts")
    return ShardInfo(**{k: entry[k] for k in keys if k in entry}), list(entry.get("skipped", [])), True


def _materialised(samples: list[Sample], skip_bad: bool, name: str) -> tuple[list[Sample], list[dict]]:
    """(samples with their image bytes, bad inputs left out); a bad input is an error
    unless ``skip_bad``."""
    ready, skipped = [], []
    for sample in samples:
        try:
            ready.append(sample.materialise())
        except BadInputError as exc:
            if not skip_bad:
                raise
            log.warning("skipped: %s", exc)
            skipped.append({"path": exc.path, "error": str(exc), "shard": name})
    return ready, skipped


def _empty_entry(name: str, url: str, fp: str, skipped: list[dict]) -> dict:
    """The partial-log entry of a shard whose every sample was bad (nothing is written)."""
    return {
        "name": name,
        "url": url,
        "samples": 0,
        "bytes": -1,
        "classes": [],
        "class_counts": [],
        "sha256": "",
        "fingerprint": fp,
        "skipped": skipped,
    }


def _publish_tar(url: str, samples: list[Sample], tmp_dir: str) -> tuple[int, str]:
    """Write the samples as a tar and publish it at ``url``; (bytes, sha256)."""
    # beside the destination when local (published by a rename), else a temporary folder
    folder = storage.local_path(url).parent if not storage.is_s3(url) else Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(url).name}.", suffix=".tmp", dir=folder)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; shards are meant to be read by others
    try:
        with os.fdopen(fd, "wb") as out:
            size, sha = write_tar(out, samples)
        storage.put_file(tmp, url)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return size, sha


def _write_shard(
    dst: str, name: str, samples: list[Sample], fp: str, partial: PartialLog, skip_bad: bool, tmp_dir: str
) -> tuple[ShardInfo | None, list[dict], bool]:
    """Write (or reuse) one shard; returns (info or None when every sample was bad,
    skipped inputs, reused?)."""
    url = storage.join(dst, name)
    entry = partial.reusable(name, fp, url)
    if entry is not None:
        return _reused(entry)
    ready, skipped = _materialised(samples, skip_bad, name)
    if not ready:
        partial.record(name, _empty_entry(name, url, fp, skipped))
        return None, skipped, False
    size, sha = _publish_tar(url, ready, tmp_dir)
    info = ShardInfo(
        name=name,
        url=url,
        samples=len(ready),
        bytes=size,
        classes=sorted({s.label for s in ready}),
        sha256=sha,
        fingerprint=fp,
        class_counts=class_runs(s.label for s in ready),
    )
    partial.record(name, dict(vars(info), skipped=skipped))
    return info, skipped, False


class _ShardPool:
    """The thread pool writing planned shards, with a bounded look-ahead; the first
    failure stops further submissions."""

    def __init__(self, dst: str, workers: int, salt: str, skip_bad: bool, on_shard: Callable[[int, int], None] | None):
        self.dst, self.salt, self.skip_bad, self.on_shard = dst, salt, skip_bad, on_shard
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dmlray-pack")
        # bounded look-ahead: at most this many planned shards wait in memory
        self.slots = threading.BoundedSemaphore(2 * workers)
        self.futures: list[tuple[str, Future]] = []
        self.failed = threading.Event()
        self.lock = threading.Lock()
        self.tmp = tempfile.TemporaryDirectory(prefix="dmlray-pack-")

    def submit_split(self, split: str, planned: Iterable[list[Sample]], partial: PartialLog, result: SplitResult):
        """Submit every planned shard of a split, unless a shard has failed."""
        for index, group in enumerate(planned):
            self.slots.acquire()
            if self.failed.is_set():
                self.slots.release()
                return
            name = shard_name(split, index)
            future = self.pool.submit(
                _write_shard,
                self.dst,
                name,
                group,
                fingerprint(self.salt, name, group),
                partial,
                self.skip_bad,
                self.tmp.name,
            )
            future.add_done_callback(functools.partial(self._done, result))
            self.futures.append((split, future))

    def _done(self, result: SplitResult, future: Future) -> None:
        self.slots.release()
        if future.cancelled():
            return
        if future.exception() is not None:
            self.failed.set()
            return
        info, skipped, reused = future.result()
        with self.lock:
            result.skipped += skipped
            result.reused += reused
        if info is not None and self.on_shard is not None:
            self.on_shard(info.samples, info.bytes)

    def finish(self, results: dict[str, SplitResult]) -> None:
        """Wait for every shard; raise the first failure, else add each shard to its split."""
        wait([f for _, f in self.futures], return_when=FIRST_EXCEPTION)
        for _, future in self.futures:
            error = future.exception() if future.done() and not future.cancelled() else None
            if error is not None:
                raise error
        for split, future in self.futures:
            info = future.result()[0]
            if info is not None:
                results[split].shards.append(info)

    def close(self, cancel: bool) -> None:
        """Stop the pool (running shards finish and are recorded) and drop the temporary folder."""
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        self.tmp.cleanup()


def write_splits(
    dst: str,
    splits: dict[str, Iterable[Sample]],
    shard_bytes: int,
    *,
    salt: str = "",
    workers: int = 0,
    skip_bad: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
    known: dict[str, dict] | None = None,
) -> dict[str, SplitResult]:
    """Write every split's shards under ``dst`` with a pool of ``workers`` threads.

    ``salt`` enters every shard's fingerprint (the recipe: reader, options, shard size),
    so a shard packed differently is never reused. ``on_shard(samples, bytes)`` is called
    as each shard completes. The first error stops the run: shards already complete stay
    recorded, and a re-run picks up from there. ``known`` lists reusable shards of an
    earlier manifest (default: the one at ``dst``, if any).
    """
    results = {split: SplitResult() for split in splits}
    known = known_shards(dst) if known is None else known
    pool = _ShardPool(dst, workers or default_workers(), salt, skip_bad, on_shard)
    cancel = True
    try:
        for split, samples in splits.items():
            partial = PartialLog(dst, split, {k: v for k, v in known.items() if k.startswith(f"{split}/")})
            planned = plan_shards(_checked(samples, skip_bad, results[split].skipped), shard_bytes, split)
            pool.submit_split(split, planned, partial, results[split])
            if pool.failed.is_set():
                break
        pool.finish(results)
        cancel = False
    finally:
        pool.close(cancel)
    for result in results.values():
        result.shards.sort(key=lambda s: s.name)
    return results


def remove_partials(dst: str, splits: Iterable[str]) -> None:
    """Forget the progress records once the manifest is written."""
    for split in splits:
        storage.delete(storage.join(dst, PARTIAL_DIR, f"{split}.json"))
    if not storage.is_s3(dst):
        try:
            storage.local_path(storage.join(dst, PARTIAL_DIR)).rmdir()
        except OSError:  # not empty (another split's record) or already gone
            pass
