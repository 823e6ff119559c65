"""The unit of packing: one encoded image with its label and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One sample as stored in a shard: ``{key}.{ext}``, ``{key}.cls``, ``{key}.json``."""

    key: str
    """Unique key within the dataset (no dots: WebDataset splits keys at the first dot)."""
    label: int
    """Integer class id."""
    data: bytes
    """The encoded image, as read from the source (or pre-resized)."""
    ext: str = "jpg"
    """Encoding: jpg or png."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Original relative path and anything else worth keeping (stored as json)."""
