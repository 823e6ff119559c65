"""The GPU path, measured once: numerics, loss speed, stream-fed training and evaluation on one device.

    python bench/gpu_check.py --out DIR [--smoke] [--device cuda|cpu] [--workers N] [--wheels DIR]

Needs only torch, torchvision, numpy and pillow (no Ray, boto3, prometheus_client,
webdataset or faiss). Writes DIR/gpu-check.json and DIR/gpu-check.md after every section,
so a run stopped by a time limit still leaves what it measured. Sections:

  1 numerics    every registered loss on the device in float32 and under bf16 autocast
                against float64 on the CPU (value and gradients w.r.t. the embeddings and
                the loss's parameters, same parameters on both sides); the cross-batch
                memory; the world-size-1 gathers (also through the real collective); uint8
                batches normalised on the device; channels-last backbones; Recall@K, MAP@R
                and NMI on the device against the CPU's.
  2 loss speed  multi-similarity + memory forward+backward (B=256, M=55,000, d=512) against
                the bare B×M product forward+backward (the floor); PML too if importable.
  3 stream      BN-Inception and ResNet-50 (bf16, channels-last) trained by dmlray's Trainer,
                fed by the P×K stream from local shards (original JPEGs and packed with
                ``resize: 256``) against synthetic batches already on the device.
  4 eval        Recall@{1,10,100,1000} + MAP@R at SOP size (60,502 × 512): time, peak
                device memory, and equality with the CPU's.

Budget on one H200 with 16 cores (< 8 min in all): numerics ~1 min, loss speed ~20 s,
stream ~4 min (data ~30 s, 6 runs capped at 35 s each), eval ~40 s. ``--smoke`` runs every
path at tiny sizes on the CPU in under a minute (resnet18 stands in for resnet50 there).
Exit status 0 when every section ran (failed comparisons are results, in the report), 1
when a section raised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_backbones import stream_batches  # noqa: E402
from bench_data import make_images  # noqa: E402
from bench_eval import KS, make_data  # noqa: E402
from bench_losses import bench_memory  # noqa: E402

from dmlray import losses
from dmlray.config import LossConfig, ModelConfig  # noqa: E402
from dmlray.data.pack import Recipe, pack  # noqa: E402
from dmlray.data.shards import read_manifest  # noqa: E402
from dmlray.data.transforms import NaturalImageTransform, make_transform  # noqa: E402
from dmlray.evaluation.metrics import retrieval_metrics  # noqa: E402
from dmlray.jobs.worker import build_loss, build_model  # noqa: E402
from dmlray.losses import miners  # noqa: E402
from dmlray.training.distributed import (  # noqa: E402
    _AllGatherWithGrad,
    all_gather_list,
    all_gather_no_grad,
    all_gather_variable,
    all_gather_with_grad,
    broadcast_object,
)
from dmlray.training.memory import CrossBatchMemory  # noqa: E402
from dmlray.training.trainer import Trainer  # noqa: E402

CPU = torch.device("cpu")
START = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full run and ``--smoke``."""

    loss_batch: tuple[int, int] = (8, 4)  # numerics: P × K
    loss_dim: int = 64
    loss_memory: int = 96
    speed: tuple[int, int, int] = (256, 55_000, 512)  # B, M, d
    speed_repeats: tuple[int, int] = (25, 5)  # dmlray and floor, PML
    images: int = 2000  # synthetic JPEGs, 20 per class
    batch: tuple[int, int] = (16, 4)  # stream: P × K
    backbones: tuple[tuple[str, int], ...] = (("bn_inception", 227), ("resnet50", 224))
    window: int = 25  # steps between two clock readings
    windows: int = 8  # timed windows after the warm-up one
    run_seconds: float = 35.0  # a training run stops after this, keeping its windows
    check_images: tuple[int, int] = (4, 224)  # backbone numerics: batch, size
    retrieval_check: int = 10_000  # numerics: items, 128-d
    eval_items: int = 60_502  # SOP test size


