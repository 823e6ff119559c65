"""Run training with Ray Train: a TorchTrainer whose workers each run ``run_worker``.

Connects to the cluster named by ``RAY_ADDRESS`` (so ``ray job submit -- dmlray train``
works) and starts a local one otherwise. ``run.num_workers=0`` runs in-process (Ray
Train's local mode: no cluster, no fault tolerance) for quick runs and tests.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dmlray.config import Config, ConfigError, config_from_dict, config_to_dict, validate
from dmlray.data import storage
from dmlray.data.shards import read_manifest
from dmlray.jobs import elastic, output
from dmlray.jobs.run_folder import LOCK_FILE, MetricsWriter, RunFolder, RunLock, clear_run_folder, numeric_metrics
from dmlray.jobs.worker import WorkerContext, check_training_data, run_worker
from dmlray.telemetry.worker_metrics import WorkerMetrics
from dmlray.training import preemption
from dmlray.training.checkpoints import LOCAL_CHECKPOINT, STATE_FILE, load_state, state_bytes

log = logging.getLogger(__name__)

# AWS credentials as environment variables: they must not travel in a Ray runtime_env
CREDENTIAL_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def resolve_storage_path(path: str) -> str:
    """Ray needs an absolute local path or a URI."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def prepare_worker_process(cfg: Config, verbose: bool) -> None:
    """Logging, torch threads, the storage retry deadline and the preemption handler of a
    worker process."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    output.quiet_library_loggers(verbose)
    torch.set_num_threads(cfg.run.threads_per_worker)
    storage.set_retry_deadline(cfg.run.storage_retry_s)
    preemption.reset()
    if ray.is_initialized():  # local mode (num_workers=0) runs in the user's process: leave its signals alone
        install_preemption_handler()


def worker_device(use_gpu: bool, local_rank: int) -> torch.device:
    """This worker's GPU when the run uses GPUs and one is there, else the CPU."""
    if not (use_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def restored_state(device: torch.device) -> dict | None:
    """The state of the checkpoint Ray Train resumes this worker from, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        # named by its place in storage (as_directory may be a local copy of an S3 folder)
        return load_state((Path(folder) / STATE_FILE).read_bytes(), storage.join(checkpoint.path, STATE_FILE), device)


@dataclass
class RayReport:
    """The worker's ``report``: gauges, metrics.jsonl and progress (rank 0), and at
    checkpoints the state to Ray Train (one copy, from rank 0)."""

    steps: int
    rank: int
    metrics: WorkerMetrics
    folder: RunFolder | None
    """The run folder on rank 0, else None."""
    writer: MetricsWriter | None
    """metrics.jsonl's background writer on rank 0, else None."""
    last_checkpoint: float | None = None
    """When the previous checkpoint was reported (time.monotonic), to warn of a cadence Ray
    Train cannot keep up with."""
    cadence_warned: bool = False

    def __call__(self, record: dict, history: list[dict], state: dict | None) -> None:
        record["storage_retries"] = storage.retry_count()  # an S3 outage shows as a rise
        self.metrics.record(record)
        if self.writer is not None:
            self.writer.submit(history)  # written in the background: S3 latency stays off the step
            output.write_line(progress_line(record, self.steps))  # rank 0 only
        if state is None:
            return
        if self.writer is not None:
            self.writer.flush()  # a checkpoint's metrics are stored before the checkpoint is
        self.checkpoint(numeric_metrics(record), state, last=bool(record.get("preempted")))

    def check_cadence(self, step: int) -> None:
        """Warn once when checkpoints come faster than Ray Train's controller registers them:
        it takes one report per rank per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so
        faster ones queue up, are registered late (a lost node resumes from an older one)
        and hold the run's end back until the queue is through."""
        now, previous = time.monotonic(), self.last_checkpoint
        self.last_checkpoint = now
        poll = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
        if previous is not None and now - previous < poll and not self.cadence_warned:
            self.cadence_warned = True
            log.warning(
                "step %d: a checkpoint %.1fs after the one before, faster than Ray Train registers them (one per "
                "%.1fs poll, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): raise train.checkpoint_every",
                step,
                now - previous,
                poll,
            )

    def checkpoint(self, flat: dict, state: dict, last: bool) -> None:
        import ray
        import ray.train

        if self.folder is not None and not ray.is_initialized():
            # local mode keeps Ray's checkpoints in a temporary folder: keep the latest
            # one in the run folder too, so `dmlray eval RUN` finds it
            storage.write_bytes(self.folder.file(f"{LOCAL_CHECKPOINT}/{STATE_FILE}"), state_bytes(state))
        # one copy of the state is enough: every rank holds the same. A preemption checkpoint
        # (every rank stops at the same step) is uploaded before the worker exits: an upload
        # still in flight when the group is torn down is lost, and the restart would redo the step
        background = ray.is_initialized() and not last
        if ray.is_initialized() and self.rank == 0:
            self.check_cadence(int(flat["step"]))
        report_checkpoint(flat, state if self.rank == 0 else None, background=background)
        if last and ray.is_initialized():
            wait_until_registered(timeout_s=preemption.GRACE_S / 2)


def report_checkpoint(metrics: dict, state: dict | None, background: bool) -> None:
    """``ray.train.report`` with a checkpoint of ``state`` (rank 0) or none (other ranks).

    ``background`` (Ray workers): the state is written to a local folder and Ray Train's
    upload thread copies it to storage and deletes it (``CheckpointUploadMode.ASYNC``) while
    the next steps run; Ray registers it once uploaded, and waits for pending uploads when
    the train function returns. Local mode (no Ray workers) uploads nothing: it reports synchronously.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    if not background:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if state is not None:
                (Path(tmp) / STATE_FILE).write_bytes(state_bytes(state))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        return
    ckpt = None
    if state is not None:
        folder = tempfile.mkdtemp(prefix="dmlray-checkpoint-")  # Ray deletes it after the upload
        (Path(folder) / STATE_FILE).write_bytes(state_bytes(state))
        ckpt = ray.train.Checkpoint.from_directory(folder)
    # every rank reports in the same mode: the reports stay in step
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)


def wait_until_registered(timeout_s: float) -> None:
    """Block until Ray Train's controller registered every report of this worker, for at
    most ``timeout_s`` (then go on: the grace period must not run out).

    A preemption checkpoint is followed by every rank stopping. Ray Train registers a
    checkpoint only once it holds the reports of all ranks, gathered over its status polls;
    a poll that sees a rank stopped before it saw rank 0's report (rank 0 still uploading the
    state) restarts the group without registering it, and the restart resumes from the
    checkpoint before, redoing the steps since (seen on a loaded machine).
    """
    import ray.train
    from ray.train import CheckpointConsistencyMode

    t0 = time.monotonic()
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s)
    log.info("the preemption checkpoint is registered (waited %.1fs)", time.monotonic() - t0)


def wrap_ddp(model: torch.nn.Module, *, world_size: int, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel across ranks (itself in one process)."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train_function(config: dict) -> None:
    """The per-worker entry point Ray Train calls (config arrives as a plain dict)."""
    import ray
    import ray.train

    cfg = config_from_dict(config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    prepare_worker_process(cfg, config.get("verbose", False))
    device = worker_device(cfg.run.use_gpu, context.get_local_rank())
    restored = restored_state(device)
    backend = "ray" if ray.is_initialized() else "prometheus"
    metrics = WorkerMetrics(
        run=cfg.run.name,
        rank=rank,
        trial=config.get("trial", ""),
        backend=backend,
        port=cfg.run.metrics_port if backend == "prometheus" else 0,
    )
    folder = RunFolder(cfg.run.storage_path, cfg.run.name) if rank == 0 else None
    writer = MetricsWriter(folder) if folder is not None else None
    final = run_worker(
        cfg,
        WorkerContext(
            rank=rank,
            world_size=world_size,
            device=device,
            report=RayReport(cfg.train.steps, rank, metrics, folder, writer),
            restored=restored,
            wrap_model=functools.partial(wrap_ddp, world_size=world_size, device=device),
            run_folder=folder,
        ),
    )
    if writer is not None:
        writer.close()
    if folder is not None:
        folder.write_result(result_record(cfg, final))


def install_preemption_handler() -> None:
    """SIGTERM to this worker checkpoints at the next step and stops (dmlray.training.preemption).

    Signal handlers can be set from the main thread only, and Ray Train runs the train
    function in a thread of its own; the worker actor's main thread, free between Train's
    status polls, sets it through the actor's ``execute`` method.
    """
    import ray

    if threading.current_thread() is threading.main_thread():
        preemption.install_sigterm_handler()
        return
    try:
        actor = ray.get_runtime_context().current_actor
        installed = ray.get(actor.execute.remote(preemption.install_sigterm_handler), timeout=60)
    except Exception as exc:  # an internal Ray Train method: never fail a run for it
        log.warning("no SIGTERM handler (a preemption loses up to a checkpoint interval): %s", exc)
        return
    if not installed:
        log.warning("no SIGTERM handler: the worker actor's method ran outside the main thread")


def progress_line(record: dict, steps: int) -> str:
    """One line of training progress, as printed by rank 0 at each log step."""
    parts = [f"step {record['step']}/{steps}", f"loss {record['loss']:.4f}"]
    if record.get("memory_loss") is not None:
        parts.append(f"(batch {record['batch_loss']:.4f} + memory {record['memory_loss']:.4f})")
    parts.append(f"{record['samples_per_second']:.0f} samples/s")
    for key in ("val/recall@1", "recall@1", "map@r"):
        if key in record:
            parts.append(f"{key.replace('recall@1', 'R@1').replace('map@r', 'MAP@R')} {record[key]:.4f}")
    return "[dmlray] " + "  ".join(parts)


def result_record(cfg: Config, final: dict) -> dict:
    """result.json: the final retrieval metrics of the model and of the raw-pixel baseline."""
    keys = ("recall@", "map@r", "r_precision", "precision@1", "nmi")
    model = {k: v for k, v in final.items() if k.startswith(keys)}
    validation = {k[4:]: v for k, v in final.items() if k.startswith("val/")}
    return {
        "run": cfg.run.name,
        "steps": final.get("step"),
        "test_split": cfg.data.test_split,
        "ks": cfg.eval.ks,
        "metrics": model,
        "validation": validation or None,
        "restarts": final.get("restarts", 0),
        "baseline_raw_pixels": final.get("baseline"),
    }


def keep_credentials_out_of_tune_runtime_envs() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into every trial's runtime_env.

    Tune (ray.tune.execution.class_cache, Ray 2.60) puts AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and the session tokens from the driver's os.environ into the
    runtime_env of each trainable, which Ray logs and shows like any other. Trials need no
    such help: they inherit the node's environment like every other Ray process.
    """
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if propagated is None:  # Ray changed: tests/test_secrets.py tells whether it still copies them
        log.warning("ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE is gone: cannot check what Tune copies")
        return
    class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - CREDENTIAL_ENV


