"""Checkpoint files: saved with ``torch.save``, loaded with ``weights_only=True`` only.

A checkpoint holds tensors and plain Python values (see ``Trainer.state_dict``; RNG states
are converted by ``train.rng_state``), so loading never runs code from the file: whoever can
write to a run folder cannot execute anything on the workers that resume it, nor on the
laptop that runs ``dmlray eval``.

``latest_checkpoint`` picks a run's newest *complete* checkpoint in the order the run wrote
them: Ray Train V2's ``checkpoint_manager_snapshot.json`` lists the registered ones (a
half-uploaded folder is not registered yet); without it (local mode's ``checkpoint_local``)
the state file's modification time orders them. A state file that is not a whole zip
archive (``torch.save``'s format) is skipped as incomplete.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile

import torch

from dmlray.data import storage

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of registered checkpoints, in the run folder (ray 2.60)."""
LOCAL_CHECKPOINT = "checkpoint_local"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded safely; the message names the file."""


def state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_state(data: bytes, source: str, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's state from its bytes; only tensors and plain values are accepted."""
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: the file wants to run code
        first = str(exc).strip().splitlines()[-1][:300]
        raise CheckpointError(
            f"{source}: refused to load: it holds objects other than tensors and plain values, "
            f"which could run code ({first}); a checkpoint written before dmlray stored RNG "
            "states as tensors needs run.fresh=true"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{source}: not a dmlray checkpoint (expected a mapping with model and step)")
    return state


def load_state_file(url: str, device: torch.device | str = "cpu") -> dict:
    return load_state(storage.read_bytes(url), url, device)


def is_complete(data: bytes) -> bool:
    """True when the bytes are a whole zip archive (torch.save's format): a half-written file is not."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def registered_checkpoints(run_url: str) -> list[str] | None:
    """Checkpoint folder names Ray Train registered, oldest first; None without a snapshot."""
    url = storage.join(run_url, SNAPSHOT_FILE)
    if not storage.exists(url):
        return None
    try:
        snapshot = json.loads(storage.read_bytes(url))
        results = snapshot.get("checkpoint_results") or []
        indices = snapshot.get("checkpoint_report_indices") or list(range(len(results)))
        names = [
            r["checkpoint_dir_name"] for _, r in sorted(zip(indices, results, strict=True), key=lambda pair: pair[0])
        ]
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s is unreadable (%s): ordering checkpoints by modification time", url, exc)
        return None
    if latest and latest not in names:
        names.append(latest)
    elif latest:  # the latest is last, whatever the report indices say
        names = [n for n in names if n != latest] + [latest]
    return names


def checkpoint_candidates(run_url: str) -> list[str]:
    """A run's checkpoint folder names, newest first (see the module docstring)."""
    present = [n for n in storage.list_dir(run_url) if n.startswith("checkpoint_") and n != SNAPSHOT_FILE]
    registered = registered_checkpoints(run_url)

    def written(name: str) -> float:
        return storage.modified(storage.join(run_url, name, STATE_FILE)) or 0.0

    if registered is None:
        return sorted(present, key=lambda n: (written(n), n), reverse=True)
    newest = [n for n in reversed(registered) if n in present]
    if LOCAL_CHECKPOINT in present and (not newest or written(LOCAL_CHECKPOINT) > written(newest[0])):
        newest.insert(0, LOCAL_CHECKPOINT)  # a later local-mode run of the same name
    elif LOCAL_CHECKPOINT in present:
        newest.append(LOCAL_CHECKPOINT)
    return newest


def latest_checkpoint(run_url: str) -> str | None:
    """URL of the run's newest complete checkpoint folder; None when it has none."""
    for name in checkpoint_candidates(run_url):
        url = storage.join(run_url, name)
        state = storage.join(url, STATE_FILE)
        if storage.exists(state) and is_complete(storage.read_bytes(state)):
            return url
        log.warning("skipping %s: no complete %s (still being written, or cut off)", url, STATE_FILE)
    return None
