"""Metrics for dashboards: the sweep driver's prometheus_client endpoint, the Prometheus
config that finds it and Ray's nodes, and a real Prometheus server scraping a sweep whose
trial trains with 2 Ray Train workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from dmlray.devtools.ports import free_ports
from dmlray.telemetry.prometheus_config import DRIVER_JOB, write_file_sd, write_prometheus_config
from dmlray.telemetry.sweep_metrics import STATES, MetricsPortError, SweepMetrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
INSTALL = "apt-get update && apt-get install -y prometheus"


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name`` whose labels include ``labels`` (None if absent)."""
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


# ----------------------------------------------------------------------------- the driver's endpoint


def test_sweep_metrics_serve_states_best_and_per_trial_values():
    with SweepMetrics("s1", "recall@1", "max") as metrics:
        port = metrics.serve(0)
        metrics.set_states({"pending": 2, "running": 2})
        metrics.observe("a_00000", 0.40)
        metrics.observe("a_00001", 0.70)
        metrics.observe("a_00000", 0.55)
        metrics.observe("a_00001", float("nan"))  # ignored
        text = scrape(port)
        for state in STATES:  # every state has a series, zero or not, so dashboards show zeros
            assert sample(text, "dmlray_sweep_trials", sweep="s1", state=state) is not None, state
        assert sample(text, "dmlray_sweep_trials", state="running") == 2
        assert sample(text, "dmlray_sweep_best_metric", sweep="s1", metric="recall@1") == 0.70
        assert sample(text, "dmlray_sweep_trial_metric", trial="a_00000") == 0.55
        assert sample(text, "dmlray_sweep_trial_metric", trial="a_00001") == 0.70
        assert metrics.target == f"127.0.0.1:{port}"
    with pytest.raises(OSError):
        scrape(port)  # closed on exit
    with pytest.raises(ValueError, match="unknown trial states"):
        SweepMetrics("s2", "loss", "min").set_states({"terminated": 1})


def test_the_driver_waits_for_a_last_scrape_only_when_something_scrapes_it():
    with SweepMetrics("s", "recall@1") as metrics:
        port = metrics.serve(0)
        t0 = time.monotonic()
        assert metrics.wait_for_scrape(5) is False and time.monotonic() - t0 < 1  # nobody scrapes
        scrape(port)
        threading.Timer(0.5, scrape, args=(port,)).start()
        assert metrics.wait_for_scrape(10) is True


def test_min_mode_keeps_the_lowest_value():
    metrics = SweepMetrics("s", "loss", "min")
    for v in (0.9, 0.5, 0.7):
        metrics.observe("t", v)
    assert metrics.best_value == 0.5


def test_a_port_in_use_is_a_clear_error_or_moves_on_when_allowed():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(MetricsPortError, match=rf"127\.0\.0\.1:{port}.*--metrics-port-auto"):
            SweepMetrics("s", "recall@1").serve(port)
        with SweepMetrics("s", "recall@1") as metrics:
            bound = metrics.serve(port, auto=True)
            assert bound > port
            assert "dmlray_sweep_trials" in scrape(bound)
    finally:
        holder.close()


def test_the_cli_reports_a_taken_metrics_port_before_starting_ray(tmp_path, capsys):
    import ray

    from dmlray.cli import main

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    try:
        rc = main(
            [
                "tune",
                "--space",
                str(space),
                "--metrics-port",
                str(port),
                "demo",
                f"data.url={tmp_path}/data",
                f"run.storage_path={tmp_path}",
                "run.num_workers=1",
            ]
        )
    finally:
        holder.close()
    assert rc == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--metrics-port-auto" in err
    assert not ray.is_initialized() and not (tmp_path / "demo-sweep").exists()


# ----------------------------------------------------------------------------- config files


