"""The one place that gathers across ranks, with its gradient semantics spelled out.

Everything here is the identity at world size 1 (or without an initialised process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows in rank order.

    Backward: every rank's loss depends on all gathered rows, so the gradient of a row is
    the sum over ranks of the gradients that reached it; each rank keeps its own slice of
    that sum (a reduce-scatter, done as all_reduce + slice so gloo supports it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) concatenated in rank order.

    Gradients flow back to the rank that owns each row, summed over all ranks' losses.
    With DDP averaging parameter gradients over R ranks, a loss that is a mean over local
    anchors then gives exactly the gradient of the mean over the global batch.
    Identity at world size 1.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) in rank order, detached (labels, memory)."""
    _, world_size = world()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs across ranks (evaluation), detached."""
    _, world_size = world()
    if world_size == 1:
        return x
    # every rank's whole shape: a rank with no rows may not know the trailing dimensions
    # (an empty evaluation share), and gloo needs equal-sized buffers on every rank
    shape = torch.tensor([list(x.shape)], dtype=torch.long, device=x.device)
    shapes = all_gather_no_grad(shape).tolist()
    counts = [s[0] for s in shapes]
    trailing = {tuple(s[1:]) for s in shapes if s[0] > 0}
    if len(trailing) > 1:
        raise ValueError(f"all_gather_variable: ranks hold rows of different shapes {sorted(trailing)}")
    if trailing and x.shape[0] == 0:
        x = x.new_zeros((0, *trailing.pop()))
    longest = max(counts)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    gathered = all_gather_no_grad(padded)
    return torch.cat([gathered[i * longest : i * longest + n] for i, n in enumerate(counts)], dim=0)


def all_gather_list(items: list) -> list:
    """Concatenate every rank's list of picklable items in rank order (keys, names)."""
    _, world_size = world()
    if world_size == 1:
        return list(items)
    parts: list = [None] * world_size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    _, world_size = world()
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
