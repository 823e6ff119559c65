"""Hyper-parameter sweeps with Ray Tune: every trial is a whole distributed training run.

``run_sweep`` checks the search space against the config schema, then runs a Tune
function trainable per sample. The trial driver applies its sampled values to the base
config, names the run after the trial (stable across restarts) and fits the TorchTrainer
of ``launch.build_trainer`` with a ``TuneReportCallback``: each evaluation reaches Tune,
so ASHA stops bad trials early.

The sweep folder ``storage_path/name`` (local or s3://) holds Tune's experiment (one
folder per trial with TensorBoard event files), the trials' run folders under ``runs/``,
and at the end ``sweep.csv``, ``sweep_curves.png`` and ``sweep_params.png``. Running the
same command again resumes an interrupted sweep (``Tuner.restore``) without re-running
finished trials. Optionally the driver serves sweep-level metrics for Prometheus and
writes a ``prometheus.yml`` that scrapes it and Ray's nodes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from dmlray.config import Config, ConfigError, check_name, check_port, config_from_dict, config_to_dict, load_config
from dmlray.data import storage
from dmlray.jobs.launch import build_trainer, ensure_ray, resolve_storage_path, storage_arguments
from dmlray.jobs.run_folder import RunFolder, RunLock, is_number, numeric_metrics
from dmlray.sweeps.search_space import Param, apply_sample, load_space, set_key, to_tune

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
"""Sub-folder of the sweep holding each trial's training run (Tune owns the trial folders)."""
SETTINGS_FILE = "sweep.yaml"
ASHA_STATE = "asha_state.json"
ASHA_STATE_VERSION = 1
LEGACY_ASHA_STATE = "asha_state.pkl"
"""Written by older versions as a pickle: never loaded (it could run code); a resumed sweep warns."""
METRICS_LINGER_S = 30.0
"""At the end, wait this long at most for a last scrape of the sweep metrics."""


@dataclass
class SweepSettings:
    """What defines a sweep; saved as sweep.yaml so a resumed sweep reports the same way."""

    name: str = ""
    """The sweep folder's name under run.storage_path; "" for ``<run.name>-sweep``."""
    metric: str = "recall@1"
    """The metric trials are ranked and stopped by (e.g. recall@1, val/map@r)."""
    mode: str = "max"
    """max or min: whether a larger metric is better."""
    num_samples: int = 4
    """Trials sampled from the space."""
    scheduler: str = "asha"
    """asha (stop poor trials at rungs) or none."""
    search: str = "random"
    """random or optuna (TPE)."""
    grace_period: int = 0
    """ASHA: steps before a trial can be stopped (0 = the first evaluation)."""
    reduction_factor: int = 2
    """ASHA: the fraction 1/reduction_factor of trials continues at each rung."""
    max_concurrent: int = 0
    """Trials at once; 0 for as many as the cluster's resources fit."""
    seed: int | None = None
    """Seed of the search; None for the base config's train.seed."""
    space: dict = field(default_factory=dict)
    """The resolved search space ({key: {kind: args}})."""
    base: dict = field(default_factory=dict)
    """The resolved base config."""


@dataclass
class TrialRow:
    """One trial in the sweep's table and CSV."""

    trial: str
    run: str
    state: str
    step: int | None
    last: float | None
    best: float | None
    params: dict[str, Any]
    metrics: dict[str, float]
    history: list[tuple[int, float]]
    """(step, metric) at each evaluation, from the run folder's metrics.jsonl."""


@dataclass
class SweepResult:
    """What ``run_sweep`` returns."""

    url: str
    complete: bool
    """False when the sweep was interrupted (run it again to resume)."""
    restored: bool
    rows: list[TrialRow]
    files: dict[str, str]
    metrics_port: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.state] = out.get(row.state, 0) + 1
        return out


# --------------------------------------------------------------------------- trial driver


def trial_name(trial) -> str:
    """Tune's trial name and folder: ``trial_<id>`` (stable when the sweep is restored)."""
    return f"trial_{trial.trial_id}"


