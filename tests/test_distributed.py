"""Exact distributed semantics, for real: R gloo processes against one process on R·b.

With R ranks of local batch b, each step (global gather, loss against the global batch,
cross-batch memory of global batches, DDP gradient averaging) must give the parameter
gradients of one process on the concatenated batch, and every rank must hold the same
memory after every step.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recipes import PML_CHECKED_PAIR_LOSSES
from torch.nn.parallel import DistributedDataParallel

from dmlray import losses
from dmlray.models import EmbeddingModel
from dmlray.models.glyph_cnn import GlyphCNN
from dmlray.training.distributed import all_gather_variable, all_gather_with_grad
from dmlray.training.memory import CrossBatchMemory
from dmlray.training.trainer import training_loss

STEPS = 3
LOCAL_BATCH = 6


def make_model() -> EmbeddingModel:
    torch.manual_seed(0)
    # no BatchNorm: batch statistics are per rank by design (frozen or SyncBN in recipes)
    return EmbeddingModel(GlyphCNN(in_channels=1, width=4, norm="none"), embedding_dim=8).double()


def make_batches(world_size: int, loss_name: str = "") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    n = world_size * LOCAL_BATCH
    batches = [
        (torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen))
        for _ in range(STEPS)
    ]
    if loss_name == "instance":
        for _, labels in batches:
            # the instance loss's layout: the global batch starts with one sample of each
            # id in order (a label's rank is its target column)
            labels[:4] = torch.arange(4)
    return batches


def run_steps(model, loss_fn, batches, rank, world_size, memory, wrap):
    """STEPS SGD steps; returns per-step (loss of this rank, flat grads, memory digest)."""
    net = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for images, labels in batches:
        lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
        if world_size > 1:
            images, labels = images[lo:hi], labels[lo:hi]
        opt.zero_grad()
        result = training_loss(net, loss_fn, images, labels, memory)
        result.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        contents = None
        if memory is not None:
            emb, lab = memory.contents()
            contents = (
                emb.clone(),
                lab.clone(),
                hashlib.sha256(emb.numpy().tobytes() + lab.numpy().tobytes()).hexdigest(),
            )
        out.append((result.loss.detach().clone(), grads.clone(), contents))
        opt.step()
    return out


MODES = {"no-memory": 0, "memory": 20}
# Every loss that pairs against references: anchor means and pair means split by rank,
# the rest (rank_decomposable = False: histogram, margin's sampling) computed over the
# whole global batch on every rank; plus a mining variant that samples.
VARIANTS = {
    "contrastive+distance_weighted": ("contrastive", {"mining": "distance_weighted"}),
    # issue #17: a row-wise miner (rank shares) and a batch-wide one (whole global batch)
    "triplet_margin+batch_hard": ("triplet_margin", {"miner": "batch_hard"}),
    "triplet_margin+hdc": ("triplet_margin", {"miner": "hdc"}),
    # a triplet-wise miner (dense triplets, rank shares) and a random batch-wide one
    "triplet_margin+angular": ("triplet_margin", {"miner": "angular"}),
    "triplet_margin+uniform_histogram": ("triplet_margin", {"miner": "uniform_histogram"}),
}
LOSSES = [n for n in losses.names() if losses.loss_class(n).supports_references] + list(VARIANTS)
# Losses without references (proxies, classification, batch-wide tuples and clusters).
# Left out: auxiliary terms the trainer refuses (adversarial needs a second embedding branch).
PROXY_LOSSES = [
    n for n in losses.names() if not losses.loss_class(n).supports_references and losses.loss_class(n).trainable_alone
]


CASES = [(n, mode) for n in LOSSES for mode in MODES] + [(n, "no-memory") for n in PROXY_LOSSES]


def make_loss(name: str):
    """Same initial loss parameters (proxies are random) and RNG stream in every process."""
    torch.manual_seed(2)
    name, options = VARIANTS.get(name, (name, {}))
    cls = losses.loss_class(name)
    kwargs = {"num_classes": 4, "embedding_dim": 8} if cls.needs_classes else {}
    return losses.build(name, **kwargs, **options).double()


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        out = {}
        # one process group for every case: spawning is the slow part
        for loss_name, mode in CASES:
            size = MODES[mode]
            memory = CrossBatchMemory(size, 8, dtype=torch.float64) if size else None
            out[loss_name, mode] = run_steps(
                make_model(),
                make_loss(loss_name),
                make_batches(world_size, loss_name),
                rank,
                world_size,
                memory,
                lambda m: DistributedDataParallel(m),
            )
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_exactness_test_covers_the_pair_and_proxy_losses():
    assert {
        "multi_similarity",
        "contrastive",
        "triplet_semihard",
        "lifted_structure",
        "binomial_deviance",
        "nca",
        "cbml",
        "histogram",
        "margin",
    } <= set(LOSSES)
    assert {"proxy_nca", "proxy_anchor", "softtriple", "cross_entropy", "center", "npair", "angular", "cluster"} <= set(
        PROXY_LOSSES
    )
    # both trainer paths are exercised
    assert (
        not make_loss("histogram").rank_decomposable
        and not make_loss("contrastive+distance_weighted").rank_decomposable
    )
    assert make_loss("multi_similarity").rank_decomposable


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_one_process_on_the_concatenated_batch(tmp_path, world_size):
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=world_size, join=True)
    ranks = [torch.load(f"{tmp_path / 'res'}.{r}", weights_only=False) for r in range(world_size)]
    failures = []
    for case in CASES:
        size = MODES[case[1]]
        memory = CrossBatchMemory(size, 8, dtype=torch.float64) if size else None
        reference = run_steps(
            make_model(), make_loss(case[0]), make_batches(world_size, case[0]), 0, 1, memory, lambda m: m
        )
        try:
            check_case(case, ranks, reference, world_size)
        except AssertionError as exc:
            failures.append(f"{case}: {' '.join(str(exc).split())[:300]}")
    assert not failures, "\n".join(failures)


def check_case(case, ranks, reference, world_size):
    """Each step of each rank against the one-process reference for one (loss, mode)."""
    for step, (ref_loss, ref_grad, ref_memory) in enumerate(reference):
        where = f"{case} step {step}"
        # the global loss is the mean of the ranks' local means (equal local batches)
        mean_loss = sum(r[case][step][0] for r in ranks) / world_size
        torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-9, atol=1e-12, msg=where)
        for r in ranks:
            torch.testing.assert_close(r[case][step][1], ref_grad, rtol=1e-5, atol=1e-9, msg=where)
        if ref_memory is not None:
            assert len({r[case][step][2][2] for r in ranks}) == 1, f"{where}: ranks hold different memories"
            torch.testing.assert_close(ranks[0][case][step][2][0], ref_memory[0], rtol=1e-7, atol=1e-10)
            assert torch.equal(ranks[0][case][step][2][1], ref_memory[1])


def test_the_reference_steps_are_not_degenerate():
    """Guard against a vacuous equivalence: the MS reference must carry gradient."""
    for _, grad, _ in run_steps(
        make_model(), losses.build("multi_similarity"), make_batches(2), 0, 1, None, lambda m: m
    ):
        assert grad.abs().sum() > 0


def _gather_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
        gathered = all_gather_with_grad(x)
        weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered)
        (gathered * weights * (rank + 1)).sum().backward()
        variable = all_gather_variable(torch.full((rank + 1, 2), float(rank)))
        # an empty evaluation share that does not know the others' row width (zeros(0, 1))
        share = torch.zeros(0, 1) if rank == 1 else torch.full((2, 5), float(rank))
        uneven = all_gather_variable(share)
        saved = {"gathered": gathered.detach(), "grad": x.grad, "variable": variable, "uneven": uneven}
        torch.save(saved, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_orders_by_rank_and_routes_summed_gradients_to_the_owner(tmp_path):
    world_size = 3
    mp.spawn(
        _gather_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=world_size, join=True
    )
    outs = [torch.load(f"{tmp_path / 'res'}.{r}", weights_only=False) for r in range(world_size)]
    weights = torch.arange(18, dtype=torch.float64).view(6, 3)
    total_scale = sum(r + 1 for r in range(world_size))  # every rank's loss reaches every row
    for rank, out in enumerate(outs):
        assert out["gathered"][:, 0].tolist() == [1, 1, 2, 2, 3, 3]
        torch.testing.assert_close(out["grad"], weights[2 * rank : 2 * rank + 2] * total_scale)
        assert out["variable"][:, 0].tolist() == [0, 1, 1, 2, 2, 2]
        assert out["uneven"].shape == (4, 5) and out["uneven"][:, 0].tolist() == [0, 0, 2, 2]


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x


def test_the_exactness_test_covers_the_issue_17_losses():
    """The losses added for issue #17 enter the R=2/R=3 run through the registry; both
    trainer paths (rank shares, whole global batch) and pair means are among them."""
    assert PML_CHECKED_PAIR_LOSSES | {"triplet_margin+batch_hard", "triplet_margin+hdc"} <= set(LOSSES)
    assert {"arcface", "subcenter_arcface", "cosface", "sphereface", "large_margin_softmax", "p2sgrad"} <= set(
        PROXY_LOSSES
    )
    assert "fast_ap" in LOSSES and {"smooth_ap", "pnp", "dynamic_soft_margin"} <= set(PROXY_LOSSES)
    assert make_loss("ntxent").pair_mean and make_loss("ntxent").rank_decomposable
    assert not make_loss("intra_pair_variance").rank_decomposable
    assert make_loss("triplet_margin+batch_hard").rank_decomposable
    assert not make_loss("triplet_margin+hdc").rank_decomposable
    # the last ones: instance and manifold on the whole global batch, the new miners' two paths
    assert {"instance", "manifold"} <= set(PROXY_LOSSES)
    assert not make_loss("instance").rank_decomposable and not make_loss("manifold").rank_decomposable
    assert make_loss("triplet_margin+angular").rank_decomposable
    assert not make_loss("triplet_margin+uniform_histogram").rank_decomposable
