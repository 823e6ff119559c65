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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ScheduleSettings:
    """One run's learning-rate schedule (the optim.* fields of the config)."""

    schedule: Schedule
    """step: ×gamma at each milestone; cosine: half a cosine down to cosine_floor."""
    total_steps: int
    """The run's optimisation steps (the cosine ends at the last)."""
    milestones: tuple[int, ...] = ()
    """Steps at which a step schedule multiplies the rate by gamma."""
    gamma: float = 0.1
    """The step schedule's factor per milestone."""
    warmup_steps: int = 0
    """Linear warm-up over this many first steps (any schedule); 0 = none."""
    warmup_start: float = 0.0
    """Fraction of each rate at step 0 of the warm-up."""
    cosine_floor: float = 0.0
    """Fraction of each rate left at the last step of a cosine schedule."""

    def check(self) -> None:
        """Refuse settings that make no schedule, naming them."""
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"optim.schedule={self.schedule!r}: expected 'step' or 'cosine'")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_start <= 1.0:
            raise ValueError(
                f"warm-up of {self.warmup_steps} steps from {self.warmup_start}: need steps >= 0, start in [0, 1]"
            )
        if not 0.0 <= self.cosine_floor <= 1.0:
            raise ValueError(f"optim.cosine_floor={self.cosine_floor}: expected a fraction in [0, 1]")

    def constant(self) -> bool:
        """True where the rate never changes (no scheduler needed)."""
        return self.schedule == "step" and not self.milestones and self.warmup_steps <= 0

    def __call__(self, step: int) -> float:
        """The multiplier of every base learning rate at ``step`` (0-based: the step about to run)."""
        if self.schedule == "cosine":
            decay = cosine_factor(step, self.warmup_steps, self.total_steps, self.cosine_floor)
        else:
            decay = step_factor(step, self.milestones, self.gamma)
        return warmup_factor(step, self.warmup_steps, self.warmup_start) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: ScheduleSettings
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A scheduler stepping once per optimisation step, or None where the rate never changes.

    The settings object is the scheduler's factor function: a frozen dataclass pickles, and a
    resumed run's factor is recomputed from the step alone.
    """
    settings.check()
    if settings.constant():
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, settings)
