"""A preemption notice (SIGTERM) turned into a checkpoint at the next step boundary.

Spot and preemptible machines, Kubernetes pod evictions and `ray stop` announce the end
with SIGTERM and a grace period. The handler only sets a flag; the Trainer finishes the
step in progress, asks every rank whether any was told to stop (one all-reduced int: the
checkpoint report is a barrier, so all ranks must stop at the same step), reports a
checkpoint and raises :class:`Preempted`. The worker group then restarts
(``run.max_failures``) and resumes from that checkpoint: no step is lost.

A second SIGTERM, or the grace period running out, ends the process the way the handler
it replaced would have (Ray's: exit at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GRACE_S = 120.0  # after the notice: time to finish the step and store the checkpoint

_requested = threading.Event()
_previous: object = None


class Preempted(RuntimeError):
    """Training stopped early on a preemption notice, after the checkpoint of ``step``."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): stopped after the checkpoint of step {step}; "
                         "a restart resumes from it")
        self.step = step


def request_stop() -> None:
    """Ask the training loop of this process to checkpoint and stop after its current step."""
    _requested.set()


def reset() -> None:
    """Forget an earlier request (a new training attempt in the same process)."""
    _requested.clear()


def stop_agreed(device: torch.device) -> bool:
    """True on every rank as soon as any rank was asked to stop (a MAX all-reduce of one
    int; no communication at world size 1)."""
    flag = _requested.is_set()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    # nccl reduces device tensors only; gloo reduces CPU tensors
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=where)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _on_sigterm(signum: int, frame) -> None:
    if _requested.is_set():  # a second notice: do not wait any longer
        log.warning("second SIGTERM: exiting now")
        _exit_as_before(signum, frame)
        return
    log.warning("SIGTERM: finishing this step, writing a checkpoint, then stopping (grace %.0fs)", GRACE_S)
    request_stop()
    timer = threading.Timer(GRACE_S, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True  # a process that stopped in time is not held up by it
    timer.start()


def _exit_as_before(signum: int, frame) -> None:
    if callable(_previous):
        _previous(signum, frame)
    raise SystemExit(128 + signum)


def install_sigterm_handler() -> bool:
    """Make SIGTERM request a stop (see the module docstring). Signal handlers can only be
    set from the main thread: returns False (and changes nothing) anywhere else."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous = current
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True
