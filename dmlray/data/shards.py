"""Writing class-grouped WebDataset tar shards and the manifest that lists them.

Layout under a destination URL::

    <dst>/train/shard-000000.tar ...
    <dst>/test/shard-000000.tar ...
    <dst>/manifest.json            written last: a half-written dataset is never visible

A sample is ``{key}.{png|jpg}``, ``{key}.cls`` (decimal class id) and ``{key}.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from dmlray.data import storage
from dmlray.data.records import Sample

MANIFEST_NAME = "manifest.json"
FORMAT = "dmlray-shards/1"


@dataclass
class ShardInfo:
    """One shard as listed in the manifest."""

    name: str
    """Path relative to the dataset root (e.g. ``train/shard-000003.tar``)."""
    url: str
    """Absolute URL at packing time (the reader resolves ``name`` against the manifest)."""
    samples: int
    bytes: int
    classes: list[int]
    sha256: str


def _tar_bytes(sample: Sample) -> int:
    """Bytes a sample takes in a tar: three members, each a 512-byte header plus padded data."""
    payloads = (len(sample.data), len(str(sample.label)), len(json.dumps(sample.meta, sort_keys=True)))
    return sum(512 + -(-n // 512) * 512 for n in payloads)


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible shards: same input, same bytes, same checksum
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Packs samples of one split into tar shards of about ``shard_bytes`` each.

    Samples must arrive grouped by class; a class never straddles two shards unless it
    alone is larger than a shard, so each shard holds whole classes.
    """

    def __init__(self, dst: str, split: str, shard_bytes: int, on_progress: Callable[[int, int], None] | None = None):
        self.dst = dst
        self.split = split
        self.shard_bytes = shard_bytes
        self.shards: list[ShardInfo] = []
        self.on_progress = on_progress
        self._tmp = tempfile.TemporaryDirectory(prefix="dmlray-pack-")
        self._pending: list[Sample] = []
        self._pending_bytes = 0
        self._current_class: int | None = None
        self._class_samples: list[Sample] = []
        self._seen: set[int] = set()

    def add(self, sample: Sample) -> None:
        if "." in sample.key:
            raise ValueError(f"sample key {sample.key!r} contains '.', which WebDataset reads as an extension")
        if sample.label != self._current_class:
            if sample.label in self._seen:
                raise ValueError(f"split {self.split!r}: class {sample.label} appears in two separate runs; samples must be grouped by class")
            self._end_class()
            self._current_class = sample.label
            self._seen.add(sample.label)
        self._class_samples.append(sample)

    def _end_class(self) -> None:
        group, self._class_samples = self._class_samples, []
        size = sum(_tar_bytes(s) for s in group)
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending.extend(group)
        self._pending_bytes += size
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"{self.split}/shard-{len(self.shards):06d}.tar"
        path = Path(self._tmp.name) / name.replace("/", "_")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in self._pending:
                _tar_member(tar, f"{s.key}.{s.ext}", s.data)
                _tar_member(tar, f"{s.key}.cls", str(s.label).encode())
                _tar_member(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        url = storage.join(self.dst, name)
        storage.upload_file(path, url)
        info = ShardInfo(
            name=name, url=url, samples=len(self._pending), bytes=path.stat().st_size,
            classes=sorted({s.label for s in self._pending}), sha256=digest,
        )
        path.unlink()
        self.shards.append(info)
        if self.on_progress:
            self.on_progress(info.samples, info.bytes)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[ShardInfo]:
        self._end_class()
        self._flush()
        self._tmp.cleanup()
        return self.shards


def write_split(dst: str, split: str, samples: Iterable[Sample], shard_bytes: int,
                on_progress: Callable[[int, int], None] | None = None) -> list[ShardInfo]:
    writer = ShardWriter(dst, split, shard_bytes, on_progress)
    try:
        for sample in samples:
            writer.add(sample)
    except BaseException:
        writer._tmp.cleanup()
        raise
    return writer.close()


def build_manifest(splits: dict[str, tuple[list[int], list[ShardInfo]]], made_by: dict[str, Any]) -> dict:
    out: dict[str, Any] = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "made_by": made_by, "splits": {}}
    for split, (classes, shards) in splits.items():
        present = sorted({c for s in shards for c in s.classes})
        if not present:
            raise ValueError(f"split {split!r} has zero classes: nothing to write")
        out["splits"][split] = {
            "num_samples": sum(s.samples for s in shards),
            "num_classes": len(present),
            "classes": present,
            "shards": [vars(s) for s in shards],
        }
    return out


def write_manifest(dst: str, manifest: dict) -> str:
    url = storage.join(dst, MANIFEST_NAME)
    storage.write_bytes(url, json.dumps(manifest, indent=1).encode())
    return url


@dataclass
class Manifest:
    """A packed dataset as read back: the manifest plus its root URL."""

    root: str
    data: dict = field(repr=False)

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def split(self, name: str) -> dict:
        if name not in self.data["splits"]:
            raise KeyError(f"dataset {self.root} has no split {name!r}; splits: {', '.join(self.splits)}")
        return self.data["splits"][name]

    def shard_urls(self, split: str) -> list[str]:
        """Shard URLs resolved against the manifest's root (so datasets can be moved)."""
        return [storage.join(self.root, s["name"]) for s in self.split(split)["shards"]]

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["num_samples"])

    def classes(self, split: str) -> list[int]:
        return list(self.split(split)["classes"])


def read_manifest(root: str) -> Manifest:
    """Read ``<root>/manifest.json``; a clear error when the dataset is missing or half-written."""
    url = storage.join(root, MANIFEST_NAME)
    try:
        data = json.loads(storage.read_bytes(url))
    except storage.StorageError as exc:
        raise storage.StorageError(f"no dataset at {root}: {url} cannot be read (pack it with 'dmlray pack'): {exc}") from exc
    if data.get("format") != FORMAT:
        raise ValueError(f"{url}: unknown manifest format {data.get('format')!r} (expected {FORMAT})")
    return Manifest(root=root.rstrip("/"), data=data)
