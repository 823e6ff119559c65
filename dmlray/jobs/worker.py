"""Build a Trainer from a Config and run it: the body of every training worker.

It knows the rank and how to report, nothing else of Ray: ``launch.py`` supplies a
``WorkerContext`` backed by Ray Train, tests supply their own.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import time
from collections.abc import Callable, Iterator, Set
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from dmlray import losses, models
from dmlray.config import (
    Config,
    DataConfig,
    LossConfig,
    LossTermConfig,
    ModelConfig,
    OptimConfig,
    PseudoLabelConfig,
    pseudo_label_head,
    term_ids,
)
from dmlray.data.health import StreamStats
from dmlray.data.partition import Eligibility, ShardLayout, check_fillable, eligible_classes
from dmlray.data.pk_batches import PKBatches
from dmlray.data.shards import Manifest, read_manifest
from dmlray.data.stream import iter_shard, scan_layouts
from dmlray.data.transforms import make_transform
from dmlray.evaluation.embedding import embed_split, score
from dmlray.evaluation.report import TestPlan, evaluate_test, write_evaluation_pictures
from dmlray.jobs import elastic
from dmlray.training.memory import CrossBatchMemory
from dmlray.training.pseudo_labels import PseudoLabels
from dmlray.training.schedules import ScheduleSettings, build_scheduler
from dmlray.training.trainer import LossTerm, Trainer

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker gets from whoever runs it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict, list[dict], dict | None], None] = lambda record, history, state: None
    """Called with (record, history, state) at log steps (state None) and evaluations."""
    restored: dict | None = None
    """Checkpoint state to resume from."""
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    """DDP wrapping (identity in one process)."""
    run_folder: object | None = None
    """The RunFolder (rank 0 only): the final evaluation draws its pictures there."""


def build_model(cfg: ModelConfig, channels: int) -> models.EmbeddingModel:
    kwargs = dict(cfg.backbone_args)
    if cfg.pretrained:
        kwargs["pretrained"] = cfg.pretrained
    if cfg.backbone == "glyph_cnn":
        kwargs.setdefault("in_channels", channels)
    backbone = models.build_backbone(cfg.backbone, **kwargs)
    heads = [models.HeadSpec(h.name, h.dim, h.hidden_dim) for h in cfg.heads]
    model = models.EmbeddingModel(backbone, cfg.embedding_dim, cfg.hidden_dim, heads=heads)
    if cfg.batchnorm == "frozen":
        from dmlray.models.frozen_bn import freeze_batchnorm

        freeze_batchnorm(model)
    elif cfg.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_transforms(cfg: Config, model: nn.Module):
    """(train, eval) transforms: glyph or natural-image style from the input size and
    channels, normalised the way the backbone's weights expect (e.g. BGR/[0,255]).
    ``model``: an EmbeddingModel or its view of one head (both have ``backbone``)."""
    convention = getattr(getattr(model, "backbone", None), "input_convention", "rgb_imagenet")
    train = make_transform(
        "auto", cfg.data.image_size, cfg.data.channels, train=cfg.data.augment, convention=convention
    )
    evaluate = make_transform("auto", cfg.data.image_size, cfg.data.channels, train=False, convention=convention)
    return train, evaluate


def split_validation(train_classes: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training classes, validation classes): a seeded, class-disjoint hold-out."""
    if fraction <= 0:
        return list(train_classes), []
    held = sorted(
        random.Random(f"val-{seed}").sample(sorted(train_classes), max(2, round(fraction * len(train_classes))))
    )
    keep = sorted(set(train_classes) - set(held))
    if len(keep) < 2:
        raise ValueError(f"data.val_fraction={fraction} leaves {len(keep)} training classes")
    return keep, held


def training_layouts(manifest, split: str) -> list[ShardLayout]:
    """The split's shard layouts from the manifest; older manifests lack per-class counts,
    so their shards are read once (not decoded) to count them."""
    layouts = manifest.layouts(split)
    if layouts is None:
        log.warning(
            "%s predates per-class counts in its manifest: reading its %s shards once to count them "
            "(re-pack with 'dmlray pack --overwrite' to skip this)",
            manifest.root,
            split,
        )
        layouts = scan_layouts(manifest.shard_urls(split))
    return layouts