# (Ray job id, log_to_driver) of the ray.init made by ensure_ray
_forwarding: tuple[str, bool] = ("", True)


def worker_logs_forwarded() -> bool:
    """Whether the workers' output reaches this driver: as ensure_ray set it, and Ray's
    default (yes) for a ray.init made elsewhere."""
    import ray

    job, forwarded = _forwarding
    return forwarded or job != ray.get_runtime_context().get_job_id()


def ensure_ray(
    num_cpus: int | None = None, metrics_export_port: int | None = None, metrics_interval_ms: int | None = None
) -> None:
    """Connect to RAY_ADDRESS's cluster, or start a local one.

    S3 credentials are never put in a runtime_env: Ray logs it (runtime_env_agent.log) and
    shows it through the jobs and state APIs; nor does Tune put them in its trials' (see
    keep_credentials_out_of_tune_runtime_envs). A local cluster's raylet, and so every worker,
    the Train controller included, inherits this process's environment as it is now
    (credentials set after this call reach nobody); on an existing cluster the nodes'
    environment provides them (a Kubernetes Secret, an instance role).

    A local cluster keeps its dashboard (Train V2 needs the State API to clean up) on a
    free loopback port; ``metrics_export_port`` fixes where the node's metrics agent
    serves Prometheus (random otherwise, listed in Ray's service-discovery file).
    """
    import ray

    from dmlray.devtools.ports import free_ports

    keep_credentials_out_of_tune_runtime_envs()  # also when Ray runs already: a sweep may follow
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        forward = output.forward_worker_logs(existing_cluster=True)
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=forward, logging_level=output.ray_logging_level())
        remember_forwarding(forward)
        return
    extra: dict = {}
    if metrics_export_port:
        extra["_metrics_export_port"] = metrics_export_port
    if metrics_interval_ms:
        extra["_system_config"] = {"metrics_report_interval_ms": metrics_interval_ms}
    forward = output.forward_worker_logs(existing_cluster=False)
    # a local cluster talks over loopback only
    ray.init(
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        dashboard_port=free_ports(1)[0],
        log_to_driver=forward,
        logging_level=output.ray_logging_level(),
        **extra,
    )
    remember_forwarding(forward)


