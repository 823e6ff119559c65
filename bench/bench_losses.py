"""Multi-similarity loss: dmlray against pytorch-metric-learning and against the floor.

    python bench/bench_losses.py [--quick] [--device cpu|cuda] [--only-new | --only-rest]

On the same inputs, times forward+backward of
  * the floor: the bare (B, M) similarity product E·Rᵀ, forward and backward
    (``(E @ R.T).sum().backward()``) — no loss can do less;
  * dmlray's MultiSimilarityLoss;
  * pytorch-metric-learning (PML): MultiSimilarityLoss on MultiSimilarityMiner pairs for
    the batch, and CrossBatchMemory(MultiSimilarityLoss, miner=MultiSimilarityMiner) for
    a memory of M entries (its ring buffer holds the same entries, the batch enqueued);
and prints the ratios and whether the two losses agree. Times are the minimum over
repeats after a warm-up (the machine may be shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmlray import losses  # noqa: E402
from dmlray.training.memory import CrossBatchMemory  # noqa: E402


def timed(
    fns: dict[str, Callable[[], Any]],
    repeats: dict[str, int],
    device: torch.device,
    warmup_s: float = 0.3,
    statistic: Callable[[list[float]], float] = min,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Minimum wall time of each function in ms (runs interleaved), and each one's first result.

    ``statistic`` replaces the minimum (e.g. the median, on a machine nobody else uses).

    Interleaving spreads a shared machine's noise over all contenders, and the warm-up
    matters: thread pools and the allocator settle over the first calls (a 1 ms product
    can take 100+ ms for its first few runs on a busy machine). A function is warmed up
    until ``warmup_s`` has passed, at least once.
    """
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        first[name] = fn()
        for _ in range(100):
            if time.perf_counter() - start > warmup_s:
                break
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_ >= repeats[name]:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistic(ts) * 1e3 for name, ts in samples.items()}, first


