"""On a real local Ray cluster (2 CPUs): a run that asks for more workers than the cluster
can ever hold fails at once naming both, and a resume refuses a checkpoint planted in the
run folder, naming it, without running it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dmlray.config import ConfigError, load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_2cpus():
    import ray

    from dmlray.jobs.launch import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def small_run(data: str, storage: Path, steps: int, *extra: str):
    return load_config(
        "demo",
        [
            f"data.url={data}",
            f"run.storage_path={storage}",
            "run.name=small",
            "run.num_workers=1",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            "train.log_every=2",
            "data.classes_per_batch=4",
            "data.class_buffer=8",
            "memory.size=0",
            "optim.milestones=[]",
            "eval.baseline=false",
            "eval.nmi=false",
            *extra,
        ],
    )


def wait_for_autoscaler_report(timeout_s: float) -> None:
    from dmlray.jobs.launch import autoscaler_report

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if autoscaler_report() is not None:
            return
        time.sleep(0.5)
    raise AssertionError(f"the head's monitor published no autoscaler report in {timeout_s} s")


def test_more_workers_than_the_cluster_has_fails_within_a_minute_naming_both(ray_2cpus, glyphs_small, tmp_path):
    from dmlray.jobs.launch import has_autoscaler, launch

    assert ray_2cpus.cluster_resources()["CPU"] == 2
    # the head's monitor publishes a (read-only) autoscaler report soon after start; wait for
    # it so that the check below sees what a long-lived local cluster shows
    wait_for_autoscaler_report(timeout_s=30)
    assert not has_autoscaler()  # a local cluster cannot grow: an error, not a warning
    cfg = small_run(glyphs_small, tmp_path, 4, "run.num_workers=5")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        launch(cfg)
    assert time.monotonic() - t0 < 60
    message = str(info.value)
    assert "run.num_workers=5" in message and "5 CPU" in message and "has 2" in message, message
    assert not (tmp_path / "small").exists()
    cfg = small_run(glyphs_small, tmp_path, 4, "run.num_workers=1", "run.cpus_per_worker=3")
    with pytest.raises(ConfigError, match="largest node has 2"):
        launch(cfg)


def test_resume_refuses_a_planted_checkpoint_naming_it(ray_2cpus, glyphs_small, tmp_path):
    from test_safety import Planted

    from dmlray.jobs.commands import find_checkpoint
    from dmlray.jobs.launch import launch
    from dmlray.training.checkpoints import SNAPSHOT_FILE, state_bytes

    run = tmp_path / "small"
    result = launch(small_run(glyphs_small, tmp_path, 4))
    assert result["steps"] == 4
    # a real resume from the run's checkpoint (RNG states as tensors) goes on to step 6
    result = launch(small_run(glyphs_small, tmp_path, 6))
    assert result["steps"] == 6 and result["restarts"] == 1
    snapshot = json.loads((run / SNAPSHOT_FILE).read_text())
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert find_checkpoint(str(run))[0] == str(run / latest)  # eval agrees with Ray's record
    assert not (run / "run.lock").exists()  # released at the end

    marker = tmp_path / "marker"
    state = run / latest / "state.pt"
    state.write_bytes(state_bytes({"model": {}, "step": 6, "payload": Planted(marker)}))
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        launch(small_run(glyphs_small, tmp_path, 8))
    assert str(state) in str(info.value) and "refused" in str(info.value), str(info.value)[-2000:]
    assert not marker.exists()
    assert not (run / "run.lock").exists()  # a failed run releases its lock too
    print(f"planted checkpoint refused in {time.monotonic() - t0:.0f}s")