def remember_forwarding(forward: bool) -> None:
    """Record, for this driver's Ray job, whether ensure_ray forwards the workers' output."""
    import ray

    global _forwarding
    if ray.is_initialized():  # a ray.init stand-in (tests) starts no job
        _forwarding = (ray.get_runtime_context().get_job_id(), forward)


def storage_arguments(storage_path: str) -> dict:
    """RunConfig storage arguments; S3-compatible endpoints need an explicit filesystem.

    The filesystem names only the endpoint, scheme and region: pyarrow finds the credentials
    itself (environment, AWS_SESSION_TOKEN, instance role) in each process that uses it.
    Keys given to it would travel in its pickle, which Tune stores in tuner.pkl and its
    experiment state.
    """
    path = resolve_storage_path(storage_path)
    if not storage.is_s3(path):
        return {"storage_path": path}
    endpoint = storage.configured_endpoint()
    if not endpoint:
        return {"storage_path": path}
    # pyarrow ignores AWS_ENDPOINT_URL (FIELD_NOTES): spell the endpoint out
    scheme, _, host = endpoint.partition("://")
    fs = storage.arrow_s3_filesystem(  # an S3FileSystem that retries for storage.retry_deadline()
        endpoint_override=host,
        scheme=scheme or "https",
        region=storage.region(),
    )
    return {"storage_path": path[len("s3://") :], "storage_filesystem": fs}


