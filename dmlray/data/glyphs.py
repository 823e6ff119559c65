"""The built-in glyphs dataset: characters rendered in the 16 font faces shipped with matplotlib.

A class is a character present in all 16 faces (DejaVu Sans, Sans Mono, Serif and STIX
General; 4 styles each); an instance is the character in one face with a small seeded
jitter (shift, rotation, size). Classes are split in half with a fixed seed: train on one
half, retrieve on the other (the CUB/Cars zero-shot protocol). Deterministic for a given
matplotlib/Pillow version and seed; nothing is downloaded.
"""

from __future__ import annotations

import io
import random
import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from dmlray.data.records import Sample

FAMILIES = ("DejaVuSans", "DejaVuSansMono", "DejaVuSerif", "STIXGeneral")


@lru_cache(maxsize=1)
def glyph_faces() -> tuple[Path, ...]:
    """The 16 font files (4 families × 4 styles) inside matplotlib's mpl-data."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    faces = []
    for path in sorted(folder.glob("*.ttf")):
        stem = path.stem
        family = stem.split("-")[0]
        if stem.startswith("STIXGeneral"):
            family = "STIXGeneral"
        if family in FAMILIES and "Display" not in stem:
            faces.append(path)
    if len(faces) != 16:
        raise RuntimeError(f"expected 16 glyph faces in {folder}, found {len(faces)}: {[p.name for p in faces]}")
    return tuple(faces)


@lru_cache(maxsize=1)
def glyph_classes() -> tuple[int, ...]:
    """Code points of visible characters (letters, numbers, punctuation, symbols) in all 16 faces."""
    from matplotlib.ft2font import FT2Font

    common: set[int] | None = None
    for face in glyph_faces():
        cmap = set(FT2Font(str(face)).get_charmap())
        common = cmap if common is None else common & cmap
    return tuple(sorted(c for c in common if unicodedata.category(chr(c))[0] in "LNPS"))


def split_classes(classes: tuple[int, ...], seed: int) -> tuple[list[int], list[int]]:
    """Half the classes at random (fixed seed) train, the other half test."""
    order = list(classes)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


@lru_cache(maxsize=64)
def _font(face: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(face, size)


def render_glyph(codepoint: int, face: Path, image_size: int, rng: random.Random):
    """One instance: the character centred on a white square with seeded shift/rotation/size."""
    from PIL import Image, ImageDraw

    scale = rng.uniform(0.8, 1.05)
    angle = rng.uniform(-12.0, 12.0)
    dx, dy = rng.uniform(-0.08, 0.08) * image_size, rng.uniform(-0.08, 0.08) * image_size
    # draw large, then rotate and shrink: smoother strokes than drawing at 32 px
    big = image_size * 4
    font = _font(str(face), max(8, int(big * 0.7 * scale)))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), chr(codepoint), font=font)
    x = (big - (right - left)) / 2 - left + dx * 4
    y = (big - (bottom - top)) / 2 - top + dy * 4
    draw.text((x, y), chr(codepoint), fill=255, font=font)
    canvas = canvas.rotate(angle, resample=Image.BILINEAR)
    small = canvas.resize((image_size, image_size), Image.LANCZOS)
    return Image.eval(small, lambda v: 255 - v)  # dark glyph on white, like ink


def glyph_samples(classes: list[int], image_size: int = 32, per_face: int = 1, seed: int = 0) -> Iterator[Sample]:
    """Every instance of the given classes, grouped by class (one class's samples contiguous)."""
    faces = glyph_faces()
    for codepoint in classes:
        for f, face in enumerate(faces):
            for j in range(per_face):
                rng = random.Random(f"{seed}-{codepoint}-{f}-{j}")
                image = render_glyph(codepoint, face, image_size, rng)
                buf = io.BytesIO()
                image.save(buf, format="PNG", optimize=False)
                yield Sample(
                    key=f"u{codepoint:05x}_{face.stem}_{j}",
                    label=codepoint,
                    data=buf.getvalue(),
                    ext="png",
                    meta={"char": chr(codepoint), "face": face.stem, "path": f"{face.stem}/{codepoint:05x}_{j}.png"},
                )


def glyph_splits(
    image_size: int = 32, per_face: int = 1, split_seed: int = 0, max_classes: int = 0
) -> dict[str, tuple[list[int], Iterator[Sample]]]:
    """{split: (class ids, samples)} for train and test; max_classes > 0 keeps a subset (tests)."""
    classes = glyph_classes()
    if max_classes:
        classes = tuple(random.Random(split_seed).sample(classes, max_classes))
    train, test = split_classes(classes, split_seed)
    return {
        "train": (train, glyph_samples(train, image_size, per_face, split_seed)),
        "test": (test, glyph_samples(test, image_size, per_face, split_seed)),
    }
