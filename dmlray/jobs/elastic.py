"""Elastic runs: Ray Train's worker bounds, and each rank's share of the fixed global batch.

A run with ``run.min_workers`` between 1 and ``run.num_workers`` is elastic: Ray Train
(2.60) starts it with as many workers as the cluster holds within the bounds, restarts the
worker group smaller from the latest checkpoint when a worker is lost, and bigger when the
resize check (``run.resize_check_s``) finds room. The global batch is the full-size one,
``data.classes_per_batch × run.num_workers`` classes of K samples: at world size w every
rank takes ``1/w`` of those classes (``config.validate`` refuses bounds holding a size that
cannot split them), so the loss, learning rate and schedule mean the same at every size.

Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from dmlray.config import Config, RunConfig, splitting_world_sizes
from dmlray.training.distributed import all_gather_list


def scaling_workers(run: RunConfig) -> int | tuple[int, int]:
    """``ScalingConfig(num_workers=...)``: the (min, max) bounds of an elastic run, else the size."""
    return (run.min_workers, run.num_workers) if run.elastic else run.num_workers


def scaling_arguments(run: RunConfig) -> dict:
    """The worker-count and placement arguments of Ray Train's ``ScalingConfig``."""
    out: dict = {"num_workers": scaling_workers(run)}
    if run.elastic:
        out["elastic_resize_monitor_interval_s"] = run.resize_check_s
    if run.worker_labels and run.num_workers > 0:
        out["label_selector"] = dict(run.worker_labels)  # one selector for every worker
    return out


def global_classes(cfg: Config) -> int:
    """Classes in a global batch: the full-size run's, whatever the world size now."""
    return cfg.data.classes_per_batch * max(1, cfg.run.num_workers)


def rank_share(cfg: Config, world_size: int) -> Config:
    """The config a rank of a ``world_size`` worker group trains with: for an elastic run,
    ``data.classes_per_batch`` becomes this size's share of the global classes. A fixed-size
    run's config is returned as it is."""
    if not cfg.run.elastic:
        return cfg
    total = global_classes(cfg)
    if total % world_size:
        fits = splitting_world_sizes(total, cfg.run.min_workers, cfg.run.num_workers)
        raise ValueError(
            f"world size {world_size} cannot split the global batch of {total} classes "
            f"(data.classes_per_batch={cfg.data.classes_per_batch} x run.num_workers={cfg.run.num_workers}); "
            f"sizes that can: {', '.join(map(str, fits))}"
        )
    data = dataclasses.replace(cfg.data, classes_per_batch=total // world_size)
    return dataclasses.replace(cfg, data=data)


class BatchRows:
    """Counts the rows of each local batch that passes, so a log step can record the global
    batch the ranks actually trained on (summed over ranks, not derived from the config)."""

    def __init__(self) -> None:
        self.local = 0

    def count(self, batches: Iterable[tuple]) -> Iterator[tuple]:
        for batch in batches:
            self.local = int(batch[1].shape[0])
            yield batch

    def global_rows(self) -> int:
        """The latest batch's rows on all ranks together (a collective: every rank calls it)."""
        return sum(all_gather_list([self.local]))
