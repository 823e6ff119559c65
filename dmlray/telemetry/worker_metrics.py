"""Prometheus metrics of a training worker, labelled by run, trial and rank.

Inside Ray, ``ray.util.metrics`` gauges are exported by each node's metrics agent as
``ray_dmlray_<name>`` (no port per process). Outside Ray, ``prometheus_client`` serves
the same names (without the ``ray_`` prefix) on a port of the user's choice.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

GAUGES = {
    "step": "Optimisation steps completed",
    "loss": "Training loss (batch term + weighted memory term)",
    "batch_loss": "Loss term against the global batch",
    "memory_loss": "Loss term against the cross-batch memory",
    "samples_per_second": "Global training samples per second",
    "data_wait_fraction": "Fraction of wall time spent waiting for data",
    "memory_fill": "Entries in the cross-batch memory",
    "recall_at_1": "Last evaluated Recall@1",
    "map_at_r": "Last evaluated MAP@R",
    "val_recall_at_1": "Last validation Recall@1 (held-out training classes)",
    "val_map_at_r": "Last validation MAP@R (held-out training classes)",
    "memory_weight": "Current weight of the memory loss term",
    "restarts": "Times this run restarted from a checkpoint",
    "skipped_samples": "Bad samples skipped by the data stream",
    "bad_shards": "Shards the data stream excluded (unreadable or failing their checksum)",
    "storage_retries": "S3 requests retried after a transient failure (an outage shows as a rise)",
}
TAG_KEYS = ("run", "trial", "rank")
PREFIX = "dmlray_"
TERM_GAUGE = "term_loss"
"""One gauge for the terms of ``loss.terms``: a record's ``loss/<id>`` is its value with the
label ``term=<id>`` (ids are config names, checked to be unique)."""
TERM_DESCRIPTION = "Value of one loss term of loss.terms, before its weight"
TERM_TAG_KEYS = (*TAG_KEYS, "term")
TERM_PREFIX = "loss/"


def _metric_key(record_key: str) -> str:
    return record_key.replace("val/", "val_").replace("@", "_at_")


class WorkerMetrics:
    """Records a worker's metrics; backend ``ray``, ``prometheus`` or ``none``."""

    def __init__(self, run: str, rank: int, backend: str, trial: str = "", port: int = 0):
        self.tags = {"run": run, "trial": trial, "rank": str(rank)}
        self.backend = backend
        self.gauges: dict = {}
        if backend == "ray":
            from ray.util.metrics import Gauge

            self.gauges = {k: Gauge(PREFIX + k, description=d, tag_keys=TAG_KEYS) for k, d in GAUGES.items()}
            self.gauges[TERM_GAUGE] = Gauge(PREFIX + TERM_GAUGE, description=TERM_DESCRIPTION, tag_keys=TERM_TAG_KEYS)
        elif backend == "prometheus":
            self.gauges = _prometheus_gauges()
            if port:
                serve_prometheus(port)
        elif backend != "none":
            raise ValueError(f"metrics backend must be ray, prometheus or none, got {backend!r}")

    def record(self, record: dict) -> None:
        """Set every gauge whose value the record carries (recall@1 → recall_at_1, ...)."""
        for key, value in record.items():
            tags = self.tags
            name = _metric_key(key)
            if key.startswith(TERM_PREFIX):
                name, tags = TERM_GAUGE, {**self.tags, "term": key[len(TERM_PREFIX) :]}
            if value is None or name not in self.gauges:
                continue
            gauge = self.gauges[name]
            if self.backend == "ray":
                gauge.set(float(value), tags=tags)
            else:
                gauge.labels(**tags).set(float(value))


_PROM_GAUGES: dict = {}
_PROM_PORTS: set[int] = set()


def _prometheus_gauges() -> dict:
    # one registry entry per name per process, however many WorkerMetrics are made
    if not _PROM_GAUGES:
        from prometheus_client import Gauge

        for k, d in GAUGES.items():
            _PROM_GAUGES[k] = Gauge(PREFIX + k, d, TAG_KEYS)
        _PROM_GAUGES[TERM_GAUGE] = Gauge(PREFIX + TERM_GAUGE, TERM_DESCRIPTION, TERM_TAG_KEYS)
    return _PROM_GAUGES


def serve_prometheus(port: int, addr: str = "127.0.0.1") -> None:
    """Serve this process's prometheus_client registry; a port in use is a clear error."""
    if port in _PROM_PORTS:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {addr}:{port}: {exc} (choose another run.metrics_port)") from exc
    _PROM_PORTS.add(port)
    log.info("metrics on http://%s:%d/metrics", addr, port)