SMOKE = Sizes(
    loss_batch=(4, 3),
    loss_dim=16,
    loss_memory=40,
    speed=(32, 512, 64),
    speed_repeats=(3, 1),
    images=64,
    batch=(2, 2),
    backbones=(("bn_inception", 64), ("resnet18", 64)),
    window=1,
    windows=2,
    run_seconds=20.0,
    check_images=(2, 64),
    retrieval_check=600,
    eval_items=2000,
)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class Tolerance:
    """Element-wise |got − want| ≤ rtol·|want| + atol·max|want| (atol scales with each tensor,
    since a gradient's entries shrink with the batch size)."""

    rtol: float
    atol: float


TOLERANCES = {
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    # bf16 keeps 8 significant bits (relative step 2^-8 ≈ 0.4%) in the autocast matmuls;
    # losses with logit scales of 16–80 multiply that error on the way to the value
    "bfloat16": Tolerance(rtol=5e-2, atol=5e-2),
}
# The histogram loss's gradient is 1/Δ = 500× as sensitive to a similarity's rounding as the
# similarity itself (1000 bins on [-1, 1]): its float32 error is ~10× the others'
LOOSER = {"histogram": 10.0}


def tolerance(loss: str, dtype: str) -> Tolerance:
    tol, factor = TOLERANCES[dtype], LOOSER.get(loss, 1.0)
    return Tolerance(tol.rtol * factor, tol.atol * factor)


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: Tolerance) -> dict:
    """Worst error of ``got`` against ``want`` in units of the tolerance (pass: ≤ 1)."""
    worst, worst_at, max_abs = 0.0, "", 0.0
    for key, ref in want.items():
        if key not in got or got[key].shape != ref.shape:
            return {"pass": False, "worst": float("inf"), "worst_at": f"{key} missing or misshapen", "max_abs": None}
        ref = ref.double().cpu()
        err = (got[key].double().cpu() - ref).abs()
        if not torch.isfinite(err).all():
            return {"pass": False, "worst": float("inf"), "worst_at": f"{key} not finite", "max_abs": None}
        if err.numel() == 0:
            continue
        allowed = tol.rtol * ref.abs() + tol.atol * max(float(ref.abs().max()), 1e-12)
        ratio = float((err / allowed).max())
        max_abs = max(max_abs, float(err.max()))
        if ratio > worst:
            worst, worst_at = ratio, key
    return {"pass": worst <= 1.0, "worst": worst, "worst_at": worst_at, "max_abs": max_abs}


# ------------------------------------------------------------------ 1 numerics: losses


