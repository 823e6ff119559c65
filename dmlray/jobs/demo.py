"""``dmlray demo``: the whole system on the built-in glyphs, on this machine.

1. start a SeaweedFS S3 server on loopback (with credentials), 2. pack the glyphs into
shards there, 3. train with Ray Train (2 workers, gloo DDP) streaming from S3 with the MS
loss and a global cross-batch memory, then print Recall@K and MAP@R against the raw-pixel
baseline and where the run folder and pictures are, and stop the server.

What it prints is a short story: these three steps, one progress line per logged step
(with Recall@1 at each evaluation) and the results. Ray's own output is kept in its log
files unless ``--verbose`` (dmlray.jobs.output).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dmlray.config import Config, load_config
from dmlray.data.pack import load_recipe, pack
from dmlray.data.shards import read_manifest
from dmlray.data.storage import split_s3
from dmlray.devtools.seaweed import SeaweedS3

SUBSET_SHARD_BYTES = 16 * 1024  # a 60-class subset: ~18 shards per split


def say(line: str) -> None:
    print(line, flush=True)


def describe_dataset(cfg: Config) -> str:
    """The splits as packed: classes and images to train on, and held out."""
    manifest = read_manifest(cfg.data.url)
    train, test = cfg.data.train_split, cfg.data.test_split
    return (
        f"{len(manifest.classes(train))} training classes ({manifest.num_samples(train)} images), "
        f"{len(manifest.classes(test))} held-out classes ({manifest.num_samples(test)} images) for retrieval"
    )


def run_demo(out: str = "demo-out", overrides: Sequence[str] = (), max_classes: int = 0) -> dict:
    """The demo, its data and runs in ``out``; ``max_classes`` > 0 renders a random subset of
    the glyph classes (seeded by the recipe's split seed)."""
    out_dir = Path(out).resolve()
    cfg = load_config("demo", [f"run.storage_path={out_dir / 'runs'}", *overrides])
    bucket, _ = split_s3(cfg.data.url)
    # a demo is a fresh run: the same name would otherwise resume the previous one
    shutil.rmtree(out_dir / "runs" / cfg.run.name, ignore_errors=True)
    shutil.rmtree(out_dir / "s3", ignore_errors=True)
    t0 = time.monotonic()
    say("dmlray demo: glyphs on a local S3 server -> Ray Train (DDP) -> retrieval on held-out classes")
    say(f"[1/3] starting SeaweedFS, an S3 server on loopback (its files in {out_dir / 's3'})")
    with SeaweedS3(out_dir / "s3", buckets=[bucket]) as s3, s3.activated():
        try:
            say(f"      S3 endpoint {s3.endpoint}, bucket {bucket!r}")
            say(f"[2/3] rendering and packing the glyphs dataset into {cfg.data.url}")
            recipe = load_recipe("glyphs")
            if max_classes:
                recipe.options["max_classes"] = max_classes
                # smaller shards, so that a subset's splits still give every worker some to
                # read (a worker with no evaluation shard fails the raw-pixel gather)
                recipe.shard_bytes = min(recipe.shard_bytes, SUBSET_SHARD_BYTES)
            manifest = pack(recipe, cfg.data.url, progress=sys.stderr.isatty())
            say(f"      {describe_dataset(cfg)}; manifest {manifest}")
            set_up = time.monotonic() - t0
            say(
                f"[3/3] training {cfg.train.steps} steps on {cfg.run.num_workers} Ray Train workers: "
                f"{cfg.model.backbone}, {cfg.loss.describe()}, memory of {cfg.memory.size} from step "
                f"{cfg.memory.start}; run folder {out_dir / 'runs' / cfg.run.name}"
            )
            from dmlray.jobs.commands import train_and_report

            result = train_and_report(cfg)
        finally:
            try:
                import ray

                ray.shutdown()  # before the object store goes away
            except ImportError:
                pass
    total = time.monotonic() - t0
    say(f"demo finished in {total:.0f}s ({set_up:.0f}s set-up, {total - set_up:.0f}s training and evaluation)")
    return result
