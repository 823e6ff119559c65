"""The Trainer's options, in one process: memory ramp, accumulation, bf16, validation split."""

from __future__ import annotations

import pytest
import torch

from dmlray import losses
from dmlray.jobs.worker import split_validation
from dmlray.models import EmbeddingModel
from dmlray.models.glyph_cnn import GlyphCNN
from dmlray.training.memory import CrossBatchMemory
from dmlray.training.trainer import Trainer


def make_trainer(**kwargs) -> Trainer:
    torch.manual_seed(0)
    model = EmbeddingModel(GlyphCNN(in_channels=1, width=4, norm="batch"), embedding_dim=8)
    gen = torch.Generator().manual_seed(0)

    def batches(start):
        while True:
            yield torch.randn(16, 1, 8, 8, generator=gen), torch.arange(4).repeat_interleave(4)

    options = dict(
        model=model,
        loss_fn=losses.build("multi_similarity"),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        batches=batches,
        steps=6,
        device=torch.device("cpu"),
        log_every=1,
        eval_every=100,
    )
    options.update(kwargs)
    return Trainer(**options)


def test_memory_weight_ramps_linearly_from_the_start_step():
    trainer = make_trainer(memory=CrossBatchMemory(64, 8), memory_start=2, memory_weight=0.5, memory_ramp_steps=4)
    assert [trainer.memory_weight_at(s) for s in range(8)] == [0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    history = trainer.train()
    assert [h["memory_weight"] for h in history] == [0, 0, 0.125, 0.25, 0.375, 0.5]
    assert history[0]["memory_loss"] is None and history[2]["memory_loss"] is not None
    assert history[-1]["memory_fill"] == 16 * 4  # filled from step 2 on


def test_accumulation_draws_micro_batches_and_fills_memory_with_each():
    trainer = make_trainer(accumulate=3, memory=CrossBatchMemory(1000, 8), steps=2)
    history = trainer.train()
    assert history[-1]["memory_fill"] == 2 * 3 * 16


def test_independent_accumulation_of_one_batch_split_in_two_averages_the_micro_losses():
    """Gradient of accumulate=2 (independent) equals the gradient of the mean of the two micro-batch losses."""
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.arange(4).repeat(4)
    trainer = make_trainer(accumulate=2, accumulate_mode="independent", dtype=torch.float64)
    trainer.model.double()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
    trainer.train_step([(images[:8], labels[:8]), (images[8:], labels[8:])])
    accumulated = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.optimizer.zero_grad()
    loss_fn = losses.build("multi_similarity")
    ((loss_fn(trainer.model(images[:8]), labels[:8]) + loss_fn(trainer.model(images[8:]), labels[8:])) / 2).backward()
    for a, p in zip(accumulated, trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_bf16_autocast_trains_with_finite_float32_losses():
    history = make_trainer(amp="bf16", channels_last=True, memory=CrossBatchMemory(64, 8)).train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert len(history) == 6


def test_exact_accumulation_trains_under_bf16_autocast_and_channels_last():
    trainer = make_trainer(amp="bf16", channels_last=True, accumulate=2, memory=CrossBatchMemory(64, 8), steps=3)
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor([h["loss"], h["memory_loss"]])).all() for h in history)
    assert history[-1]["memory_fill"] == 64  # 3 steps of 2 × 16 rows, the ring full


def test_checkpoint_cadence_reports_state_without_evaluating():
    reports = []
    trainer = make_trainer(
        checkpoint_every=2,
        eval_every=100,
        steps=6,
        log_every=3,
        report=lambda record, history, state: reports.append((record["step"], state is not None)),
    )
    trainer.train()
    assert reports == [(2, True), (3, False), (4, True), (6, True)]


def test_state_dict_round_trip_resumes_the_same_run():
    a = make_trainer(memory=CrossBatchMemory(64, 8), steps=3)
    a.train()
    b = make_trainer(memory=CrossBatchMemory(64, 8), steps=3)
    b.load_state_dict(a.state_dict())
    assert b.step == 3 and b.restarts == 1 and b.history == a.history
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(a.memory.contents()[0], b.memory.contents()[0])


def test_records_name_the_checkpoint_step_their_attempt_resumed_from():
    a = make_trainer(steps=4, log_every=1, checkpoint_every=2)
    a.train()
    assert [r["resumed_from"] for r in a.history] == [0, 0, 0, 0]
    checkpoint = a.state_dict()
    b = make_trainer(steps=6, log_every=1)
    b.load_state_dict(checkpoint)
    b.train()
    # the restored history keeps the first attempt's records; the new ones name step 4
    assert [(r["step"], r["restarts"], r["resumed_from"]) for r in b.history] == [
        (1, 0, 0),
        (2, 0, 0),
        (3, 0, 0),
        (4, 0, 0),
        (5, 1, 4),
        (6, 1, 4),
    ]


def test_validation_classes_are_a_disjoint_seeded_subset():
    classes = list(range(100, 160))
    train, val = split_validation(classes, 0.25, seed=3)
    assert len(val) == 15 and not set(train) & set(val) and sorted(train + val) == classes
    assert split_validation(classes, 0.25, seed=3) == (train, val)
    assert split_validation(classes, 0.0, seed=3) == (classes, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation([1, 2, 3], 0.9, seed=0)


def test_sampling_losses_get_the_run_seed_and_draw_the_same_on_every_rank():
    from dmlray.config import LossConfig
    from dmlray.jobs.worker import build_loss

    a, b = build_loss(LossConfig(name="margin"), 4, 8, seed=7), build_loss(LossConfig(name="margin"), 4, 8, seed=7)
    assert a.seed == b.seed == 7
    assert build_loss(LossConfig(name="margin", params={"seed": 3}), 4, 8, seed=7).seed == 3  # config wins
    assert "seed" not in vars(build_loss(LossConfig(name="multi_similarity"), 4, 8, seed=7))  # no such option
    x = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    y = torch.arange(16) % 4
    torch.manual_seed(0)
    first = a(x, y)
    torch.manual_seed(1)  # another global RNG state (another rank): same draws
    assert torch.equal(first, b(x, y))


def _one_step_update(**kwargs) -> torch.Tensor:
    """The flat parameter change of one SGD step (lr 0.1, no momentum) from the seeded start."""
    trainer = make_trainer(steps=1, **kwargs)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - before


def test_gradient_clipping_scales_the_step_to_the_norm_and_keeps_its_direction():
    free = _one_step_update()
    clipped = _one_step_update(clip_grad_norm=1e-3)
    assert free.norm() / 0.1 > 1e-2  # the unclipped gradient is well above the bound
    assert (clipped.norm() / 0.1).item() == pytest.approx(1e-3, rel=1e-3)
    cosine = torch.nn.functional.cosine_similarity(free, clipped, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(_one_step_update(clip_grad_norm=1e6), free)  # a bound above the norm changes nothing