def make_inputs(batch: int, memory: int, dim: int, classes: int, device: torch.device, seed: int = 0):
    """A batch of P×K-like labels and a memory whose classes overlap it (so pairs exist)."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device)
    labels = (torch.arange(batch) // 4 % classes).to(device)
    mem = F.normalize(torch.randn(memory, dim, generator=g), dim=1).to(device)
    mem_labels = torch.randint(0, classes, (memory,), generator=g).to(device)
    return emb, labels, mem, mem_labels


def bench_batch(batch: int, dim: int, repeats: int, device: torch.device) -> dict:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    emb, labels, _, _ = make_inputs(batch, 0, dim, batch // 4, device)
    ours = losses.build("multi_similarity", alpha=2.0, beta=40.0, base=0.5, margin=0.1)
    pml = pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    x = emb.clone().requires_grad_(True)

    def floor():
        (x @ x.T).sum().backward()
        x.grad = None

    def run_ours():
        value = ours(x, labels)
        value.backward()
        x.grad = None
        return value.detach()

    def run_pml():
        value = pml(x, labels, miner(x, labels))
        value.backward()
        x.grad = None
        return value.detach()

    times, first = timed(
        {"floor": floor, "dmlray": run_ours, "pml": run_pml},
        {"floor": repeats, "dmlray": repeats, "pml": repeats},
        device,
    )
    return {"case": f"batch B={batch} (M=B)", **times, "values": (float(first["dmlray"]), float(first["pml"]))}


def bench_memory(
    batch: int,
    memory: int,
    dim: int,
    repeats: int,
    pml_repeats: int,
    device: torch.device,
    with_pml: bool = True,
    statistic: Callable[[list[float]], float] = min,
) -> dict:
    """The batch against a full memory of ``memory`` entries, enqueued at the same slots on both sides.

    dmlray's side is the trainer's: its CrossBatchMemory, the batch's slots as ``self_index``.
    """
    emb, labels, mem, mem_labels = make_inputs(batch, memory, dim, max(memory // 5, 1), device)
    x = emb.clone().requires_grad_(True)
    cursor = memory // 3
    xbm = CrossBatchMemory(memory, dim, device=device)
    xbm.embeddings.copy_(mem)
    xbm.labels.copy_(mem_labels)
    xbm.filled, xbm.ptr = memory, cursor
    slots = xbm.enqueue(x.detach(), labels)
    ref, ref_labels = xbm.contents()
    ours = losses.build("multi_similarity", alpha=2.0, beta=40.0, base=0.5, margin=0.1)

    def floor():
        (x @ ref.T).sum().backward()
        x.grad = None

    def run_ours():
        value = ours(x, labels, ref, ref_labels, slots)
        value.backward()
        x.grad = None
        return value.detach()

    fns, counts = {"floor": floor, "dmlray": run_ours}, {"floor": repeats, "dmlray": repeats}
    if with_pml:
        fns["pml"], counts["pml"] = pml_memory(x, labels, mem, mem_labels, cursor), pml_repeats
    times, first = timed(fns, counts, device, statistic=statistic)
    values = (float(first["dmlray"]), float(first["pml"]) if with_pml else None)
    return {"case": f"memory B={batch} M={memory}", **times, "values": values}


def pml_memory(
    x: torch.Tensor, labels: torch.Tensor, mem: torch.Tensor, mem_labels: torch.Tensor, cursor: int
) -> Callable[[], torch.Tensor]:
    """PML's CrossBatchMemory(MultiSimilarityLoss, miner=MultiSimilarityMiner) holding ``mem``,
    the batch enqueued at ``cursor`` on every call (its ring buffer then matches dmlray's memory)."""
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    cbm = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5),
        x.shape[1],
        memory_size=mem.shape[0],
        miner=pml_miners.MultiSimilarityMiner(epsilon=0.1),
    ).to(x.device)
    cbm.embedding_memory.copy_(mem)
    cbm.label_memory.copy_(mem_labels)
    cbm.has_been_filled = True

    def run_pml():
        cbm.queue_idx = cursor  # enqueue at the same slots every time
        value = cbm(x, labels)
        value.backward()
        x.grad = None
        return value.detach()

    return run_pml


SOP_CLASSES = 11318
"""Stanford Online Products' training classes: the classifier losses' size in practice."""