def loss_inputs(P: int, K: int, dim: int, memory: int, seed: int = 0) -> dict[str, Any]:
    """A P×K batch (raw, normalised in the loss call as in training) and a full memory that
    holds the batch at its slots, as the trainer's memory does, in float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    # P × K, classes interleaved: each class's first sample sits at its rank, the layout the
    # instance loss needs (its target column is the label's rank); the others are indifferent
    labels = torch.arange(P).repeat(K)
    raw = torch.randn(P * K, dim, generator=g, dtype=torch.float64)
    xbm = CrossBatchMemory(memory, dim, dtype=torch.float64)
    xbm.enqueue(
        F.normalize(torch.randn(memory, dim, generator=g, dtype=torch.float64), dim=1),
        torch.randint(0, P + 2, (memory,), generator=g),
    )
    slots = xbm.enqueue(F.normalize(raw, dim=1), labels)
    refs, ref_labels = xbm.contents()
    aux = torch.randn(P * K, dim, generator=g, dtype=torch.float64)  # the adversarial loss's second branch
    return {
        "raw": raw,
        "labels": labels,
        "refs": refs.clone(),
        "ref_labels": ref_labels.clone(),
        "self_index": slots,
        "aux": aux,
        "classes": P + 2,
    }


@contextlib.contextmanager
def same_noise(seed: int) -> Iterator[None]:
    """Sampling losses draw their Gumbel noise from one float64 CPU stream on every device:
    CPU and CUDA generators give different streams, which would compare different samples."""
    original, g = miners._gumbel, torch.Generator().manual_seed(seed)

    def gumbel(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(like.shape, dtype=torch.float64, generator=g).clamp(min=torch.finfo(torch.float64).tiny)
        return (-torch.log(-torch.log(u))).to(like.device, like.dtype)

    miners._gumbel = gumbel
    try:
        yield
    finally:
        miners._gumbel = original


def run_loss(
    loss: losses.PairLoss, inputs: dict, memory: bool, device: torch.device, dtype: torch.dtype, bf16: bool
) -> dict[str, torch.Tensor]:
    """Value and gradients (embeddings, aux branch, loss parameters) of one loss call."""
    leaf = inputs["raw"].to(device, dtype, copy=True).requires_grad_(True)  # copy: never the shared input
    aux = inputs["aux"].to(device, dtype, copy=True).requires_grad_(True)
    refs = (inputs["refs"].to(device, dtype), inputs["ref_labels"].to(device), inputs["self_index"].to(device))
    labels = inputs["labels"].to(device)
    with same_noise(seed=1), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        emb = F.normalize(leaf, dim=1)
        if not loss.trainable_alone:
            value = loss(emb, labels, aux_embeddings=F.normalize(aux, dim=1))
        elif memory:
            value = loss(emb, labels, *refs)
        else:
            value = loss(emb, labels)
    value.backward()
    out = {"value": value.detach(), "grad embeddings": leaf.grad}
    if aux.grad is not None:
        out["grad aux"] = aux.grad
    for name, p in loss.named_parameters():
        if p.requires_grad:
            out[f"grad {name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def check_losses(device: torch.device, sizes: Sizes) -> list[dict]:
    """Every registered loss, with and without memory references where it takes them."""
    inputs = loss_inputs(*sizes.loss_batch, sizes.loss_dim, sizes.loss_memory)
    rows = []
    for name in losses.names():
        cls = losses.loss_class(name)
        torch.manual_seed(0)  # proxies and centres are random: one draw, copied to both sides
        base = build_loss(LossConfig(name=name), inputs["classes"], sizes.loss_dim, seed=0)
        modes = ["batch", "memory"] if cls.supports_references and cls.trainable_alone else ["batch"]
        for mode in modes:
            want = run_loss(copy.deepcopy(base).double(), inputs, mode == "memory", CPU, torch.float64, False)
            for label, bf16 in (("float32", False), ("bfloat16", True)):
                got = run_loss(copy.deepcopy(base).to(device), inputs, mode == "memory", device, torch.float32, bf16)
                result = compare(got, want, tolerance(name, label))
                rows.append(
                    {
                        "loss": name,
                        "mode": mode,
                        "dtype": label,
                        "trainable_alone": cls.trainable_alone,
                        "value": float(want["value"]),
                        **result,
                    }
                )
    return rows


# ------------------------------------------------------------------ 1 numerics: the rest


def check_memory(device: torch.device) -> dict:
    """The same enqueues (wrapping, a bf16 batch, one larger than the memory) on the device and
    the CPU: slots, contents and a state round trip must be identical (they are copies)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (7, 10, 30)]
    batches[1] = (batches[1][0].bfloat16(), batches[1][1])  # what a bf16 step's embeddings may be
    seen = []
    for dev in (CPU, device):
        mem = CrossBatchMemory(24, 16, device=dev)
        slots = torch.cat([mem.enqueue(e.to(dev), y.to(dev)) for e, y in batches])
        restored = CrossBatchMemory(24, 16, device=dev)
        restored.load_state_dict(mem.state_dict())
        emb, lab = restored.contents()
        seen.append((slots.cpu(), emb.cpu(), lab.cpu(), restored.ptr, restored.filled))
    (s0, e0, l0, p0, f0), (s1, e1, l1, p1, f1) = seen
    same = torch.equal(s0, s1) and torch.equal(e0, e1) and torch.equal(l0, l1) and (p0, f0) == (p1, f1)
    return {
        "check": "cross-batch memory",
        "pass": same,
        "detail": f"{f1} entries, ptr {p1}, {int((s1 < 0).sum())} overwritten rows",
    }


def grad_of(t: torch.Tensor) -> torch.Tensor:
    """``t.grad``, which a backward pass must have filled."""
    assert t.grad is not None, "no gradient reached the tensor"
    return t.grad


