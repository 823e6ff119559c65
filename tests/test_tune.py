"""Sweeps: search-space checks (fast), and a real Ray Tune sweep that ASHA prunes, that is
interrupted and resumed, and that leaves its table, CSV, plots and TensorBoard files."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from dmlray.config import ConfigError, config_to_dict, load_config
from dmlray.sweeps.search_space import apply_sample, load_space, parse_space

BASE = config_to_dict(load_config("demo"))


# ----------------------------------------------------------------------------- the space


def test_a_space_file_parses_to_typed_distributions(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "loss:\n  params:\n    beta: {choice: [20, 40, 50]}\n"  # nested keys work too
        "memory.size: {randint: [0, 4096]}\n"
        "memory.weight: {uniform: [0.5, 1]}\n"
    )
    params = {p.key: p for p in load_space(path, BASE)}
    assert set(params) == {"optim.lr", "loss.params.beta", "memory.size", "memory.weight"}
    assert params["optim.lr"].kind == "loguniform" and params["optim.lr"].args == (1e-4, 1e-2)
    assert params["loss.params.beta"].args == (20, 40, 50)
    assert params["memory.size"].examples() == [0, 4095]  # randint excludes high, as in Ray Tune


def test_the_shipped_demo_space_fits_the_demo_preset():
    keys = [p.key for p in load_space("demo_sweep_space", BASE)]
    assert keys == ["optim.lr", "loss.params.beta", "memory.size"]


@pytest.mark.parametrize(
    "space, named",
    [
        ({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}, "optim.lrr"),
        ({"optimizer.lr": {"uniform": [0.1, 0.2]}}, "optimizer.lr"),
        ({"loss.params.betta": {"choice": [20, 40]}}, "loss.params.betta"),
        ({"optim": {"choice": [1, 2]}}, "optim"),
        ({"optim.lr": {"loguniform": [1e-2, 1e-4]}}, "optim.lr"),
        ({"optim.lr": {"uniform": [0.01, 0.01]}}, "optim.lr"),
        ({"optim.lr": {"loguniform": [0, 1e-2]}}, "optim.lr"),
        ({"optim.lr": {"loguniform": [-1e-3, 1e-2]}}, "optim.lr"),
        ({"optim.lr": {"uniform": [0.0, 1e-2]}}, "optim.lr"),  # lr must be > 0
        ({"loss.params.beta": {"choice": []}}, "loss.params.beta"),
        ({"memory.size": {"uniform": [0, 4096]}}, "memory.size"),  # an int field, floats sampled
        ({"memory.size": {"randint": [0.5, 4096]}}, "memory.size"),
        ({"memory.size": {"randint": [-8, 16]}}, "memory.size"),
        ({"optim.name": {"choice": ["adam", "rmsprop"]}}, "optim.name"),
        ({"data.augment": {"choice": [1, 0]}}, "data.augment"),
        ({"optim.lr": {"normal": [0, 1]}}, "optim.lr"),
        ({"optim.lr": {"uniform": [1e-3]}}, "optim.lr"),
        ({"optim.lr": 0.001}, "optim.lr"),
    ],
)
def test_unknown_keys_and_impossible_ranges_are_refused_naming_the_key(space, named):
    with pytest.raises(ConfigError) as info:
        parse_space(space, BASE)
    assert named in str(info.value), str(info.value)


def test_a_space_that_is_not_a_mapping_and_a_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        parse_space(["optim.lr"], BASE)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml", BASE)


def test_memory_needs_a_loss_that_pairs_against_references():
    base = config_to_dict(load_config("demo", ["loss.name=proxy_anchor", "memory.size=0"]))
    with pytest.raises(ConfigError, match="memory.size"):
        parse_space({"memory.size": {"choice": [0, 1024]}}, base)


def test_a_sample_is_applied_typed_even_where_yaml_would_read_a_string():
    from dmlray.config import config_from_dict

    cfg = config_from_dict(apply_sample(BASE, {"optim.lr": 1e-05, "loss.params.beta": 20, "memory.size": 512}))
    assert cfg.optim.lr == 1e-05 and cfg.loss.params["beta"] == 20 and cfg.memory.size == 512
    assert BASE["optim"]["lr"] == 0.001  # the base is not modified


# ----------------------------------------------------------------------------- the driver's pieces


def test_concurrency_is_derived_from_the_limiting_resource():
    from dmlray.sweeps.tune import derive_max_concurrent, trial_resources

    cfg = load_config("demo", ["run.num_workers=2", "run.cpus_per_worker=1"])
    assert trial_resources(cfg) == {"CPU": 3.0}  # the trial driver + 2 workers
    assert derive_max_concurrent(cfg, {"CPU": 8.0}, num_samples=10) == 2
    assert derive_max_concurrent(cfg, {"CPU": 9.0}, num_samples=10) == 3
    assert derive_max_concurrent(cfg, {"CPU": 9.0}, num_samples=2) == 2
    assert derive_max_concurrent(cfg, {"CPU": 2.0}, num_samples=4) == 1  # never 0
    gpu = load_config("demo", ["run.num_workers=2", "run.use_gpu=true"])
    assert derive_max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0}, num_samples=10) == 2  # GPUs limit


def test_optuna_samples_the_space_into_valid_configs():
    from dmlray.config import config_from_dict
    from dmlray.sweeps.search_space import to_tune
    from dmlray.sweeps.tune import make_search_alg

    params = load_space("demo_sweep_space", BASE)
    searcher = make_search_alg("optuna", seed=0, concurrent=2)
    assert searcher.set_search_properties("recall@1", "max", to_tune(params))
    for i in range(3):
        sample = searcher.suggest(f"t{i}")
        assert set(sample) == {"optim.lr", "loss.params.beta", "memory.size"}
        cfg = config_from_dict(apply_sample(BASE, sample))
        assert 3e-4 <= cfg.optim.lr <= 3e-3 and cfg.loss.params["beta"] in (20, 40, 50)
        assert cfg.memory.size in (0, 1024, 2048)


def test_trial_states_separate_early_stops_from_finished_runs():
    from dmlray.sweeps.tune import trial_state

    def trial(status, step, **config):
        return SimpleNamespace(status=status, last_result={"step": step}, config=config)

    assert trial_state(trial("TERMINATED", 100), 100) == "finished"
    assert trial_state(trial("TERMINATED", 50), 100) == "stopped_early"
    assert trial_state(trial("TERMINATED", 50, **{"train.steps": 50}), 100) == "finished"  # swept train.steps
    assert trial_state(trial("RUNNING", 50), 100, done=True) == "stopped_early"  # on_trial_complete
    assert trial_state(trial("RUNNING", 50), 100) == "running"
    assert trial_state(trial("PENDING", 0), 100) == "pending"
    assert trial_state(trial("PAUSED", 0), 100) == "pending"
    assert trial_state(trial("ERROR", 10), 100) == "error"


def test_the_tune_subcommand_parses_the_sweep_flags():
    from dmlray.cli import build_parser

    # argparse takes the positionals in one run: options first, then CONFIG and its overrides
    args = build_parser().parse_args(
        [
            "tune",
            "--space",
            "demo_sweep_space",
            "--metric",
            "map@r",
            "--name",
            "s1",
            "--metrics-port",
            "9500",
            "--metrics-port-auto",
            "--grace-period",
            "50",
            "--reduction-factor",
            "3",
            "demo",
            "train.steps=100",
        ]
    )
    assert (args.metric, args.name, args.metrics_port, args.metrics_port_auto) == ("map@r", "s1", 9500, True)
    assert (args.grace_period, args.reduction_factor, args.overrides) == (50, 3, ["train.steps=100"])


def test_a_bad_space_or_metric_fails_before_ray_starts(tmp_path, capsys):
    from dmlray.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert main(["tune", "--space", str(space), "demo", f"run.storage_path={tmp_path}"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert main(["tune", "--space", str(space), "--metric", "recall@3", "demo", f"run.storage_path={tmp_path}"]) == 2
    assert "recall@3" in capsys.readouterr().err
    assert not (tmp_path / "demo-sweep").exists()


# ----------------------------------------------------------------------------- a real sweep


def tensorboard_recall_curve(trial_dir: Path) -> list[tuple[int, float]]:
    """(training step, Recall@1) as TensorBoard shows a trial: read with TensorBoard's own
    reader, Tune's iteration axis mapped to the step logged beside it."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(trial_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"ray/tune/recall_1", "ray/tune/step"} <= tags, (trial_dir.name, sorted(tags))
    step_at = {e.step: int(e.value) for e in events.Scalars("ray/tune/step")}
    return [(step_at[e.step], e.value) for e in events.Scalars("ray/tune/recall_1")]


