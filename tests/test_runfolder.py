"""The run folder's metrics file, written off the training loop."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dmlray.jobs.run_folder import MetricsWriter, RunFolder


def records(n: int) -> list[dict]:
    return [{"step": 10 * (i + 1), "loss": 1.0 / (i + 1)} for i in range(n)]


def test_the_file_holds_the_newest_history_after_flush(tmp_path):
    folder = RunFolder(str(tmp_path), "run")
    writer = MetricsWriter(folder)
    history = []
    for record in records(25):
        history.append(record)
        writer.submit(history)
    writer.flush()
    assert folder.read_metrics() == records(25)
    # a restarted trainer's history (shorter: resumed from a checkpoint) is written whole
    writer.submit(records(3))
    writer.close()
    assert folder.read_metrics() == records(3)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "".join(
        json.dumps(r, sort_keys=True) + "\n" for r in records(3)
    )


def test_a_slow_store_does_not_stall_submit_and_writes_coalesce(tmp_path):
    folder = RunFolder(str(tmp_path), "run")
    writes = []
    release = threading.Event()

    def slow_write(text: str) -> None:
        release.wait(5)
        writes.append(text)
        RunFolder.write_metrics_text(folder, text)

    folder.write_metrics_text = slow_write
    writer = MetricsWriter(folder)
    history = []
    t0 = time.perf_counter()
    for record in records(50):
        history.append(record)
        writer.submit(history)
    submit_seconds = time.perf_counter() - t0
    release.set()
    writer.close()
    assert submit_seconds < 1.0  # the store was blocked the whole time: nothing waited on it
    assert len(writes) < 50  # superseded histories were never written
    assert folder.read_metrics() == records(50)


def test_a_failed_write_is_raised_by_flush(tmp_path):
    (tmp_path / "blocker").write_text("a file where the run folder's parent should be")
    writer = MetricsWriter(RunFolder(str(tmp_path / "blocker"), "run"))
    writer.submit(records(1))
    with pytest.raises(OSError):
        writer.flush()
    writer.close()  # the error was reported once; closing still stops the thread
    assert not writer._thread.is_alive()
