"""Raw image files as packing sources: read lazily, checked, optionally pre-resized.

A reader lists a dataset's files without opening them (an :class:`ImageFile` per image);
the shard writers read them in parallel threads. Every failure is a
:class:`BadInputError` naming the file and the list that named it, so ``dmlray pack``
either stops with a clear message or, with ``--skip-bad``, leaves the image out and lists
it in the manifest.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

# encodings stored as they are; anything else is re-encoded (losslessly, as PNG)
_KEEP = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


class BadInputError(ValueError):
    """An image or list file of the raw dataset cannot be used; the message names it."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


@dataclass
class ImageFile:
    """One image of a raw dataset, read when its shard is written.

    ``resize`` > 0 shrinks the shorter side to that many pixels (never enlarges) and
    re-encodes (JPEG at ``quality``); 0 keeps the original bytes. ``verify`` decodes the
    image once, cheaply (JPEG at 1/8 scale), so a truncated or corrupt file is caught at
    packing time rather than in the middle of training.
    """

    path: str
    """Absolute path of the file."""
    listed_in: str = ""
    """The list file that names this image (for error messages)."""
    resize: int = 0
    quality: int = 95
    verify: bool = True
    _stat: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _hint: int | None = field(default=None, init=False, repr=False)

    def _where(self) -> str:
        return f" (listed in {self.listed_in})" if self.listed_in else ""

    def stat(self) -> tuple[int, int]:
        """(size, mtime_ns); a missing or unreadable file is a BadInputError."""
        if self._stat is None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                raise BadInputError(f"missing image {self.path}{self._where()}", self.path) from None
            except OSError as exc:
                raise BadInputError(f"cannot read image {self.path}{self._where()}: {exc}", self.path) from None
            self._stat = (st.st_size, st.st_mtime_ns)
        return self._stat

    def size_hint(self) -> int:
        """Bytes this image will take in a shard: exact for original bytes, estimated from
        the header's dimensions when pre-resizing (deterministic either way, so shard
        boundaries are the same on every run)."""
        if self._hint is None:
            size, _ = self.stat()
            if size == 0:
                raise BadInputError(f"empty image file {self.path}{self._where()}", self.path)
            hint = size
            if self.resize:
                width, height = self._header_size()
                hint = max(1, int(size * min(1.0, (self.resize / min(width, height)) ** 2)))
            self._hint = hint
        return self._hint

    def fingerprint(self) -> str:
        """Changes when the file or the way it is packed changes (for resuming)."""
        size, mtime = self.stat()
        return f"{size}:{mtime}:{self.resize}:{self.quality}"

    def _header_size(self) -> tuple[int, int]:
        from PIL import Image

        try:
            with Image.open(self.path) as image:
                return image.size
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
            raise BadInputError(f"cannot decode image {self.path}{self._where()}: {exc}", self.path) from None

    def load(self) -> tuple[bytes, str]:
        """(encoded bytes, extension jpg|png) as they go into the shard."""
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            raise BadInputError(f"missing image {self.path}{self._where()}", self.path) from None
        except OSError as exc:
            raise BadInputError(f"cannot read image {self.path}{self._where()}: {exc}", self.path) from None
        ext = _KEEP.get(Path(self.path).suffix.lower())
        try:
            if self.resize or ext is None:
                return shrink(data, self.resize, self.quality, keep_ext=ext)
            if self.verify:
                check_decodes(data)
            return data, ext
        except Exception as exc:
            raise BadInputError(f"cannot decode image {self.path}{self._where()}: {exc}", self.path) from None


def check_decodes(data: bytes) -> None:
    """Raise unless the bytes decode as an image. JPEGs decode at 1/8 scale: every
    entropy-coded block is still parsed, so truncation and corruption are caught, at a
    fraction of a full decode's cost."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()


def shrink(data: bytes, shorter: int, quality: int = 95, keep_ext: str | None = None) -> tuple[bytes, str]:
    """Shrink an encoded image so its shorter side is ``shorter`` pixels (0 or already
    small enough: unchanged size). Returns (bytes, ext): the original bytes when nothing
    needs to change, else JPEG (PNG when the source was PNG or not JPEG/PNG at all)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        small = min(width, height)
        if (not shorter or small <= shorter) and keep_ext is not None:
            check_decodes(data)
            return data, keep_ext
        if shorter and small > shorter:
            target = (max(1, round(width * shorter / small)), max(1, round(height * shorter / small)))
            # JPEG DCT scaling decodes straight to >= the target size: much cheaper
            image.draft("RGB", target)
        else:
            target = image.size
        image.load()
        picture: Image.Image = image
        if picture.mode not in ("RGB", "L"):
            picture = picture.convert("RGB")
        if picture.size != target:
            picture = picture.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        if keep_ext == "jpg":
            picture.save(out, format="JPEG", quality=quality)
            return out.getvalue(), "jpg"
        picture.save(out, format="PNG")
        return out.getvalue(), "png"


def sanitise_key(relpath: str, limit: int = 80) -> str:
    """A WebDataset key from a relative path: no dots, no slashes, at most ``limit``
    characters (a hash of the path keeps long names unique)."""
    import hashlib
    import re

    stem = relpath.rsplit(".", 1)[0] if "." in Path(relpath).name else relpath
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "x"
    if len(key) > limit:
        key = key[: limit - 9] + "_" + hashlib.sha1(relpath.encode()).hexdigest()[:8]
    return key
