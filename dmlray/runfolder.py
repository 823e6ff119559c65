"""The files of a run folder: config.yaml, metrics.jsonl, result.json, plots.

The folder is ``storage_path/name`` (local or s3://); Ray Train keeps its checkpoints in
the same place. Only rank 0 writes.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import yaml

from dmlray.data import storage


class RunFolder:
    def __init__(self, storage_path: str, name: str):
        self.url = storage.join(storage_path, name)

    @classmethod
    def at(cls, url: str) -> "RunFolder":
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
        return [json.loads(line) for line in storage.read_bytes(self.file("metrics.jsonl")).decode().splitlines() if line]

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
        self._lines.extend(metrics_line(r) for r in history[len(self._lines):])
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
