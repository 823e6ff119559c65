"""Typed run configuration: dataclasses, YAML files or presets, and ``a.b=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key, raised before any
worker starts. A field with a fixed set of values is typed ``Literal[...]``: the type is the
one list of what it accepts (``allowed_values``). The resolved config is written into every
run folder (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how batches are drawn from them."""

    url: str = ""
    """Dataset root holding ``<split>/manifest.json`` (plain path, file:// or s3://)."""
    train_split: str = "train"
    """Split trained on."""
    test_split: str = "test"
    """Split evaluated leave-one-out (or the query split when gallery_split is set)."""
    gallery_split: str = ""
    """Gallery split for query-vs-gallery evaluation (In-Shop); empty = leave-one-out."""
    classes_per_batch: int = 16
    """P: classes in each local batch."""
    samples_per_class: int = 4
    """K: instances of each class in a batch."""
    class_buffer: int = 128
    """Classes held in the stream's group buffer (bounds memory; more = better mixing)."""
    open_shards: int = 4
    """Shards read in interleaved fashion at once, so one batch mixes several shards."""
    image_size: int = 32
    """Side of the square network input."""
    channels: Literal[1, 3] = 1
    """Image channels fed to the network (1 = grey, 3 = RGB)."""
    augment: bool = True
    """Random shift/scale augmentation during training."""
    loader_workers: int = 0
    """DataLoader worker processes per rank (0 = read in the training process)."""
    eval_batch_size: int = 256
    """Batch size when embedding the evaluation split."""
    val_fraction: float = 0.0
    """Fraction of training classes held out (class-disjoint) for model selection; 0 = none."""


@dataclass(kw_only=True)
class HeadConfig:
    """One embedding head of a model with several (``model.heads``)."""

    name: str = "embedding"
    """Head name, as loss terms and ``model.eval_head`` refer to it."""
    dim: int = 64
    """Size of this head's L2-normalised embedding."""
    hidden_dim: int = 0
    """Hidden width of an MLP head; 0 = linear head."""


@dataclass(kw_only=True)
class ModelConfig:
    """Backbone and embedding head(s)."""

    backbone: str = "glyph_cnn"
    """Registered backbone name (see dmlray.models.backbone_names())."""
    backbone_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backbone builder."""
    pretrained: str = ""
    """Path or URL of pretrained backbone weights (nothing is downloaded otherwise)."""
    embedding_dim: int = 64
    """Size of the L2-normalised embedding."""
    hidden_dim: int = 0
    """Hidden width of an MLP head; 0 = linear head."""
    batchnorm: Literal["train", "frozen", "sync"] = "train"
    """BatchNorm layers: train (per-rank statistics), frozen (eval mode, no grad; the seed recipes) or sync."""
    heads: list[HeadConfig] = field(default_factory=list)
    """Several embedding heads on one backbone (each L2-normalised; MIC's class and
    auxiliary heads); empty = one head named "embedding" of embedding_dim and hidden_dim."""
    eval_head: str = ""
    """The head that evaluation, indexing and serving embed with; empty = the first."""


@dataclass(kw_only=True)
class LossTermConfig:
    """One weighted term of a combined loss (``loss.terms``)."""

    name: str = "multi_similarity"
    """Registered loss name (see dmlray.losses.names())."""
    weight: float = 1.0
    """Weight of the term in the sum."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loss (its defaults otherwise)."""
    id: str = ""
    """The term's name in metrics (``loss/<id>``) and checkpoints; empty = the loss name."""
    head: str = ""
    """The embedding head the term reads (``model.heads``); empty = the first."""
    other_head: str = ""
    """Second head of a two-branch term (adversarial: the auxiliary head); empty = none."""
    memory: bool = False
    """Also pair against a cross-batch memory of this head (sized by the memory section)."""
    labels: Literal["class", "pseudo"] = "class"
    """class: the dataset's labels; pseudo: cluster labels of the auxiliary head (MIC,
    refreshed per the pseudo_labels section)."""


