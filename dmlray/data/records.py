"""The unit of packing: one encoded image with its label and metadata."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dmlray.data.sources import ImageFile


@dataclass
class Sample:
    """One sample as stored in a shard: ``{key}.{ext}``, ``{key}.cls``, ``{key}.json``.

    Either ``data`` holds the encoded image, or ``source`` names a file that is read
    (and maybe pre-resized) only when the sample's shard is written, in a worker thread.
    """

    key: str
    """Unique key within the dataset (no dots: WebDataset splits keys at the first dot)."""
    label: int
    """Integer class id."""
    data: bytes = b""
    """The encoded image, as read from the source (or pre-resized)."""
    ext: str = "jpg"
    """Encoding: jpg or png."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Original relative path and anything else worth keeping (stored as json)."""
    source: ImageFile | None = None
    """A file to read the image from when the shard is written (instead of ``data``)."""

    def meta_bytes(self) -> bytes:
        return json.dumps(self.meta, sort_keys=True).encode()

    def size_hint(self) -> int:
        """Bytes of the encoded image (exact, or estimated when pre-resizing)."""
        return len(self.data) if self.source is None else self.source.size_hint()

    def fingerprint(self) -> str:
        """Identifies the sample's content without reading its image file."""
        if self.source is None:
            content = hashlib.sha256(self.data).hexdigest()
        else:
            content = self.source.fingerprint()
        return f"{self.key}|{self.label}|{self.ext}|{content}|{self.meta_bytes().decode()}"

    def materialise(self) -> Sample:
        """This sample with its image bytes in ``data`` (reads ``source``)."""
        if self.source is None:
            return self
        data, ext = self.source.load()
        return replace(self, data=data, ext=ext, source=None)
