"""Runs that survive failures: a killed worker process, a restart by name, a fresh start."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def read_history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except json.JSONDecodeError:  # being rewritten
        return []


class WorkerKiller(threading.Thread):
    """Kills one Ray Train worker process (SIGKILL, by pid) once the run passes a step.

    Ray Train registers a reported checkpoint asynchronously: a worker killed right after
    a report can restart from the one before. The kill waits until a checkpoint folder has
    been on disk for a few seconds, so the test shows a resume rather than a restart.
    """

    def __init__(self, run: Path, after_step: int, address: str):
        super().__init__(daemon=True)
        self.run_folder, self.after_step, self.address = run, after_step, address
        self.killed: int | None = None
        self.killed_at_step: int | None = None
        self.stop = threading.Event()

    def run(self):
        from ray.util.state import list_actors

        first_checkpoint_seen = None
        while not self.stop.is_set():
            history = read_history(self.run_folder)
            if first_checkpoint_seen is None and any(self.run_folder.glob("checkpoint_*/state.pt")):
                first_checkpoint_seen = time.monotonic()
            settled = first_checkpoint_seen is not None and time.monotonic() - first_checkpoint_seen > 5
            if settled and history and history[-1]["step"] >= self.after_step:
                alive = list_actors(
                    address=self.address,
                    detail=True,
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                )
                if alive:
                    self.killed = int(alive[0]["pid"])
                    self.killed_at_step = history[-1]["step"]
                    os.kill(self.killed, signal.SIGKILL)
                    return
            self.stop.wait(0.5)


def overrides(data_url: str, storage: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"data.url={data_url}",
        f"run.storage_path={storage}",
        "run.name=ft",
        "run.num_workers=2",
        "run.max_failures=2",
        f"train.steps={steps}",
        "train.log_every=5",
        "train.checkpoint_every=10",
        "train.eval_every=40",
        "data.classes_per_batch=8",
        "data.class_buffer=16",
        "memory.size=256",
        "memory.start=5",
        "optim.milestones=[]",
        "eval.baseline=false",
        *extra,
    ]


@pytest.mark.timeout(900)
def test_killed_worker_resume_by_name_and_fresh(glyphs_small, tmp_path):
    import ray

    from dmlray.config import load_config
    from dmlray.jobs.launch import ensure_ray, launch

    run = tmp_path / "ft"
    ensure_ray(num_cpus=4)
    try:
        # other Ray clusters may run on this host: name ours
        killer = WorkerKiller(run, after_step=25, address=ray.get_runtime_context().gcs_address)
        killer.start()
        t0 = time.monotonic()
        result = launch(load_config("demo", overrides(glyphs_small, tmp_path, 40)))
        killer.stop.set()
        killer.join()
        assert killer.killed is not None, "the run ended before a worker could be killed"
        history = read_history(run)
        # the final step is exact and the history has no gap and no duplicate
        assert result["steps"] == 40
        assert [h["step"] for h in history] == list(range(5, 41, 5))
        assert history[-1]["restarts"] >= 1 and result["restarts"] >= 1
        print(f"killed pid {killer.killed} at step {killer.killed_at_step}; run took {time.monotonic() - t0:.0f}s")

        # the same name resumes from the last checkpoint (step 40) and goes on to 50
        result = launch(load_config("demo", overrides(glyphs_small, tmp_path, 50)))
        history = read_history(run)
        assert result["steps"] == 50
        assert [h["step"] for h in history] == list(range(5, 51, 5))
        assert history[-1]["restarts"] == history[-3]["restarts"] + 1  # one more restart: the resume

        # unless a fresh run is asked for
        result = launch(load_config("demo", overrides(glyphs_small, tmp_path, 10, "run.fresh=true")))
        history = read_history(run)
        assert result["steps"] == 10 and [h["step"] for h in history] == [5, 10]
        assert history[-1]["restarts"] == 0
    finally:
        ray.shutdown()
