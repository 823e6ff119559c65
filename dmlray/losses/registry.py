"""Name → loss class. Users choose losses by name in configs; a duplicate name is an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

_LOSSES: dict[str, type[nn.Module]] = {}

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make the loss buildable as ``build(name, **kwargs)``."""

    def add(cls: T) -> T:
        if name in _LOSSES:
            raise ValueError(f"loss name {name!r} is already registered by {_LOSSES[name].__qualname__}")
        _LOSSES[name] = cls
        return cls

    return add


def loss_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; an unknown name lists the known ones."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known losses: {', '.join(names())}") from None


def build(name: str, **kwargs) -> nn.Module:
    """Build the loss registered under ``name`` with its keyword arguments."""
    cls = loss_class(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"loss {name!r}: {exc}") from None


def names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)