def test_the_prometheus_config_scrapes_ray_and_the_driver_through_file_sd(tmp_path):
    sd = write_file_sd(tmp_path / "sweep" / "prometheus_sd.json", ["127.0.0.1:9500"], {"sweep": "s"})
    assert json.loads(sd.read_text()) == [{"targets": ["127.0.0.1:9500"], "labels": {"sweep": "s"}}]
    ray_sd = tmp_path / "ray_sd.json"
    ray_sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ["127.0.0.1:8080"]}]))
    path = write_prometheus_config(tmp_path / "prometheus.yml", ray_sd=str(ray_sd), driver_sd=sd, scrape_interval="1s")
    config = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job["file_sd_configs"][0]["files"] for job in config["scrape_configs"]}
    assert jobs == {"ray": [str(ray_sd)], DRIVER_JOB: [str(sd)]}
    assert config["global"]["scrape_interval"] == "1s"
    if os.path.exists(PROMTOOL):  # Prometheus's own checker reads the config and both sd files
        check = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_each_loss_term_is_one_series_of_the_term_gauge():
    """A run with loss.terms records loss/<id>; outside Ray prometheus_client serves each
    as dmlray_term_loss{term="<id>"} beside the summed loss."""
    from prometheus_client import REGISTRY, generate_latest

    from dmlray.telemetry.worker_metrics import WorkerMetrics

    metrics = WorkerMetrics("terms-run", 1, "prometheus")
    metrics.record({"step": 7, "loss": 1.25, "loss/class": 0.75, "loss/aux": 0.5, "loss/none": None})
    lines = generate_latest(REGISTRY).decode().splitlines()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if 'run="terms-run"' in line}
    tags = 'rank="1",run="terms-run"'
    assert series[f'dmlray_term_loss{{{tags},term="class",trial=""}}'] == 0.75
    assert series[f'dmlray_term_loss{{{tags},term="aux",trial=""}}'] == 0.5
    assert series[f'dmlray_loss{{{tags},trial=""}}'] == 1.25
    assert not any('term="none"' in key for key in series)  # a term without a value is not exported


