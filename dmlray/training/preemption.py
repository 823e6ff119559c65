"""A preemption notice (SIGTERM) turned into a checkpoint at the next step boundary.

Spot and preemptible machines, Kubernetes pod evictions and `ray stop` announce the end
with SIGTERM and a grace period. The handler only sets a flag; the Trainer finishes the
step in progress, asks every rank whether any was told to stop (one all-reduced int: the
checkpoint report is a barrier, so all ranks must stop at the same step), reports a
checkpoint and raises :class:`Preempted`. The worker group then restarts
(``run.max_failures``) and resumes from that checkpoint: no step is lost.

A second SIGTERM, or the grace period (``GRACE_S``) running out, ends the process at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GRACE_S = 120.0  # after the notice: time to finish the step and store the checkpoint

_requested = threading.Event()
_installed = False


class Preempted(RuntimeError):
    """Training stopped early on a preemption notice, after the checkpoint of ``step``."""

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): stopped after the checkpoint of step {step}; a restart resumes from it")
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


def _on_notice(count: int) -> None:
    """The `count`-th SIGTERM of this process."""
    if count > 1:  # a second notice: do not wait any longer
        log.warning("second SIGTERM: exiting now")
        os._exit(128 + signal.SIGTERM)
    log.warning("SIGTERM: finishing this step, writing a checkpoint, then stopping (grace %.0fs)", GRACE_S)
    request_stop()
    timer = threading.Timer(GRACE_S, lambda: os._exit(128 + signal.SIGTERM))
    timer.daemon = True  # a process that stopped in time is not held up by it
    timer.start()


def _watch(read_fd: int, forward_fd: int) -> None:
    """Read the signal numbers CPython's C-level handler writes to the wakeup fd."""
    count = 0
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if forward_fd >= 0:  # someone else's wakeup fd (an event loop) still hears of every signal
            with contextlib.suppress(OSError):
                os.write(forward_fd, data)
        for number in data:
            if number == signal.SIGTERM:
                count += 1
                _on_notice(count)


def _ignore(signum: int, frame) -> None:
    """The Python-level handler: nothing, the watcher thread acts (see install_sigterm_handler)."""


def install_sigterm_handler() -> bool:
    """Make SIGTERM request a stop (see the module docstring). Returns False, changing
    nothing, when not called from the main thread (only it may set signal handlers).

    Python runs signal handlers in the main thread, between bytecodes; in a Ray actor the
    main thread waits in C++ for tasks, so a Python handler would run late (seen: after
    training ended). CPython's C-level handler also writes the signal's number to the
    wakeup fd at once, whichever thread is busy: a small thread reads it and acts.
    """
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    if _installed:
        return True
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block
    signal.signal(signal.SIGTERM, _ignore)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd, previous), name="dmlray-sigterm", daemon=True).start()
    _installed = True
    return True
