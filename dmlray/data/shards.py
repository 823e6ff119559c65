"""The shard format: class-grouped WebDataset tars, how samples are cut into shards, and
the manifest that lists them.

Layout under a destination URL::

    <dst>/train/shard-000000.tar ...
    <dst>/test/shard-000000.tar ...
    <dst>/manifest.json            written last: a half-written dataset is never visible

A sample is ``{key}.{png|jpg}``, ``{key}.cls`` (decimal class id) and ``{key}.json``.
Writing them, in parallel and resumably, is :mod:`dmlray.data.writer`'s job.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

from dmlray.data import storage
from dmlray.data.partition import ShardLayout
from dmlray.data.records import Sample

MANIFEST_NAME = "manifest.json"
FORMAT = "dmlray-shards/1"
MAX_KEY = 90  # USTAR names hold 100 characters; keep room for ".json"


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
    fingerprint: str = ""
    """Digest of the planned content (keys, labels, source files): a re-run that plans
    the same shard and finds it written with this fingerprint does not write it again."""
    class_counts: list[list[int]] = field(default_factory=list)
    """``[class, samples]`` runs in the order the tar stores them: the P×K stream plans its
    partition and epochs from these without reading the shard."""


def class_runs(labels: Iterable[int]) -> list[list[int]]:
    """``[class, count]`` runs of consecutive equal labels."""
    runs: list[list[int]] = []
    for label in labels:
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return runs


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def _padded(n: int) -> int:
    return 512 + -(-n // 512) * 512  # a 512-byte header plus the data padded to blocks


def tar_bytes(sample: Sample) -> int:
    """Bytes a sample takes in a tar (its image size estimated for unread sources)."""
    return _padded(sample.size_hint()) + _padded(len(str(sample.label))) + _padded(len(sample.meta_bytes()))


def check_key(key: str) -> None:
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} contains '.' or '/', which WebDataset reads as an extension or folder")
    if len(key) > MAX_KEY:
        raise ValueError(f"sample key {key!r} is longer than {MAX_KEY} characters (tar names hold 100)")


def plan_shards(samples: Iterable[Sample], shard_bytes: int, split: str = "") -> Iterator[list[Sample]]:
    """Cut class-grouped samples into shards of about ``shard_bytes`` (deterministically).

    Whole classes go into a shard while they fit; a class larger than a shard on its own
    is cut into shard-sized pieces, each still contiguous. A class whose samples arrive in
    two separate runs is an error: readers must group by class.
    """
    pending: list[Sample] = []
    pending_bytes = 0
    group: list[Sample] = []
    current: int | None = None
    seen: set[int] = set()

    def end_class() -> Iterator[list[Sample]]:
        nonlocal pending, pending_bytes
        sizes = [tar_bytes(s) for s in group]
        total = sum(sizes)
        if pending and pending_bytes + total > shard_bytes:
            yield pending
            pending, pending_bytes = [], 0
        for sample, size in zip(group, sizes, strict=True):
            if pending and total > shard_bytes and pending_bytes + size > shard_bytes:
                yield pending  # only a class bigger than a shard is cut
                pending, pending_bytes = [], 0
            pending.append(sample)
            pending_bytes += size
        if pending_bytes >= shard_bytes:
            yield pending
            pending, pending_bytes = [], 0

    for sample in samples:
        check_key(sample.key)
        if sample.label != current:
            if sample.label in seen:
                raise ValueError(
                    f"split {split!r}: class {sample.label} appears in two separate runs; "
                    "samples must be grouped by class"
                )
            yield from end_class()
            group, current = [], sample.label
            seen.add(sample.label)
        group.append(sample)
    yield from end_class()
    if pending:
        yield pending


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible shards: same input, same bytes, same checksum
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_tar(out: IO[bytes], samples: Iterable[Sample]) -> tuple[int, str]:
    """Write materialised samples as a USTAR tar; returns (bytes written, sha256)."""
    hashing = _HashingWriter(out)
    # cast: writing a tar ("w") calls only write() and tell(), which is all _HashingWriter has
    with tarfile.open(fileobj=cast(IO[bytes], hashing), mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _member(tar, f"{s.key}.{s.ext}", s.data)
            _member(tar, f"{s.key}.cls", str(s.label).encode())
            _member(tar, f"{s.key}.json", s.meta_bytes())
    return hashing.size, hashing.sha.hexdigest()


def build_manifest(
    splits: dict[str, tuple[list[int], list[ShardInfo]]],
    made_by: dict[str, Any],
    skipped: dict[str, list[dict]] | None = None,
) -> dict:
    """The manifest: per split its shards, sample count, class list, and the bad inputs
    that were left out (``--skip-bad``); ``made_by`` says how the dataset was packed."""
    out: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "made_by": made_by,
        "splits": {},
    }
    for split, (classes, shards) in splits.items():
        present = sorted({c for s in shards for c in s.classes})
        if not present:
            raise ValueError(f"split {split!r} has zero classes: nothing to write")
        entry: dict[str, Any] = {
            "num_samples": sum(s.samples for s in shards),
            "num_classes": len(present),
            "classes": present,
            "shards": [vars(s) for s in shards],
        }
        missing = sorted(set(classes) - set(present))
        if missing:
            entry["classes_without_samples"] = missing
        entry["skipped"] = list((skipped or {}).get(split, []))
        out["splits"][split] = entry
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

    def shard_checksums(self, split: str) -> dict[str, str]:
        """{shard URL: sha256} for the stream's checksum verification."""
        return {storage.join(self.root, s["name"]): s["sha256"] for s in self.split(split)["shards"]}

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["num_samples"])

    def classes(self, split: str) -> list[int]:
        return list(self.split(split)["classes"])

    def layouts(self, split: str) -> list[ShardLayout] | None:
        """The split's shards with their per-class counts, as the P×K stream plans with
        them; None for manifests packed before the counts were recorded."""
        entries = self.split(split)["shards"]
        if any("class_counts" not in e or (e["samples"] and not e["class_counts"]) for e in entries):
            return None
        return [
            ShardLayout(url, tuple((int(c), int(n)) for c, n in e["class_counts"]), int(e.get("bytes", 0)))
            for url, e in zip(self.shard_urls(split), entries, strict=True)
        ]


def read_manifest(root: str) -> Manifest:
    """Read ``<root>/manifest.json``; a clear error when the dataset is missing or half-written."""
    url = storage.join(root, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(url)
    except storage.StorageError as exc:
        if exc.permanent and not exc.missing:
            raise  # wrong credentials, no bucket: that message is the clear one
        raise storage.StorageError(
            f"no dataset at {root}: {url} cannot be read (pack it with 'dmlray pack'): {exc}", exc.code
        ) from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(
            f"{url} is not valid JSON ({exc}); re-pack the dataset with 'dmlray pack --overwrite'"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        raise ValueError(
            f"{url} is not a dmlray manifest: expected a JSON object with 'splits', got {type(data).__name__}"
        )
    if data.get("format") != FORMAT:
        raise ValueError(f"{url}: unknown manifest format {data.get('format')!r} (expected {FORMAT})")
    return Manifest(root=root.rstrip("/"), data=data)
