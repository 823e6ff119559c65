"""Build a Trainer from a Config and run it: the body of every training worker.

It knows the rank and how to report, nothing else of Ray: ``launch.py`` supplies a
``WorkerContext`` backed by Ray Train, tests supply their own.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dmlray import losses, models
from dmlray.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig
from dmlray.data.health import StreamStats
from dmlray.data.partition import Eligibility, ShardLayout, check_fillable, eligible_classes
from dmlray.data.pk_batches import PKBatches
from dmlray.data.shards import read_manifest
from dmlray.data.stream import iter_shard, scan_layouts
from dmlray.data.transforms import make_transform
from dmlray.evaluation.embedding import embed_split, score
from dmlray.jobs import elastic
from dmlray.training.memory import CrossBatchMemory
from dmlray.training.trainer import Trainer

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
    model = models.EmbeddingModel(backbone, cfg.embedding_dim, cfg.hidden_dim)
    if cfg.batchnorm == "frozen":
        from dmlray.models.frozen_bn import freeze_batchnorm

        freeze_batchnorm(model)
    elif cfg.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_transforms(cfg: Config, model: models.EmbeddingModel):
    """(train, eval) transforms: glyph or natural-image style from the input size and
    channels, normalised the way the backbone's weights expect (e.g. BGR/[0,255])."""
    convention = getattr(model.backbone, "input_convention", "rgb_imagenet")
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
    held_out: set[int] = frozenset(),
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


def build_loss(cfg: LossConfig, num_classes: int, embedding_dim: int, seed: int | None = None) -> nn.Module:
    """The configured loss; ``seed`` goes to losses that sample (margin), so every rank
    draws the same samples and a resumed run continues their stream (it is checkpointed)."""
    params = dict(cfg.params)
    cls = losses.loss_class(cfg.name)
    if getattr(cls, "needs_classes", False):
        params.setdefault("num_classes", num_classes)
        params.setdefault("embedding_dim", embedding_dim)
    if seed is not None and "seed" in inspect.signature(cls.__init__).parameters:
        params.setdefault("seed", seed)
    return losses.build(cfg.name, **params)


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


def run_worker(cfg: Config, ctx: WorkerContext) -> dict:
    """Train per the config; returns the final metrics (on every rank)."""
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
    loss_fn = build_loss(cfg.loss, len(train_classes), cfg.model.embedding_dim, cfg.train.seed).to(ctx.device, dtype)
    optimizer = build_optimizer(cfg.optim, model, loss_fn)
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.optim.milestones, cfg.optim.gamma)
        if cfg.optim.milestones
        else None
    )
    memory = (
        CrossBatchMemory(cfg.memory.size, cfg.model.embedding_dim, dtype=dtype, device=ctx.device)
        if cfg.memory.size
        else None
    )
    wrapped = ctx.wrap_model(model)

    train_tf, eval_tf = build_transforms(cfg, model)
    train_urls = manifest.shard_urls(cfg.data.train_split)
    val_set = set(val_classes)
    stats = StreamStats()
    val_urls = [
        u for u, s in zip(train_urls, manifest.split(cfg.data.train_split)["shards"]) if val_set & set(s["classes"])
    ]
    if getattr(losses.loss_class(cfg.loss.name), "needs_classes", False):
        # per-class parameters are indexed 0..C-1; shards carry the dataset's class ids
        remap = {c: i for i, c in enumerate(train_classes)}
    else:
        remap = None

    layouts = training_layouts(manifest, cfg.data.train_split)

    def batches(start_step: int):
        return training_batches(
            cfg.data,
            layouts,
            manifest.shard_checksums(cfg.data.train_split),
            train_tf,
            seed=cfg.train.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
            start_batch=start_step * cfg.train.accumulate,
            stats=stats,
            held_out=val_set,
            remap=remap,
        )

    def evaluate(step: int) -> dict:
        final = step >= cfg.train.steps
        t0 = time.perf_counter()
        pixels = final and cfg.eval.baseline
        query = embed_split(
            wrapped_eval,
            manifest.shard_urls(cfg.data.test_split),
            eval_tf,
            cfg.data.eval_batch_size,
            ctx.device,
            expected=manifest.num_samples(cfg.data.test_split),
            pixels=pixels,
            checksums=manifest.shard_checksums(cfg.data.test_split),
        )
        gallery = None
        if cfg.data.gallery_split:
            gallery = embed_split(
                wrapped_eval,
                manifest.shard_urls(cfg.data.gallery_split),
                eval_tf,
                cfg.data.eval_batch_size,
                ctx.device,
                expected=manifest.num_samples(cfg.data.gallery_split),
                pixels=pixels,
                checksums=manifest.shard_checksums(cfg.data.gallery_split),
            )
        metrics = score(query, cfg.eval.ks, gallery, nmi=final and cfg.eval.nmi)
        out = {k: v for k, v in metrics.items()}
        if val_set:
            # model selection looks at these, never at the test split
            val = embed_split(
                wrapped_eval,
                val_urls,
                eval_tf,
                cfg.data.eval_batch_size,
                ctx.device,
                read_shard=only_classes(iter_shard, val_set, keep=True),
            )
            out.update({f"val/{k}": v for k, v in score(val, cfg.eval.ks, nmi=False).items()})
        if pixels:
            out["baseline"] = score(query, cfg.eval.ks, gallery, key="pixels", nmi=cfg.eval.nmi)
        if final and ctx.run_folder is not None:
            from dmlray.evaluation.pictures import write_pictures

            curves = {"dmlray": metrics, "raw pixels": out.get("baseline") or {}}
            write_pictures(
                ctx.run_folder,
                query,
                gallery,
                manifest.shard_urls(cfg.data.test_split),
                manifest.shard_urls(cfg.data.gallery_split) if cfg.data.gallery_split else None,
                cfg.data.channels,
                curves,
            )
        out["eval_seconds"] = time.perf_counter() - t0
        if ctx.rank == 0:
            log.info(
                "step %d: Recall@1 %.4f MAP@R %.4f (%.1fs)",
                step,
                out.get("recall@1", float("nan")),
                out.get("map@r", float("nan")),
                out["eval_seconds"],
            )
        return out

    wrapped_eval = model  # evaluation needs no DDP (no backward); every rank embeds its own shards

    trainer = Trainer(
        model=wrapped,
        raw_model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=lambda start_step: rows.count(batches(start_step)),
        steps=cfg.train.steps,
        device=ctx.device,
        dtype=dtype,
        memory=memory,
        memory_start=cfg.memory.start,
        memory_weight=cfg.memory.weight,
        memory_ramp_steps=cfg.memory.ramp_steps,
        evaluate=evaluate,
        eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every,
        report=ctx.report,
        accumulate=cfg.train.accumulate,
        amp=cfg.train.amp,
        channels_last=cfg.train.channels_last,
        extra_metrics=lambda: {
            "skipped_samples": stats.skipped,
            "bad_shards": stats.bad_shards,
            "world_size": ctx.world_size,
            "global_batch": rows.global_rows(),
        },
    )
    if ctx.restored is not None:
        trainer.load_state_dict(ctx.restored)
        log.info("rank %d resumed at step %d", ctx.rank, trainer.step)
    history = trainer.train()
    return history[-1] if history else {}