def _fwd_bwd(fn: Callable[[], torch.Tensor], x: torch.Tensor, *params: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward+backward of ``fn`` (gradients of x and the loss's parameters dropped after)."""

    def run() -> torch.Tensor:
        value = fn()
        value.backward()
        for t in (x, *params):
            t.grad = None
        return value.detach()

    return run


def bench_classifier(name: str, batch: int, dim: int, repeats: int, device: torch.device) -> dict:
    """A margin-softmax loss at SOP's class count, the same weights on both sides."""
    from pytorch_metric_learning import losses as pml_losses

    pml_class = {"arcface": pml_losses.ArcFaceLoss, "subcenter_arcface": pml_losses.SubCenterArcFaceLoss}[name]
    emb, labels, _, _ = make_inputs(batch, 0, dim, SOP_CLASSES, device)
    labels = torch.randint(0, SOP_CLASSES, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    ours = losses.build(name, num_classes=SOP_CLASSES, embedding_dim=dim).to(device)
    weight = next(ours.parameters())  # (C·K, D)
    theirs: Any = pml_class(num_classes=SOP_CLASSES, embedding_size=dim).to(device)  # PML is untyped
    theirs.W.data = weight.data.T.clone()
    x = emb.clone().requires_grad_(True)
    times, first = timed(
        {
            "dmlray": _fwd_bwd(lambda: ours(x, labels), x, weight),
            "pml": _fwd_bwd(lambda: theirs(x, labels), x, theirs.W),
        },
        {"dmlray": repeats, "pml": repeats},
        device,
    )
    return {
        "case": f"{name} C={SOP_CLASSES} B={batch}",
        **times,
        "values": (float(first["dmlray"]), float(first["pml"])),
    }


def _pml_pair_loss(name: str) -> Callable[..., torch.Tensor]:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    pml_miner = {
        "triplet_margin+batch_hard": pml_miners.BatchHardMiner,
        "triplet_margin+angular": pml_miners.AngularMiner,
        "triplet_margin+uniform_histogram": pml_miners.UniformHistogramMiner,
    }.get(name)
    if pml_miner is not None:
        loss, miner = pml_losses.TripletMarginLoss(), pml_miner()
        return lambda x, y, r, ry: loss(x, y, miner(x, y, r, ry), ref_emb=r, ref_labels=ry)
    pml = {
        "tuplet_margin": pml_losses.TupletMarginLoss,
        "ntxent": pml_losses.NTXentLoss,
        "generalized_lifted_structure": pml_losses.GeneralizedLiftedStructureLoss,
        "intra_pair_variance": pml_losses.IntraPairVarianceLoss,
        "threshold_consistent_margin": pml_losses.ThresholdConsistentMarginLoss,
        "triplet_margin": pml_losses.TripletMarginLoss,
    }[name]()
    return lambda x, y, r, ry: pml(x, y, ref_emb=r, ref_labels=ry)


def bench_pair_loss(
    name: str, batch: int, memory: int, dim: int, repeats: int, pml_repeats: int, device: torch.device
) -> dict:
    """A pair loss of the batch against ``memory`` references (or the batch itself, memory 0).

    Both sides pair the anchors with the same references and no self-exclusion (PML's
    CrossBatchMemory would add its own bookkeeping; this times the losses).
    """
    emb, labels, mem, mem_labels = make_inputs(batch, memory, dim, max(memory // 5, batch // 4), device)
    x = emb.clone().requires_grad_(True)
    loss_name, options = (name.split("+")[0], {"miner": name.split("+")[1]}) if "+" in name else (name, {})
    ours = losses.build(loss_name, **options)
    theirs = _pml_pair_loss(name)
    refs: tuple[torch.Tensor | None, torch.Tensor | None] = (mem, mem_labels) if memory else (None, None)
    times, first = timed(
        {"dmlray": _fwd_bwd(lambda: ours(x, labels, *refs), x), "pml": _fwd_bwd(lambda: theirs(x, labels, *refs), x)},
        {"dmlray": repeats, "pml": pml_repeats},
        device,
    )
    where = f"M={memory}" if memory else "M=B"
    return {"case": f"{name} B={batch} {where}", **times, "values": (float(first["dmlray"]), float(first["pml"]))}


def bench_rest(name: str, batch: int, dim: int, repeats: int, device: torch.device) -> dict:
    """The last issue #17 losses: instance (image-text ids [0..B/2−1] twice) and manifold
    (PML's defaults, K = 50; the same proxies, and the global RNG seeded before every call
    on both sides so both draw the same meta-classes)."""
    from pytorch_metric_learning import losses as pml_losses

    emb, _, _, _ = make_inputs(batch, 0, dim, 1, device)
    x = emb.clone().requires_grad_(True)
    if name == "instance":
        labels = (torch.arange(batch) % (batch // 2)).to(device)
        ours: Any = losses.build("instance")
        theirs: Any = pml_losses.InstanceLoss()
        fns = {"dmlray": _fwd_bwd(lambda: ours(x, labels), x), "pml": _fwd_bwd(lambda: theirs(x, labels), x)}
    else:
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        ours = losses.build("manifold", embedding_dim=dim).to(device)
        theirs = pml_losses.ManifoldLoss(l=dim).to(device)
        theirs.proxies.data = ours.proxies.data.clone()

        def seeded(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                torch.manual_seed(0)
                return fn().reshape(())

            return run

        fns = {
            "dmlray": _fwd_bwd(seeded(lambda: ours(x, labels)), x, ours.proxies),
            "pml": _fwd_bwd(seeded(lambda: theirs(x)), x, theirs.proxies),
        }
    times, first = timed(fns, {"dmlray": repeats, "pml": repeats}, device)
    return {"case": f"{name} B={batch}", **times, "values": (float(first["dmlray"]), float(first["pml"]))}


REST_BENCHED = ("instance", "manifold")
REST_MINERS_BENCHED = ("triplet_margin+angular", "triplet_margin+uniform_histogram")
RANDOM_MINERS = {"triplet_margin+uniform_histogram"}
"""Random selections drawn differently from PML's: timed, their values not compared."""


PAIR_LOSSES_BENCHED = (
    "tuplet_margin",
    "ntxent",
    "generalized_lifted_structure",
    "intra_pair_variance",
    "threshold_consistent_margin",
    "triplet_margin",
)
MEMORY_LOSSES_BENCHED = ("generalized_lifted_structure", "intra_pair_variance", "triplet_margin+batch_hard")
"""Against a 55k memory. Not NT-Xent or tuplet margin: PML forms a (#positive pairs) ×
(#negative pairs) matrix for them — 640 × 7·10⁶ here — which does not fit in memory
(dmlray's cost is one (B, M) block)."""


def print_table(rows: list[dict], case_width: int, with_floor: bool) -> bool:
    """Times (ms), their ratios and whether dmlray's and PML's values agree; True if all do."""
    floor = f" {'floor':>9s}" if with_floor else ""
    header = f"{'case':{case_width}s}{floor} {'dmlray':>9s} {'PML':>10s}"
    header += f" {'dmlray/floor':>13s}" if with_floor else ""
    header += f" {'PML/dmlray':>11s}  values agree"
    print(header)
    print("-" * len(header))
    ok = True
    for row in rows:
        ours_v, pml_v = row["values"]
        random = row["case"].split()[0] in RANDOM_MINERS
        agree = random or abs(ours_v - pml_v) <= 1e-4 * max(1.0, abs(pml_v))
        ok &= agree
        line = f"{row['case']:{case_width}s}" + (f" {row['floor']:9.1f}" if with_floor else "")
        line += f" {row['dmlray']:9.1f} {row['pml']:10.1f}"
        line += f" {row['dmlray'] / row['floor']:13.2f}" if with_floor else ""
        verdict = "random" if random else ("yes" if agree else "NO")
        print(f"{line} {row['pml'] / row['dmlray']:11.1f}  {verdict} ({ours_v:.6f} vs {pml_v:.6f})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats (< 30 s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--only-new", action="store_true", help="only the issue #17 losses' table")
    parser.add_argument(
        "--only-rest", action="store_true", help="only instance, manifold and the angular/uniform-histogram miners"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = 128 if args.quick else 256
    repeats, pml_repeats = (3, 1) if args.quick else (7, 3)

    print(f"device={device} threads={torch.get_num_threads()} dim={args.dim} (times: min over repeats, ms)")
    new_rows = [bench_rest(n, batch, args.dim, repeats, device) for n in REST_BENCHED]
    new_rows += [bench_pair_loss(n, batch, 0, args.dim, repeats, repeats, device) for n in REST_MINERS_BENCHED]
    if not args.only_rest:
        new_rows += [bench_classifier(n, batch, args.dim, repeats, device) for n in ("arcface", "subcenter_arcface")]
        new_rows += [bench_pair_loss(n, batch, 0, args.dim, repeats, repeats, device) for n in PAIR_LOSSES_BENCHED]
        new_rows += [
            bench_pair_loss(n, batch, 55000, args.dim, repeats, pml_repeats, device) for n in MEMORY_LOSSES_BENCHED
        ]
    # the issue #17 losses: dmlray and PML forward+backward on the same inputs
    new_ok = print_table(new_rows, 48, with_floor=False)
    if args.only_new or args.only_rest:
        return 0 if new_ok else 1
    print()
    rows = [bench_batch(batch, args.dim, repeats, device)]
    for memory in (8192, 55000):
        rows.append(bench_memory(batch, memory, args.dim, repeats, pml_repeats, device))

    ok = print_table(rows, 28, with_floor=True)
    return 0 if ok and new_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
