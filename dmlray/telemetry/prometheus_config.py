"""Local Prometheus setup: file-based service discovery for Ray's nodes and the sweep driver.

Ray's head writes the metrics endpoints of every node (metrics agents, dashboard,
autoscaler) into ``prom_metrics_service_discovery.json`` in its session folder, with a
link at ``/tmp/ray/prom_metrics_service_discovery.json``. The sweep driver's
prometheus_client endpoint is one more ``file_sd`` entry, written next to the sweep.
``write_prometheus_config`` writes a prometheus.yml that scrapes both::

    prometheus --config.file=SWEEP/prometheus.yml --storage.tsdb.path=SWEEP/prometheus-data

Plain JSON/YAML only; Ray is consulted (never imported at module import) to find the
current session's discovery file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

RAY_SD_NAME = "prom_metrics_service_discovery.json"
DEFAULT_RAY_SD = f"/tmp/ray/{RAY_SD_NAME}"
DRIVER_JOB = "dmlray_sweep"


def ray_service_discovery_file() -> str:
    """Ray's discovery file of the cluster this process is connected to.

    The per-session file, not the ``/tmp/ray`` link: the link follows whichever cluster
    on this host started last, which need not be ours.
    """
    try:
        import ray

        if ray.is_initialized():
            node = ray._private.worker._global_node  # no public accessor for the session dir
            if node is not None:
                path = Path(node.get_session_dir_path()) / RAY_SD_NAME
                # on a worker-only node the head's file is elsewhere: fall back to the link
                if path.exists() or node.is_head():
                    return str(path)
    except (ImportError, AttributeError):
        pass
    return DEFAULT_RAY_SD


def write_file_sd(path: str | Path, targets: list[str], labels: dict[str, str] | None = None) -> Path:
    """A Prometheus file_sd JSON listing ``host:port`` targets with labels (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = [{"targets": list(targets), "labels": dict(labels or {})}]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)  # Prometheus never reads a half-written file
    return path


def prometheus_config(jobs: dict[str, list[str]], scrape_interval: str = "5s", refresh_interval: str = "5s") -> dict:
    """prometheus.yml content: one scrape job per name, discovering targets from files.

    Files are re-read every ``refresh_interval`` as well as on change, so a file that
    appears later (the driver's, once it serves) is picked up.
    """
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": job,
                "file_sd_configs": [{"files": [str(f) for f in files], "refresh_interval": refresh_interval}],
            }
            for job, files in jobs.items()
        ],
    }


def write_prometheus_config(
    path: str | Path,
    ray_sd: str | None = None,
    driver_sd: str | Path | None = None,
    scrape_interval: str = "5s",
    refresh_interval: str = "5s",
) -> Path:
    """Write a prometheus.yml scraping Ray's nodes (``ray_sd``) and the sweep driver (``driver_sd``).

    ``ray_sd`` defaults to the connected cluster's discovery file (pass "" to leave Ray
    out); ``driver_sd`` None leaves the driver out.
    """
    jobs: dict[str, list[str]] = {}
    ray_sd = ray_service_discovery_file() if ray_sd is None else ray_sd
    if ray_sd:
        jobs["ray"] = [ray_sd]
    if driver_sd:
        jobs[DRIVER_JOB] = [str(Path(driver_sd).resolve())]
    if not jobs:
        raise ValueError("nothing to scrape: give ray_sd or driver_sd")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by dmlray: Ray's nodes and the sweep driver, found through file_sd\n"
        + yaml.safe_dump(prometheus_config(jobs, scrape_interval, refresh_interval), sort_keys=False)
    )
    return path
