"""Name → loss class. Users choose losses by name in configs; a duplicate name is an error.

Every registered class is a ``PairLoss``: its capability attributes are the interface the
trainer, the worker and the config read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from dmlray.losses.base import PairLoss

_LOSSES: dict[str, type[PairLoss]] = {}

T = TypeVar("T", bound=type[PairLoss])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make the loss buildable as ``build(name, **kwargs)``."""

    def add(cls: T) -> T:
        if name in _LOSSES:
            raise ValueError(f"loss name {name!r} is already registered by {_LOSSES[name].__qualname__}")
        _LOSSES[name] = cls
        return cls

    return add


def loss_class(name: str) -> type[PairLoss]:
    """The class registered under ``name``; an unknown name lists the known ones."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known losses: {', '.join(names())}") from None


def build(name: str, **kwargs) -> PairLoss:
    """Build the loss registered under ``name`` with its keyword arguments."""
    cls = loss_class(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"loss {name!r}: {exc}") from None


def names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)
