"""A real Ray Train run: 2 workers (gloo DDP) streaming glyph shards from SeaweedFS."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


class MetricsPoller(threading.Thread):
    """Scrapes a Prometheus endpoint every second, keeping the dmlray lines it sees."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.lines: set[str] = set()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
                self.lines |= {line for line in text.splitlines() if line.startswith("ray_dmlray_")}
            except OSError:
                pass
            self.stop.wait(1.0)


def test_two_ray_workers_from_s3_beat_raw_pixels_and_export_metrics(glyphs_s3, s3_env, tmp_path):
    import ray

    from dmlray.config import load_config
    from dmlray.devtools.ports import free_ports
    from dmlray.jobs.launch import ensure_ray, launch

    port = free_ports(1)[0]
    ensure_ray(num_cpus=4, metrics_export_port=port, metrics_interval_ms=1000)
    poller = MetricsPoller(f"http://127.0.0.1:{port}/metrics")
    poller.start()
    try:
        cfg = load_config(
            "demo",
            [
                f"data.url={glyphs_s3}",
                f"run.storage_path={tmp_path}",
                "run.name=ray-test",
                "data.classes_per_batch=8",
                "data.samples_per_class=4",
                "data.class_buffer=16",
                "train.steps=80",
                "train.eval_every=40",
                "train.log_every=5",
                "memory.size=256",
                "memory.start=20",
                "optim.milestones=[]",
            ],
        )
        t0 = time.monotonic()
        result = launch(cfg)
        elapsed = time.monotonic() - t0
        time.sleep(3)  # one more export interval
    finally:
        poller.stop.set()
        poller.join()
        ray.shutdown()

    run = Path(tmp_path) / "ray-test"
    on_disk = json.loads((run / "result.json").read_text())
    assert on_disk["steps"] == 80 and result["run_folder"] == str(run)
    model, pixels = on_disk["metrics"], on_disk["baseline_raw_pixels"]
    assert model["recall@1"] > pixels["recall@1"], (model, pixels)
    assert model["map@r"] > pixels["map@r"]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(5, 81, 5))
    assert history[-1]["memory_fill"] == 256  # global entries: 2 ranks × 32 per step
    assert (run / "config.yaml").is_file() and any(run.glob("checkpoint_*/state.pt"))
    # every rank's series reached Ray's Prometheus endpoint during the run
    for name in ("ray_dmlray_loss", "ray_dmlray_step", "ray_dmlray_samples_per_second", "ray_dmlray_memory_fill"):
        ranks = {r for line in poller.lines if line.startswith(name + "{") for r in ("0", "1") if f'rank="{r}"' in line}
        assert ranks == {"0", "1"}, f"{name}: ranks seen {ranks}; lines: {sorted(poller.lines)[:5]}"
    assert any(line.startswith("ray_dmlray_recall_at_1{") and 'run="ray-test"' in line for line in poller.lines)
    print(f"ray train test: {elapsed:.0f}s, R@1 {model['recall@1']:.3f} vs pixels {pixels['recall@1']:.3f}")