class Interrupter(threading.Thread):
    """Presses Ctrl-C (SIGUSR1, Tune's graceful stop) once the sweep's metrics show a trial done.

    It reads the driver's endpoint from the file_sd entry the sweep writes, as Prometheus would.
    """

    def __init__(self, sd_file: Path):
        super().__init__(daemon=True)
        self.sd_file, self.stop = sd_file, threading.Event()
        self.fired_at: dict[str, float] | None = None
        self.states_seen: set[str] = set()

    def run(self):
        while not self.stop.wait(0.5):
            try:
                target = json.loads(self.sd_file.read_text())[0]["targets"][0]
                text = urllib.request.urlopen(f"http://{target}/metrics", timeout=2).read().decode()
            except (OSError, ValueError, IndexError, KeyError):
                continue
            states = {
                m[0]: float(m[1]) for m in re.findall(r'dmlray_sweep_trials\{[^}]*state="(\w+)"[^}]*\} (\S+)', text)
            }
            self.states_seen |= {s for s, v in states.items() if v > 0}
            if states.get("finished", 0) + states.get("stopped_early", 0) >= 1:
                self.fired_at = states
                os.kill(os.getpid(), signal.SIGUSR1)
                return


@pytest.mark.slow
def test_a_sweep_prunes_bad_trials_survives_an_interruption_and_reports(glyphs_small, tmp_path, capsys):
    import ray

    from dmlray.cli import main
    from dmlray.jobs.launch import ensure_ray
    from dmlray.sweeps.tune import SweepMetricsEndpoint, SweepSettings, run_sweep

    space = tmp_path / "space.yaml"
    # lr 1e-6 barely moves the random init: those trials are clearly worse at the first rung
    space.write_text("optim.lr: {choice: [1.0e-6, 1.0e-3]}\nloss.params.beta: {choice: [20, 40]}\n")
    overrides = [
        f"data.url={glyphs_small}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=t",
        "run.num_workers=1",
        "data.classes_per_batch=8",
        "data.samples_per_class=4",
        "data.class_buffer=16",
        "train.steps=20",
        "train.eval_every=10",
        "train.log_every=5",
        "memory.size=0",
        "optim.milestones=[]",
        "eval.baseline=false",
        "eval.ks=[1,2]",
    ]
    sweep = tmp_path / "runs" / "t-sweep"
    t0 = time.monotonic()
    ensure_ray(num_cpus=4)  # 2 trials at once: each holds 1 CPU for its driver + 1 for its worker
    interrupter = Interrupter(sweep / "prometheus_sd.json")
    interrupter.start()
    try:
        # seed 3 samples lr = 1e-3, 1e-6, 1e-6, 1e-3: a good trial reaches the rung first
        first = run_sweep(
            "demo",
            str(space),
            SweepSettings(num_samples=4, scheduler="asha", seed=3, grace_period=10, reduction_factor=2),
            overrides,
            metrics=SweepMetricsEndpoint(port=0),
        )
        interrupter.stop.set()
        assert interrupter.fired_at is not None, "the sweep ended before any trial was done"
        assert not first.complete and not first.restored
        done_first = {
            r.run: (sweep / "runs" / r.run / "metrics.jsonl").stat().st_mtime
            for r in first.rows
            if r.state in ("finished", "stopped_early")
        }
        assert done_first, [(r.run, r.state) for r in first.rows]
        assert len(first.rows) < 4 or any(r.state in ("interrupted", "pending") for r in first.rows)
        assert "interrupted" in capsys.readouterr().out
        t1 = time.monotonic()

        # the same command again: restored, the finished trials are not run again
        assert (
            main(
                [
                    "tune",
                    "--space",
                    str(space),
                    "--num-samples",
                    "4",
                    "--seed",
                    "3",
                    "--grace-period",
                    "10",
                    "demo",
                    *overrides,
                ]
            )
            == 0
        )
        t2 = time.monotonic()
    finally:
        interrupter.stop.set()
        ray.shutdown()
    out = capsys.readouterr().out
    assert "Sweep t-sweep: 4 trials" in out and "best by final recall@1" in out

    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    states = [r["state"] for r in rows]
    assert set(states) <= {"finished", "stopped_early"}, states
    assert "stopped_early" in states and "finished" in states, states
    for r in rows:  # ASHA stops at the rung (step 10), finished trials ran all 20 steps
        assert int(r["step"]) == (20 if r["state"] == "finished" else 10), r
    best = rows[0]
    assert float(best["recall@1"]) == max(float(r["recall@1"]) for r in rows)
    assert float(best["optim.lr"]) == 1e-3
    assert all(float(r["optim.lr"]) == 1e-6 for r in rows if r["state"] == "stopped_early")
    # finished trials of the first run were not run again
    for run, mtime in done_first.items():
        assert (sweep / "runs" / run / "metrics.jsonl").stat().st_mtime == mtime, run
    for name in ("sweep_curves.png", "sweep_params.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (sweep / name).stat().st_size > 5000
    # `tensorboard --logdir SWEEP` (the summary's suggestion) shows every trial's Recall@1 curve:
    # one series per trial, a point at each evaluation the trial's run logged, with its value
    for r in rows:
        assert list((sweep / f"trial_{r['trial']}").glob("events.out.tfevents.*")), f"no TensorBoard file: {r}"
        history = [json.loads(line) for line in (sweep / "runs" / f"trial_{r['trial']}" / "metrics.jsonl").open()]
        logged = [(h["step"], h["recall@1"]) for h in history if "recall@1" in h]
        assert [s for s, _ in logged] == [10, 20] if r["state"] == "finished" else [10], (r, logged)
        curve = tensorboard_recall_curve(sweep / f"trial_{r['trial']}")
        # the values are the run's evaluations in order; TensorBoard's x axis is Tune's counter, which
        # for a trial resumed after the interruption need not be the run's step (seen: [20, 20])
        assert [v for _, v in curve] == pytest.approx([v for _, v in logged], abs=1e-6), (r["trial"], curve, logged)
        assert [s for s, _ in curve] == sorted(s for s, _ in curve), (r["trial"], curve)
    # each trial is a run folder named after the trial, with the sampled values in its config
    cfg = (sweep / "runs" / f"trial_{best['trial']}" / "config.yaml").read_text()
    assert f"name: trial_{best['trial']}" in cfg and "lr: 0.001" in cfg
    print(f"sweep test: interrupted run {t1 - t0:.0f}s, resumed run {t2 - t1:.0f}s; states {states}")
