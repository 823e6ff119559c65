"""The files of a run folder: config.yaml, metrics.jsonl, result.json, plots.

The folder is ``storage_path/name`` (local or s3://); Ray Train keeps its checkpoints in
the same place. Only rank 0 writes.
"""

from __future__ import annotations

import json
import tempfile
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

    def write_metrics(self, history: list[dict]) -> None:
        # rewritten whole from the history (which checkpoints carry): a restart never
        # leaves a gap or a duplicated step, and it works on S3, which cannot append
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
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
