"""Elastic training (Ray Train 2.60's ``ScalingConfig(num_workers=(min, max))``).

Fast: the bounds and the global batch split are checked before any worker starts, and each
rank's share of the global P classes is the same global batch at every world size.

Slow, on a real local cluster (cluster/local_cluster.py: a head without CPUs and two
one-CPU worker nodes): a run with bounds 1-2 loses a worker node and goes on with one
worker without waiting for it, with the same global batch and a full cross-batch memory;
when the node is back the run grows to two workers again, and it ends with exactly
``train.steps`` steps, none missing or repeated in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deploy import local_cluster
from test_faults import driver_env, environ, node_raylet, wait_for

# a tiny run: 2 x 3 classes of K=4 per global batch, a memory of 12 global batches (more
# than a log interval: a memory restarted empty cannot be full at the first record). ~25
# steps/s here at two workers, ~7 at one: enough steps to outlast a node's loss and return
# (~60 s at one worker, grown back near step 300 here, twice that on a loaded machine).
STEPS, LOG_EVERY, CHECKPOINT_EVERY = 1000, 10, 20
P_PER_RANK, K, WORKERS, MEMORY = 3, 4, 2, 288
# a lost node is declared dead within ~3 s (GCS health checks), and a worker group that
# Ray Train tried to start on it gives up after 15 s (60 s by default). Ray Train's controller
# takes one report per rank per poll: at its default 2 s poll, this run's 1.25 checkpoints/s
# queued up (registered a minute late, the run ending a minute after its last step)
CLUSTER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}
GLOBAL_BATCH = P_PER_RANK * WORKERS * K


# ------------------------------------------------------------------------------ before any worker


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.num_workers=2", "run.min_workers=3"], r"run.min_workers=3 must be between 1 and run.num_workers=2"),
        (["run.num_workers=2", "run.min_workers=-1"], r"run.min_workers=-1 must be between 1"),
        (
            ["run.num_workers=4", "run.min_workers=1", "data.classes_per_batch=2", "run.max_failures=3"],
            r"2 x 4 = 8 classes cannot be split evenly over 3 worker\(s\); world sizes in the bounds that can: 1, 2, 4",
        ),
        (
            ["run.num_workers=5", "run.min_workers=2", "data.classes_per_batch=2", "run.max_failures=3"],
            r"= 10 classes cannot be split evenly over 3, 4 worker\(s\); world sizes in the bounds that can: 2, 5",
        ),
        (["run.num_workers=2", "run.min_workers=1", "run.max_failures=0"], r"run.max_failures != 0"),
        (
            ["run.num_workers=2", "run.min_workers=1", "run.max_failures=1", "run.resize_check_s=-1"],
            r"run.resize_check_s must be finite and >= 0",
        ),
    ],
)
def test_bad_bounds_are_refused_naming_them(overrides, message):
    from dmlray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_fixed_size_runs_are_not_elastic():
    from dmlray.config import load_config
    from dmlray.jobs import elastic

    for bounds in (["run.min_workers=0"], ["run.min_workers=2"]):
        cfg = load_config("demo", ["run.num_workers=2", *bounds])
        assert elastic.scaling_arguments(cfg.run) == {"num_workers": 2}
        assert elastic.rank_share(cfg, 1) is cfg  # unchanged: a fixed run's P is per rank
    cfg = load_config(
        "demo",
        [
            "run.num_workers=4",
            "run.min_workers=2",
            "run.max_failures=1",
            "run.resize_check_s=7",
            "data.classes_per_batch=3",
        ],
    )
    assert elastic.scaling_arguments(cfg.run) == {"num_workers": (2, 4), "elastic_resize_monitor_interval_s": 7.0}


def test_every_world_size_trains_on_the_same_global_classes(tmp_path):
    """At world size w each rank draws global/w classes; the ranks' classes are disjoint and
    together they make one global batch of the full-size run's P·R classes × K samples."""
    from conftest import RECIPE_40

    from dmlray.config import load_config
    from dmlray.data.pack import pack
    from dmlray.data.pk_batches import PKBatches
    from dmlray.data.shards import read_manifest
    from dmlray.jobs import elastic

    pack(RECIPE_40, str(tmp_path / "g"), progress=False)
    manifest = read_manifest(str(tmp_path / "g"))
    cfg = load_config(
        "demo",
        ["run.num_workers=4", "run.min_workers=1", "run.max_failures=1", "data.classes_per_batch=3"],
    )
    for world_size in (1, 2, 3, 4):
        share = elastic.rank_share(cfg, world_size)
        assert share.data.classes_per_batch * world_size == 12
        labels = []
        for rank in range(world_size):
            stream = PKBatches(
                manifest.layouts("train"),
                share.data.classes_per_batch,
                share.data.samples_per_class,
                lambda data, rng: data,  # never called: the draws are not decoded
                rank=rank,
                world_size=world_size,
            )
            _, draw = next(iter(stream.draws()))
            labels.append([label for label, ticket in draw for _ in ticket.items])
        classes = [set(x) for x in labels]
        assert sum(len(x) for x in labels) == 12 * 4, world_size
        assert all(len(c) == 12 // world_size for c in classes)
        assert len(set().union(*classes)) == 12  # disjoint across ranks


# ------------------------------------------------------------------------------ a real cluster


def history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    with contextlib.suppress(OSError, ValueError):
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    return []


@contextlib.contextmanager
def elastic_driver(state: dict, data: Path, runs: Path, log: Path):
    """`python -m dmlray train demo` with bounds 1-2 as a driver of the cluster; its process
    group is killed if it still runs when the block ends."""
    overrides = [
        f"data.url={data}",
        f"run.storage_path={runs}",
        "run.name=elastic",
        f"run.num_workers={WORKERS}",
        "run.min_workers=1",
        "run.max_failures=5",
        "run.resize_check_s=2",
        f"train.steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.eval_every=1000",
        f"data.classes_per_batch={P_PER_RANK}",
        f"data.samples_per_class={K}",
        "data.class_buffer=12",
        "data.image_size=16",
        "model.embedding_dim=16",
        f"memory.size={MEMORY}",
        "memory.start=0",
        "memory.ramp_steps=0",
        "optim.milestones=[]",
        "eval.ks=[1]",
        "eval.baseline=false",
        "eval.nmi=false",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dmlray", "train", "demo", *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=driver_env(state),
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def registered_step(run: Path) -> int:
    """Step of the latest checkpoint Ray Train registered (it registers reported ones
    asynchronously, and a worker group lost before that resumes from an earlier one)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    return 0


def first_record(records: list[dict], after_step: int, world_size: int) -> dict | None:
    return next((r for r in records if r["step"] > after_step and r["world_size"] == world_size), None)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lost_node_shrinks_the_run_and_a_new_node_grows_it_back(tmp_path):
    from conftest import RECIPE_40

    from dmlray.data.pack import pack

    t_start = time.monotonic()
    data, runs, log = tmp_path / "glyphs40", tmp_path / "runs", tmp_path / "driver.log"
    pack(RECIPE_40, str(data), progress=False)
    folder = tmp_path / "cluster"
    with environ(CLUSTER_ENV):
        state = local_cluster.up(folder, workers=2, cpus=1, head_cpus=0, s3=False, timeout=300)
    t_up = time.monotonic()
    try:
        run = runs / "elastic"
        with elastic_driver(state, data, runs, log) as proc:
            alive = lambda: proc.poll() is None  # noqa: E731
            wait_for(
                "a registered checkpoint of two workers with a full memory",
                lambda: registered_step(run) >= 2 * CHECKPOINT_EVERY,
                300,
                alive,
                every=0.2,
            )
            killed_after = history(run)[-1]["step"]
            os.kill(node_raylet(state, "ray-worker-1"), signal.SIGKILL)
            t_kill = time.monotonic()
            shrunk = wait_for(
                "a record of one worker",
                lambda: first_record(history(run), 0, 1),
                300,
                alive,
                every=0.2,
            )
            t_shrunk = time.monotonic()
            assert shrunk["step"] < STEPS - 4 * CHECKPOINT_EVERY, "the run nearly ended before it shrank"
            local_cluster.restart_node(folder, "ray-worker-1", timeout=300)
            t_back = time.monotonic()
            grown = wait_for(
                "a record of two workers after the shrink",
                lambda: first_record(history(run), shrunk["step"], 2),
                300,
                alive,
                every=0.2,
            )
            t_grown = time.monotonic()
            assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        local_cluster.down(folder)

    records = history(run)
    steps = [r["step"] for r in records]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), f"gap or duplicate: {steps}"
    assert json.loads((run / "result.json").read_text())["steps"] == STEPS
    sizes = [r["world_size"] for r in records]
    # 2 workers, then 1, then 2 again, each a contiguous stretch
    changes = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert changes == [2, 1, 2], sizes
    assert all(r["global_batch"] == GLOBAL_BATCH for r in records), {r["global_batch"] for r in records}
    # the memory came through both resizes whole: full at the first record of each attempt,
    # where a fresh memory would hold the global batches since the checkpoint only
    steps_to_fill = MEMORY // GLOBAL_BATCH
    shrink, grow = records[steps.index(shrunk["step"])], records[steps.index(grown["step"])]
    for record in (shrink, grow):
        assert record["memory_fill"] == MEMORY, record
        assert record["restarts"] >= 1
        # resumed from a checkpoint, recent enough that a fresh memory could not be full there
        assert record["resumed_from"] % CHECKPOINT_EVERY == 0, record
        assert 0 <= record["step"] - record["resumed_from"] < steps_to_fill, record
    assert shrink["resumed_from"] >= 2 * CHECKPOINT_EVERY  # the registered checkpoint the kill waited for
    shrink_resume, grow_resume = shrink["resumed_from"], grow["resumed_from"]
    print(
        f"ELASTIC cluster up {t_up - t_start:.0f}s; killed after step {killed_after}; "
        f"1 worker from step {shrunk['step']} (resumed at {shrink_resume}, {t_shrunk - t_kill:.0f}s after the kill); "
        f"node back {t_back - t_shrunk:.0f}s later; 2 workers from step {grown['step']} "
        f"(resumed at {grow_resume}, {t_grown - t_back:.0f}s after the node); total {time.monotonic() - t_start:.0f}s"
    )
