"""What gradient accumulation costs: peak memory and time per global batch.

ResNet-18 (torchvision, no pretrained weights) at 64×64, multi-similarity loss, one
optimisation step over a global batch of 512 as
  * big: one batch of 512 (the peer: what accumulation stands in for);
  * exact: 8 micro-batches of 64 by gradient caching (``train.accumulate_mode=exact``, the
    default): the big batch's gradient, two forwards per micro-batch;
  * independent: 8 micro-batches of 64, each its own loss (``accumulate_mode=independent``):
    one forward, but pairs form only within a micro-batch.
Each variant runs in its own process so peak resident memory (VmHWM) is its own; "step
peak" subtracts the process's resident memory before the first step (torch, the model,
the data). Times are the minimum over the timed steps after a warm-up step.

    python bench/bench_accumulation.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmlray import losses  # noqa: E402
from dmlray.config import ModelConfig  # noqa: E402
from dmlray.jobs.worker import build_model  # noqa: E402
from dmlray.training.trainer import Trainer  # noqa: E402

VARIANTS = {"big": (1, "exact"), "exact": (8, "exact"), "independent": (8, "independent")}
SAMPLES_PER_CLASS = 4  # K; a micro-batch of 64 holds 16 whole classes


def resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def micro_batches(global_batch: int, n: int, size: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batch (K per class) for every variant, split into n micro-batches."""
    gen = torch.Generator().manual_seed(step)
    images = torch.randn(global_batch, 3, size, size, generator=gen)
    labels = torch.arange(global_batch // SAMPLES_PER_CLASS).repeat_interleave(SAMPLES_PER_CLASS)
    return list(zip(images.chunk(n), labels.chunk(n), strict=True))


def run_variant(name: str, global_batch: int, size: int, steps: int) -> dict:
    """Child process: time ``steps`` steps after one warm-up; peak memory of the whole run."""
    torch.manual_seed(0)
    n, mode = VARIANTS[name]
    model = build_model(ModelConfig(backbone="resnet18", embedding_dim=128), channels=3)
    trainer = Trainer(
        model=model,
        loss_fn=losses.build("multi_similarity"),
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
        scheduler=None,
        batches=lambda start: iter(()),
        steps=steps + 1,
        device=torch.device("cpu"),
        accumulate=n,
        accumulate_mode=mode,
    )
    data = [micro_batches(global_batch, n, size, step) for step in range(steps + 1)]
    before = resident_mib("VmRSS")
    times = []
    for batch in data:
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    peak = resident_mib("VmHWM")
    return {"seconds": min(times[1:]), "peak_mib": peak, "step_peak_mib": peak - before}


def measure(name: str, global_batch: int, size: int, steps: int) -> dict:
    """Run one variant in a fresh interpreter so no other variant's memory counts."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, "--batch", str(global_batch), "--size", str(size)]
        + ["--steps", str(steps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="global batch 128, 32×32 inputs, one timed step")
    parser.add_argument("--steps", type=int, default=0, help="timed steps after the warm-up (default 2; 1 quick)")
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.batch, args.size, args.steps)))
        return
    global_batch, size = (128, 32) if args.quick else (512, 64)
    steps = args.steps or (1 if args.quick else 2)
    print(
        f"ResNet-18 {size}×{size}, MS loss, global batch {global_batch}, CPU ({torch.get_num_threads()} threads), "
        f"min of {steps} steps after 1 warm-up; one process per variant"
    )
    results = {name: measure(name, global_batch, size, steps) for name in VARIANTS}
    big = results["big"]
    print(f"{'variant':<22}{'s/step':>8}{'× big':>7}{'peak MiB':>10}{'step peak MiB':>15}{'× big':>7}")
    for name, r in results.items():
        n, _ = VARIANTS[name]
        label = f"{name} {n}×{global_batch // n}"
        print(
            f"{label:<22}{r['seconds']:>8.2f}{r['seconds'] / big['seconds']:>7.2f}{r['peak_mib']:>10.0f}"
            f"{r['step_peak_mib']:>15.0f}{r['step_peak_mib'] / big['step_peak_mib']:>7.2f}"
        )


if __name__ == "__main__":
    main()