def test_the_grafana_dashboard_uses_the_names_dmlray_exports():
    from dmlray.telemetry.worker_metrics import GAUGES, PREFIX

    dashboard = (ROOT / "k8s" / "grafana" / "dmlray-sweep.json").read_text()
    exprs = " ".join(re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', dashboard))
    assert exprs, "no PromQL expressions found in the dashboard"
    used = set(re.findall(r"\b((?:ray_)?dmlray_\w+)", exprs))
    sweep = {"dmlray_sweep_trials", "dmlray_sweep_best_metric", "dmlray_sweep_trial_metric"}
    workers = {f"ray_{PREFIX}{name}" for name in GAUGES}
    assert used <= sweep | workers, f"dashboard names dmlray does not export: {sorted(used - sweep - workers)}"
    # every state the dashboard counts is one the driver exports
    for regex in re.findall(r'state=~\\"\(\?i\)([^\\]*)\\"', exprs):
        assert any(re.fullmatch(regex, s, re.I) for s in STATES), regex


# ----------------------------------------------------------------------------- a real Prometheus


class Prometheus:
    """A Prometheus server on a free loopback port with its own data folder."""

    def __init__(self, config: Path, data: Path):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data.parent / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prometheus not ready after {timeout}s")

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}"
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets(self) -> list[dict]:
        body = json.loads(urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5).read())
        return body["data"]["activeTargets"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.log.close()


class Watcher(threading.Thread):
    """Asks Prometheus every second which dmlray series it holds, keeping their labels."""

    QUERIES = (
        "ray_dmlray_loss",
        "ray_dmlray_recall_at_1",
        "ray_dmlray_step",
        "dmlray_sweep_trials",
        "dmlray_sweep_best_metric",
        "dmlray_sweep_trial_metric",
    )

    def __init__(self, prometheus: Prometheus):
        super().__init__(daemon=True)
        self.prometheus, self.stop = prometheus, threading.Event()
        self.seen: dict[str, list[dict]] = {q: [] for q in self.QUERIES}
        self.jobs_up: set[str] = set()
        self.errors: list[str] = []

    def run(self):
        while not self.stop.wait(1.0):
            try:
                for q in self.QUERIES:
                    for series in self.prometheus.query(q):
                        labels = dict(series["metric"], value=series["value"][1])
                        if labels not in self.seen[q]:
                            self.seen[q].append(labels)
                self.jobs_up |= {t["labels"]["job"] for t in self.prometheus.targets() if t["health"] == "up"}
            except (OSError, ValueError, KeyError) as exc:
                self.errors.append(repr(exc))


@pytest.mark.slow
def test_prometheus_scrapes_the_workers_and_the_driver_of_a_sweep_kept_on_s3(glyphs_small, s3_env, tmp_path):
    if not os.path.exists(PROMETHEUS):
        pytest.skip(f"the prometheus binary is not installed ({PROMETHEUS}); install it with: {INSTALL}")
    import ray

    from dmlray.data import storage
    from dmlray.jobs.launch import ensure_ray
    from dmlray.sweeps.tune import SweepMetricsEndpoint, SweepSettings, run_sweep
    from dmlray.telemetry.prometheus_config import ray_service_discovery_file

    space = tmp_path / "space.yaml"
    space.write_text("loss.params.beta: {choice: [40]}\n")
    runs = f"s3://dmlray-test/{tmp_path.name}"  # Tune's experiment and the trial's run live on S3
    local = tmp_path / "prometheus"  # Prometheus reads local files
    t0 = time.monotonic()
    ensure_ray(num_cpus=4, metrics_export_port=free_ports(1)[0], metrics_interval_ms=1000)
    prometheus = watcher = None
    try:
        ray_sd = ray_service_discovery_file()
        assert ray_sd != "/tmp/ray/prom_metrics_service_discovery.json", "expected this session's own file"
        # the driver's entry appears once the sweep serves its metrics: Prometheus re-reads it
        config = write_prometheus_config(
            tmp_path / "prometheus.yml",
            ray_sd=ray_sd,
            driver_sd=local / "prometheus_sd.json",
            scrape_interval="1s",
            refresh_interval="1s",
        )
        prometheus = Prometheus(config, tmp_path / "tsdb")
        prometheus.wait_ready()
        watcher = Watcher(prometheus)
        watcher.start()
        result = run_sweep(
            "demo",
            str(space),
            SweepSettings(num_samples=1, scheduler="none"),
            [
                f"data.url={glyphs_small}",
                f"run.storage_path={runs}",
                "run.name=p",
                "run.num_workers=2",
                "data.classes_per_batch=8",
                "data.samples_per_class=4",
                "data.class_buffer=16",
                "train.steps=30",
                "train.eval_every=10",
                "train.log_every=2",
                "memory.size=0",
                "optim.milestones=[]",
                "eval.baseline=false",
                "eval.ks=[1,2]",
            ],
            metrics=SweepMetricsEndpoint(port=0, prometheus_dir=str(local)),
        )
        # the driver's endpoint closed when run_sweep returned, so Prometheus marks its
        # series stale at the next scrape (maybe before the watcher's next query); the
        # samples it stored still hold the final states
        deadline = time.monotonic() + 15
        while True:
            final = prometheus.query("last_over_time(dmlray_sweep_trials[5m])")
            watcher.seen["dmlray_sweep_trials"] += [dict(s["metric"], value=s["value"][1]) for s in final]
            if any(s["metric"]["state"] == "finished" and float(s["value"][1]) > 0 for s in final):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        if watcher is not None:
            watcher.stop.set()
            watcher.join(timeout=10)
        if prometheus is not None:
            prometheus.stop()
        ray.shutdown()
    elapsed = time.monotonic() - t0

    assert result.complete and [r.state for r in result.rows] == ["finished"]
    trial = result.rows[0].trial
    seen = watcher.seen
    assert {"ray", DRIVER_JOB} <= watcher.jobs_up, (watcher.jobs_up, watcher.errors[:3])
    for name in ("ray_dmlray_loss", "ray_dmlray_recall_at_1", "ray_dmlray_step"):
        ranks = {s["rank"] for s in seen[name] if s.get("trial") == trial and s.get("run") == f"trial_{trial}"}
        assert ranks == {"0", "1"}, f"{name}: ranks {ranks}; series {seen[name][:4]}; errors {watcher.errors[:3]}"
    # the driver lingers until Prometheus has read the final states
    states = {s["state"] for s in seen["dmlray_sweep_trials"] if float(s["value"]) > 0}
    assert {"running", "finished"} <= states, seen["dmlray_sweep_trials"]
    assert all(s["sweep"] == "p-sweep" and s["job"] == DRIVER_JOB for s in seen["dmlray_sweep_trials"])
    assert any(float(s["value"]) > 0 for s in seen["dmlray_sweep_best_metric"])
    assert {s["trial"] for s in seen["dmlray_sweep_trial_metric"]} == {trial}  # joins with the workers' label
    # the sweep's reports landed on S3 next to Tune's experiment; the Prometheus files locally
    assert result.url == f"{runs}/p-sweep"
    for name in (
        "sweep.csv",
        "sweep_curves.png",
        "sweep_params.png",
        "sweep.yaml",
        f"runs/trial_{trial}/result.json",
        f"runs/trial_{trial}/config.yaml",
    ):
        assert storage.exists(f"{result.url}/{name}"), name
    assert (local / "prometheus.yml").is_file()
    print(f"prometheus test: {elapsed:.0f}s")