def build_trainer(cfg: Config, trial: str = "", callbacks: list | None = None):
    """The TorchTrainer for a config (also used by the Tune driver)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = ScalingConfig(
        **elastic.scaling_arguments(cfg.run),
        use_gpu=cfg.run.use_gpu,
        resources_per_worker=None
        if cfg.run.num_workers == 0
        else {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
    )
    storage.set_retry_deadline(cfg.run.storage_retry_s)  # also how long Ray's S3 filesystem retries
    run = RunConfig(
        name=cfg.run.name,
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        callbacks=callbacks,
        **storage_arguments(cfg.run.storage_path),
    )
    return TorchTrainer(
        train_function,
        train_loop_config={"config": config_to_dict(cfg), "trial": trial, "verbose": output.verbose()},
        scaling_config=scaling,
        run_config=run,
    )


def cluster_shortfall(cfg: Config, total: dict[str, float], node_totals: list[dict[str, float]]) -> str | None:
    """Why the cluster can never place the run's workers, or None when it can.

    Every worker's bundle (``cpus_per_worker`` CPUs, one GPU with ``use_gpu``) must fit on
    one node, and all of them in the cluster's total.
    """
    n = cfg.run.min_workers if cfg.run.elastic else cfg.run.num_workers  # an elastic run starts at min
    bundle = {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {})}
    problems = []
    for resource, per_worker in bundle.items():
        need, have = n * per_worker, float(total.get(resource, 0.0))
        if need > have + 1e-9:
            problems.append(f"{need:g} {resource} ({n} workers x {per_worker:g}) but the cluster has {have:g}")
        biggest = max((float(node.get(resource, 0.0)) for node in node_totals), default=0.0)
        if per_worker > biggest + 1e-9:
            problems.append(f"{per_worker:g} {resource} on one node per worker but the largest node has {biggest:g}")
    if not problems:
        return None
    workers = f"run.min_workers={n}" if cfg.run.elastic else f"run.num_workers={n}"
    return (
        f"{workers}, run.cpus_per_worker={cfg.run.cpus_per_worker:g}, run.use_gpu={cfg.run.use_gpu}: "
        f"the run needs {'; '.join(problems)}"
    )


def has_autoscaler() -> bool:
    """Whether an autoscaler may add nodes to the connected cluster (KubeRay, the cluster launcher).

    Ray's monitor runs on every head node and publishes an autoscaler report in the GCS
    key-value store even on a cluster that cannot grow (a laptop, ``ray start`` by hand): it
    then drives a read-only provider, whose report is :func:`report_can_grow`'s to tell apart.
    Autoscaler v2 marks itself in the store and publishes its node groups' limits.
    """
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return v2_config_can_grow()
    except Exception:  # an older or newer Ray without these helpers: the v1 report decides
        pass
    return report_can_grow(autoscaler_report())


def autoscaler_report() -> dict | None:
    """The (v1) autoscaler report the head's monitor last published, None before its first."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(status).get("autoscaler_report") if status else None


