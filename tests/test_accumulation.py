"""Exact gradient accumulation: n micro-batches on R gloo ranks against one process on n·R·b.

The trainer's ``accumulate_mode="exact"`` (gradient caching) must give, for every kind of
loss the trainer runs (per-anchor, pair-mean, whole-batch, with loss parameters), with
and without the cross-batch memory, the parameter gradients of one process computing the
loss once on the concatenated batch. The model has dropout and BatchNorm, so the reference
embeds the batch chunk by chunk (BatchNorm statistics are per micro-batch and per rank, as
in any DDP run without SyncBN), each rank's chunks in order from the rank's RNG state:
the replayed forward must match its no-grad forward for the gradients to agree, and the
running statistics must be updated once per micro-batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import VARIANTS, make_loss
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from dmlray import losses
from dmlray.config import ConfigError, config_from_dict
from dmlray.training.memory import CrossBatchMemory
from dmlray.training.trainer import Trainer

LOCAL_BATCH = 12  # b: 4 classes × 3 per micro-batch
STEPS = 2
MEMORY = 60  # smaller than n·R·b at n = 4, R = 2: the ring wraps within a step
ACCUMULATE = [1, 2, 4]
LOSSES = {
    "multi_similarity": "per-anchor",
    "triplet_semihard": "pair-mean",
    "histogram": "whole-batch",
    "contrastive+distance_weighted": "whole-batch, samples from the global RNG",
    "proxy_anchor": "whole-batch, proxies, no references",
    "proxy_nca": "per-anchor, proxies, no references (no gather)",
}


def supports_references(name: str) -> bool:
    return losses.loss_class(VARIANTS.get(name, (name, {}))[0]).supports_references


CASES = [
    (name, n, memory)
    for name in LOSSES
    for n in ACCUMULATE
    for memory in ((False, True) if supports_references(name) else (False,))
]


class TinyNet(nn.Module):
    """Linear → BatchNorm → ReLU → dropout → linear, L2-normalised: RNG and buffers in the forward."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), dim=1)


def make_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().double()


def make_data(world_size: int, n: int) -> list[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """data[step][rank][micro] = (inputs, labels), the same in every process."""
    gen = torch.Generator().manual_seed(1)

    def chunk():
        labels = torch.arange(4).repeat(3)[torch.randperm(LOCAL_BATCH, generator=gen)]
        return torch.randn(LOCAL_BATCH, 6, generator=gen, dtype=torch.float64), labels

    return [[[chunk() for _ in range(n)] for _ in range(world_size)] for _ in range(STEPS)]


def step_seed(step: int) -> int:
    return 100 + step  # every rank starts a step from the same RNG state, as the trainer's do


def snapshot(model: nn.Module, loss_fn: nn.Module) -> dict:
    return {
        "grad": torch.cat([p.grad.flatten() for p in model.parameters()]).clone(),
        "loss_grad": [p.grad.clone() for p in loss_fn.parameters() if p.grad is not None],
        "buffers": [b.clone() for b in model.buffers()],
    }


def run_trainer(name: str, n: int, use_memory: bool, rank: int, world_size: int) -> list[dict]:
    """STEPS exact-accumulation steps of the real Trainer on this rank's micro-batches."""
    model, loss_fn = make_model(), make_loss(name)
    net = DistributedDataParallel(model) if world_size > 1 else model
    trainer = Trainer(
        model=net,
        raw_model=model,
        loss_fn=loss_fn,
        optimizer=torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.5),
        scheduler=None,
        batches=lambda start: iter(()),
        steps=STEPS,
        device=torch.device("cpu"),
        dtype=torch.float64,
        memory=CrossBatchMemory(MEMORY, 8, dtype=torch.float64) if use_memory else None,
        accumulate=n,
        accumulate_mode="exact",
    )
    out = []
    for step, ranks in enumerate(make_data(world_size, n)):
        torch.manual_seed(step_seed(step))
        result = trainer.train_step(ranks[rank])
        out.append({"loss": result.loss.clone(), "rng_after": torch.get_rng_state(), **snapshot(model, loss_fn)})
    return out


def reference(name: str, n: int, use_memory: bool, world_size: int) -> list[dict]:
    """One process, loss computed once on the concatenated n·R·b batch (rank-major order)."""
    model, loss_fn = make_model(), make_loss(name)
    optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.5)
    memory = CrossBatchMemory(MEMORY, 8, dtype=torch.float64) if use_memory else None
    params = dict(model.named_parameters())
    out = []
    for step, ranks in enumerate(make_data(world_size, n)):
        optimizer.zero_grad()
        start = {k: b.clone() for k, b in model.named_buffers()}
        parts, rank0_buffers = [], None
        for rank, chunks in enumerate(ranks):
            torch.manual_seed(step_seed(step))  # each rank's forwards draw from its own stream
            buffers = {k: b.clone() for k, b in start.items()}  # each rank its own statistics
            parts += [functional_call(model, {**params, **buffers}, x) for x, _ in chunks]
            rank0_buffers = buffers if rank == 0 else rank0_buffers
        embeddings = torch.cat(parts)
        labels = torch.cat([y for chunks in ranks for _, y in chunks])
        loss = loss_fn(embeddings, labels)
        if memory is not None:
            slots = memory.enqueue(embeddings.detach(), labels)
            mem_emb, mem_labels = memory.contents()
            loss = loss + loss_fn(embeddings, labels, mem_emb, mem_labels, slots)
        loss.backward()
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(rank0_buffers[k])
        out.append({"loss": loss.detach(), "rng_after": torch.get_rng_state(), **snapshot(model, loss_fn)})
        optimizer.step()
    return out


