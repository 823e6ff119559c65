"""Pair and triplet selection shared by the losses; masks in, masks out, no host sync."""

from __future__ import annotations

import torch


def ms_mine(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-similarity mining: the hard pairs of each anchor.

    N'_i = {n ∈ N_i : s_in + ε > min_{p∈P_i} s_ip},
    P'_i = {p ∈ P_i : s_ip − ε < max_{n∈N_i} s_in}.
    An anchor without positives keeps no negatives and vice versa.
    """
    big = torch.finfo(sim.dtype).max
    # mining thresholds are selections, not part of the loss's gradient
    s = sim.detach()
    min_pos = torch.where(pos, s, torch.full_like(s, big)).min(dim=1, keepdim=True).values
    max_neg = torch.where(neg, s, torch.full_like(s, -big)).max(dim=1, keepdim=True).values
    hard_neg = neg & (s + margin > min_pos)
    hard_pos = pos & (s - margin < max_neg)
    return hard_pos, hard_neg
