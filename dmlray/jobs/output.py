"""What a user sees: dmlray's own lines by default, Ray's and the libraries' with ``--verbose``.

Quiet (the default), a local Ray cluster does not forward its processes' output to the
driver (``log_to_driver=False``): Ray Train's ``TrainingReport(...)`` dumps, its
controller's placement messages, the C++ core's warnings (``PreemptionWatcher ... has
constructor arguments in the object store``) and boto's "Found credentials in environment
variables" from every worker stay in the session's log files. The driver prints the
training progress itself, one line per logged step, from the run folder's
``metrics.jsonl`` (``ProgressPrinter``). On an existing cluster (``RAY_ADDRESS``) worker
output is forwarded all the same, as it is the job's log (``ray job logs``), with the
libraries' INFO chatter lowered in the workers.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmlray.jobs.run_folder import RunFolder

# "1": show Ray's and the libraries' output; a local cluster's workers inherit it
VERBOSE_ENV = "DMLRAY_VERBOSE"
# loggers whose INFO records are chatter to a user of dmlray (shown with --verbose)
CHATTY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "fsspec", "ray", "ray.train", "ray.tune")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if on else "0"


class QuietFormatter(logging.Formatter):
    """``[dmlray] message`` for dmlray's INFO lines, ``LEVEL logger: message`` for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("dmlray"):
            return f"[dmlray] {record.getMessage()}"
        return f"{record.levelname} {record.name}: {super().format(record)}"


def configure_logging(on: bool) -> None:
    """The command line's logging: everything at INFO with timestamps when verbose; otherwise
    dmlray's INFO and everyone's warnings."""
    set_verbose(on)
    if on:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    handler = logging.StreamHandler()
    handler.setFormatter(QuietFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("dmlray").setLevel(logging.INFO)


def quiet_library_loggers(on: bool) -> None:
    """In a Ray worker (its logging is Ray Train's): the libraries' INFO lines only if verbose."""
    if not on:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def ray_logging_level() -> int:
    """``ray.init(logging_level=...)``: the driver's own Ray lines (token authentication,
    "Started a local Ray instance") only if verbose."""
    return logging.INFO if verbose() else logging.ERROR


def forward_worker_logs(existing_cluster: bool) -> bool:
    """``ray.init(log_to_driver=...)``: on an existing cluster always (the job's log), on a
    local one only if verbose."""
    return existing_cluster or verbose()


def write_line(line: str) -> None:
    """One line on stdout. Not ``print``: Ray Train's workers replace it with one that tees to
    stdout and logs to stderr as well, which printed every progress line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ProgressPrinter:
    """Prints ``format_line(record)`` for each new record of a run's metrics.jsonl, polling
    the run folder while training runs elsewhere (workers whose output is not forwarded).

    A record is new when its step is past the last one printed: after a restart the
    replayed steps are not printed again.
    """

    def __init__(self, folder: RunFolder, format_line: Callable[[dict], str], interval_s: float = 1.0):
        self.folder = folder
        self.format_line = format_line
        self.interval_s = interval_s
        self.last_step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmlray-progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        try:  # a resumed run's earlier steps were printed by its earlier driver
            self.last_step = max((r.get("step", -1) for r in self.folder.read_metrics()), default=-1)
        except Exception:
            self.last_step = -1
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last records, written before fit() returned

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            records = self.folder.read_metrics()
        except Exception:  # a partial or unreachable file: the next poll reads it again
            return
        for record in records:
            step = record.get("step")
            if isinstance(step, int) and step > self.last_step and "loss" in record:
                write_line(self.format_line(record))
                self.last_step = step
