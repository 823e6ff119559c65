"""Name → backbone builder. A backbone is an ``nn.Module`` mapping images to (N, out_dim)
features and carrying an ``out_dim: int`` attribute; the embedding head sits on top."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator for a builder ``fn(**kwargs) -> nn.Module`` with ``.out_dim``."""

    def add(fn):
        if name in _BACKBONES:
            raise ValueError(f"backbone name {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return add


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone; an unknown name lists the known ones."""
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known backbones: {', '.join(backbone_names())}")
    model = _BACKBONES[name](**kwargs)
    if not isinstance(getattr(model, "out_dim", None), int):
        raise TypeError(f"backbone {name!r} must set an integer out_dim attribute")
    return model


def describe_backbone(model: nn.Module, out_dim: int, input_convention: str) -> None:
    """Give a third-party network the attributes every backbone carries.

    Set in the instance's ``__dict__``, which is what ``nn.Module.__setattr__`` does with a
    value that is neither a tensor nor a module (its signature admits only those two).
    """
    vars(model).update(out_dim=out_dim, input_convention=input_convention)


def backbone_names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_BACKBONES)
