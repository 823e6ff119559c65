"""Is the shard stream fast enough to keep the accelerator busy?

Training images/s of ResNet-50 (224) and BN-Inception (227), MS loss, bf16 autocast and
channels-last on CUDA, fed (a) by the real shard stream (JPEG shards → decode → seed
recipe augmentation → P×K batches, DataLoader workers) and (b) by synthetic tensors
already on the device (the compute-only limit), in one run. Goal: stream / synthetic
≥ 0.90. On a CPU-only machine it runs a few small steps so the pipeline is exercised,
but there the stream and the model share the same cores, so the ratio says little.

    python bench/bench_backbones.py [--quick] [--steps N] [--workers W]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import make_images  # noqa: E402  (same folder: the synthetic JPEG maker)

from dmlray import losses  # noqa: E402
from dmlray.config import ModelConfig  # noqa: E402
from dmlray.data.pack import Recipe, pack  # noqa: E402
from dmlray.data.pk_batches import PKBatches  # noqa: E402
from dmlray.data.shards import Manifest, read_manifest  # noqa: E402
from dmlray.data.transforms import make_transform  # noqa: E402
from dmlray.jobs.worker import build_model  # noqa: E402
from dmlray.training.trainer import training_loss  # noqa: E402


def train_rate(
    model, loss_fn, optimizer, batches, steps: int, warmup: int, device, amp: bool, channels_last: bool
) -> float:
    """Images per second over ``steps`` optimisation steps after ``warmup`` ones."""
    done, t0 = 0, time.perf_counter()
    for i, (images, labels) in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, done = time.perf_counter(), 0
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            result = training_loss(model, loss_fn, images, labels)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        done += labels.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def stream_batches(
    manifest: Manifest, split: str, P: int, K: int, transform, workers: int, device: torch.device
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """The trainer's input path: P×K uint8 batches from the split's shards (pinned on CUDA),
    normalised on the device. The one place the benchmarks build the training stream."""
    stream = PKBatches(
        manifest.layouts(split) or manifest.shard_urls(split),
        P,
        K,
        transform,
        seed=0,
        class_buffer=2 * P,
        open_shards=2,
        uint8=True,
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False
    )
    for images, labels, _ in loader:
        yield transform.normalise(images.to(device, non_blocking=True)), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 30 on CUDA, 3 on CPU)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 8 on CUDA, 2 on CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (30 if cuda else (2 if args.quick else 3))
    warmup = 5 if cuda else 1
    workers = args.workers or (8 if cuda else 2)
    P, K = (16, 4) if cuda else (4, 2)
    print(
        f"device {device}, {steps} timed steps after {warmup}, batch {P}×{K}, {workers} loader workers, "
        f"bf16+channels-last {'on' if cuda else 'off (CPU)'}"
    )

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        count = 400 if (args.quick or not cuda) else 4000
        make_images(tmp / "raw", count)
        pack(
            Recipe(dataset="folder", shard_bytes=8 * 2**20, options={"test_fraction": 0}),
            str(tmp / "shards"),
            str(tmp / "raw"),
            progress=False,
        )
        manifest = read_manifest(str(tmp / "shards"))
        print(f"{'backbone':<14}{'size':>5}{'stream img/s':>14}{'synthetic img/s':>17}{'ratio':>7}")
        for backbone, size in (("resnet50", 224), ("bn_inception", 227)):
            torch.manual_seed(0)
            model = build_model(ModelConfig(backbone=backbone, embedding_dim=512), channels=3).to(device)
            if cuda:
                model = model.to(memory_format=torch.channels_last)
            loss_fn = losses.build("multi_similarity")
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
            convention = getattr(model.backbone, "input_convention", "rgb_imagenet")
            transform = make_transform("natural", size, 3, train=True, convention=convention)
            # uint8 batches, normalised on the device: what the trainer does
            normalised = stream_batches(manifest, "train", P, K, transform, workers, device)
            streamed = train_rate(model, loss_fn, optimizer, normalised, steps, warmup, device, cuda, cuda)
            normalised.close()  # stops the loader's workers
            fixed = (
                torch.randn(P * K, 3, size, size, device=device),
                torch.arange(P, device=device).repeat_interleave(K),
            )
            synthetic = train_rate(
                model, loss_fn, optimizer, itertools.repeat(fixed), steps, warmup, device, cuda, cuda
            )
            print(f"{backbone:<14}{size:>5}{streamed:>14.1f}{synthetic:>17.1f}{streamed / synthetic:>7.2f}")
    print("goal on a GPU: stream / synthetic >= 0.90")


if __name__ == "__main__":
    main()
