"""Reading tar shards as a stream: resumable reads, a small tar parser, samples by key.

Why not ``tarfile`` or WebDataset's expander: this reader knows its byte offset, so a read
that fails mid-shard resumes from that offset (an S3 range request) after a backoff, and
it tells a truncated or corrupt archive (an error to count) from its clean end. It reads
USTAR, GNU long names and pax path records, which covers shards written by dmlray,
WebDataset's ``ShardWriter`` and GNU tar.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from dmlray.data import storage

log = logging.getLogger(__name__)

BLOCK = 512
CHUNK = 1 << 20


class ShardError(IOError):
    """A shard cannot be read to its end: truncated, corrupt, failing its checksum, or
    unreachable after retries. ``checksum`` marks a sha256 mismatch."""

    def __init__(self, url: str, reason: str, checksum: bool = False):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.checksum = checksum


class Readable(Protocol):
    """What a reader needs of an opened object: ``storage.open_read``'s stream, or a replay."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ResumableReader:
    """Sequential reads of one object in large chunks; a read that fails is retried with
    exponential backoff from the same byte offset (each reopening itself waits out an
    outage up to the storage retry deadline, see ``storage.with_retries``). Permanent
    storage errors (wrong credentials, no such object) and an endpoint that stayed down
    past that deadline (``StorageUnavailable``) are raised at once."""

    def __init__(
        self,
        url: str,
        open_at: Callable[[str, int], Readable] = storage.open_read,
        retries: int = 3,
        backoff: float = 0.5,
        on_retry: Callable[[], None] | None = None,
        hasher: hashlib._Hash | None = None,
    ):
        self.url = url
        self.open_at = open_at
        self.retries = retries
        self.backoff = backoff
        self.on_retry = on_retry
        self.hasher = hasher
        self.offset = 0  # bytes received from the object so far
        self.stream: Readable | None = None
        self.buf = b""
        self.pos = 0

    def read_chunk(self, n: int) -> bytes:
        """Up to ``n`` bytes from the object (b"" at its end), retrying failed reads."""
        failures = 0
        while True:
            try:
                if self.stream is None:
                    self.stream = self.open_at(self.url, self.offset)
                data = self.stream.read(n)
                break
            except storage.StorageError as exc:
                if exc.code in ("InvalidRange", "416") and self.offset > 0:
                    return b""  # resumed exactly at the end of the object
                if exc.permanent or isinstance(exc, storage.StorageUnavailable):
                    # retrying cannot help, or open_at already retried up to the storage
                    # deadline: a down endpoint is the run's error, not this shard's
                    raise
                error: Exception = exc
            except Exception as exc:  # connection reset, timeout, incomplete read...
                error = exc
            self._drop_stream()
            failures += 1
            if failures > self.retries:
                raise ShardError(self.url, f"read failed at byte {self.offset} after {self.retries} retries: {error}")
            if self.on_retry is not None:
                self.on_retry()
            log.info(
                "%s: read failed at byte %d (%s); resuming there (retry %d of %d)",
                self.url,
                self.offset,
                error,
                failures,
                self.retries,
            )
            time.sleep(self.backoff * 2 ** (failures - 1))
        self.offset += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; EOFError when the object ends first. Reads in chunks of at
        most ``CHUNK``, so a corrupt size field claiming gigabytes costs no more memory than
        the object really holds."""
        if len(self.buf) - self.pos >= n:
            out = self.buf[self.pos : self.pos + n]
            self.pos += n
            return out
        parts = [self.buf[self.pos :]]
        have = len(parts[0])
        while have < n:
            chunk = self.read_chunk(CHUNK)
            if not chunk:
                self.buf, self.pos = b"".join(parts), 0  # keep what was read: tell() stays right
                raise EOFError(f"{self.url} ends at byte {self.offset}")
            parts.append(chunk)
            have += len(chunk)
        joined = b"".join(parts)
        self.buf, self.pos = joined, n
        return joined[:n]

    def tell(self) -> int:
        """Offset of the next byte ``read_exact`` returns."""
        return self.offset - (len(self.buf) - self.pos)

    def drain(self) -> None:
        """Read to the end of the object (so the hash covers all of it)."""
        self.buf, self.pos = b"", 0
        while self.read_chunk(CHUNK):
            pass

    def _drop_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing a broken connection may fail too
                pass

    def close(self) -> None:
        self._drop_stream()


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    rest = header[:148] + header[156:]
    if stored == sum(rest) + 8 * 32:
        return True
    # some old writers summed signed bytes
    return stored == sum(b - 256 if b > 127 else b for b in rest) + 8 * 32


def iter_members(reader: ResumableReader) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in the tar, in order. A clean end is the
    end-of-archive block; running out of bytes before it, or a header that fails its
    checksum, raises ShardError."""
    url = reader.url
    long_name: str | None = None
    while True:
        start = reader.tell()
        try:
            header = reader.read_exact(BLOCK)
        except EOFError:
            raise ShardError(
                url, f"truncated tar: ends at byte {reader.tell()} without an end-of-archive block"
            ) from None
        if header.count(0) == BLOCK:
            return
        if not _checksum_ok(header):
            raise ShardError(url, f"corrupt tar header at byte {start}")
        try:
            size = _octal(header[124:136])
        except ValueError:
            raise ShardError(url, f"corrupt tar header at byte {start}: bad size field") from None
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        try:
            data = reader.read_exact(size)
            reader.read_exact(-size % BLOCK)
        except EOFError:
            raise ShardError(
                url,
                f"truncated or corrupt tar: the header of member {name!r} at byte {start} claims "
                f"{size} bytes, but the shard ends at byte {reader.offset}",
            ) from None
        if kind in (b"0", b"\0", b"7"):
            yield (long_name or name), data
            long_name = None
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":  # pax record: "<len> path=<name>\n"
            for record in data.decode("utf-8", "replace").split("\n"):
                _, _, keyvalue = record.partition(" ")
                if keyvalue.startswith("path="):
                    long_name = keyvalue[5:]
        # directories, links, global pax headers: nothing to yield


def iter_grouped(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset samples: consecutive members sharing a key (the name up to the first
    dot of its last path part), as ``(key, {ext: data, ...})``."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    for name, data in members:
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key:
            if key is not None:
                yield key, fields
            key, fields = member_key, {}
        fields[ext.lower()] = data
    if key is not None:
        yield key, fields
