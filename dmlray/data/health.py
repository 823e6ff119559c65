"""Counting what the data stream skipped, so training goes on and the trainer can say so.

A :class:`StreamStats` lives in shared memory: DataLoader worker processes (forked or
spawned with the dataset) add to the same counters the training process reads, e.g. to
publish ``stats.skipped`` as a metric. Each bad shard or sample is logged once per
process, with its shard URL and key.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable

log = logging.getLogger("dmlray.data.stream")

FIELDS = (
    "samples_read",  # samples parsed from shards
    "samples_used",  # samples decoded into batches
    "samples_skipped",  # samples that failed to decode or were malformed
    "shards_skipped",  # shards cut short: truncated, corrupt, unreadable after retries
    "checksum_failures",  # shards whose sha256 differs from the manifest
    "retries",  # reads resumed after a transient storage error
)


class StreamStats:
    """Shared counters of a data stream (see ``FIELDS``)."""

    def __init__(self, on_skip: Callable[[str, str, str], None] | None = None):
        # one lock for all counters: increments are rare next to decoding an image
        self._values = multiprocessing.Array("q", len(FIELDS))
        self._logged: set[tuple[str, str]] = set()
        self.on_skip = on_skip
        """Called as ``on_skip(shard, key, reason)`` in the process where a skip happens."""

    def add(self, name: str, n: int = 1) -> None:
        index = FIELDS.index(name)
        with self._values.get_lock():
            self._values[index] += n

    def get(self, name: str) -> int:
        return int(self._values[FIELDS.index(name)])

    @property
    def skipped(self) -> int:
        """Samples and shards skipped so far (across DataLoader workers)."""
        return self.get("samples_skipped") + self.get("shards_skipped")

    @property
    def bad_shards(self) -> int:
        """Shards excluded so far: unreadable, truncated, corrupt or failing their checksum
        (each is excluded for the rest of the run by the worker that found it)."""
        return self.get("shards_skipped") + self.get("checksum_failures")

    def as_metrics(self) -> dict[str, int]:
        """The counters the trainer publishes at its log steps."""
        return {"skipped_samples": self.skipped, "bad_shards": self.bad_shards}

    def as_dict(self) -> dict[str, int]:
        with self._values.get_lock():
            return {name: int(v) for name, v in zip(FIELDS, self._values[:], strict=True)}

    def skip_sample(self, shard: str, key: str, reason: object) -> None:
        self.add("samples_skipped")
        self._report(shard, key, f"sample {key} skipped: {reason}")

    def skip_shard(self, shard: str, reason: object, checksum: bool = False) -> None:
        self.add("checksum_failures" if checksum else "shards_skipped")
        self._report(shard, "", f"shard skipped: {reason}")

    def _report(self, shard: str, key: str, message: str) -> None:
        if (shard, key) not in self._logged:
            self._logged.add((shard, key))
            log.warning("%s: %s (skipped so far: %d)", shard, message, self.skipped)
        if self.on_skip is not None:
            self.on_skip(shard, key, message)
