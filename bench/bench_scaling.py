"""Ray Train's per-step overhead: the same dmlray loop under Ray Train and under torchrun.

Both run 2 CPU processes (gloo DDP) on the glyphs dataset from local disk, the same
config and steps; throughput is read from the loop's own metrics after a warm-up
window, so process start-up is excluded. The two alternate over several rounds (the
same machine drifts by ~10% between runs) and the medians are compared. Also measured:
the all-gather and the cross-batch-memory term per step.

    python bench/bench_scaling.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def steady_rate(history: list[dict], warmup: int) -> float:
    """Mean global samples/s over the log windows after the warm-up steps."""
    rates = [h["samples_per_second"] for h in history if h["step"] > warmup]
    return statistics.mean(rates)


def gather_and_memory_costs(batch: int, dim: int, memory: int, repeats: int) -> dict:
    """Per-step cost (ms) of the MS loss against the global batch, and of the memory term, in one process."""
    from dmlray import losses
    from dmlray.training.memory import CrossBatchMemory

    torch.manual_seed(0)
    loss_fn = losses.build("multi_similarity")
    mem = CrossBatchMemory(memory, dim)
    for _ in range(memory // (2 * batch) + 1):
        mem.enqueue(
            torch.nn.functional.normalize(torch.randn(2 * batch, dim), dim=1), torch.randint(0, 300, (2 * batch,))
        )
    x = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1).requires_grad_()
    y = torch.randint(0, 300, (batch,))
    g = torch.cat([x, torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)])
    gy = torch.cat([y, torch.randint(0, 300, (batch,))])

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e3

    own = torch.arange(batch)
    batch_ms = timed(lambda: loss_fn(x, y, g, gy, own).backward())
    emb, lab = mem.contents()
    memory_ms = timed(lambda: (mem.enqueue(g.detach(), gy), loss_fn(x, y, emb, lab, own).backward()))
    return {"batch_term_ms": batch_ms, "memory_term_ms": memory_ms}


def gloo_gather_cost(batch: int, dim: int) -> float:
    """ms per all_gather_with_grad forward+backward of (batch, dim) across 2 gloo processes."""
    code = f"""
import time, torch, torch.distributed as dist
from dmlray.training.distributed import all_gather_with_grad
dist.init_process_group("gloo")
x = torch.randn({batch}, {dim}, requires_grad=True)
for i in range(220):
    if i == 20:
        dist.barrier(); t0 = time.perf_counter()
    all_gather_with_grad(x).sum().backward()
dist.barrier()
if dist.get_rank() == 0:
    print((time.perf_counter() - t0) / 200 * 1e3)
dist.destroy_process_group()
"""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", f.name],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(f.name)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round")
    parser.add_argument(
        "--rounds", type=int, default=0, help="alternating torchrun/Ray rounds (default 3; 1 with --quick)"
    )
    args = parser.parse_args()
    steps = 120 if args.quick else 400
    warmup = 20 if args.quick else 50
    rounds = args.rounds or (1 if args.quick else 3)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from dmlray.config import config_to_dict, load_config
    from dmlray.data.pack import Recipe, pack
    from dmlray.jobs.launch import ensure_ray, launch

    rates: dict[str, list[float]] = {"torchrun": [], "ray": []}
    walls: dict[str, list[float]] = {"torchrun": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "glyphs"
        pack(Recipe(dataset="glyphs", shard_bytes=256 * 1024, options={"max_classes": 300}), str(data), progress=False)
        common = [
            f"data.url={data}",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            "train.log_every=10",
            "eval.baseline=false",
            "memory.start=0",
            "run.num_workers=2",
            f"run.storage_path={tmp / 'runs'}",
        ]
        ensure_ray()  # one cluster for every Ray round: its start-up is not the loop's cost
        # rounds alternate so that drifts in the machine's speed hit both alike
        for r in range(rounds):
            cfg = load_config("demo", common + [f"run.name=torchrun{r}"])
            (tmp / "torchrun.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
            t0 = time.perf_counter()
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "torchrun"),
                    "--nproc_per_node",
                    "2",
                    str(ROOT / "bench" / "torchrun_worker.py"),
                    str(tmp / "torchrun.yaml"),
                    str(tmp / "torchrun.json"),
                ],
                check=True,
                capture_output=True,
            )
            walls["torchrun"].append(time.perf_counter() - t0)
            rates["torchrun"].append(steady_rate(json.loads((tmp / "torchrun.json").read_text()), warmup))

            t0 = time.perf_counter()
            launch(load_config("demo", common + [f"run.name=ray{r}"]))
            walls["ray"].append(time.perf_counter() - t0)
            history = [
                json.loads(line) for line in (tmp / "runs" / f"ray{r}" / "metrics.jsonl").read_text().splitlines()
            ]
            rates["ray"].append(steady_rate(history, warmup))
            print(
                f"round {r + 1}/{rounds}: torchrun {rates['torchrun'][-1]:.1f}, "
                f"Ray Train {rates['ray'][-1]:.1f} samples/s",
                flush=True,
            )
        import ray

        ray.shutdown()

    costs = gather_and_memory_costs(batch=64, dim=64, memory=2048, repeats=50)
    gather_ms = gloo_gather_cost(batch=64, dim=64)
    torchrun_rate, ray_rate = statistics.median(rates["torchrun"]), statistics.median(rates["ray"])
    step_ms = 1e3 * 128 / ray_rate
    print(
        f"training loop, 2 CPU workers, {steps} steps (first {warmup} excluded), global batch 128, "
        f"median of {rounds} alternating rounds:"
    )
    print(
        f"  torchrun    {torchrun_rate:8.1f} samples/s  ({1e3 * 128 / torchrun_rate:6.1f} ms/step, "
        f"wall {statistics.median(walls['torchrun']):.0f}s incl. start-up)"
    )
    print(
        f"  Ray Train   {ray_rate:8.1f} samples/s  ({step_ms:6.1f} ms/step, "
        f"wall {statistics.median(walls['ray']):.0f}s incl. start-up)"
    )
    spread = {k: 100 * (max(v) - min(v)) / statistics.median(v) for k, v in rates.items()}
    print(
        f"  Ray Train per-step overhead vs torchrun: {100 * (torchrun_rate / ray_rate - 1):+.1f}%  (goal: under 5%; "
        f"round-to-round spread torchrun {spread['torchrun']:.0f}%, Ray {spread['ray']:.0f}%)"
    )
    print("per-step costs inside the loop (batch 64 per rank, 64-d, memory 2048):")
    print(
        f"  all_gather_with_grad fwd+bwd, 2 gloo ranks: {gather_ms:.2f} ms  "
        f"({100 * gather_ms / step_ms:.1f}% of a step)"
    )
    print(f"  MS loss vs global batch fwd+bwd:            {costs['batch_term_ms']:.2f} ms")
    print(
        f"  memory enqueue + MS loss vs memory fwd+bwd: {costs['memory_term_ms']:.2f} ms  "
        f"({100 * costs['memory_term_ms'] / step_ms:.1f}% of a step)"
    )


if __name__ == "__main__":
    main()
