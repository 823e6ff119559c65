"""Learning-rate schedules against torch's own schedulers and the closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from dmlray.training.schedules import ScheduleSettings, build_scheduler


def _optimizer(lrs=(0.1,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _rates(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The learning rate of every group at each step, stepping as the trainer does (once per step)."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_step_schedule_with_warmup_equals_torch_linear_then_multistep():
    ours = _optimizer((0.1, 10.0))
    sched = build_scheduler(
        ours, ScheduleSettings("step", 60, milestones=(20, 40), gamma=0.5, warmup_steps=8, warmup_start=0.1)
    )
    theirs = _optimizer((0.1, 10.0))
    chained = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.LinearLR(theirs, start_factor=0.1, total_iters=8),
            torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=[20, 40], gamma=0.5),
        ]
    )
    got, want = _rates(ours, sched, 60), _rates(theirs, chained, 60)
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-12)
    assert got[-1][1] / got[-1][0] == pytest.approx(100.0)  # groups keep their ratio


def test_cosine_without_warmup_equals_torch_cosine_annealing():
    ours = _optimizer()
    sched = build_scheduler(ours, ScheduleSettings(schedule="cosine", total_steps=30, cosine_floor=0.2))
    theirs = _optimizer()
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=30, eta_min=0.02)
    for a, b in zip(_rates(ours, sched, 30), _rates(theirs, annealing, 30), strict=True):
        assert a == pytest.approx(b, rel=1e-9)


def test_cosine_after_warmup_follows_the_closed_form():
    ours = _optimizer()
    sched = build_scheduler(ours, ScheduleSettings(schedule="cosine", total_steps=25, warmup_steps=5, warmup_start=0.0))
    rates = [r[0] for r in _rates(ours, sched, 25)]
    for t, rate in enumerate(rates):
        if t < 5:
            want = 0.1 * t / 5
        else:
            want = 0.1 * 0.5 * (1 + math.cos(math.pi * (t - 5) / 20))
        assert rate == pytest.approx(want, abs=1e-12), t
    assert rates[5] == pytest.approx(0.1)  # the peak is reached right after the warm-up


def test_resumed_scheduler_continues_identically():
    a = _optimizer()
    sa = build_scheduler(a, ScheduleSettings(schedule="cosine", total_steps=40, warmup_steps=6, warmup_start=0.25))
    _rates(a, sa, 17)
    state = sa.state_dict()
    b = _optimizer()
    sb = build_scheduler(b, ScheduleSettings(schedule="cosine", total_steps=40, warmup_steps=6, warmup_start=0.25))
    sb.load_state_dict(state)
    b.param_groups[0]["lr"] = a.param_groups[0]["lr"]  # the optimiser's state travels in its own checkpoint
    assert _rates(a, sa, 10) == _rates(b, sb, 10)


def test_constant_rate_needs_no_scheduler_and_bad_settings_are_named():
    assert build_scheduler(_optimizer(), ScheduleSettings(schedule="step", total_steps=10)) is None
    with pytest.raises(ValueError, match="warm-up of -1 steps"):
        build_scheduler(_optimizer(), ScheduleSettings(schedule="cosine", total_steps=10, warmup_steps=-1))
    with pytest.raises(ValueError, match="cosine_floor=1.5"):
        build_scheduler(_optimizer(), ScheduleSettings(schedule="cosine", total_steps=10, cosine_floor=1.5))
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        build_scheduler(_optimizer(), ScheduleSettings(schedule="linear", total_steps=10, warmup_steps=2))  # type: ignore[arg-type]
