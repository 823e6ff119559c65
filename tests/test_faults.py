"""Faults that clusters have, on a real local cluster (cluster/local_cluster.py: a head
without CPUs, two one-CPU worker nodes started one after another, SeaweedFS): a
preemption notice (SIGTERM to a worker), an S3 outage, a stopped and resubmitted job, a
dead node. Every run must end with the exact step count and a metrics.jsonl without gap
or duplicate; each test prints what the fault cost (steps lost, time to recover).

The retry deadline itself is tested against a real closed port (fast, not slow).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_deploy import local_cluster, submit_ray_job

# ~2.5 steps/s on 2 shared cores: long enough to inject a fault after a checkpoint
STEPS, LOG_EVERY, CHECKPOINT_EVERY = 120, 5, 20
GRID = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))


# --------------------------------------------------------------------------- the retry deadline (fast)


def test_unreachable_endpoint_fails_after_the_deadline_naming_it(monkeypatch):
    """A closed port (nothing listens): retried with backoff for the deadline, then one
    clear error naming the endpoint; the retries are counted."""
    from dmlray.data import storage
    from dmlray.devtools.ports import free_ports

    port = free_ports(1)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    storage.reset_clients()
    before, deadline = storage.retry_count(), storage.retry_deadline()
    storage.set_retry_deadline(3.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match=f"127.0.0.1:{port}.*run.storage_retry_s=3s"):
            storage.read_bytes("s3://bucket/some/key")
        took = time.monotonic() - t0
    finally:
        storage.set_retry_deadline(deadline)
        storage.reset_clients()
    assert 3.0 <= took < 30.0
    assert storage.retry_count() - before >= 1  # each attempt is a botocore call with its own quick retries


def test_storage_retry_deadline_is_validated():
    from dmlray.config import ConfigError, load_config

    assert load_config("demo").run.storage_retry_s == 120.0
    with pytest.raises(ConfigError, match="run.storage_retry_s"):
        load_config("demo", ["run.storage_retry_s=0"])


def test_checkpoints_faster_than_ray_train_registers_them_are_warned_of_once(monkeypatch, caplog):
    """Ray Train's controller takes one report per rank per poll: a faster checkpoint cadence
    is named once, with the setting to change."""
    from dmlray.jobs.launch import RayReport

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    report = RayReport(steps=100, rank=0, metrics=None, folder=None, writer=None)  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="dmlray.jobs.launch"):
        report.check_cadence(10)
        time.sleep(0.6)
        report.check_cadence(20)  # slower than the poll: fine
        report.check_cadence(30)
        report.check_cadence(40)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("step 30: a checkpoint"), warnings
    assert "raise train.checkpoint_every" in warnings[0] and "0.5s poll" in warnings[0]


# ------------------------------------------------------------------------------------ the cluster


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """os.environ with `values` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (0 CPUs) + 2 worker nodes (1 CPU each) + SeaweedFS, with glyphs40 packed on it.

    With no CPU on the head, both training workers need both worker nodes: a run that
    lost a node waits until it is back. Ray Train waits up to 5 minutes for a worker
    group (60 s by default) so that a node restart on a loaded machine fits.
    """
    from recipes import RECIPE_40

    from dmlray.data import storage
    from dmlray.data.pack import pack

    folder = tmp_path_factory.mktemp("faults") / "cluster"
    with environ({"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", "RAY_USAGE_STATS_ENABLED": "0"}):
        t0 = time.monotonic()
        state = local_cluster.up(folder, workers=2, cpus=1, head_cpus=0, timeout=300)
    print(f"cluster up (head + 2 worker nodes + S3) in {time.monotonic() - t0:.0f}s")
    try:
        assert local_cluster.alive_ray_nodes(state["ray"]) == 3
        with environ(local_cluster.s3_env(state["s3"])):
            storage.reset_clients()
            pack(RECIPE_40, f"s3://{state['s3']['bucket']}/glyphs40", progress=False)
        storage.reset_clients()
        yield state
    finally:
        local_cluster.down(folder)


def overrides(state: dict, name: str, *extra: str) -> list[str]:
    bucket = state["s3"]["bucket"]
    return [
        f"data.url=s3://{bucket}/glyphs40",
        f"run.storage_path=s3://{bucket}/runs",
        f"run.name={name}",
        "run.num_workers=2",
        "run.max_failures=3",
        f"train.steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.eval_every=1000",
        "data.classes_per_batch=8",
        "data.class_buffer=16",
        "memory.size=256",
        "memory.start=5",
        "optim.milestones=[]",
        "eval.baseline=false",
        "eval.nmi=false",
        *extra,
    ]


def driver_env(state: dict) -> dict[str, str]:
    """A driver of the cluster (ray.init to its GCS) with its token and S3 settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "AWS_"))}
    env.update(local_cluster.cluster_env(state))
    env["RAY_ADDRESS"] = state["ray"]["address"]
    return env


