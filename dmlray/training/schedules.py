"""Learning-rate schedules over optimisation steps: a step or cosine decay, after an optional linear warm-up.

Every parameter group keeps its own base learning rate (network, head, loss parameters) and all are
scaled by the same factor, so "proxies at 100× the network's rate" holds throughout the schedule.
The factor is a pure function of the step, which makes a resumed run's learning rate exactly the one
an uninterrupted run would have had (the scheduler's state is just its step count).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

import torch

Schedule = Literal["step", "cosine"]


def warmup_factor(step: int, warmup_steps: int, start: float) -> float:
    """Linear warm-up: ``start`` at step 0, rising to 1 at ``warmup_steps`` (1 from then on)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


def step_factor(step: int, milestones: Sequence[int], gamma: float) -> float:
    """``gamma`` to the number of milestones reached (a milestone counts from its own step)."""
    return gamma ** bisect.bisect_right(sorted(milestones), step)


def cosine_factor(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Half a cosine from 1 down to ``floor`` over the steps after the warm-up."""
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(
    step: int,
    *,
    schedule: Schedule,
    total_steps: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    cosine_floor: float = 0.0,
) -> float:
    """The multiplier of every base learning rate at ``step`` (0-based: the step about to run)."""
    if schedule == "step":
        decay = step_factor(step, milestones, gamma)
    elif schedule == "cosine":
        decay = cosine_factor(step, warmup_steps, total_steps, cosine_floor)
    else:
        raise ValueError(f"optim.schedule={schedule!r}: expected 'step' or 'cosine'")
    return warmup_factor(step, warmup_steps, warmup_start) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: Schedule,
    total_steps: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    cosine_floor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A scheduler stepping once per optimisation step, or None where the rate never changes."""
    if schedule == "step" and not milestones and warmup_steps <= 0:
        return None
    if warmup_steps < 0 or not 0.0 <= warmup_start <= 1.0:
        raise ValueError(f"warm-up of {warmup_steps} steps from {warmup_start}: need steps >= 0, start in [0, 1]")
    if not 0.0 <= cosine_floor <= 1.0:
        raise ValueError(f"optim.cosine_floor={cosine_floor}: expected a fraction in [0, 1]")
    settings = {
        "schedule": schedule,
        "total_steps": total_steps,
        "milestones": tuple(milestones),
        "gamma": gamma,
        "warmup_steps": warmup_steps,
        "warmup_start": warmup_start,
        "cosine_floor": cosine_floor,
    }
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(settings))


class _Factor:
    """``lr_factor`` with fixed settings, as a picklable callable (a lambda would not be)."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.settings)