def check_training_data(cfg: Config, manifest, world_size: int) -> Eligibility:
    """Fail before training when the data cannot fill a global P×K batch of ``world_size``
    ranks; returns the eligibility (classes left out are in ``.excluded``)."""
    train_classes, val_classes = split_validation(
        manifest.classes(cfg.data.train_split), cfg.data.val_fraction, cfg.train.seed
    )
    held = set(val_classes)
    eligibility = eligible_classes(
        training_layouts(manifest, cfg.data.train_split),
        cfg.data.samples_per_class,
        (lambda label: label not in held) if held else None,
    )
    check_fillable(
        eligibility, cfg.data.classes_per_batch, world_size, where=f"{manifest.root} (split {cfg.data.train_split!r})"
    )
    return eligibility


def training_batches(
    data: DataConfig,
    layouts: list[ShardLayout],
    checksums: dict[str, str],
    transform,
    *,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    start_batch: int = 0,
    stats: StreamStats | None = None,
    held_out: Set[int] = frozenset(),
    remap: dict[int, int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """This rank's P×K training batches ``(images, labels, keys)`` from batch ``start_batch``
    on, through a DataLoader of ``data.loader_workers`` processes, on ``device``.

    ``held_out`` classes (validation) are never drawn; ``remap`` turns dataset class ids
    into 0..C−1 for losses with per-class parameters. Natural images travel as uint8 (a
    quarter of the bytes through the loader's shared memory and to the device) and are
    normalised on the device.
    """
    uint8 = hasattr(transform, "normalise")
    stream = PKBatches(
        layouts,
        data.classes_per_batch,
        data.samples_per_class,
        transform,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
        class_buffer=data.class_buffer,
        open_shards=data.open_shards,
        checksums=checksums,
        stats=stats,
        class_filter=(lambda label: label not in held_out) if held_out else None,
        uint8=uint8,
    )
    if rank == 0 and start_batch == 0 and stream.eligibility.excluded:
        log.warning("training data: %s", stream.eligibility.describe_excluded())
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=data.loader_workers,
        persistent_workers=data.loader_workers > 0,
        pin_memory=device.type == "cuda",
    )
    for images, labels, keys in loader:
        if uint8:
            images = transform.normalise(images.to(device, non_blocking=True))
        if remap is not None:
            labels = torch.tensor([remap[int(c)] for c in labels], dtype=torch.long)
        yield images, labels, keys


def only_classes(read_shard, classes: set[int], keep: bool):
    """A shard reader that keeps (or drops) the samples of the given classes."""

    def read(url: str):
        for sample in read_shard(url):
            if (sample[1] in classes) == keep:
                yield sample

    return read


def build_loss(cfg: LossConfig, num_classes: int, embedding_dim: int, seed: int | None = None) -> losses.PairLoss:
    """The configured loss; ``seed`` goes to losses that sample (margin), so every rank
    draws the same samples and a resumed run continues their stream (it is checkpointed)."""
    params = dict(cfg.params)
    cls = losses.loss_class(cfg.name)
    if cls.needs_classes:
        params.setdefault("num_classes", num_classes)
        params.setdefault("embedding_dim", embedding_dim)
    if seed is not None and "seed" in inspect.signature(cls.__init__).parameters:
        params.setdefault("seed", seed)
    return losses.build(cfg.name, **params)


def build_terms(
    cfg: Config,
    model: models.EmbeddingModel,
    num_classes: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[LossTerm]:
    """The config's ``loss.terms`` as LossTerms on the model's heads: each loss built like a
    single loss (per-class parameters over the classes, or the clusters of a pseudo-label
    term), with its own memory of its head when it reads one."""
    out = []
    for i, (term, key) in enumerate(zip(cfg.loss.terms, term_ids(cfg.loss), strict=True)):
        columns = model.columns(term.head)
        classes = cfg.pseudo_labels.clusters if term.labels == "pseudo" else num_classes
        loss_fn = build_term_loss(term, classes, model, cfg.train.seed + i).to(device, dtype)
        memory = None
        if term.memory:
            memory = CrossBatchMemory(cfg.memory.size, columns.stop - columns.start, dtype=dtype, device=device)
        other = model.columns(term.other_head) if term.other_head else None
        out.append(LossTerm(key, loss_fn, term.weight, columns, other, memory, term.labels == "pseudo"))
    return out


def build_term_loss(term: LossTermConfig, num_classes: int, model: models.EmbeddingModel, seed: int) -> losses.PairLoss:
    """One term's loss, sized to its head (and to its second head: adversarial's aux_dim)."""
    columns = model.columns(term.head)
    params = dict(term.params)
    if term.other_head:
        other = model.columns(term.other_head)
        params.setdefault("aux_dim", other.stop - other.start)
    return build_loss(LossConfig(name=term.name, params=params), num_classes, columns.stop - columns.start, seed)


def build_optimizer(cfg: OptimConfig, model: models.EmbeddingModel, loss_fn: nn.Module) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.lr, cfg.head_lr or None)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.loss_lr or cfg.lr})
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def build_lr_schedule(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The configured schedule (warm-up, step or cosine decay), or None for a constant rate."""
    settings = ScheduleSettings(
        schedule=cfg.schedule,
        total_steps=total_steps,
        milestones=tuple(cfg.milestones),
        gamma=cfg.gamma,
        warmup_steps=cfg.warmup_steps,
        warmup_start=cfg.warmup_start,
        cosine_floor=cfg.cosine_floor,
    )
    return build_scheduler(optimizer, settings)


def build_memory(cfg: Config, dtype: torch.dtype, device: torch.device) -> CrossBatchMemory | None:
    """The cross-batch memory, or None when ``memory.size`` is 0."""
    if not cfg.memory.size:
        return None
    return CrossBatchMemory(cfg.memory.size, cfg.model.embedding_dim, dtype=dtype, device=device)


def class_remap(loss: LossConfig, train_classes: list[int]) -> dict[int, int] | None:
    """Dataset class id -> 0..C-1 when a loss on class labels has per-class parameters, else None."""
    names = [t.name for t in loss.terms if t.labels == "class"] if loss.terms else [loss.name]
    if any(losses.loss_class(name).needs_classes for name in names):
        # per-class parameters are indexed 0..C-1; shards carry the dataset's class ids
        return {c: i for i, c in enumerate(train_classes)}
    return None


def validation_urls(manifest, split: str, val_classes: set[int]) -> list[str]:
    """The split's shards holding any validation class."""
    shards = manifest.split(split)["shards"]
    return [u for u, s in zip(manifest.shard_urls(split), shards, strict=True) if val_classes & set(s["classes"])]


def test_plan(cfg: Config) -> TestPlan:
    """The config's test evaluation (shared by training's evaluations and ``dmlray eval``)."""
    return TestPlan(
        test_split=cfg.data.test_split,
        gallery_split=cfg.data.gallery_split,
        ks=cfg.eval.ks,
        batch_size=cfg.data.eval_batch_size,
        channels=cfg.data.channels,
        baseline=cfg.eval.baseline,
        nmi=cfg.eval.nmi,
    )


@dataclass
class TrainingStream:
    """The Trainer's ``batches(start_step)``: this rank's P×K batches from a step on."""

    data: DataConfig
    layouts: list[ShardLayout]
    checksums: dict[str, str]
    transform: Callable
    seed: int
    rank: int
    world_size: int
    device: torch.device
    accumulate: int
    stats: StreamStats
    held_out: set[int]
    remap: dict[int, int] | None

    def __call__(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        return training_batches(
            self.data,
            self.layouts,
            self.checksums,
            self.transform,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            start_batch=start_step * self.accumulate,
            stats=self.stats,
            held_out=self.held_out,
            remap=self.remap,
        )


@dataclass
class WorkerEvaluation:
    """The Trainer's ``evaluate(step)``: the test split, the validation classes when held
    out, and at the last step the baseline, NMI and the run folder's pictures."""

    model: nn.Module
    """The unwrapped model: evaluation needs no DDP (no backward); every rank embeds its own shards."""
    manifest: Manifest
    plan: TestPlan
    transform: Callable
    device: torch.device
    steps: int
    rank: int
    val_classes: set[int]
    val_urls: list[str]
    run_folder: object | None

    def __call__(self, step: int) -> dict:
        final = step >= self.steps
        t0 = time.perf_counter()
        evaluation = evaluate_test(self.model, self.manifest, self.plan, self.transform, self.device, final=final)
        out: dict = dict(evaluation.metrics)
        if self.val_classes:
            out.update(self.validation_metrics())
        if evaluation.baseline is not None:
            out["baseline"] = evaluation.baseline
        if final and self.run_folder is not None:
            write_evaluation_pictures(self.run_folder, self.manifest, self.plan, evaluation)
        out["eval_seconds"] = time.perf_counter() - t0
        if self.rank == 0:
            log.info(
                "step %d: Recall@1 %.4f MAP@R %.4f (%.1fs)",
                step,
                out.get("recall@1", float("nan")),
                out.get("map@r", float("nan")),
                out["eval_seconds"],
            )
        return out

    def validation_metrics(self) -> dict[str, float]:
        """``val/``-prefixed metrics of the held-out classes: model selection looks at
        these, never at the test split."""
        val = embed_split(
            self.model,
            self.val_urls,
            self.transform,
            self.plan.batch_size,
            self.device,
            read_shard=only_classes(iter_shard, self.val_classes, keep=True),
        )
        return {f"val/{k}": v for k, v in score(val, self.plan.ks, nmi=False).items()}


def training_stream(
    cfg: Config,
    ctx: WorkerContext,
    manifest: Manifest,
    transform: Callable,
    stats: StreamStats,
    train_classes: list[int],
    val_classes: set[int],
) -> TrainingStream:
    """This rank's training batches of the config's train split, validation classes held out."""
    return TrainingStream(
        cfg.data,
        training_layouts(manifest, cfg.data.train_split),
        manifest.shard_checksums(cfg.data.train_split),
        transform,
        seed=cfg.train.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=ctx.device,
        accumulate=cfg.train.accumulate,
        stats=stats,
        held_out=val_classes,
        remap=class_remap(cfg.loss, train_classes),
    )


def worker_evaluation(
    cfg: Config, ctx: WorkerContext, manifest: Manifest, model: nn.Module, transform: Callable, val_classes: set[int]
) -> WorkerEvaluation:
    """The config's evaluation of ``model`` on this rank."""
    return WorkerEvaluation(
        model,
        manifest,
        test_plan(cfg),
        transform,
        ctx.device,
        steps=cfg.train.steps,
        rank=ctx.rank,
        val_classes=val_classes,
        val_urls=validation_urls(manifest, cfg.data.train_split, val_classes),
        run_folder=ctx.run_folder,
    )


@dataclass
class PseudoLabelRefresh:
    """The Trainer's pseudo-label source (MIC): every ``every`` steps (and before the first)
    the training split is embedded with one head and clustered; batches look their
    samples' clusters up by key. Every rank embeds its shards and gathers the whole split,
    so every rank clusters the same rows (PseudoLabels checks and agrees on them)."""

    labels: PseudoLabels
    model: nn.Module
    """The unwrapped model's view of the clustered head."""
    shard_urls: list[str]
    transform: Callable
    batch_size: int
    device: torch.device
    every: int
    seed: int
    held_out: set[int]
    """Validation classes: never clustered (they never enter a batch)."""
    center_first_by_class: bool = True
    """Cluster the first time the embeddings minus their class means (MIC's initial clustering)."""

    def update(self, step: int) -> None:
        if self.labels.ready and step % self.every:
            return
        read = only_classes(iter_shard, self.held_out, keep=False) if self.held_out else iter_shard
        split = embed_split(self.model, self.shard_urls, self.transform, self.batch_size, self.device, read_shard=read)
        self.labels.refresh(
            split["keys"],
            split["embeddings"],
            seed=self.seed + self.labels.generation,
            class_labels=split["labels"] if self.center_first_by_class and not self.labels.ready else None,
        )

    def lookup(self, keys) -> torch.Tensor:
        return self.labels.lookup(keys, self.device)

    def state_dict(self) -> dict:
        return self.labels.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.labels.load_state_dict(state)


def pseudo_label_source(
    cfg: Config,
    manifest: Manifest,
    model: models.EmbeddingModel,
    transform: Callable,
    device: torch.device,
    held_out: set[int],
) -> PseudoLabelRefresh | None:
    """The pseudo-labels the config's terms read, or None when none does."""
    if not any(t.labels == "pseudo" for t in cfg.loss.terms):
        return None
    section: PseudoLabelConfig = cfg.pseudo_labels
    return PseudoLabelRefresh(
        PseudoLabels(section.clusters),
        model.view(pseudo_label_head(cfg)),
        manifest.shard_urls(cfg.data.train_split),
        transform,
        cfg.data.eval_batch_size,
        device,
        section.every,
        cfg.train.seed,
        held_out,
        section.center_first_by_class,
    )


def build_trainer(cfg: Config, ctx: WorkerContext) -> Trainer:
    """Model, loss, optimizer, data stream and evaluation wired into a Trainer."""
    cfg = elastic.rank_share(cfg, ctx.world_size)  # an elastic run's ranks split the global batch
    rows = elastic.BatchRows()
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    manifest = read_manifest(cfg.data.url)
    train_classes, val_classes = split_validation(
        manifest.classes(cfg.data.train_split), cfg.data.val_fraction, cfg.train.seed
    )
    model = build_model(cfg.model, cfg.data.channels).to(ctx.device, dtype)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    terms = build_terms(cfg, model, len(train_classes), dtype, ctx.device) if cfg.loss.terms else []
    loss_fn: nn.Module
    if terms:
        loss_fn = nn.ModuleDict({t.key: t.loss_fn for t in terms})
    else:
        loss_fn = build_loss(cfg.loss, len(train_classes), cfg.model.embedding_dim, cfg.train.seed)
        loss_fn = loss_fn.to(ctx.device, dtype)
    optimizer = build_optimizer(cfg.optim, model, loss_fn)
    train_tf, eval_tf = build_transforms(cfg, model)
    stats = StreamStats()
    batches = training_stream(cfg, ctx, manifest, train_tf, stats, train_classes, set(val_classes))
    evaluate = worker_evaluation(cfg, ctx, manifest, model.view(cfg.model.eval_head), eval_tf, set(val_classes))
    return Trainer(
        model=ctx.wrap_model(model),
        raw_model=model,
        loss_fn=None if terms else cast(losses.PairLoss, loss_fn),
        terms=terms,
        pseudo_labels=pseudo_label_source(cfg, manifest, model, eval_tf, ctx.device, set(val_classes)),
        optimizer=optimizer,
        scheduler=build_lr_schedule(cfg.optim, optimizer, cfg.train.steps),
        batches=functools.partial(counted_batches, rows, batches),
        steps=cfg.train.steps,
        device=ctx.device,
        dtype=dtype,
        memory=None if terms else build_memory(cfg, dtype, ctx.device),
        memory_start=cfg.memory.start,
        memory_weight=cfg.memory.weight,
        memory_ramp_steps=cfg.memory.ramp_steps,
        evaluate=evaluate,
        eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every,
        report=ctx.report,
        accumulate=cfg.train.accumulate,
        accumulate_mode=cfg.train.accumulate_mode,
        clip_grad_norm=cfg.train.clip_grad_norm,
        amp=cfg.train.amp,
        channels_last=cfg.train.channels_last,
        extra_metrics=functools.partial(step_metrics, stats, rows, ctx.world_size),
    )


def counted_batches(rows: elastic.BatchRows, batches: Callable, start_step: int) -> Iterator[tuple]:
    """The stream from ``start_step`` on, its rows counted (the global batch is recorded, not derived)."""
    return rows.count(batches(start_step))


def step_metrics(stats: StreamStats, rows: elastic.BatchRows, world_size: int) -> dict:
    """What every logged step records beside the loss: stream health, world size, global batch rows."""
    return {**stats.as_metrics(), "world_size": world_size, "global_batch": rows.global_rows()}


def run_worker(cfg: Config, ctx: WorkerContext) -> dict:
    """Train per the config; returns the final metrics (on every rank)."""
    trainer = build_trainer(cfg, ctx)
    if ctx.restored is not None:
        trainer.load_state_dict(ctx.restored)
        log.info("rank %d resumed at step %d", ctx.rank, trainer.step)
    history = trainer.train()
    return history[-1] if history else {}