def sweep_trial(config: dict, base: dict, runs_url: str) -> None:
    """The Tune function trainable: one whole training run with the sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    trial_id, name = context.get_trial_id(), context.get_trial_name()
    data = apply_sample(base, config)
    data = set_key(set_key(data, "run.name", name), "run.storage_path", runs_url)
    cfg = config_from_dict(data)  # checked again: the same rules as a config file
    folder = RunFolder(runs_url, name)
    history = folder.read_metrics()
    if history and (history[-1].get("step") or 0) >= cfg.train.steps and storage.exists(folder.file("result.json")):
        # the run ended just before the sweep was interrupted, unheard by Tune: tell it
        # the final evaluation instead of training again
        tune.report(numeric_metrics(history[-1]))
        return
    folder.write_config(config_to_dict(cfg))
    log.info("trial %s: %s", name, ", ".join(f"{k}={v}" for k, v in config.items()))
    # the run's name is the trial's: a restored trial resumes its run from its last checkpoint
    build_trainer(cfg, trial=trial_id, callbacks=[TuneReportCallback()]).fit()


# --------------------------------------------------------------------------- state of trials


def trial_state(trial, max_steps: int, done: bool = False, last_step: int | None = None) -> str:
    """pending, running, stopped_early, finished or error, from a Tune Trial.

    ``done`` marks a trial being stopped now (Tune calls ``on_trial_complete`` before it
    sets TERMINATED). A terminated trial that reached its last step (``train.steps``, or
    its swept value) finished; one stopped before by the scheduler stopped early. The
    step is Tune's last result's unless ``last_step`` (the run folder's) is given.
    """
    status = "TERMINATED" if done else trial.status
    if status == "ERROR":
        return "error"
    if status == "RUNNING":
        return "running"
    if status == "TERMINATED":
        step = last_step if last_step is not None else (trial.last_result or {}).get("step") or 0
        return "finished" if step >= trial.config.get("train.steps", max_steps) else "stopped_early"
    return "pending"  # PENDING, PAUSED


_LIVE_METRICS: dict = {}
"""The SweepMetrics of the sweeps this process runs, by sweep URL (see the callback)."""


class SweepMetricsCallback(Callback):
    """A Tune Callback that keeps the driver's SweepMetrics up to date.

    Tune pickles callbacks into the experiment state and brings them back on restore:
    it holds only the sweep's key and finds the live metrics of this process through it.
    """

    def __init__(self, key: str, num_samples: int, max_steps: int):
        self.key, self.num_samples, self.max_steps = key, num_samples, max_steps

    def _update(self, trials, stopping=None) -> None:
        metrics = _LIVE_METRICS.get(self.key)
        if metrics is None:
            return
        # samples the searcher has not created yet are pending too
        counts = {"pending": max(0, self.num_samples - len(trials))}
        for t in trials:
            state = trial_state(t, self.max_steps, done=t is stopping)
            counts[state] = counts.get(state, 0) + 1
        metrics.set_states(counts)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = _LIVE_METRICS.get(self.key)
        if metrics is not None and metrics.metric in result:
            metrics.observe(trial.trial_id, result[metrics.metric])
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trials, stopping=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trials)

    def on_experiment_end(self, trials, **info):
        self._update(trials)


def read_asha_state(url: str) -> dict | None:
    """The saved ASHA state at ``url`` (None when there is none). A file that is not this
    format's JSON is an error naming it: silently starting ASHA afresh would let every
    resumed trial run to the end, the failure ResumableASHA exists to prevent."""
    if not storage.exists(url):
        return None
    data = storage.read_bytes(url)
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or state.get("version") != ASHA_STATE_VERSION:
        raise ValueError(
            f"{url}: not a dmlray ASHA state (JSON, version {ASHA_STATE_VERSION}); it is not loaded. "
            "Delete it to resume the sweep without the scheduler's history"
        )
    return state


class ResumableASHA(ASHAScheduler):
    """An ASHAScheduler whose rungs survive ``Tuner.restore``.

    Tune saves trials and the searcher but never its scheduler: a restored sweep would
    start ASHA with empty rungs, and trials compared against nothing are never stopped.
    This one writes its state to the sweep folder as JSON after each decision (never a
    pickle: loading it runs no code) and reads it back before its first decision in a
    restored run.
    """

    def __init__(self, state_url: str, **kwargs):
        super().__init__(**kwargs)
        self._state_url = state_url
        self._loaded = False

    def state(self) -> dict:
        """What ASHA decides with: each bracket's rungs (milestone, trial id → reward), which
        bracket each live trial is in, and the counters; plain JSON."""
        index = {id(b): i for i, b in enumerate(self._brackets)}
        return {
            "version": ASHA_STATE_VERSION,
            "brackets": [[[milestone, dict(recorded)] for milestone, recorded in b._rungs] for b in self._brackets],
            "trial_bracket": {trial_id: index[id(b)] for trial_id, b in self._trial_info.items()},
            "counter": self._counter,
            "num_stopped": self._num_stopped,
        }

    def set_state(self, state: dict) -> None:
        """Restore ``state()``; a state made with other ASHA settings (other rungs) is refused."""
        rungs = [[float(m) for m, _ in b._rungs] for b in self._brackets]
        if [[float(m) for m, _ in b] for b in state["brackets"]] != rungs:
            raise ValueError(f"rungs {state['brackets']} do not match this scheduler's {rungs}")
        for bracket, saved in zip(self._brackets, state["brackets"], strict=True):
            bracket._rungs = [
                (milestone, {str(k): float(v) for k, v in recorded.items()})
                for (milestone, _), (_, recorded) in zip(bracket._rungs, saved, strict=True)
            ]
        self._trial_info = {str(t): self._brackets[int(i)] for t, i in state["trial_bracket"].items()}
        self._counter, self._num_stopped = int(state["counter"]), int(state["num_stopped"])

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        state = read_asha_state(self._state_url)
        if state is not None:
            try:
                self.set_state(state)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ValueError(
                    f"{self._state_url}: not this sweep's ASHA state ({exc}); delete it to resume "
                    "without the scheduler's history"
                ) from None
            log.info("ASHA resumed: %s", " | ".join(b.debug_str() for b in self._brackets))

    def _save(self) -> None:
        storage.write_bytes(self._state_url, json.dumps(self.state()).encode())

    def on_trial_add(self, tune_controller, trial):
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


# --------------------------------------------------------------------------- resources


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds: 1 CPU for its driver plus its Train workers' bundles."""
    need = {"CPU": 1.0 + cfg.run.num_workers * cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        need["GPU"] = float(cfg.run.num_workers)
    return need


def derive_max_concurrent(cfg: Config, resources: dict[str, float], num_samples: int) -> int:
    """Trials that fit at once on the cluster's resources (the limiting one decides)."""
    need = trial_resources(cfg)
    fits = min(int(resources.get(k, 0.0) // v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        log.warning(
            "one trial needs %s but the cluster has %s: running one at a time (it waits for an autoscaler, or forever)",
            need,
            resources,
        )
        fits = 1
    return max(1, min(fits, num_samples))


# --------------------------------------------------------------------------- the sweep


def _check_metric(metric: str, cfg: Config) -> None:
    if metric.startswith("recall@"):
        k = metric.split("@", 1)[1]
        if not k.isdigit() or int(k) not in cfg.eval.ks:
            raise ConfigError(f"--metric {metric!r}: evaluation reports recall@K for eval.ks={cfg.eval.ks}")


def _settings_url(url: str) -> str:
    return storage.join(url, SETTINGS_FILE)


def _load_settings(url: str) -> SweepSettings | None:
    if not storage.exists(_settings_url(url)):
        return None
    return SweepSettings(**yaml.safe_load(storage.read_bytes(_settings_url(url))))


@dataclass(frozen=True)
class SweepMetricsEndpoint:
    """Where the sweep driver serves its Prometheus metrics."""

    port: int = 0
    """TCP port; 0 asks the OS for any free port."""
    addr: str = "127.0.0.1"
    """Address to bind."""
    auto: bool = False
    """A port in use moves to the next free one upward instead of failing."""
    prometheus_dir: str | None = None
    """Where the file_sd entry and a prometheus.yml go (default: the sweep folder when it
    is local, ``./<name>-prometheus`` when it is on S3)."""


def check_settings(settings: SweepSettings) -> None:
    """A ConfigError naming the first setting out of range."""
    if settings.scheduler not in ("asha", "none"):
        raise ConfigError(f"scheduler must be asha or none, got {settings.scheduler!r}")
    if settings.search not in ("random", "optuna"):
        raise ConfigError(f"search must be random or optuna, got {settings.search!r}")
    if settings.mode not in ("max", "min"):
        raise ConfigError(f"mode must be max or min, got {settings.mode!r}")
    if settings.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {settings.num_samples}")
    if settings.reduction_factor < 2:
        raise ConfigError(f"reduction_factor must be >= 2, got {settings.reduction_factor}")


def resolve_settings(requested: SweepSettings, cfg: Config, params: list[Param]) -> SweepSettings:
    """The requested settings with their defaults taken from the base config, the space
    and the base config filled in: what sweep.yaml stores."""
    name = requested.name or f"{cfg.run.name}-sweep"
    check_name("--name (the sweep name)", name)
    return replace(
        requested,
        name=name,
        grace_period=requested.grace_period or cfg.train.eval_every,
        seed=cfg.train.seed if requested.seed is None else requested.seed,
        space={p.key: {p.kind: list(p.args)} for p in params},
        base=config_to_dict(cfg),
    )


# what a resumed sweep keeps from its first run (a new value is ignored with a warning)
_RESUMED_SETTINGS = (
    "metric",
    "mode",
    "num_samples",
    "scheduler",
    "search",
    "grace_period",
    "reduction_factor",
    "space",
    "base",
)


def stored_or_new(url: str, settings: SweepSettings) -> tuple[SweepSettings, bool]:
    """(settings, stored): an existing sweep's saved settings, or the new ones."""
    stored = _load_settings(url)
    if stored is None:
        return settings, False
    changed = [k for k in _RESUMED_SETTINGS if getattr(stored, k) != getattr(settings, k)]
    if changed:
        log.warning(
            "sweep %s exists: resuming it with its original settings (ignoring new %s)", url, ", ".join(changed)
        )
    return stored, True


def check_asha_state(url: str) -> None:
    """Fail on a planted or broken ASHA state, and warn about an old pickled one, before Ray starts."""
    read_asha_state(storage.join(url, ASHA_STATE))
    if storage.exists(storage.join(url, LEGACY_ASHA_STATE)):
        log.warning(
            "%s is a pickle from an older dmlray: not loaded (it could run code); ASHA resumes without its history",
            storage.join(url, LEGACY_ASHA_STATE),
        )


def start_metrics(url: str, settings: SweepSettings, endpoint: SweepMetricsEndpoint) -> tuple[Any, int]:
    """(the sweep's metrics, the port they are served on); a taken port fails here, before Ray starts."""
    from dmlray.telemetry.sweep_metrics import SweepMetrics

    metrics = SweepMetrics(settings.name, settings.metric, settings.mode)
    metrics.set_states({"pending": settings.num_samples})
    bound = metrics.serve(endpoint.port, endpoint.addr, auto=endpoint.auto)
    _LIVE_METRICS[url] = metrics
    return metrics, bound


def trials_at_once(base_cfg: Config, settings: SweepSettings, url: str) -> int:
    """How many trials run at once: ``max_concurrent``, or as many as the cluster fits."""
    import ray

    fits = derive_max_concurrent(base_cfg, ray.cluster_resources(), settings.num_samples)
    concurrent = settings.max_concurrent or fits
    if concurrent > fits:
        # each trial driver holds its CPU while its Train workers wait: too many deadlock
        log.warning(
            "--max-concurrent %d: only %d trials fit on the cluster now; the others' workers will wait",
            concurrent,
            fits,
        )
    log.info(
        "sweep %s: %d samples, up to %d at once, each holding %s",
        url,
        settings.num_samples,
        concurrent,
        trial_resources(base_cfg),
    )
    return concurrent


def tune_and_collect(settings: SweepSettings, url: str, root: str, concurrent: int) -> SweepResult:
    """Run (or resume) the Tune experiment, then read every trial's run folder."""
    tuner, restored = _tuner(settings, config_from_dict(settings.base), url, root, concurrent)
    t0 = time.monotonic()
    tuner.fit()
    log.info("sweep %s: tuning loop ended after %.0fs", url, time.monotonic() - t0)
    result = collect(url, root, settings, restored)
    result.files.update(write_reports(result, settings))
    return result


def run_sweep(
    config: str,
    space: str,
    settings: SweepSettings,
    overrides: Sequence[str] = (),
    *,
    metrics: SweepMetricsEndpoint | None = None,
    top: int = 10,
    num_cpus: int | None = None,
) -> SweepResult:
    """Sweep the base config (preset or YAML plus overrides) over a search-space file.

    The sweep lives in ``run.storage_path/<settings.name>`` (the name defaults to
    ``<run.name>-sweep``); if it exists there, it is resumed with its original settings.
    ``settings.max_concurrent=0`` derives the number of trials at once from the cluster's
    resources. With ``metrics`` the sweep serves its Prometheus metrics there and writes
    their file_sd entry and a prometheus.yml.
    """
    check_settings(settings)
    check_port("--metrics-port", None if metrics is None else metrics.port)
    cfg = load_config(config, list(overrides))
    if cfg.run.num_workers < 1:
        raise ConfigError("run.num_workers: a sweep trial trains with Ray Train workers; set it >= 1")
    _check_metric(settings.metric, cfg)
    params = load_space(space, config_to_dict(cfg))  # every problem in the space is reported before Ray starts
    settings = resolve_settings(settings, cfg, params)
    root = resolve_storage_path(cfg.run.storage_path)
    url = storage.join(root, settings.name)
    settings, stored = stored_or_new(url, settings)
    check_asha_state(url)
    served, bound = start_metrics(url, settings, metrics) if metrics is not None else (None, None)
    lock = None
    try:
        lock = RunLock(url, what="sweep").acquire()  # one live sweep per name; its trials run under it
        if not stored:
            storage.write_bytes(_settings_url(url), yaml.safe_dump(asdict(settings), sort_keys=False).encode())
        ensure_ray(num_cpus=num_cpus)
        concurrent = trials_at_once(config_from_dict(settings.base), settings, url)
        files: dict[str, str] = {}
        if metrics is not None and served is not None:
            prometheus_dir = metrics.prometheus_dir or _default_prometheus_dir(url, settings.name)
            files = write_prometheus_files(prometheus_dir, served.target)
        result = tune_and_collect(settings, url, root, concurrent)
    finally:
        if lock is not None:
            lock.release()
        if served is not None:
            # let Prometheus read the final states before the endpoint goes away
            served.close(wait_for_scrape=METRICS_LINGER_S)
            _LIVE_METRICS.pop(url, None)
    result.files.update(files)
    result.metrics_port = bound
    print_summary(result, settings, top)
    return result


def _tune_storage(url: str, root: str, name: str) -> tuple[str, str, Any]:
    """(storage_path, experiment path, filesystem) for Tune (S3 endpoints need a filesystem)."""
    args = storage_arguments(root)
    fs = args.get("storage_filesystem")
    path = args["storage_path"]
    return path, (f"{path.rstrip('/')}/{name}" if fs is not None else url), fs


def make_search_alg(search: str, seed: int, concurrent: int):
    """Random sampling of the space (Tune's generator) or Optuna's TPE, seeded."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)  # TuneConfig.max_concurrent_trials wraps it in a limiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a generator is not wrapped by TuneConfig.max_concurrent_trials: limit it here
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)


def _tuner(settings: SweepSettings, base_cfg: Config, url: str, root: str, concurrent: int):
    """A new Tuner, or the restored one when the sweep folder holds an experiment."""
    from ray import tune

    runs_url = storage.join(url, RUNS_DIR)
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, base=settings.base, runs_url=runs_url), {"cpu": 1}
    )
    storage_path, experiment, fs = _tune_storage(url, root, settings.name)
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming sweep %s (finished trials are kept, unfinished ones continue)", url)
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
        return tuner, True

    params = [Param(key, kind, tuple(args)) for key, spec in settings.space.items() for kind, args in spec.items()]
    scheduler = None
    if settings.scheduler == "asha":
        # time is the training step: rungs sit at grace_period × rf^k steps, below train.steps
        scheduler = ResumableASHA(
            storage.join(url, ASHA_STATE),
            time_attr="step",
            max_t=base_cfg.train.steps,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    tune_config = tune.TuneConfig(
        metric=settings.metric,
        mode=settings.mode,
        num_samples=settings.num_samples,
        scheduler=scheduler,
        search_alg=make_search_alg(settings.search, settings.seed or 0, concurrent),  # resolved: never None
        max_concurrent_trials=None if settings.search == "random" else concurrent,
        reuse_actors=False,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )
    run_config = tune.RunConfig(
        name=settings.name,
        storage_path=storage_path,
        storage_filesystem=fs,
        callbacks=[SweepMetricsCallback(url, settings.num_samples, base_cfg.train.steps)],
    )
    return tune.Tuner(trainable, param_space=to_tune(params), tune_config=tune_config, run_config=run_config), False


# --------------------------------------------------------------------------- results


def collect(url: str, root: str, settings: SweepSettings, restored: bool) -> SweepResult:
    """Every trial of the sweep, read back from its storage (Tune's state + run folders)."""
    from ray.tune import ExperimentAnalysis

    _, experiment, fs = _tune_storage(url, root, settings.name)
    analysis = ExperimentAnalysis(
        experiment, storage_filesystem=fs, default_metric=settings.metric, default_mode=settings.mode
    )
    runs_url = storage.join(url, RUNS_DIR)
    max_steps = settings.base["train"]["steps"]
    rows = []
    for trial in analysis.trials:
        run = trial_name(trial)
        records = RunFolder(runs_url, run).read_metrics()  # the run's own record: complete after restarts
        history = [
            (int(r["step"]), float(r[settings.metric]))
            for r in records
            if r.get(settings.metric) is not None and "step" in r
        ]
        last = trial.last_result or {}
        last_step = max((int(r["step"]) for r in records if "step" in r), default=None)
        state = trial_state(trial, max_steps, last_step=last_step)
        if state == "running":
            state = "interrupted"
        values = [v for _, v in history] or ([last[settings.metric]] if settings.metric in last else [])
        best = (max if settings.mode == "max" else min)(values) if values else None
        final = history[-1][1] if history else last.get(settings.metric)
        final_eval = next((r for r in reversed(records) if settings.metric in r), last)
        numbers = {
            k: float(v)
            for k, v in final_eval.items()
            if is_number(v) and ("@" in k or k in ("loss", "nmi", "r_precision"))
        }
        rows.append(
            TrialRow(
                trial=trial.trial_id,
                run=run,
                state=state,
                step=history[-1][0] if history else last.get("step"),
                last=final,
                best=best,
                params={k: trial.config.get(k) for k in settings.space},
                metrics=numbers,
                history=history,
            )
        )
    sign = -1.0 if settings.mode == "max" else 1.0
    rows.sort(
        key=lambda r: (
            r.last is None or (isinstance(r.last, float) and math.isnan(r.last)),
            sign * (r.last or 0.0),
            r.trial,
        )
    )
    complete = len(rows) >= settings.num_samples and all(
        r.state in ("finished", "stopped_early", "error") for r in rows
    )
    return SweepResult(url=url, complete=complete, restored=restored, rows=rows, files={})


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_rows(rows: list[TrialRow], settings: SweepSettings) -> str:
    """A fixed-width table: trial, state, step, metric (last, best), swept values."""
    header = ["#", "trial", "state", "step", settings.metric, "best", *settings.space]
    lines = [
        [
            str(i + 1),
            r.trial,
            r.state,
            _fmt(r.step),
            _fmt(r.last),
            _fmt(r.best),
            *(_fmt(r.params.get(k)) for k in settings.space),
        ]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(h), *(len(line[j]) for line in lines)) if lines else len(h) for j, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def sweep_csv(rows: list[TrialRow], settings: SweepSettings) -> str:
    """sweep.csv: one row per trial, best first; swept values and final metrics as columns."""
    extra = sorted({k for r in rows for k in r.metrics} - {settings.metric})
    header = [
        "rank",
        "trial",
        "run",
        "state",
        "step",
        settings.metric,
        f"best_{settings.metric}",
        *settings.space,
        *extra,
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for i, r in enumerate(rows):
        writer.writerow(
            [
                i + 1,
                r.trial,
                r.run,
                r.state,
                r.step,
                r.last,
                r.best,
                *(r.params.get(k) for k in settings.space),
                *(r.metrics.get(k) for k in extra),
            ]
        )
    return buffer.getvalue()


def write_reports(result: SweepResult, settings: SweepSettings) -> dict[str, str]:
    """sweep.csv and the two plots, in the sweep folder; returns their URLs."""
    from dmlray.sweeps import plots as sweep_plots

    files = {"csv": storage.join(result.url, "sweep.csv")}
    storage.write_bytes(files["csv"], sweep_csv(result.rows, settings).encode())
    root, name = result.url.rsplit("/", 1)
    folder = RunFolder(root, name)
    files["curves"] = folder.write_png(
        "sweep_curves.png", lambda p: sweep_plots.curves(p, result.rows, settings.metric)
    )
    files["params"] = folder.write_png("sweep_params.png", lambda p: sweep_plots.params(p, result.rows, settings))
    return files


def _default_prometheus_dir(url: str, name: str) -> str:
    # Prometheus reads local files only
    return str(storage.local_path(url)) if not storage.is_s3(url) else str(Path(f"{name}-prometheus").resolve())


def write_prometheus_files(folder: str, target: str | None) -> dict[str, str]:
    """The driver's file_sd entry and a prometheus.yml scraping it and Ray's nodes, in a local folder."""
    from dmlray.telemetry.prometheus_config import DRIVER_JOB, write_file_sd, write_prometheus_config

    out = Path(folder)
    # no "sweep" target label: the series carry it, and a target label would rename theirs
    sd = write_file_sd(out / "prometheus_sd.json", [target] if target else [], {"job": DRIVER_JOB})
    yml = write_prometheus_config(out / "prometheus.yml", driver_sd=sd, scrape_interval="5s")
    log.info("Prometheus: prometheus --config.file=%s --storage.tsdb.path=%s", yml, out / "prometheus-data")
    return {"file_sd": str(sd), "prometheus_yml": str(yml)}


def print_summary(result: SweepResult, settings: SweepSettings, top: int) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
    print()
    if result.complete:
        best = f"best by final {settings.metric} ({settings.mode})"
        print(f"Sweep {settings.name}: {len(result.rows)} trials ({counts}); {best}:")
    else:
        print(f"Sweep {settings.name} was interrupted ({counts}); run the same command again to resume it.")
    print(format_rows(result.rows[:top], settings))
    print()
    print(f"sweep folder: {result.url}")
    for key in ("csv", "curves", "params", "prometheus_yml"):
        if key in result.files:
            print(f"{key + ':':<15} {result.files[key]}")
    print(f"tensorboard:    tensorboard --logdir {result.url}")
