"""The test evaluation of a model: embed the test (and gallery) split, score it, score raw
pixels as the baseline, draw the pictures.

Training's final evaluation (``dmlray.jobs.worker``) and ``dmlray eval``
(``dmlray.jobs.commands``) both go through :func:`evaluate_test` and
:func:`write_evaluation_pictures`, so the two report the same numbers for the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dmlray.data.shards import Manifest
from dmlray.evaluation.embedding import embed_split, score


@dataclass(frozen=True)
class TestPlan:
    """What a test evaluation embeds and measures."""

    __test__ = False  # a plan, not a pytest test class

    test_split: str
    """The query split (leave-one-out retrieval within it without a gallery)."""
    gallery_split: str | None
    """The gallery split queries are matched against, or None."""
    ks: Sequence[int]
    """K values of Recall@K."""
    batch_size: int
    """Images per embedding batch."""
    channels: int
    """Image channels, for decoding the pictures' images."""
    baseline: bool
    """Also score raw pixels (the final evaluation only)."""
    nmi: bool
    """Also compute NMI (the final evaluation only)."""


@dataclass
class TestEvaluation:
    """The embedded splits and their scores."""

    __test__ = False  # a result, not a pytest test class

    query: dict
    """``embed_split`` of the test split (with 'pixels' when the baseline was scored)."""
    gallery: dict | None
    """``embed_split`` of the gallery split, or None."""
    metrics: dict[str, float]
    """The model's retrieval metrics."""
    baseline: dict[str, float] | None
    """Raw pixels' retrieval metrics, or None when not scored."""


def embed_manifest_split(
    model: nn.Module,
    manifest: Manifest,
    split: str,
    transform: Callable,
    batch_size: int,
    device: torch.device,
    *,
    pixels: bool,
    progress: bool,
) -> dict:
    """``embed_split`` of a whole manifest split, its count and checksums checked."""
    return embed_split(
        model,
        manifest.shard_urls(split),
        transform,
        batch_size,
        device,
        expected=manifest.num_samples(split),
        pixels=pixels,
        progress=progress,
        checksums=manifest.shard_checksums(split),
    )


def evaluate_test(
    model: nn.Module,
    manifest: Manifest,
    plan: TestPlan,
    transform: Callable,
    device: torch.device,
    *,
    final: bool = True,
    progress: bool = False,
) -> TestEvaluation:
    """Embed and score the plan's splits; the baseline and NMI only when ``final``.

    Every rank calls it (embedding is shared across ranks); every rank gets the scores.
    """
    pixels = final and plan.baseline

    def embed(split: str) -> dict:
        return embed_manifest_split(
            model, manifest, split, transform, plan.batch_size, device, pixels=pixels, progress=progress
        )

    query = embed(plan.test_split)
    gallery = embed(plan.gallery_split) if plan.gallery_split else None
    metrics = score(query, plan.ks, gallery, nmi=final and plan.nmi)
    baseline = score(query, plan.ks, gallery, key="pixels", nmi=plan.nmi) if pixels else None
    return TestEvaluation(query, gallery, metrics, baseline)


def write_evaluation_pictures(folder, manifest: Manifest, plan: TestPlan, evaluation: TestEvaluation) -> list[str]:
    """retrieval_grid.png and recall_at_k.png of an evaluation in the run folder; their URLs."""
    from dmlray.evaluation.pictures import write_pictures

    return write_pictures(
        folder,
        evaluation.query,
        evaluation.gallery,
        manifest.shard_urls(plan.test_split),
        manifest.shard_urls(plan.gallery_split) if plan.gallery_split else None,
        plan.channels,
        {"dmlray": evaluation.metrics, "raw pixels": evaluation.baseline or {}},
    )