@dataclass(kw_only=True)
class LossConfig:
    """The metric-learning loss: one loss (name, params) or a weighted sum of terms."""

    name: str = "multi_similarity"
    """Registered loss name (see dmlray.losses.names()); unused when terms are given."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loss (its defaults otherwise); unused when terms are given."""
    terms: list[LossTermConfig] = field(default_factory=list)
    """Weighted loss terms, each on its head, its labels, with or without memory; empty =
    the single loss above (name, params, and the memory when memory.size > 0)."""

    def describe(self) -> str:
        """What a progress line says of the loss: ``margin loss`` or its weighted terms."""
        if not self.terms:
            return f"{self.name} loss"
        return "loss " + " + ".join(f"{t.weight:g}·{t.name}" for t in self.terms)


@dataclass(kw_only=True)
class PseudoLabelConfig:
    """Cluster pseudo-labels for loss terms with ``labels: pseudo`` (MIC)."""

    head: str = ""
    """The head whose embeddings of the training split are clustered; empty = the first
    head that a pseudo-label term reads."""
    clusters: int = 30
    """k of the k-means over the training split (MIC on CUB: 30)."""
    every: int = 100
    """Re-embed and re-cluster the training split every this many steps (and at step 0)."""
    center_first_by_class: bool = True
    """Subtract each class's mean embedding before the first clustering, so its clusters
    group what classes share rather than the classes (MIC's initial clustering with its
    default cluster_mode 'mean'; MIC's later clusterings take the head's embeddings as
    they are, and so do these)."""


@dataclass(kw_only=True)
class MemoryConfig:
    """Cross-batch memory (XBM) of global batches."""

    size: int = 0
    """Entries held (global across ranks); 0 turns the memory off."""
    start: int = 0
    """Step from which the memory is filled and its loss term used."""
    weight: float = 1.0
    """Weight w of the memory term L(batch, memory)."""
    ramp_steps: int = 0
    """Ramp the memory weight linearly from 0 to w over this many steps after start (0 = switch on at once)."""