@contextlib.contextmanager
def driver(state: dict, name: str, log: Path, *extra: str):
    """`python -m dmlray train demo ...` as a driver process; killed (its group) if still
    running when the block ends."""
    cmd = [sys.executable, "-m", "dmlray", "train", "demo", *overrides(state, name, *extra)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=driver_env(state), start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def history(state: dict, name: str) -> list[dict] | None:
    """metrics.jsonl of a run, None while it cannot be read (not there yet, S3 down)."""
    try:
        body = (
            local_cluster.s3_client(state["s3"])
            .get_object(Bucket=state["s3"]["bucket"], Key=f"runs/{name}/metrics.jsonl")["Body"]
            .read()
        )
        return [json.loads(line) for line in body.decode().splitlines() if line]
    except Exception:
        return None


def checkpoints(state: dict, name: str) -> list[str]:
    try:
        listing = local_cluster.s3_client(state["s3"]).list_objects_v2(
            Bucket=state["s3"]["bucket"], Prefix=f"runs/{name}/checkpoint_", Delimiter="/"
        )
    except Exception:
        return []
    return [p["Prefix"] for p in listing.get("CommonPrefixes", [])]


def wait_for(
    what: str, check: Callable[[], object], timeout: float, alive: Callable[[], bool] = lambda: True, every: float = 1.0
):
    """Poll `check()` until it returns something truthy (returned), within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert alive(), f"the run ended while waiting for {what}"
        time.sleep(every)
    raise TimeoutError(f"no {what} within {timeout:.0f}s")


def ready_for_fault(state: dict, name: str, proc: subprocess.Popen | None = None, min_step: int = 30) -> int:
    """Wait until the run passed `min_step` with a checkpoint stored a few seconds ago (Ray
    registers a reported checkpoint asynchronously); returns the last logged step."""
    alive = (lambda: proc.poll() is None) if proc is not None else (lambda: True)
    wait_for("a checkpoint", lambda: checkpoints(state, name), 600, alive)
    time.sleep(3)
    return wait_for(
        f"step {min_step}",
        lambda: (h := history(state, name)) and h[-1]["step"] >= min_step and h[-1]["step"],
        300,
        alive,
        every=0.3,
    )


def watch_recovery(
    state: dict, name: str, restarts_before: int, alive: Callable[[], bool], timeout: float = 600
) -> tuple[float, int]:
    """(seconds until the first record of the restarted attempt, highest step logged before it)."""
    t0, high = time.monotonic(), 0

    def restarted() -> bool:
        nonlocal high
        h = history(state, name) or []
        if h and h[-1]["restarts"] > restarts_before:
            return True
        assert not h or h[-1]["step"] < STEPS, "the run finished without a restart"
        high = max([high] + [r["step"] for r in h])
        return False

    wait_for("a record after the restart", restarted, timeout, alive, every=0.5)
    return time.monotonic() - t0, high


def assert_contiguous(records: list[dict]) -> None:
    """Steps strictly increasing, every log step present: no gap, no duplicate. Only a
    preemption checkpoint may add a step off the log grid."""
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    assert set(GRID) <= set(steps), f"gap: missing {sorted(set(GRID) - set(steps))}"
    off_grid = [r for r in records if r["step"] not in GRID]
    assert all(r.get("preempted") for r in off_grid), f"unexpected records: {off_grid}"


def resumed_steps(records: list[dict]) -> list[int]:
    """The checkpoint step each restarted attempt that logged a record started from, in order
    (from metrics.jsonl: the driver's log can repeat a worker's line, once per node on this
    host, or miss it when the node that forwards it is restarted)."""
    starts: dict[int, int] = {}
    for record in records:
        if record["restarts"]:
            starts.setdefault(record["restarts"], record["resumed_from"])
    return list(starts.values())


def node_raylet(state: dict, node: str) -> int:
    """The raylet's pid of one worker node (in the process group of its `ray start`)."""
    proc = next(p for p in local_cluster.load_state(state["dir"])["processes"] if p["name"] == node)
    raylets = [pid for pid in local_cluster._group_members(proc["pgid"]) if _stat(pid)[0] == "raylet"]
    assert len(raylets) == 1, f"{node}: raylets {raylets}"
    return raylets[0]


def _stat(pid: int) -> tuple[str, int]:
    """(command name, parent pid) of a process; ("", 0) when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0
    return raw[raw.index("(") + 1 : raw.rindex(")")], int(raw[raw.rindex(")") + 2 :].split()[1])


def train_worker_pids(state: dict, node: str) -> list[int]:
    """Ray Train worker processes on one worker node: children of its raylet (Ray starts
    workers in process groups of their own) whose title names the Train worker actor."""
    raylet = node_raylet(state, node)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name))[1] == raylet:
            with contextlib.suppress(OSError):
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def report(fault: str, **figures) -> None:
    print(f"FAULT {fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ----------------------------------------------------------------------------------- the faults


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigterm_checkpoints_the_step_and_resumes_losing_nothing(cluster, tmp_path):
    name, log = "sigterm", tmp_path / "driver.log"
    with driver(cluster, name, log) as proc:
        ready_for_fault(cluster, name, proc)
        pids = wait_for("a train worker on ray-worker-1", lambda: train_worker_pids(cluster, "ray-worker-1"), 60)
        os.kill(pids[0], signal.SIGTERM)
        took, _ = watch_recovery(cluster, name, 0, lambda: proc.poll() is None)
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    text = log.read_text()
    records = history(cluster, name)
    assert_contiguous(records)
    preempted = [r["step"] for r in records if r.get("preempted")]
    assert len(preempted) == 1, records
    assert "SIGTERM: finishing this step" in text
    resumed = resumed_steps(records)
    assert resumed == [preempted[0]], f"resumed at {resumed}, preempted at {preempted}"
    assert records[-1]["step"] == STEPS and records[-1]["restarts"] == 1
    result = json.loads(
        local_cluster.s3_client(cluster["s3"])
        .get_object(Bucket=cluster["s3"]["bucket"], Key=f"runs/{name}/result.json")["Body"]
        .read()
    )
    assert result["steps"] == STEPS
    report(
        "SIGTERM to a worker",
        checkpointed_at=preempted[0],
        resumed_at=resumed[0],
        steps_lost=preempted[0] - resumed[0],
        recover_s=f"{took:.0f}",
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_s3_outage_of_20s_is_waited_out(cluster, tmp_path):
    name, log = "outage", tmp_path / "driver.log"
    with driver(cluster, name, log) as proc:
        at = ready_for_fault(cluster, name, proc)
        t0 = time.monotonic()
        local_cluster.restart_seaweedfs(cluster["dir"], pause_s=20.0)
        down_s = time.monotonic() - t0
        # progress after the outage: the run went on
        resumed = wait_for(
            "progress after the outage",
            lambda: (h := history(cluster, name)) and h[-1]["step"] > at and h[-1]["step"],
            600,
            lambda: proc.poll() is None,
        )
        took = time.monotonic() - t0
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    text = log.read_text()
    records = history(cluster, name)
    assert_contiguous(records)
    assert records[-1]["step"] == STEPS
    # the outage is visible: in the log (start and end) and in the metrics
    assert "storage: cannot" in text and "is back" in text, text[-5000:]
    assert records[-1]["storage_retries"] > 0
    restarts = records[-1]["restarts"]
    lost = (at - max(resumed_steps(records))) if restarts else 0
    report(
        "S3 down 20 s",
        outage_s=f"{down_s:.0f}",
        step_at_outage=at,
        restarts=restarts,
        storage_retries=records[-1]["storage_retries"],
        steps_lost=lost,
        recover_s=f"{took - down_s:.0f} after S3 was back (progress at step {resumed})",
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_stopped_job_resubmitted_resumes(cluster, tmp_path):
    from dmlray.config import config_to_dict, load_config

    name = "jobstop"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(yaml.safe_dump(config_to_dict(load_config("demo", overrides(cluster, name)))))
    runtime_env = json.dumps({"working_dir": str(job_dir)})
    ray_bin, address = local_cluster._bin("ray"), cluster["ray"]["dashboard_url"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "AWS_"))}
    env.update(local_cluster.cluster_env(cluster))
    submit = [ray_bin, "job", "submit", "--address", address, "--runtime-env-json", runtime_env]
    entry = ["--", "python", "-m", "dmlray", "train", "job.yaml"]
    first = f"faults-{os.getpid()}-1"
    out = subprocess.run(
        [*submit, "--no-wait", "--submission-id", first, *entry], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        at = ready_for_fault(cluster, name)
    finally:
        stop = subprocess.run(
            [ray_bin, "job", "stop", "--address", address, first], capture_output=True, text=True, timeout=300, env=env
        )
    t0 = time.monotonic()
    assert stop.returncode == 0, stop.stderr[-3000:]
    status = subprocess.run(
        [ray_bin, "job", "status", "--address", address, first], capture_output=True, text=True, timeout=120, env=env
    )
    assert "stopped" in (status.stdout + status.stderr).lower()
    stopped_high = max(r["step"] for r in history(cluster, name))

    job = submit_ray_job(
        cluster, "python -m dmlray train job.yaml", timeout=900, runtime_env={"working_dir": str(job_dir)}
    )
    took = time.monotonic() - t0
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    records = history(cluster, name)
    assert_contiguous(records)
    assert records[-1]["step"] == STEPS and records[-1]["restarts"] == 1
    resumed = resumed_steps(records)
    assert len(resumed) == 1 and resumed[0] % CHECKPOINT_EVERY == 0 and resumed[0] <= stopped_high, resumed
    report(
        "ray job stop + resubmit",
        stopped_at_step=stopped_high,
        resumed_at=resumed[0],
        steps_lost=stopped_high - resumed[0],
        first_poll_step=at,
        recover_s=f"{took:.0f} (resubmit to the end of the run)",
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dead_node_restarted_resumes_from_checkpoint(cluster, tmp_path):
    name, log = "nodedeath", tmp_path / "driver.log"
    with driver(cluster, name, log) as proc:
        at = ready_for_fault(cluster, name, proc)
        os.kill(node_raylet(cluster, "ray-worker-1"), signal.SIGKILL)
        t0 = time.monotonic()
        time.sleep(5)  # the node is gone for a while before it is replaced
        local_cluster.restart_node(cluster["dir"], "ray-worker-1", timeout=300)
        node_back_s = time.monotonic() - t0
        took, high = watch_recovery(cluster, name, 0, lambda: proc.poll() is None)
        took += node_back_s
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    records = history(cluster, name)
    assert_contiguous(records)
    assert records[-1]["step"] == STEPS and records[-1]["restarts"] >= 1
    resumed = resumed_steps(records)
    assert resumed and all(r % CHECKPOINT_EVERY == 0 for r in resumed) and resumed[-1] <= max(high, at), resumed
    report(
        "raylet of a worker node SIGKILLed, node restarted",
        killed_after_step=max(high, at),
        resumed_at=resumed[-1],
        steps_lost=max(high, at) - resumed[-1],
        node_back_s=f"{node_back_s:.0f}",
        recover_s=f"{took:.0f}",
        attempts=len(resumed),
    )
