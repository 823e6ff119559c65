"""Sweep-level Prometheus metrics, served by the sweep driver with prometheus_client.

``dmlray_sweep_trials{sweep, state}``      trials per state (pending, running, stopped_early,
                                           finished, error)
``dmlray_sweep_best_metric{sweep, metric}`` best value of the sweep's metric so far
``dmlray_sweep_trial_metric{sweep, trial, metric}`` each trial's latest value

The names are those of k8s/grafana/dmlray-sweep.json. Each SweepMetrics has its own
registry, so several sweeps (or tests) in one process do not collide. Ray-free: the Tune
callback that feeds it lives in dmlray/sweeps/tune.py.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

STATES = ("pending", "running", "stopped_early", "finished", "error")
PORT_TRIES = 100
"""Ports tried upward from the one asked for when moving on is allowed."""


class MetricsPortError(ValueError):
    """The metrics port cannot be bound; the message says which and what to do (the CLI prints it)."""


class SweepMetrics:
    """The gauges of one sweep and, once ``serve`` is called, an HTTP endpoint for them."""

    def __init__(self, sweep: str, metric: str, mode: str = "max"):
        from prometheus_client import CollectorRegistry, Gauge

        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {mode!r}")
        self.sweep, self.metric, self.mode = sweep, metric, mode
        self.registry = CollectorRegistry()
        self.trials = Gauge(
            "dmlray_sweep_trials", "Trials of the sweep in each state", ["sweep", "state"], registry=self.registry
        )
        self.best = Gauge(
            "dmlray_sweep_best_metric",
            "Best value of the sweep's metric so far",
            ["sweep", "metric"],
            registry=self.registry,
        )
        self.trial_metric = Gauge(
            "dmlray_sweep_trial_metric",
            "Latest value of the sweep's metric per trial",
            ["sweep", "trial", "metric"],
            registry=self.registry,
        )
        self.best_value: float | None = None
        self.last_scrape: float | None = None
        self.registry.register(_ScrapeClock(self))
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None
        self.set_states({})

    # ------------------------------------------------------------------ values
    def set_states(self, counts: dict[str, int]) -> None:
        """Trials per state; states not given are 0 (every state always has a series)."""
        unknown = set(counts) - set(STATES)
        if unknown:
            raise ValueError(f"unknown trial states {sorted(unknown)}; known: {', '.join(STATES)}")
        for state in STATES:
            self.trials.labels(sweep=self.sweep, state=state).set(counts.get(state, 0))

    def observe(self, trial: str, value: float | None) -> None:
        """A trial reported its metric: update its series and the sweep's best."""
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        self.trial_metric.labels(sweep=self.sweep, trial=trial, metric=self.metric).set(value)
        if self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value):
            self.best_value = value
            self.best.labels(sweep=self.sweep, metric=self.metric).set(value)

    # ------------------------------------------------------------------ serving
    def serve(self, port: int, addr: str = "127.0.0.1", auto: bool = False) -> int:
        """Serve the registry on addr:port; returns the port bound.

        A port in use is a MetricsPortError naming it, unless ``auto``: then the next
        free port upward is taken (up to PORT_TRIES). Port 0 asks the OS for any port.
        """
        from prometheus_client import start_http_server

        candidates = [port] if (port == 0 or not auto) else range(port, min(port + PORT_TRIES, 65536))
        last: OSError | None = None
        for candidate in candidates:
            try:
                server, self.thread = start_http_server(candidate, addr=addr, registry=self.registry)
            except OSError as exc:
                last = exc
                continue
            self.server = server
            bound = server.server_address[1]
            self.address = (addr, bound)
            if candidate != port and port != 0:
                log.warning("metrics port %d is in use: serving sweep metrics on %d instead", port, bound)
            log.info("sweep metrics on http://%s:%d/metrics", addr, bound)
            return bound
        hint = "choose another --metrics-port" if not auto else f"no free port in {port}..{port + PORT_TRIES - 1}"
        if not auto:
            hint += " or pass --metrics-port-auto to take the next free one"
        raise MetricsPortError(f"cannot serve sweep metrics on {addr}:{port}: {last} ({hint})")

    @property
    def target(self) -> str | None:
        """host:port for Prometheus (the loopback address when serving on all interfaces)."""
        if self.address is None:
            return None
        host, port = self.address
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"  # all interfaces include loopback, where a local Prometheus scrapes
        return f"{host}:{port}"

    def wait_for_scrape(self, timeout: float) -> bool:
        """Wait until a scraper has read the current values (at most ``timeout`` s).

        Used before the driver exits, so the final states reach the dashboards. Returns
        at once when nothing has ever scraped this endpoint.
        """
        if self.server is None or self.last_scrape is None:
            return False
        since = time.monotonic()
        while time.monotonic() - since < timeout:
            if self.last_scrape > since:
                time.sleep(0.5)  # the clock ticks while the response is built: let it be sent
                return True
            time.sleep(0.1)
        return False

    def close(self, wait_for_scrape: float = 0.0) -> None:
        """Stop serving, after one more scrape if one comes within ``wait_for_scrape`` s."""
        if wait_for_scrape > 0:
            self.wait_for_scrape(wait_for_scrape)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            if self.thread is not None:
                self.thread.join(timeout=5)
            self.server = self.thread = None
            self.address = None

    def __enter__(self) -> SweepMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ScrapeClock:
    """A collector with no metrics that notes when the registry was last scraped."""

    def __init__(self, owner: SweepMetrics):
        self.owner = owner

    def describe(self):  # without it, registering would call collect() and count as a scrape
        return []

    def collect(self):
        self.owner.last_scrape = time.monotonic()
        return []