@dataclass(kw_only=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (dmlray.training.schedules)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimiser: Adam, AdamW or SGD with momentum 0.9."""
    lr: float = 1e-3
    """Learning rate of the network."""
    weight_decay: float = 0.0
    """Weight decay."""
    head_lr: float = 0.0
    """Learning rate of the embedding head; 0 = same as lr (recipes train a fresh head faster)."""
    loss_lr: float = 0.0
    """Learning rate of loss parameters (proxies, centres); 0 = same as lr."""
    milestones: list[int] = field(default_factory=list)
    """Steps at which the learning rate is multiplied by gamma."""
    gamma: float = 0.1
    """Learning-rate decay factor at each milestone (schedule step)."""
    schedule: Literal["step", "cosine"] = "step"
    """step: multiplied by gamma at each milestone; cosine: half a cosine from the peak down to
    cosine_floor over the steps after the warm-up (milestones ignored)."""
    warmup_steps: int = 0
    """Linear warm-up of every learning rate over this many first steps (any schedule); 0 = none."""
    warmup_start: float = 0.0
    """Fraction of each learning rate at step 0 of the warm-up."""
    cosine_floor: float = 0.0
    """Fraction of each learning rate left at the last step of a cosine schedule."""


@dataclass(kw_only=True)
class TrainConfig:
    """The iteration-based training loop."""

    steps: int = 300
    """Optimisation steps (every rank runs exactly this many)."""
    eval_every: int = 100
    """Evaluate (and checkpoint) every this many steps, and at the end."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps without evaluating; 0 = only at evaluations."""
    log_every: int = 10
    """Record metrics every this many steps."""
    seed: int = 0
    """Run seed; data and init seeds derive from (seed, rank, worker)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter dtype (float64 for exactness tests)."""
    amp: Literal["none", "bf16"] = "none"
    """Autocast: none, or bf16 (losses still compute similarities in float32)."""
    channels_last: bool = False
    """Channels-last memory format for images and model (faster convolutions on GPU)."""
    accumulate: int = 1
    """Micro-batches per optimisation step (gradient accumulation)."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm (network and loss parameters) to this before each
    optimiser step; 0 = no clipping."""
    accumulate_mode: Literal["exact", "independent"] = "exact"
    """exact: the gradient of one batch ``accumulate`` times larger (gradient caching: pairs
    form across micro-batches, the memory gets the whole batch; two forwards per micro-batch).
    independent: each micro-batch's own loss, gradients averaged (one forward; cheaper)."""


@dataclass(kw_only=True)
class EvalConfig:
    """Retrieval evaluation."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """K values of Recall@K."""
    baseline: bool = True
    """Also evaluate raw pixels as a baseline (at the end of training)."""
    nmi: bool = True
    """NMI at the final evaluation (k-means with one cluster per class: slow for SOP's 11k classes)."""


@dataclass(kw_only=True)
class RunConfig:
    """Where the run lives and how Ray runs it."""

    name: str = "demo"
    """Run name; the run folder is storage_path/name. An existing run of that name resumes."""
    fresh: bool = False
    """Delete an existing run folder of the same name and start over instead of resuming."""
    storage_path: str = "runs"
    """Local folder or s3:// URL holding run folders."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks); 0 runs in-process without Ray workers. The most
    workers of an elastic run (see min_workers)."""
    min_workers: int = 0
    """Fewest workers of an elastic run (Ray Train resizes between min_workers and
    num_workers as nodes come and go); 0 or num_workers = fixed size. The global batch
    stays data.classes_per_batch x num_workers classes of K samples at every size: each
    of w ranks takes 1/w of its classes, so w must divide it."""
    resize_check_s: float = 60.0
    """Elastic runs: seconds between Ray Train's checks for room to grow the worker group."""
    worker_labels: dict[str, str] = field(default_factory=dict)
    """Ray node labels a worker's node must carry (e.g. a spot worker group's, see
    docs/DEPLOY.md); empty = any node."""
    use_gpu: bool = False
    """One GPU per worker (nccl) instead of CPU (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    threads_per_worker: int = 1
    """torch intra-op threads per worker."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before the run fails."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (the most recent)."""
    metrics_port: int = 0
    """Port of a prometheus_client server when training outside Ray; 0 = none."""
    storage_retry_s: float = 120.0
    """Seconds an unreachable or failing S3 endpoint is retried (with backoff) before the
    worker fails with an error naming it; run.max_failures then resumes from the checkpoint."""

    @property
    def elastic(self) -> bool:
        """Whether the run has worker bounds: min_workers set and below num_workers."""
        return self.min_workers not in (0, self.num_workers)


@dataclass(kw_only=True)
class Config:
    """A complete training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------- building


def allowed_values(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` field type accepts, in declaration order."""
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{tp!r} is not a Literal type")
    return typing.get_args(tp)


def _one_of(values: Sequence[Any]) -> str:
    """'a, b or c'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    allowed = allowed_values(tp)
    # by type as well as value: True == 1, yet a bool is never a valid choice of an int field
    if any(type(value) is type(a) and value == a for a in allowed):
        return value
    raise ConfigError(f"{key} must be {_one_of(allowed)}, got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)  # an item of a list of sections (loss.terms, model.heads)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r}; {prefix or 'config'} has: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        where = f"{prefix}.{name}" if prefix else name
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, where)
        else:
            kwargs[name] = _coerce(value, tp, where)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested mapping (missing keys take defaults)."""
    cfg = _from_dict(Config, data or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=value`` in a nested mapping (a copy); keys are checked later."""
    out = yaml.safe_load(yaml.safe_dump(data or {}))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def preset_names() -> list[str]:
    """Training presets shipped in the package (dmlray/presets/*.yaml; *_space.yaml are sweep spaces)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.endswith("_space"))


def preset_path(name: str) -> Path:
    """Path of a shipped preset; an unknown name lists the known ones."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return path


def load_config(source: str, overrides: Sequence[str] = ()) -> Config:
    """A preset name or a YAML path, plus overrides → a validated Config."""
    path = Path(source)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = preset_path(source)
    if not path.is_file():
        raise ConfigError(f"config file {source!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return config_from_dict(apply_overrides(data, list(overrides)))


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; every message names the key."""
    from dmlray import models  # local: keep config import light

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    _check_choices(cfg)
    need(cfg.data.classes_per_batch >= 2, "data.classes_per_batch must be >= 2 (negatives need two classes)")
    need(cfg.data.samples_per_class >= 2, "data.samples_per_class must be >= 2 (positives need two instances)")
    need(cfg.data.class_buffer >= cfg.data.classes_per_batch, "data.class_buffer must be >= data.classes_per_batch")
    need(cfg.data.open_shards >= 1, "data.open_shards must be >= 1")
    need(cfg.data.image_size >= 8, "data.image_size must be >= 8")
    need(cfg.data.loader_workers >= 0, "data.loader_workers must be >= 0")
    need(cfg.model.embedding_dim >= 1, "model.embedding_dim must be >= 1")
    need(cfg.model.hidden_dim >= 0, f"model.hidden_dim must be >= 0 (0 = linear head), got {cfg.model.hidden_dim}")
    _check_heads(cfg.model)
    need(
        cfg.model.batchnorm != "sync" or cfg.run.use_gpu,
        "model.batchnorm=sync needs run.use_gpu=true (torch's SyncBatchNorm runs on GPUs only)",
    )
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    need(cfg.memory.ramp_steps >= 0, "memory.ramp_steps must be >= 0")
    need(cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
    need(cfg.train.accumulate >= 1, "train.accumulate must be >= 1")
    need(not (cfg.train.amp == "bf16" and cfg.train.dtype == "float64"), "train.amp=bf16 needs train.dtype=float32")
    if cfg.model.backbone not in models.backbone_names():
        raise ConfigError(
            f"model.backbone: unknown backbone {cfg.model.backbone!r}; known: {', '.join(models.backbone_names())}"
        )
    need(cfg.memory.size >= 0, "memory.size must be >= 0")
    need(cfg.memory.start >= 0, "memory.start must be >= 0")
    if cfg.loss.terms:
        _check_terms(cfg)
    else:
        _check_single_loss(cfg)
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.train.steps >= 1, "train.steps must be >= 1")
    need(
        0 <= cfg.optim.warmup_steps < cfg.train.steps,
        f"optim.warmup_steps must be in [0, train.steps={cfg.train.steps}), got {cfg.optim.warmup_steps}",
    )
    need(0.0 <= cfg.optim.warmup_start <= 1.0, f"optim.warmup_start must be in [0, 1], got {cfg.optim.warmup_start}")
    need(0.0 <= cfg.optim.cosine_floor <= 1.0, f"optim.cosine_floor must be in [0, 1], got {cfg.optim.cosine_floor}")
    need(
        _finite(cfg.train.clip_grad_norm) and cfg.train.clip_grad_norm >= 0,
        f"train.clip_grad_norm must be finite and >= 0 (0 = off), got {cfg.train.clip_grad_norm}",
    )
    need(cfg.train.eval_every >= 1, "train.eval_every must be >= 1")
    need(cfg.train.log_every >= 1, "train.log_every must be >= 1")
    need(len(cfg.eval.ks) > 0 and all(k >= 1 for k in cfg.eval.ks), "eval.ks must be positive integers")
    need(cfg.run.num_workers >= 0, "run.num_workers must be >= 0")
    _check_worker_bounds(cfg.run, cfg.data.classes_per_batch)
    need(cfg.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
    need(cfg.run.storage_retry_s > 0, "run.storage_retry_s must be > 0 seconds")
    need(cfg.run.max_failures >= -1, "run.max_failures must be >= -1 (-1 = retry forever)")
    need(cfg.data.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {cfg.data.eval_batch_size}")
    need(
        _finite(cfg.memory.weight) and cfg.memory.weight >= 0,
        f"memory.weight must be finite and >= 0, got {cfg.memory.weight}",
    )
    need(_finite(cfg.optim.lr), f"optim.lr must be finite, got {cfg.optim.lr}")
    for key in ("head_lr", "loss_lr", "weight_decay"):
        value = getattr(cfg.optim, key)
        need(_finite(value) and value >= 0, f"optim.{key} must be finite and >= 0, got {value}")
    need(_finite(cfg.optim.gamma) and cfg.optim.gamma > 0, f"optim.gamma must be finite and > 0, got {cfg.optim.gamma}")
    milestones = cfg.optim.milestones
    need(
        all(m >= 1 for m in milestones) and all(a < b for a, b in itertools.pairwise(milestones)),
        f"optim.milestones must be positive and strictly increasing, got {milestones}",
    )
    need(
        _finite(cfg.run.cpus_per_worker) and cfg.run.cpus_per_worker > 0,
        f"run.cpus_per_worker must be > 0, got {cfg.run.cpus_per_worker}",
    )
    need(cfg.run.threads_per_worker >= 1, f"run.threads_per_worker must be >= 1, got {cfg.run.threads_per_worker}")
    need(0 <= cfg.run.metrics_port <= 65535, f"run.metrics_port must be a port in 0-65535, got {cfg.run.metrics_port}")
    check_name("run.name", cfg.run.name)


def _check_choices(cfg: Config) -> None:
    """Every ``Literal`` field holds one of its values, also in a Config built in code."""
    for section in dataclasses.fields(cfg):
        _check_part_choices(getattr(cfg, section.name), section.name)


def _check_part_choices(part: Any, prefix: str) -> None:
    for name, tp in typing.get_type_hints(type(part)).items():
        value = getattr(part, name)
        if typing.get_origin(tp) is Literal:
            _coerce_literal(value, tp, f"{prefix}.{name}")
        elif isinstance(value, list):  # lists of sections (loss.terms)
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_part_choices(item, f"{prefix}.{name}[{i}]")


def head_names(model: ModelConfig) -> list[str]:
    """The model's head names in output order (one "embedding" head without ``model.heads``)."""
    return [h.name for h in model.heads] if model.heads else ["embedding"]


def term_ids(loss: LossConfig) -> list[str]:
    """Each term's name in metrics and checkpoints: its id, or its loss name."""
    return [t.id or t.name for t in loss.terms]


def _check_heads(model: ModelConfig) -> None:
    names = head_names(model)
    for i, head in enumerate(model.heads):
        check_name(f"model.heads[{i}].name", head.name)
        if head.dim < 1:
            raise ConfigError(f"model.heads[{i}].dim must be >= 1, got {head.dim}")
        if head.hidden_dim < 0:
            raise ConfigError(f"model.heads[{i}].hidden_dim must be >= 0 (0 = linear head), got {head.hidden_dim}")
        if names.index(head.name) != i:
            raise ConfigError(f"model.heads[{i}].name: {head.name!r} names two heads")
    if model.eval_head and model.eval_head not in names:
        raise ConfigError(f"model.eval_head: unknown head {model.eval_head!r}; heads: {', '.join(names)}")


def _check_loss_name(key: str, name: str) -> None:
    from dmlray import losses  # local: keep config import light

    if name not in losses.names():
        raise ConfigError(f"{key}: unknown loss {name!r}; known: {', '.join(losses.names())}")


def _check_single_loss(cfg: Config) -> None:
    from dmlray import losses

    _check_loss_name("loss.name", cfg.loss.name)
    if not losses.loss_class(cfg.loss.name).trainable_alone:
        raise ConfigError(
            f"loss.name: {cfg.loss.name!r} is an auxiliary term that needs a second embedding head; "
            "use it in loss.terms beside a main loss (with model.heads and other_head)"
        )
    if cfg.memory.size > 0 and not losses.loss_class(cfg.loss.name).supports_references:
        raise ConfigError(
            f"memory.size: loss {cfg.loss.name!r} cannot pair against a cross-batch memory; set memory.size=0"
        )
    if cfg.pseudo_labels != PseudoLabelConfig():
        raise ConfigError("pseudo_labels: only loss.terms with labels: pseudo read pseudo-labels")


def _check_terms(cfg: Config) -> None:
    """``loss.terms``: known losses, heads and ids; memory, pseudo-labels and a second head
    only where the term's loss can use them."""
    from dmlray import losses

    heads = head_names(cfg.model)
    ids = term_ids(cfg.loss)
    for i, term in enumerate(cfg.loss.terms):
        key = f"loss.terms[{i}]"
        _check_loss_name(f"{key}.name", term.name)
        cls = losses.loss_class(term.name)
        check_name(f"{key}.id", ids[i])
        if ids.index(ids[i]) != i:
            raise ConfigError(f"{key}.id: {ids[i]!r} names two terms; give each term its own id")
        if not (_finite(term.weight) and term.weight >= 0):
            raise ConfigError(f"{key}.weight must be finite and >= 0, got {term.weight}")
        for field_name in ("head", "other_head"):
            head = getattr(term, field_name)
            if head and head not in heads:
                raise ConfigError(f"{key}.{field_name}: unknown head {head!r}; heads: {', '.join(heads)}")
        if cls.trainable_alone and term.other_head:
            raise ConfigError(f"{key}.other_head: loss {term.name!r} reads one head; leave other_head empty")
        if not cls.trainable_alone and not term.other_head:
            raise ConfigError(f"{key}.other_head: loss {term.name!r} needs a second head (e.g. the auxiliary head)")
        if term.memory and not cls.supports_references:
            raise ConfigError(f"{key}.memory: loss {term.name!r} cannot pair against a cross-batch memory")
        if term.memory and cfg.memory.size == 0:
            raise ConfigError(f"{key}.memory: the memory is off; set memory.size > 0")
        if term.memory and term.labels == "pseudo":
            raise ConfigError(f"{key}.memory: a memory holds class labels, not pseudo-labels")
    if cfg.memory.size > 0 and not any(t.memory for t in cfg.loss.terms):
        raise ConfigError("memory.size: no loss term reads the memory; set memory: true on a term or memory.size=0")
    _check_pseudo_labels(cfg, heads)


def _check_pseudo_labels(cfg: Config, heads: list[str]) -> None:
    pseudo = [t for t in cfg.loss.terms if t.labels == "pseudo"]
    section = cfg.pseudo_labels
    if not pseudo:
        if section != PseudoLabelConfig():
            raise ConfigError("pseudo_labels: no loss term has labels: pseudo")
        return
    if section.head and section.head not in heads:
        raise ConfigError(f"pseudo_labels.head: unknown head {section.head!r}; heads: {', '.join(heads)}")
    if section.clusters < 2:
        raise ConfigError(f"pseudo_labels.clusters must be >= 2, got {section.clusters}")
    if section.every < 1:
        raise ConfigError(f"pseudo_labels.every must be >= 1, got {section.every}")


def pseudo_label_head(cfg: Config) -> str:
    """The head whose clusters are the pseudo-labels."""
    if cfg.pseudo_labels.head:
        return cfg.pseudo_labels.head
    heads = head_names(cfg.model)
    pseudo = [t.head for t in cfg.loss.terms if t.labels == "pseudo"]
    return (pseudo[0] if pseudo else "") or heads[0]


def splitting_world_sizes(global_classes: int, low: int, high: int) -> list[int]:
    """World sizes in ``low..high`` whose ranks can each take an equal share of the global classes."""
    return [w for w in range(max(1, low), high + 1) if global_classes % w == 0]


def _check_worker_bounds(run: RunConfig, classes_per_batch: int) -> None:
    """An elastic run's bounds: min <= max, every size in them splits the global batch, and
    a retry budget to survive losing a worker."""
    if not run.elastic:
        return
    if not 0 < run.min_workers < run.num_workers:
        raise ConfigError(
            f"run.min_workers={run.min_workers} must be between 1 and run.num_workers={run.num_workers} "
            "(the elastic bounds min <= max), or 0 for a fixed size"
        )
    global_classes = classes_per_batch * run.num_workers
    fits = splitting_world_sizes(global_classes, run.min_workers, run.num_workers)
    if len(fits) < run.num_workers - run.min_workers + 1:
        refused = sorted(set(range(run.min_workers, run.num_workers + 1)) - set(fits))
        raise ConfigError(
            f"run.min_workers={run.min_workers}, run.num_workers={run.num_workers}: the global batch of "
            f"data.classes_per_batch x run.num_workers = {classes_per_batch} x {run.num_workers} = "
            f"{global_classes} classes cannot be split evenly over {', '.join(map(str, refused))} worker(s); "
            f"world sizes in the bounds that can: {', '.join(map(str, fits))} (narrow the bounds to sizes "
            f"that divide {global_classes}, or change data.classes_per_batch)"
        )
    if run.max_failures == 0:
        raise ConfigError(
            f"run.min_workers={run.min_workers} (elastic) needs run.max_failures != 0: a lost worker "
            "fails the worker group, which then restarts smaller"
        )
    if not (_finite(run.resize_check_s) and run.resize_check_s >= 0):
        raise ConfigError(f"run.resize_check_s must be finite and >= 0, got {run.resize_check_s}")


NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def check_name(key: str, name: str) -> None:
    """A run or sweep name is one folder under storage_path: never a path, never '.' or '..'
    (``run.fresh`` deletes that folder)."""
    if not NAME_PATTERN.fullmatch(name or "") or name in (".", ".."):
        raise ConfigError(f"{key} must be letters, digits, '.', '_' or '-' (and not '.' or '..'), got {name!r}")


def check_port(key: str, port: int | None) -> None:
    """A TCP port option: 0-65535 (0 = any free port)."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"{key} must be a port in 0-65535, got {port}")


def _finite(value: float) -> bool:
    return math.isfinite(value)
