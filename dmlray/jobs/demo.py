"""``dmlray demo``: the whole system on the built-in glyphs, on this machine.

1. start a SeaweedFS S3 server on loopback (with credentials), 2. pack the glyphs into
shards there, 3. train with Ray Train (2 workers, gloo DDP) streaming from S3 with the MS
loss and a global cross-batch memory, 4. print Recall@K and MAP@R against the raw-pixel
baseline and write the plot; then stop the server.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dmlray.config import load_config
from dmlray.data.pack import load_recipe, pack
from dmlray.data.storage import split_s3
from dmlray.devtools.seaweed import SeaweedS3


def run_demo(out: str = "demo-out", overrides: list[str] = ()) -> dict:
    out_dir = Path(out).resolve()
    cfg = load_config("demo", [f"run.storage_path={out_dir / 'runs'}", *overrides])
    bucket, _ = split_s3(cfg.data.url)
    # a demo is a fresh run: the same name would otherwise resume the previous one
    shutil.rmtree(out_dir / "runs" / cfg.run.name, ignore_errors=True)
    shutil.rmtree(out_dir / "s3", ignore_errors=True)
    t0 = time.monotonic()
    print(f"[1/3] starting SeaweedFS (S3 API on loopback, data in {out_dir / 's3'})", flush=True)
    with SeaweedS3(out_dir / "s3", buckets=[bucket]) as s3, s3.activated():
        try:
            print(f"      endpoint {s3.endpoint}, bucket {bucket!r}", flush=True)
            print(f"[2/3] packing the glyphs dataset into {cfg.data.url}", flush=True)
            manifest = pack(load_recipe("glyphs"), cfg.data.url)
            print(f"      wrote {manifest}", flush=True)
            print(
                f"[3/3] training: {cfg.run.num_workers} Ray Train workers, {cfg.loss.name} loss, "
                f"memory {cfg.memory.size} from step {cfg.memory.start}, {cfg.train.steps} steps",
                flush=True,
            )
            from dmlray.jobs.commands import train_and_report

            result = train_and_report(cfg)
        finally:
            try:
                import ray

                ray.shutdown()  # before the object store goes away
            except ImportError:
                pass
    print(f"demo finished in {time.monotonic() - t0:.0f}s")
    return result