def check(case: tuple, ranks: list[list[dict]], ref: list[dict]) -> None:
    world_size = len(ranks)
    for step, expected in enumerate(ref):
        where = f"{case} R={world_size} step {step}"
        # each rank's loss is its share: their mean is the global loss
        mean_loss = sum(r[step]["loss"] for r in ranks) / world_size
        torch.testing.assert_close(mean_loss, expected["loss"], rtol=1e-9, atol=1e-12, msg=where)
        assert expected["grad"].abs().sum() > 0, f"{where}: degenerate reference"
        for rank in ranks:
            torch.testing.assert_close(rank[step]["grad"], expected["grad"], rtol=1e-6, atol=1e-12, msg=where)
            assert len(rank[step]["loss_grad"]) == len(expected["loss_grad"]), where
            for got, want in zip(rank[step]["loss_grad"], expected["loss_grad"], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=f"{where} (loss parameters)")
            # the generators end where the no-grad pass and the loss left them: as one pass
            assert torch.equal(rank[step]["rng_after"], expected["rng_after"]), f"{where}: RNG not restored"
        # DDP broadcasts rank 0's buffers before each forward: rank 0's are its own trajectory
        for got, want in zip(ranks[0][step]["buffers"], expected["buffers"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{where} (BatchNorm statistics)")


def run_cases(rank: int, world_size: int) -> dict:
    return {case: run_trainer(*case, rank, world_size) for case in CASES}


def _worker(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        torch.save(run_cases(rank, world_size), f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def check_all(ranks: list[dict]) -> None:
    failures = []
    for case in CASES:
        try:
            check(case, [r[case] for r in ranks], reference(*case, len(ranks)))
        except AssertionError as exc:
            failures.append(f"{case}: {' '.join(str(exc).split())[:300]}")
    assert not failures, "\n".join(failures)


def test_the_cases_cover_every_kind_of_loss():
    kinds = {name: make_loss(name) for name in LOSSES}
    assert any(getattr(k, "pair_mean", False) for k in kinds.values())
    assert not kinds["histogram"].rank_decomposable and kinds["histogram"].supports_references
    assert not kinds["proxy_anchor"].supports_references and not kinds["proxy_anchor"].rank_decomposable
    assert list(kinds["proxy_anchor"].parameters()) and list(kinds["proxy_nca"].parameters())
    assert kinds["proxy_nca"].rank_decomposable
    assert {(n, m) for _, n, m in CASES} == {(n, m) for n in ACCUMULATE for m in (False, True)}


def test_one_rank_matches_one_process_on_the_concatenated_batch():
    check_all([run_cases(0, 1)])


def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    check_all([torch.load(f"{tmp_path / 'res'}.{r}", weights_only=False) for r in range(2)])


@pytest.mark.parametrize("name", ["multi_similarity", "triplet_semihard"])
def test_independent_accumulation_is_not_the_large_batch(name):
    """The old mode sees pairs only within a micro-batch: a different gradient (guards the check)."""
    case = (name, 2, False)
    model, loss_fn = make_model(), make_loss(name)
    trainer = Trainer(
        model=model,
        loss_fn=loss_fn,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        scheduler=None,
        batches=lambda start: iter(()),
        steps=1,
        device=torch.device("cpu"),
        dtype=torch.float64,
        accumulate=2,
        accumulate_mode="independent",
    )
    torch.manual_seed(step_seed(0))
    trainer.train_step(make_data(1, 2)[0][0])
    independent = torch.cat([p.grad.flatten() for p in model.parameters()])
    exact = reference(*case, 1)[0]["grad"]
    assert not torch.allclose(independent, exact, rtol=1e-3)


def test_the_mode_is_checked_by_the_config_and_the_trainer():
    assert config_from_dict({}).train.accumulate_mode == "exact"
    assert config_from_dict({"train": {"accumulate_mode": "independent"}}).train.accumulate_mode == "independent"
    with pytest.raises(ConfigError, match=r"train\.accumulate_mode must be exact or independent, got 'sum'"):
        config_from_dict({"train": {"accumulate_mode": "sum"}})
    model = make_model()
    with pytest.raises(ValueError, match="accumulate_mode must be exact or independent, got 'sum'"):
        Trainer(
            model=model,
            loss_fn=make_loss("multi_similarity"),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            scheduler=None,
            batches=lambda start: iter(()),
            steps=1,
            device=torch.device("cpu"),
            accumulate_mode="sum",
        )