def report_can_grow(report: dict | None) -> bool:
    """Whether a v1 autoscaler report comes from a provider that can launch nodes.

    The read-only provider names each node's type ``node_<node id>`` (Ray's
    ``format_readonly_node_type``) and never launches any; a real provider names the types
    of its config (KubeRay's worker groups, the cluster launcher's node types).
    """
    if not report:
        return False
    if report.get("pending_launches") or report.get("pending_nodes"):
        return True
    mapping = report.get("node_type_mapping") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {}) | set(mapping.values())
    readonly = {f"node_{node_id}" for node_id in mapping}
    return bool(types - readonly) if mapping else any(not t.startswith("node_") for t in types)


def v2_config_can_grow() -> bool:
    """Whether autoscaler v2's published cluster config lets some node group grow (the rule
    Ray Data uses); without a published config, assume it can and only warn."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if not config or not config.node_group_configs:
        return True
    return any(
        group.max_count == -1 or group.max_count > group.min_count
        for group in config.node_group_configs
        if group.resources and group.max_count != 0
    )


def check_cluster_resources(cfg: Config) -> None:
    """Fail at start, naming requested and available resources, when the cluster can never hold
    the run's workers (Ray Train would wait for them forever). With an autoscaler the cluster
    may grow: then only warn."""
    import ray

    if cfg.run.num_workers == 0:
        return
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    shortfall = cluster_shortfall(cfg, ray.cluster_resources(), nodes)
    if shortfall is None:
        return
    if has_autoscaler():
        log.warning("%s; waiting for the autoscaler to add nodes", shortfall)
        return
    raise ConfigError(
        f"{shortfall} (and no autoscaler can add nodes); lower run.num_workers or run.cpus_per_worker, or add nodes"
    )


def launch(cfg: Config) -> dict:
    """Train per the config; returns result.json's content.

    Nothing is written before the config is valid, the dataset's manifest readable and the
    cluster big enough: a run that cannot start leaves no folder that would look resumable.
    The driver then holds the run folder's lock (one live run per name) until the end.
    """
    validate(cfg)
    cfg.run.storage_path = resolve_storage_path(cfg.run.storage_path)
    manifest = read_manifest(cfg.data.url)
    log.info("dataset %s: splits %s", cfg.data.url, ", ".join(manifest.splits))
    # a dataset that cannot fill a global P×K batch fails here, naming the numbers
    eligibility = check_training_data(cfg, manifest, world_size=max(1, cfg.run.num_workers))
    if eligibility.excluded:
        log.warning("training data: %s", eligibility.describe_excluded())
    if cfg.run.num_workers > 0:
        ensure_ray()
        check_cluster_resources(cfg)
    folder = RunFolder(cfg.run.storage_path, cfg.run.name)
    with RunLock(folder.url):  # a live run of this name fails here, naming its holder
        if [n for n in storage.list_dir(folder.url) if n != LOCK_FILE]:
            if cfg.run.fresh:
                log.info("run.fresh: deleting the previous run in %s", folder.url)
                clear_run_folder(folder.url, cfg.run.storage_path)
            else:
                log.info("%s exists: resuming from its latest checkpoint (run.fresh=true starts over)", folder.url)
        folder.write_config(config_to_dict(cfg))
        log.info("run folder: %s", folder.url)
        if cfg.run.num_workers > 0 and not worker_logs_forwarded():  # the workers' lines stay in Ray's logs
            with output.ProgressPrinter(folder, lambda record: progress_line(record, cfg.train.steps)):
                build_trainer(cfg).fit()
        else:
            build_trainer(cfg).fit()
        result = folder.read_result()
    result["run_folder"] = folder.url
    return result
