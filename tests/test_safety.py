"""Nothing executes on load, and bad input fails fast naming itself: planted pickles in
checkpoints and in the ASHA state are refused, eval picks the latest complete checkpoint,
run names stay inside storage_path, one live run per name (a lease lock, on disk and on a
real SeaweedFS), and a run that cannot start writes nothing."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dmlray.config import ConfigError, config_to_dict, load_config
from dmlray.data import storage
from dmlray.jobs.run_folder import LOCK_FILE, RunLock, RunLockedError, clear_run_folder, is_strictly_inside
from dmlray.training import checkpoints
from dmlray.training.checkpoints import CheckpointError, latest_checkpoint, load_state, state_bytes
from dmlray.training.trainer import rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]


class Planted:
    """A pickle payload: unpickling it writes a marker file (what an attacker's code would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def planted_bytes(marker: Path) -> bytes:
    """A torch.save file whose state holds the payload beside a real-looking model."""
    return state_bytes({"model": {"w": torch.zeros(2)}, "step": 5, "payload": Planted(marker)})


def assert_payload_is_live(data: bytes, marker: Path) -> None:
    """Control: the planted file really runs code when loaded the old way (the test can fail)."""
    import io

    assert not marker.exists()
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()


# ----------------------------------------------------------------------------- checkpoint format


def test_rng_states_survive_a_weights_only_load_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    saved = load_state(state_bytes({"model": {}, "step": 0, "rng": rng_state()}), "mem")["rng"]
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert again == expected


def test_a_trainer_resumed_from_a_weights_only_checkpoint_matches_the_straight_run():
    """6 steps straight vs 3 steps, checkpoint bytes, a new Trainer loaded from them, 3 more:
    the batches draw from the global RNGs, so an inexact RNG restore would change the result."""
    from dmlray import losses
    from dmlray.models import EmbeddingModel
    from dmlray.models.glyph_cnn import GlyphCNN
    from dmlray.training.trainer import Trainer

    def trainer(saved: list) -> Trainer:
        torch.manual_seed(0)
        model = EmbeddingModel(GlyphCNN(in_channels=1, width=4, norm="batch"), embedding_dim=8)

        def batches(start):
            while True:  # global RNGs, as augmentation would use them
                noise = float(np.random.rand()) + random.random()
                yield torch.randn(16, 1, 8, 8) + noise, torch.arange(4).repeat_interleave(4)

        def report(record, history, state):
            if state is not None:
                saved.append(state_bytes(state))

        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        return Trainer(
            model=model,
            loss_fn=losses.build("multi_similarity"),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.MultiStepLR(optimizer, [4]),
            batches=batches,
            steps=6,
            device=torch.device("cpu"),
            log_every=1,
            eval_every=100,
            checkpoint_every=3,
            report=report,
        )

    random.seed(0), np.random.seed(0)
    straight_saved: list = []
    straight = trainer(straight_saved)
    straight.train()
    resumed = trainer([])
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # the restore must undo this
    resumed.load_state_dict(load_state(straight_saved[0], "step-3 checkpoint"))
    assert resumed.step == 3
    resumed.train()
    for a, b in zip(straight.raw_model.state_dict().values(), resumed.raw_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eval_refuses_a_planted_checkpoint_naming_it_and_runs_nothing(tmp_path, capsys):
    from dmlray.cli import main

    run = tmp_path / "victim"
    cfg = config_to_dict(load_config("demo", [f"data.url={tmp_path / 'data'}"]))
    storage.write_bytes(str(run / "config.yaml"), json.dumps(cfg).encode())  # YAML is a superset of JSON
    marker = tmp_path / "marker"
    data = planted_bytes(marker)
    state = run / "checkpoint_2026-12-01_10-00-00.000000" / "state.pt"
    storage.write_bytes(str(state), data)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(state) in err and "refused" in err, err
    assert not marker.exists()
    assert main(["eval", str(state.parent)]) == 2  # the checkpoint folder itself: the same
    assert str(state) in capsys.readouterr().err and not marker.exists()
    assert_payload_is_live(data, marker)


def test_a_cut_off_or_foreign_state_file_is_an_error_naming_it():
    whole = state_bytes({"model": {"w": torch.zeros(8)}, "step": 1})
    with pytest.raises(CheckpointError, match="s3://b/run/checkpoint_x/state.pt: not a readable checkpoint"):
        load_state(whole[: len(whole) // 2], "s3://b/run/checkpoint_x/state.pt")
    with pytest.raises(CheckpointError, match="f.pt: not a dmlray checkpoint"):
        load_state(state_bytes({"weights": torch.zeros(1)}), "f.pt")


def real_state(step: int) -> bytes:
    return state_bytes({"model": {"w": torch.full((64,), float(step))}, "step": step})


def write_checkpoint(run: Path, name: str, data: bytes, mtime: float) -> None:
    path = run / name / "state.pt"
    storage.write_bytes(str(path), data)
    os.utime(path, (mtime, mtime))


def test_latest_complete_checkpoint_in_write_order_not_name_order(tmp_path):
    run = tmp_path / "run"
    now = time.time()
    write_checkpoint(run, "checkpoint_local", real_state(10), now - 300)  # sorts after dated names
    write_checkpoint(run, "checkpoint_2026-12-02_08-00-00.000000", real_state(20), now - 200)
    half = real_state(30)
    write_checkpoint(run, "checkpoint_2026-12-02_09-00-00.000000", half[: len(half) // 2], now - 100)  # cut off
    assert latest_checkpoint(str(run)) == str(run / "checkpoint_2026-12-02_08-00-00.000000")
    from dmlray.jobs.commands import find_checkpoint

    assert find_checkpoint(str(run)) == (str(run / "checkpoint_2026-12-02_08-00-00.000000"), str(run))
    # a later local-mode run of the same name wins by time
    os.utime(run / "checkpoint_local" / "state.pt", (now, now))
    assert latest_checkpoint(str(run)) == str(run / "checkpoint_local")


def test_rays_snapshot_decides_which_checkpoints_are_registered(tmp_path):
    run = tmp_path / "run"
    now = time.time()
    a, b, c = (f"checkpoint_2026-12-02_08-00-0{i}.000000" for i in range(3))
    for i, name in enumerate((a, b, c)):
        write_checkpoint(run, name, real_state(i), now - 100 + i)
    # the shape Ray 2.60's checkpoint manager writes (only the fields read here)
    result = lambda name: {"version": 0, "checkpoint_dir_name": name, "metrics": {}}  # noqa: E731
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": [result(a), result(b)],
        "checkpoint_report_indices": [1, 2],
        "latest_checkpoint_result": result(b),
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 3,
    }
    (run / checkpoints.SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    assert latest_checkpoint(str(run)) == str(run / b)  # c is complete but not registered: Ray resumes from b
    (run / b / "state.pt").write_bytes(real_state(1)[:100])  # b cut off: the one before
    assert latest_checkpoint(str(run)) == str(run / a)


# ----------------------------------------------------------------------------- ASHA state


def asha(url: str):
    from dmlray.sweeps.tune import ResumableASHA

    return ResumableASHA(
        url, time_attr="step", max_t=40, grace_period=10, reduction_factor=2, metric="recall@1", mode="max"
    )


def test_asha_state_is_json_and_a_resumed_scheduler_decides_the_same(tmp_path):
    url = str(tmp_path / "asha_state.json")
    first = asha(url)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
    for i, trial in enumerate(trials[:3]):
        first.on_trial_add(None, trial)
        first.on_trial_result(None, trial, {"step": 10, "recall@1": 0.1 * (i + 1)})
    state = json.loads(Path(url).read_text())
    assert state["brackets"][0][-1] == [10, {"t0": 0.1, "t1": 0.2, "t2": pytest.approx(0.3)}]
    second = asha(url)
    second.on_trial_add(None, trials[3])
    assert second.state()["brackets"] == first.state()["brackets"]
    # a weak fourth trial is stopped by the resumed rungs (an empty rung would let it go on)
    assert second.on_trial_result(None, trials[3], {"step": 10, "recall@1": 0.05}) == "STOP"
    fresh = asha(str(tmp_path / "none.json"))
    fresh.on_trial_add(None, trials[3])
    assert fresh.on_trial_result(None, trials[3], {"step": 10, "recall@1": 0.05}) == "CONTINUE"


def test_a_planted_asha_state_is_an_error_naming_it_and_runs_nothing(tmp_path):
    from dmlray.sweeps.tune import ASHA_STATE

    marker = tmp_path / "marker"
    url = tmp_path / ASHA_STATE
    url.write_bytes(pickle.dumps(Planted(marker)))
    scheduler = asha(str(url))
    with pytest.raises(ValueError, match=str(url)):
        scheduler.on_trial_add(None, SimpleNamespace(trial_id="t0"))
    assert not marker.exists()
    pickle.loads(url.read_bytes())  # control: the payload is live
    assert marker.exists()


def test_a_sweep_refuses_a_planted_asha_state_before_ray_starts(tmp_path, monkeypatch):
    from dmlray.sweeps import tune

    monkeypatch.setattr(tune, "ensure_ray", lambda **kw: pytest.fail("Ray started despite the planted state"))
    sweep = tmp_path / "demo-sweep"
    sweep.mkdir()
    (sweep / tune.ASHA_STATE).write_bytes(pickle.dumps(Planted(tmp_path / "marker")))
    with pytest.raises(ValueError, match=tune.ASHA_STATE):
        tune.run_sweep("demo", "demo_sweep_space", tune.SweepSettings(num_samples=2), [f"run.storage_path={tmp_path}"])
    assert not (tmp_path / "marker").exists()


# ----------------------------------------------------------------------------- names and fresh


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../up", "a b", "x\\y", "ok\n"])
def test_run_names_are_folder_names(name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config("demo", [f"run.name={json.dumps(name)}"])


def test_good_run_names_pass():
    assert load_config("demo", ["run.name=v1.2_try-3"]).run.name == "v1.2_try-3"


def test_fresh_deletes_only_strictly_inside_storage_path(tmp_path):
    root = tmp_path / "runs"
    (root / "r" / "sub").mkdir(parents=True)
    (root / "r" / "sub" / "f").write_text("x")
    (root / "r" / "g").write_text("x")
    (root / "r" / LOCK_FILE).write_text("{}")
    (tmp_path / "precious").write_text("keep")
    assert is_strictly_inside(str(root / "r"), str(root))
    for outside in (root, root / "..", root / "r" / ".." / "..", tmp_path):
        assert not is_strictly_inside(str(outside), str(root)), outside
        with pytest.raises(ValueError, match="refusing to delete"):
            clear_run_folder(str(outside), str(root))
    assert not is_strictly_inside("s3://b/runs/../x", "s3://b/runs")
    assert not is_strictly_inside("s3://b/runs", "s3://b/runs")
    assert not is_strictly_inside("s3://other/runs/x", "s3://b/runs")
    assert is_strictly_inside("s3://b/runs/x", "s3://b/runs/")
    clear_run_folder(str(root / "r"), str(root))
    assert sorted(os.listdir(root / "r")) == [LOCK_FILE]  # the caller's lock stays
    assert (tmp_path / "precious").read_text() == "keep"


def test_launch_revalidates_a_name_changed_after_loading(tmp_path):
    from dmlray.jobs.launch import launch

    (tmp_path / "precious").write_text("keep")
    cfg = load_config("demo", [f"run.storage_path={tmp_path / 'runs'}", "run.fresh=true", "run.num_workers=0"])
    cfg.run.name = ".."
    with pytest.raises(ConfigError, match="run.name"):
        launch(cfg)
    assert (tmp_path / "precious").read_text() == "keep"


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "override, named",
    [
        ("run.cpus_per_worker=0", "run.cpus_per_worker"),
        ("run.cpus_per_worker=-1", "run.cpus_per_worker"),
        ("run.cpus_per_worker=.nan", "run.cpus_per_worker"),
        ("run.threads_per_worker=0", "run.threads_per_worker"),
        ("data.eval_batch_size=0", "data.eval_batch_size"),
        ("run.metrics_port=65536", "run.metrics_port"),
        ("run.metrics_port=-1", "run.metrics_port"),
        ("optim.gamma=0", "optim.gamma"),
        ("optim.gamma=.inf", "optim.gamma"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.head_lr=-0.1", "optim.head_lr"),
        ("optim.head_lr=.inf", "optim.head_lr"),
        ("optim.loss_lr=.nan", "optim.loss_lr"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay"),
        ("memory.weight=-1", "memory.weight"),
        ("memory.weight=.inf", "memory.weight"),
        ("optim.milestones=[600, 300]", "optim.milestones"),
        ("optim.milestones=[0]", "optim.milestones"),
        ("optim.milestones=[5, 5]", "optim.milestones"),
        ("model.hidden_dim=-1", "model.hidden_dim"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert named in str(info.value), str(info.value)


def test_edge_values_that_are_fine_pass():
    cfg = load_config(
        "demo",
        [
            "run.metrics_port=65535",
            "optim.head_lr=0",
            "memory.weight=0",
            "run.cpus_per_worker=0.5",
            "optim.milestones=[100, 200]",
        ],
    )
    assert cfg.run.metrics_port == 65535 and cfg.run.cpus_per_worker == 0.5


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_tune_metrics_port_is_checked_before_anything_runs(tmp_path, port):
    from dmlray.cli import main

    assert (
        main(
            ["tune", "demo", "--space", "demo_sweep_space", "--metrics-port", str(port), f"run.storage_path={tmp_path}"]
        )
        == 2
    )
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- search spaces


def test_a_space_whose_keys_are_valid_alone_but_not_together_is_refused_naming_the_combination(tmp_path):
    from dmlray.sweeps.search_space import parse_space

    base = config_to_dict(load_config("demo"))  # classes_per_batch 16, class_buffer 96
    space = {"data.classes_per_batch": {"choice": [2, 64]}, "data.class_buffer": {"choice": [32, 128]}}
    for key, spec in space.items():
        parse_space({key: spec}, base)  # each key alone is fine with the base config
    with pytest.raises(ConfigError) as info:
        parse_space(space, base)
    message = str(info.value)
    assert "data.classes_per_batch=64" in message and "data.class_buffer=32" in message, message
    parse_space({"data.classes_per_batch": {"choice": [2, 32]}, "data.class_buffer": {"choice": [32, 128]}}, base)


def test_a_sweep_with_an_impossible_combination_fails_at_start(tmp_path, monkeypatch):
    from dmlray.sweeps import tune

    monkeypatch.setattr(tune, "ensure_ray", lambda **kw: pytest.fail("Ray started"))
    space = tmp_path / "space.yaml"
    space.write_text("data.classes_per_batch: {randint: [2, 65]}\ndata.class_buffer: {randint: [32, 129]}\n")
    with pytest.raises(ConfigError, match="combination"):
        tune.run_sweep("demo", str(space), tune.SweepSettings(num_samples=2), [f"run.storage_path={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_huge_spaces_are_checked_on_corners_and_a_seeded_sample():
    from dmlray.sweeps.search_space import MAX_COMBINATIONS, Param, combinations

    params = [Param(f"k{i}", "choice", tuple(range(5))) for i in range(8)]  # 5^8 = 390625 combinations
    combos, exhaustive = combinations(params)
    assert not exhaustive and len(combos) == MAX_COMBINATIONS
    assert tuple([0] * 8) in combos and tuple([4] * 8) in combos
    assert combinations(params) == (combos, False)  # seeded: the same every time
    small, exhaustive = combinations(params[:3])
    assert exhaustive and len(small) == 125


# ----------------------------------------------------------------------------- the lock


@pytest.fixture(params=["local", "s3"])
def lock_root(request, tmp_path):
    """A folder for run folders: on disk, and on a real SeaweedFS (conditional puts)."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_env")
    return f"s3://dmlray-test/locks-{time.monotonic_ns()}"


def test_a_second_holder_is_refused_naming_the_first_until_it_releases(lock_root):
    folder = storage.join(lock_root, "run")
    first = RunLock(folder, lease_s=30).acquire()
    with pytest.raises(RunLockedError) as info:
        RunLock(folder, lease_s=30).acquire()
    message = str(info.value)
    assert first.holder in message and f"pid {os.getpid()}" in message and "host " in message, message
    first.release()
    assert not storage.exists(storage.join(folder, LOCK_FILE))
    second = RunLock(folder, lease_s=30).acquire()
    second.release()


def test_a_live_lock_is_renewed_and_an_expired_one_is_taken_over(lock_root):
    folder = storage.join(lock_root, "run")
    lease = 3.0
    live = RunLock(folder, lease_s=lease).acquire()
    deadline = time.monotonic() + 2 * lease  # past the first lease: only renewal keeps it
    while time.monotonic() < deadline:
        with pytest.raises(RunLockedError):
            RunLock(folder, lease_s=lease).acquire()
        time.sleep(0.5)
    # the holder dies without releasing (its renewal thread stops with it)
    live._stop.set()
    live._thread.join(timeout=10)
    time.sleep(lease + 0.5)
    successor = RunLock(folder, lease_s=30).acquire()
    record = json.loads(storage.read_bytes(storage.join(folder, LOCK_FILE)))
    assert record["holder"] == successor.holder
    successor.release()


def test_a_killed_process_lock_expires_for_its_successor(tmp_path):
    folder = str(tmp_path / "run")
    script = (
        "import sys, time; from dmlray.jobs.run_folder import RunLock; RunLock(sys.argv[1], lease_s=2).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, folder], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            RunLock(folder).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:  # the lease (2 s) runs out
            try:
                RunLock(folder).acquire().release()
                break
            except RunLockedError:
                assert time.monotonic() < deadline, "a dead holder's lease never expired"
                time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ----------------------------------------------------------------------------- launch checks first


def test_a_run_on_a_missing_dataset_leaves_no_run_folder(tmp_path):
    from dmlray.jobs.launch import launch

    cfg = load_config(
        "demo",
        [
            f"data.url={tmp_path / 'no-such-dataset'}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=nothing",
            "run.num_workers=2",
        ],
    )
    with pytest.raises(storage.StorageError, match="no-such-dataset"):
        launch(cfg)
    assert not (tmp_path / "runs").exists()


def test_launch_refuses_a_live_run_of_the_same_name_and_fresh_deletes_nothing(glyphs_small, tmp_path):
    from dmlray.jobs.launch import launch

    run = tmp_path / "runs" / "busy"
    (run / "checkpoint_local").mkdir(parents=True)
    (run / "checkpoint_local" / "state.pt").write_bytes(real_state(3))
    holder = RunLock(str(run), lease_s=30).acquire()
    try:
        cfg = load_config(
            "demo",
            [
                f"data.url={glyphs_small}",
                f"run.storage_path={tmp_path / 'runs'}",
                "run.name=busy",
                "run.num_workers=0",
                "run.fresh=true",
            ],
        )
        with pytest.raises(RunLockedError, match=holder.holder):
            launch(cfg)
    finally:
        holder.release()
    assert (run / "checkpoint_local" / "state.pt").read_bytes() == real_state(3)
    assert not (run / "config.yaml").exists()


def test_a_second_sweep_of_the_same_name_fails_before_ray_starts(tmp_path, monkeypatch):
    from dmlray.sweeps import tune

    monkeypatch.setattr(tune, "ensure_ray", lambda **kw: pytest.fail("Ray started"))
    live = RunLock(str(tmp_path / "demo-sweep"), lease_s=30, what="sweep").acquire()
    try:
        with pytest.raises(RunLockedError, match=f"sweep is live: sweep holder {live.holder}"):
            tune.run_sweep(
                "demo", "demo_sweep_space", tune.SweepSettings(num_samples=2), [f"run.storage_path={tmp_path}"]
            )
    finally:
        live.release()
    assert sorted(os.listdir(tmp_path / "demo-sweep")) == []  # nothing written: not even sweep.yaml


# the report of a local head's monitor as Ray 2.60 publishes it (read-only provider)
NODE_ID = "facc4392aba2b88ced3639d10595815cad546efa578469f675584d2a"
READONLY_REPORT = {
    "active_nodes": {f"node_{NODE_ID}": 1},
    "idle_nodes": None,
    "pending_nodes": [],
    "pending_launches": {},
    "failed_nodes": [],
    "node_type_mapping": {NODE_ID: f"node_{NODE_ID}"},
    "legacy": True,
}


def test_a_read_only_autoscaler_report_cannot_grow_and_a_kuberay_one_can():
    from dmlray.jobs.launch import report_can_grow

    assert not report_can_grow(None) and not report_can_grow({})
    assert not report_can_grow(READONLY_REPORT)
    kuberay = {
        "active_nodes": {"headgroup": 1, "workergroup": 2},
        "pending_nodes": [],
        "pending_launches": {},
        "node_type_mapping": {"10.0.0.4": "headgroup", "10.0.0.5": "workergroup", "10.0.0.6": "workergroup"},
    }
    assert report_can_grow(kuberay)
    # a launch in flight means a real provider even before any node of that type is up
    assert report_can_grow({**READONLY_REPORT, "pending_launches": {"workergroup": 1}})
    # an older report without the mapping: read-only names are recognised by their prefix
    assert not report_can_grow({"active_nodes": {"node_ab12": 1}})
    assert report_can_grow({"active_nodes": {"ray.head.default": 1}})