def check_gathers(device: torch.device, tmp: Path) -> dict:
    """World size 1: the public gathers are the identity; the gather's autograd function also
    runs its real collective (NCCL on CUDA, gloo on CPU) in a one-process group."""
    x = torch.randn(6, 8, device=device, requires_grad=True)
    labels = torch.arange(6, device=device)
    w = torch.randn(6, 8, device=device)
    (all_gather_with_grad(x) * w).sum().backward()
    ok = torch.equal(grad_of(x), w) and torch.equal(all_gather_no_grad(labels), labels)
    ok &= torch.equal(all_gather_variable(x.detach()), x.detach()) and all_gather_list([1, 2]) == [1, 2]
    ok &= broadcast_object({"a": 1}) == {"a": 1}
    backend = "nccl" if device.type == "cuda" else "gloo"
    from datetime import timedelta

    dist.init_process_group(
        backend, init_method=f"file://{tmp / 'pg-init'}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        x.grad = None
        gathered = _AllGatherWithGrad.apply(x)  # the public function skips it at world size 1
        (gathered * w).sum().backward()
        ok &= torch.equal(gathered.detach(), x.detach()) and torch.equal(grad_of(x), w)
        ok &= torch.equal(all_gather_variable(x.detach()), x.detach())
    finally:
        dist.destroy_process_group()
    return {"check": "world-size-1 gathers", "pass": bool(ok), "detail": f"identity + {backend} all_gather/all_reduce"}


def check_normalise(device: torch.device) -> list[dict]:
    """uint8 batches (pinned on CUDA) normalised on the device against the CPU's float collate."""
    rows = []
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for convention in ("rgb_imagenet", "bgr255"):
        transform = NaturalImageTransform(32, train=False, convention=convention)
        want = transform.collate(list(pixels))
        batch = pixels.pin_memory() if device.type == "cuda" else pixels
        got = transform.normalise(batch.to(device, non_blocking=True))
        result = compare({"images": got}, {"images": want}, TOLERANCES["float32"])
        rows.append(
            {
                "check": f"uint8 normalise on device ({convention})",
                "pass": result["pass"],
                "detail": f"max abs error {result['max_abs']:.2e}",
            }
        )
    return rows


# cuDNN convolutions may use TF32 in float32 (torch's default allow_tf32 for cuDNN is True):
# ~1e-3 relative per layer, so embeddings of a deep net drift by ~1e-2
FLOAT32_BACKBONE_LIMIT = 0.03  # max distance between unit embeddings


def check_backbones(device: torch.device, sizes: Sizes) -> list[dict]:
    """Channels-last backbones on the device against float64 on the CPU and against the
    device's own contiguous layout (train mode: batch statistics keep a randomly initialised
    deep net's activations in range). bf16's distance is reported, not judged: through an
    untrained net it grows with depth and shrinks with image size (BN-Inception on the CPU:
    0.40 at 64 px, 0.10 at 224 px), so no one limit would mean anything."""
    rows = []
    batch, size = sizes.check_images
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name, _ in sizes.backbones:
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=name, embedding_dim=512), 3)
        want = copy.deepcopy(model).double()(images.double()).detach()
        got = {}
        for layout, fmt in (("channels-last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            on_device = copy.deepcopy(model).to(device).to(memory_format=fmt)
            for label, bf16 in (("float32", False), ("bfloat16", True)):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    got[layout, label] = on_device(images.to(device).contiguous(memory_format=fmt)).double().cpu()

        def distance(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm(dim=1).max())

        pairs = {
            "float32 channels-last vs CPU float64": (got["channels-last", "float32"], want),
            "float32 channels-last vs contiguous": (got["channels-last", "float32"], got["contiguous", "float32"]),
            "bfloat16 channels-last vs CPU float64": (got["channels-last", "bfloat16"], want),
        }
        for what, (a, b) in pairs.items():
            d = distance(a, b)
            judged = what.startswith("float32")
            limit = f" (limit {FLOAT32_BACKBONE_LIMIT})" if judged else ""
            verdict = d <= FLOAT32_BACKBONE_LIMIT if judged else None
            rows.append(
                {
                    "check": f"{name} {what} ({batch}×{size}²)",
                    "pass": verdict,
                    "detail": f"max embedding distance {d:.2e}{limit}",
                }
            )
    return rows


METRIC_TOLERANCE = {"nmi": 1e-2}  # k-means can amplify one reassigned point; k-NN metrics: 1e-4


def check_retrieval(device: torch.device, n: int) -> list[dict]:
    """Recall@K, MAP@R, R-precision, P@1 and NMI on the device against the CPU's, both protocols."""
    x_np, y_np = make_data(n, 128, 60502 / 11316, seed=1)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    ks = tuple(k for k in KS if k < n)
    half = n // 2
    protocols = {"leave-one-out": (x, y, None, None), "query-vs-gallery": (x[:half], y[:half], x[half:], y[half:])}
    rows = []
    for protocol, (q, ql, g, gl) in protocols.items():
        want = retrieval_metrics(q, ql, g, gl, ks=ks, nmi=True)
        g_dev = None if g is None else g.to(device)
        gl_dev = None if gl is None else gl.to(device)
        got = retrieval_metrics(q.to(device), ql.to(device), g_dev, gl_dev, ks=ks, nmi=True)
        diffs = {k: abs(got[k] - want[k]) for k in want}
        ok = all(d <= METRIC_TOLERANCE.get(k, 1e-4) for k, d in diffs.items())
        worst = max(diffs, key=lambda k: diffs[k])
        rows.append(
            {
                "check": f"retrieval metrics {protocol} (n={n})",
                "pass": ok,
                "detail": f"largest difference {worst} {diffs[worst]:.1e}; recall@1 {want['recall@1']:.4f}",
            }
        )
    return rows


def section_numerics(device: torch.device, sizes: Sizes, tmp: Path) -> dict:
    rows = check_losses(device, sizes)
    log(f"numerics: {sum(r['pass'] for r in rows)} of {len(rows)} loss comparisons pass")
    checks = [
        check_memory(device),
        check_gathers(device, tmp),
        *check_normalise(device),
        *check_retrieval(device, sizes.retrieval_check),
    ]
    log("numerics: memory, gathers, normalise and retrieval checked")
    checks += check_backbones(device, sizes)
    return {
        "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
        "losses": rows,
        "checks": checks,
        "all_pass": all(r["pass"] is not False for r in rows + checks),
    }


# ------------------------------------------------------------------ 2 loss speed


def pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def section_loss_speed(device: torch.device, sizes: Sizes) -> dict:
    """MS + memory against the floor (median of repeats after a warm-up); PML if importable."""
    batch, memory, dim = sizes.speed
    repeats, pml_repeats = sizes.speed_repeats
    with_pml = pml_available()
    row = bench_memory(batch, memory, dim, repeats, pml_repeats, device, with_pml=with_pml, statistic=statistics.median)
    ours, pml_value = row["values"]
    out = {
        "case": row["case"],
        "dim": dim,
        "floor_ms": row["floor"],
        "dmlray_ms": row["dmlray"],
        "dmlray_over_floor": row["dmlray"] / row["floor"],
        "pml": "importable" if with_pml else "not importable",
    }
    if with_pml:
        out.update(
            pml_ms=row["pml"],
            pml_over_dmlray=row["pml"] / row["dmlray"],
            values_agree=abs(ours - pml_value) <= 1e-4 * max(1.0, abs(pml_value)),
            values=[ours, pml_value],
        )
    return out


# ------------------------------------------------------------------ 3 stream against synthetic


def make_stream(
    dataset_root: str, P: int, K: int, transform, workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The P×K training stream from a packed dataset: the only place this script builds it
    (it follows bench_backbones, which the PKBatches rewrite adapts)."""
    return stream_batches(read_manifest(dataset_root), "train", P, K, transform, workers, device)


def prepare_datasets(tmp: Path, count: int) -> dict[str, str]:
    """Synthetic ~500×375 JPEGs packed twice on local disk: as they are, and with ``resize: 256``."""
    make_images(tmp / "raw", count)
    roots = {}
    for label, resize in (("original", 0), ("resize 256", 256)):
        root = str(tmp / f"shards-{resize}")
        pack(
            Recipe(dataset="folder", shard_bytes=8 * 2**20, options={"test_fraction": 0, "resize": resize}),
            root,
            str(tmp / "raw"),
            progress=False,
            workers=os.cpu_count(),
        )
        roots[label] = root
    return roots


class _Enough(Exception):
    """Raised by the report hook when a run has used its time: the windows so far count."""


def trainer_rate(model: torch.nn.Module, feed: Iterator, sizes: Sizes, device: torch.device) -> dict:
    """Images/s of dmlray's Trainer (MS loss, bf16, channels-last) over the windows after the first.

    The clock is read in the report hook, which runs after the trainer's log record has
    read the loss (a device sync), so each window holds exactly its own steps' work.
    """
    stamps: list[tuple[int, float, float]] = []

    def report(record: dict, history: list, state: dict | None) -> None:
        stamps.append((record["step"], time.perf_counter(), record["data_wait_fraction"]))
        if len(stamps) > 1 and stamps[-1][1] - stamps[0][1] > sizes.run_seconds:
            raise _Enough

    trainer = Trainer(
        model=model,
        loss_fn=losses.build("multi_similarity"),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-5),
        scheduler=None,
        batches=lambda start: feed,
        steps=sizes.window * (1 + sizes.windows),
        device=device,
        log_every=sizes.window,
        eval_every=10**9,
        amp="bf16",
        channels_last=True,
        report=report,
    )
    with contextlib.suppress(_Enough):
        trainer.train()
    (step0, t0, _), (step1, t1, _) = stamps[0], stamps[-1]
    images = (step1 - step0) * sizes.batch[0] * sizes.batch[1]
    windows = [(b[0] - a[0]) * sizes.batch[0] * sizes.batch[1] / (b[1] - a[1]) for a, b in itertools.pairwise(stamps)]
    return {
        "images_per_s": images / (t1 - t0),
        "timed_steps": step1 - step0,
        "window_min": min(windows),
        "window_max": max(windows),
        "data_wait": statistics.mean(s[2] for s in stamps[1:]),
    }


def run_feed(model: torch.nn.Module, open_feed: Callable[[], Iterator], sizes: Sizes, device: torch.device) -> dict:
    feed = open_feed()
    try:
        return trainer_rate(model, feed, sizes, device)
    finally:
        getattr(feed, "close", lambda: None)()  # a stream's close stops its loader workers


def section_stream(
    device: torch.device, sizes: Sizes, workers: int, tmp: Path, partial: Callable[[dict], None]
) -> dict:
    roots = prepare_datasets(tmp, sizes.images)
    P, K = sizes.batch
    log(f"stream: {sizes.images} JPEGs made and packed twice")
    out: dict[str, Any] = {"P": P, "K": K, "workers": workers, "images": sizes.images, "runs": []}
    for backbone, size in sizes.backbones:
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=backbone, embedding_dim=512), 3).to(device)
        model = model.to(memory_format=torch.channels_last)
        convention = getattr(model.backbone, "input_convention", "rgb_imagenet")
        transform = make_transform("natural", size, 3, train=True, convention=convention)
        fixed = (torch.randn(P * K, 3, size, size, device=device), torch.arange(P, device=device).repeat_interleave(K))
        # "synthetic" first: it also warms the model up
        feeds: dict[str, Callable[[], Iterator]] = {"synthetic": functools.partial(itertools.repeat, fixed)}
        for label, root in roots.items():
            feeds[f"stream {label}"] = functools.partial(make_stream, root, P, K, transform, workers, device)
        rates = {}
        for label, open_feed in feeds.items():
            rates[label] = run_feed(model, open_feed, sizes, device)
            log(f"stream: {backbone} {label}: {rates[label]['images_per_s']:.1f} images/s")
        for label, rate in rates.items():
            ratio = rate["images_per_s"] / rates["synthetic"]["images_per_s"]
            out["runs"].append(
                {"backbone": backbone, "size": size, "feed": label, **rate, "ratio": ratio, "goal_met": ratio >= 0.9}
            )
        partial(out)
    out["goal"] = "stream / synthetic >= 0.9"
    return out


# ------------------------------------------------------------------ 4 evaluation at SOP size


def timed_metrics(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[dict, float, float | None]:
    """Metrics, seconds, and the peak device memory (MiB) the call added to the data."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync(device)
    t0 = time.perf_counter()
    metrics = retrieval_metrics(x, y, ks=KS, nmi=False)
    sync(device)
    seconds = time.perf_counter() - t0
    added = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    return metrics, seconds, added


def section_eval(device: torch.device, sizes: Sizes) -> dict:
    x, y = make_data(sizes.eval_items, 512, 60502 / 11316, seed=0)
    xd, yd = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    first = timed_metrics(xd, yd, device)  # includes kernel loading and the allocator's growth
    metrics, seconds, added = timed_metrics(xd, yd, device)
    log(f"eval: {seconds:.2f}s on {device}")
    cpu_metrics, cpu_seconds, _ = timed_metrics(torch.from_numpy(x), torch.from_numpy(y), CPU)
    diffs = {k: abs(metrics[k] - cpu_metrics[k]) for k in metrics}
    return {
        "items": sizes.eval_items,
        "dim": 512,
        "ks": list(KS),
        "seconds_first": first[1],
        "seconds": seconds,
        "peak_added_mib": added,
        "data_mib": x.nbytes / 2**20,
        "cpu_seconds": cpu_seconds,
        "metrics": metrics,
        "max_difference_to_cpu": max(diffs.values()),
        "all_pass": max(diffs.values()) <= 1e-4,
    }


# ------------------------------------------------------------------ report


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "pass" if v else "**FAIL**"
        if v is None:
            return "info"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def markdown(report: dict) -> str:
    meta = report["meta"]
    parts = [
        f"# gpu_check ({'smoke' if meta['smoke'] else 'full'})",
        f"{meta['device_name']}; torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; "
        f"{meta['cpus']} CPUs; TF32 matmul {meta['tf32_matmul']}, cuDNN {meta['tf32_cudnn']}",
    ]
    for name in ("numerics", "loss_speed", "stream", "eval"):
        sec = report.get(name)
        if not sec:
            parts.append(f"## {name}\n\nnot run")
            continue
        parts.append(f"## {name} ({sec['status']}, {sec['seconds']:.0f} s)")
        if "error" in sec:
            parts.append(f"error: `{sec['error']}`")
            continue
        parts.append(SECTION_TABLES[name](sec["result"]))
    return "\n\n".join(parts) + "\n"


def numerics_md(r: dict) -> str:
    tol = ", ".join(f"{k} rtol {v['rtol']:g} / atol {v['atol']:g}·max|ref|" for k, v in r["tolerances"].items())
    losses_md = md_table(
        ["loss", "mode", "dtype", "result", "worst (× tol)", "at", "max abs err", "value (f64)"],
        [
            [
                x["loss"] + ("" if x["trainable_alone"] else " (aux)"),
                x["mode"],
                x["dtype"],
                x["pass"],
                x["worst"],
                x["worst_at"],
                x["max_abs"],
                x["value"],
            ]
            for x in r["losses"]
        ],
    )
    checks_md = md_table(["check", "result", "detail"], [[c["check"], c["pass"], c["detail"]] for c in r["checks"]])
    return f"Against float64 on the CPU; tolerances: {tol}.\n\n{losses_md}\n\n{checks_md}"


def loss_speed_md(r: dict) -> str:
    rows = [
        ["floor (E·Rᵀ fwd+bwd)", r["floor_ms"], 1.0],
        ["dmlray MS + memory", r["dmlray_ms"], r["dmlray_over_floor"]],
    ]
    if "pml_ms" in r:
        rows.append([f"PML (values agree: {r['values_agree']})", r["pml_ms"], r["pml_ms"] / r["floor_ms"]])
    return f"{r['case']}, d={r['dim']}, median ms; PML {r['pml']}.\n\n" + md_table(["what", "ms", "× floor"], rows)


def stream_md(r: dict) -> str:
    rows = [
        [
            x["backbone"],
            x["size"],
            x["feed"],
            x["images_per_s"],
            x["ratio"],
            x["goal_met"],
            x["data_wait"],
            x["timed_steps"],
            f"{x['window_min']:.0f}–{x['window_max']:.0f}",
        ]
        for x in r["runs"]
    ]
    return (
        f"P×K = {r['P']}×{r['K']}, {r['workers']} loader workers, {r['images']} synthetic JPEGs; "
        f"goal: {r.get('goal', 'stream / synthetic >= 0.9')}.\n\n"
        + md_table(
            ["backbone", "size", "feed", "images/s", "÷ synthetic", "≥ 0.9", "data wait", "steps", "window range"], rows
        )
    )


def eval_md(r: dict) -> str:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if k.startswith(("recall", "map")))
    return (
        md_table(
            ["items × dim", "seconds (first run)", "peak added MiB (data MiB)", "CPU seconds", "equal to CPU"],
            [
                [
                    f"{r['items']:,} × {r['dim']}",
                    f"{r['seconds']:.2f} ({r['seconds_first']:.2f})",
                    "n/a" if r["peak_added_mib"] is None else f"{r['peak_added_mib']:.0f} ({r['data_mib']:.0f})",
                    r["cpu_seconds"],
                    r["all_pass"],
                ]
            ],
        )
        + f"\n\n{metrics}; largest difference to the CPU {r['max_difference_to_cpu']:.1e}"
    )


SECTION_TABLES = {"numerics": numerics_md, "loss_speed": loss_speed_md, "stream": stream_md, "eval": eval_md}


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu-check.md").write_text(markdown(report))


def run_section(report: dict, name: str, out: Path, fn: Callable[[], dict]) -> None:
    """Runs one section; an exception is recorded (the other sections still run)."""
    log(f"{name}: start")
    t0 = time.perf_counter()
    try:
        result = fn()
        # numerics and eval judge their results; speed sections only measure
        status = "done" if "all_pass" not in result else ("pass" if result["all_pass"] else "fail")
        report[name] = {"status": status, "seconds": time.perf_counter() - t0, "result": result}
    except Exception as exc:  # noqa: BLE001 - a broken section must not cost the others
        traceback.print_exc()
        report[name] = {"status": "error", "seconds": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
    write(out, report)
    log(f"{name}: {report[name]['status']} in {report[name]['seconds']:.1f}s")


def meta(device: torch.device, smoke: bool) -> dict:
    cuda = device.type == "cuda"
    return {
        "smoke": smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every path in under a minute on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="loader workers (default 12; 2 with --smoke)")
    parser.add_argument("--wheels", type=Path, help="folder of pure-Python wheels to import from (e.g. PML)")
    parser.add_argument("--sections", default="numerics,loss_speed,stream,eval")
    args = parser.parse_args(argv)
    if args.wheels:
        sys.path[:0] = [str(w) for w in sorted(args.wheels.glob("*.whl"))]  # wheels are zip archives
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else Sizes()
    if args.smoke:
        torch.set_num_threads(1)  # the smoke checks paths, not speed: on a busy small CPU, threads mostly wait
    workers = args.workers or (2 if args.smoke else 12)
    report: dict[str, Any] = {"meta": meta(device, args.smoke)}
    m = report["meta"]
    log(
        f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, device {device} ({m['device_name']}), "
        f"{m['cpus']} CPUs, python {m['python']}"
    )
    with tempfile.TemporaryDirectory(prefix="dmlray-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)

        def partial_stream(result: dict) -> None:  # each backbone's runs reach the report at once
            report["stream"] = {"status": "partial", "seconds": time.perf_counter() - START, "result": result}
            write(args.out, report)

        sections = {
            "numerics": lambda: section_numerics(device, sizes, tmp),
            "loss_speed": lambda: section_loss_speed(device, sizes),
            "stream": lambda: section_stream(device, sizes, workers, tmp, partial_stream),
            "eval": lambda: section_eval(device, sizes),
        }
        for name in args.sections.split(","):
            run_section(report, name, args.out, sections[name])
    log(f"done: {args.out / 'gpu-check.md'}")
    return 1 if any(report[n]["status"] == "error" for n in args.sections.split(",")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
