"""Pretrained weights from a URL the user gives: a local path, ``file://`` or ``s3://``.

Nothing is ever downloaded from a model hub: users put the torchvision / timm / converted
Caffe state dict where their cluster can read it and name it in the config.

``load_state_dict_from_url`` reads and unwraps a checkpoint; ``load_pretrained`` checks it
against a backbone and loads it, with an error that lists every missing, unexpected and
wrongly-shaped key. Classifier keys that a backbone drops on purpose (``fc.*`` of a
torchvision ResNet, ``head.*`` of a timm ViT, ...) are passed in ``ignore_prefixes`` and
skipped silently, so a full ImageNet checkpoint loads into the headless backbone.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from torch import nn

# Prefixes that wrappers add in front of every key: DDP / DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts commonly nest the model's state dict.
_NESTING_KEYS = ("state_dict", "model")
_LISTED = 20  # keys listed per category in a mismatch error; the rest are counted


class StateDictMismatchError(ValueError):
    """A checkpoint does not fit a backbone; ``missing``, ``unexpected`` and ``mismatched``
    hold the offending keys (mismatched: keys present on both sides with different shapes)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def read_url_bytes(url: str) -> bytes:
    """The bytes at a local path, ``file://`` or ``s3://`` URL.

    S3 goes through ``dmlray.data.storage``, the project's one S3 path: boto3 (imported only
    there, only when needed) with the standard credential chain, ``AWS_ENDPOINT_URL`` for
    S3-compatible storage (SeaweedFS, MinIO), path-style addressing, retries, and errors
    that name the endpoint and bucket.
    """
    if urlparse(url).scheme == "s3":
        from dmlray.data import storage

        return storage.read_bytes(url)
    return _local_path(url).read_bytes()


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        # file:///abs/path (netloc empty) or file://relative/path (netloc is the first part)
        return Path(unquote(parsed.netloc + parsed.path))
    # a Windows drive letter parses as a one-letter scheme; anything longer is a real scheme
    if len(parsed.scheme) > 1:
        raise ValueError(f"pretrained weights must be a local path, file:// or s3:// URL, got {url!r}")
    return Path(url).expanduser()


def _deserialize(url: str, data: bytes | None) -> object:
    name = urlparse(url).path if "://" in url else url
    if name.endswith(".safetensors"):
        # timm / Hugging Face checkpoints are often safetensors; the package ships with timm
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data if data is not None else _local_path(url).read_bytes())
    source = io.BytesIO(data) if data is not None else _local_path(url)
    # weights_only: a checkpoint from a URL must not be able to run code on unpickling
    return torch.load(source, map_location="cpu", weights_only=True)


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: descends into ``state_dict`` / ``model`` entries
    and strips a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by all keys."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}; bounded so a cycle cannot loop
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"checkpoint holds no tensors; top-level keys: {sorted(map(str, obj))[:_LISTED]}")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_from_url(url: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path, ``file://`` URL or ``s3://`` URL.

    Accepts plain torchvision/timm state dicts, ``.safetensors`` files, and the common
    wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` key prefixes).
    Tensors are loaded on the CPU with ``torch.load(weights_only=True)``.
    """
    data = read_url_bytes(url) if urlparse(url).scheme == "s3" else None
    return unwrap_state_dict(_deserialize(url, data))


def _listing(title: str, keys: list[str]) -> str:
    shown = "\n".join(f"    {k}" for k in keys[:_LISTED])
    more = f"\n    ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return f"  {title} ({len(keys)}):\n{shown}{more}"


def check_state_dict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that ``module`` takes; raises StateDictMismatchError unless
    every key matches in name and shape, apart from keys starting with ``ignore_prefixes``."""
    ignore = tuple(ignore_prefixes)
    expected = module.state_dict()
    # checkpoints from before PyTorch 0.4 lack num_batches_tracked; BatchNorm fills it in
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not k.startswith(ignore)]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match {type(module).__name__}:"]
        problems = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        parts += [_listing(title, keys) for title, keys in problems if keys]
        if ignore:
            dropped = ", ".join(ignore)
            parts.append(
                f"  (keys starting with {dropped} belong to the dropped classifier and are ignored on purpose)"
            )
        raise StateDictMismatchError("\n".join(parts), missing, unexpected, mismatched)
    return {k: v for k, v in state.items() if k in expected}


def load_pretrained(
    module: nn.Module,
    url_or_state: str | Mapping[str, torch.Tensor],
    ignore_prefixes: Iterable[str] = (),
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Load a checkpoint (a URL for ``load_state_dict_from_url``, or a state dict already in
    memory) into ``module`` after ``check_state_dict``; returns ``module``.

    ``convert`` adapts a foreign layout first (timm's ViT filter, Caffe-era shapes).
    """
    if isinstance(url_or_state, str):
        source, state = url_or_state, load_state_dict_from_url(url_or_state)
    else:
        source, state = "state dict", unwrap_state_dict(url_or_state)
    if convert is not None:
        state = convert(state)
    # a fresh dict has no _metadata, so BatchNorm treats it as old-format and fills in a
    # missing num_batches_tracked instead of failing the strict load
    module.load_state_dict(check_state_dict(module, state, ignore_prefixes, source), strict=True)
    return module
