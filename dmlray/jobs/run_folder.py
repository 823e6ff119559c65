"""The files of a run folder: config.yaml, metrics.jsonl, result.json, plots.

The folder is ``storage_path/name`` (local or s3://); Ray Train keeps its checkpoints in
the same place. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

import yaml

from dmlray.config import ConfigError
from dmlray.data import storage

log = logging.getLogger(__name__)


def is_number(value: object) -> bool:
    """An int or float metric value (a bool is a flag, not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_metrics(record: dict) -> dict[str, int | float]:
    """The numeric values of a metrics record: what Ray Train and Tune can compare."""
    return {k: v for k, v in record.items() if is_number(v)}


LOCK_FILE = "run.lock"
LEASE_S = 60.0
"""How long a lock stays valid without renewal: a crashed run's successor waits at most this long."""


class RunFolder:
    def __init__(self, storage_path: str, name: str):
        self.url = storage.join(storage_path, name)

    @classmethod
    def at(cls, url: str) -> RunFolder:
        """The run folder at a URL."""
        parent, _, name = url.rstrip("/").rpartition("/")
        return cls(parent, name)

    def file(self, name: str) -> str:
        return storage.join(self.url, name)

    def write_config(self, config: dict) -> None:
        storage.write_bytes(self.file("config.yaml"), yaml.safe_dump(config, sort_keys=False).encode())

    def write_metrics_text(self, text: str) -> None:
        """metrics.jsonl, rewritten whole from the history (which checkpoints carry): a
        restart never leaves a gap or a duplicated step, and it works on S3, which cannot
        append (``MetricsWriter`` calls this off the training loop)."""
        storage.write_bytes(self.file("metrics.jsonl"), text.encode())

    def read_metrics(self) -> list[dict]:
        if not storage.exists(self.file("metrics.jsonl")):
            return []
        return [
            json.loads(line) for line in storage.read_bytes(self.file("metrics.jsonl")).decode().splitlines() if line
        ]

    def write_result(self, result: dict) -> None:
        storage.write_bytes(self.file("result.json"), json.dumps(result, indent=1).encode())

    def read_result(self) -> dict:
        return json.loads(storage.read_bytes(self.file("result.json")))

    def write_png(self, name: str, draw) -> str:
        """Call ``draw(local_path)`` and store the PNG in the run folder; returns its URL."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            draw(str(path))
            storage.upload_file(path, self.file(name))
        return self.file(name)


def metrics_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


class MetricsWriter:
    """Writes a run's metrics.jsonl off the training loop, so a slow store (S3, a large
    history) never stalls a step.

    ``submit(history)`` serialises only the records added since the last call (records
    are final once in the history) and hands the whole text to a writer thread; a newer
    submission replaces one not yet written. ``flush()`` waits until the newest is stored
    and raises the error of a failed write; ``close()`` flushes and stops the thread.
    """

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._pending: str | None = None
        self._submitted = self._written = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dmlray-metrics-writer", daemon=True)
        self._thread.start()

    def submit(self, history: list[dict]) -> None:
        if len(history) < len(self._lines):  # a different history: start over
            self._lines = []
        self._lines.extend(metrics_line(r) for r in history[len(self._lines) :])
        text = "".join(self._lines)
        with self._cond:
            self._pending = text
            self._submitted += 1
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._written >= self._submitted or self._error is not None)
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                text, version, self._pending = self._pending, self._submitted, None
            error = None
            try:
                self.folder.write_metrics_text(text)
            except BaseException as exc:  # kept for flush() to raise in the training thread
                error = exc
            with self._cond:
                if error is not None:
                    self._error = error
                self._written = version
                self._cond.notify_all()


# --------------------------------------------------------------------------- one live run per folder


class RunLockedError(ConfigError):
    """Another live process holds the run (or sweep) folder; the message names it (a ConfigError:
    the remedy is another run.name, and the CLI reports it as one)."""


def lock_record(holder: str, lease_s: float, what: str) -> bytes:
    return json.dumps(
        {
            "holder": holder,
            "what": what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires_at": time.time() + lease_s,
            "lease_s": lease_s,
        }
    ).encode()


def describe_holder(record: dict) -> str:
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("expires_at", 0))))
    return (
        f"{record.get('what', 'run')} holder {record.get('holder')} (host {record.get('host')}, "
        f"pid {record.get('pid')}, lease until {expires})"
    )


class RunLock:
    """A lease on a run folder: a lock object created atomically (O_EXCL locally, a conditional
    put on S3), renewed every ``lease_s / 3`` by a background thread while the run lives, and
    taken over by a successor only once it has expired (a crashed run's lock does not block
    forever). Expiry is compared with this host's clock: hosts sharing a store need synced clocks.

    The driver (``launch``, ``run_sweep``) holds it, not the workers: Ray Train's restarts of
    the worker group happen under the same driver.
    """

    def __init__(self, folder_url: str, lease_s: float = LEASE_S, what: str = "run"):
        self.url = storage.join(folder_url, LOCK_FILE)
        self.lease_s, self.what = lease_s, what
        self.holder = uuid.uuid4().hex
        self.lost = threading.Event()
        """Set when a renewal found the lock replaced (this run's lease had expired)."""
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, attempts: int = 5) -> RunLock:
        for _ in range(attempts):  # each retry follows a change by another process: bounded
            record = lock_record(self.holder, self.lease_s, self.what)
            self._version = storage.create_exclusive(self.url, record)
            if self._version is not None:
                break
            current = storage.read_versioned(self.url)
            if current is None:
                continue  # released meanwhile
            data, version = current
            other = self._parse(data)
            if other is None:  # being written by its creator right now (locally: an empty file)
                time.sleep(0.2)
                continue
            if float(other.get("expires_at", 0)) > time.time():
                raise RunLockedError(
                    f"{self.url}: the {self.what} is live: {describe_holder(other)}; wait for "
                    "it to end (or, if it died, for its lease to expire) or use another name"
                )
            self._version = storage.replace_if(self.url, record, version)
            if self._version is not None:
                log.warning("%s: took over the expired lock of %s", self.url, describe_holder(other))
                break
        else:
            raise RunLockedError(
                f"{self.url}: could not take the lock after {attempts} attempts (other processes "
                f"keep changing it); is another {self.what} of this name starting?"
            )
        self._thread = threading.Thread(target=self._renew, name="dmlray-run-lock", daemon=True)
        self._thread.start()
        return self

    def _parse(self, data: bytes) -> dict | None:
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
        if data:
            raise RunLockedError(f"{self.url}: not a dmlray lock (not JSON); delete it if no run of this name is live")
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            held = self._version
            if held is None:  # released meanwhile
                return
            try:
                version = storage.replace_if(self.url, lock_record(self.holder, self.lease_s, self.what), held)
            except OSError as exc:  # a store hiccup: the lease still runs; try again next period
                log.warning("%s: renewing the lock failed: %s", self.url, exc)
                continue
            if version is None:
                log.error(
                    "%s: the lock was taken over (this run's lease expired): another run may now write the same folder",
                    self.url,
                )
                self.lost.set()
                return
            self._version = version

    def release(self) -> None:
        """Stop renewing and delete the lock object if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._version is None or self.lost.is_set():
            return
        # a replace with our own version proves the lock is still ours; then it goes
        if storage.replace_if(self.url, b"", self._version) is not None:
            storage.delete(self.url)
        self._version = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- fresh starts


def is_strictly_inside(child: str, parent: str) -> bool:
    """True when URL ``child`` is a folder strictly below ``parent`` (after resolving '..' and links)."""
    if storage.is_s3(child) != storage.is_s3(parent):
        return False
    if storage.is_s3(child):
        cb, ck = storage.split_s3(child.rstrip("/") + "/")
        pb, pk = storage.split_s3(parent.rstrip("/") + "/")
        parts = PurePosixPath(ck).parts
        if cb != pb or any(p in (".", "..") for p in parts):
            return False
        base = PurePosixPath(pk).parts
        return len(parts) > len(base) and parts[: len(base)] == base
    c, p = storage.local_path(child).resolve(), storage.local_path(parent).resolve()
    return c != p and c.is_relative_to(p)


def clear_run_folder(folder_url: str, storage_path: str, keep: tuple[str, ...] = (LOCK_FILE,)) -> None:
    """Delete everything in a run folder except ``keep`` (the lock of the run that asked);
    refuses any folder that is not strictly inside ``storage_path``."""
    if not is_strictly_inside(folder_url, storage_path):
        raise ValueError(f"refusing to delete {folder_url}: it is not a folder inside run.storage_path {storage_path}")
    for name in storage.list_dir(folder_url):
        if name in keep:
            continue
        url = storage.join(folder_url, name)
        storage.remove_tree(url)
        if storage.exists(url):  # a plain file (remove_tree removes folders and prefixes)
            storage.delete(url)
