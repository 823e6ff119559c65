"""The built-in glyphs dataset: characters rendered in the 16 font faces shipped with matplotlib.

A class is a character present in all 16 faces (DejaVu Sans, Sans Mono, Serif and STIX
General; 4 styles each, the TrueType files inside matplotlib's mpl-data, so the same on
every machine with the same matplotlib) that is not a homoglyph of another class; an
instance is the character in one face with a small seeded jitter (shift, rotation, size).
Classes are split in half with a fixed seed: train on one half, retrieve on the other (the
CUB/Cars zero-shot protocol). Deterministic for a given matplotlib/Pillow version and
seed; nothing is downloaded.

Homoglyphs: Latin ``A``, Greek ``Α`` and Cyrillic ``А``, or ``-`` and U+2010, are drawn
from the same outline in most of these fonts, so their instances are the same pictures
under two labels and no model can retrieve them apart. Characters whose ink (unjittered,
cropped to its bounding box: instances are centred on it) is bit-identical in at least
HOMOGLYPH_MIN_FACES = 8 of the 16 faces are linked; each linked group keeps its lowest code
point and drops the others (54 of the 727 common characters; 673 classes remain). Half the
faces rather than "most": a pair identical in 8 faces is still one class in half of its
instances (``A``/``А``: 9 faces, ``Α``/``А``: 8), and the next pairs down are identical in
at most 7 (``F``/``Ϝ`` at 8 is linked, ``Ï``/``Ї`` at 7 is not).

The dropped characters are a fixed table (HOMOGLYPHS) computed once with
``homoglyph_table`` rather than at every pack: the class list then depends on the fonts'
character maps only, not on the FreeType build inside Pillow that rasterises them (a
different hinting could move a pair across the threshold), and packing does not render
11,632 extra bitmaps. tests/test_datasets.py recomputes the table from the installed fonts
and checks that no two classes are identical in HOMOGLYPH_MIN_FACES faces or more.
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
# homoglyphs: characters whose ink is identical in at least this many of the 16 faces
HOMOGLYPH_MIN_FACES = 8
# the font size of an instance at scale 1 (32 px drawn at 4×, 0.7 of the canvas): the
# resolution the homoglyph comparison is made at
CANONICAL_SIZE = 89


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
def common_characters() -> tuple[int, ...]:
    """Code points of visible characters (letters, numbers, punctuation, symbols) in all 16 faces."""
    from matplotlib.ft2font import FT2Font

    common: set[int] | None = None
    for face in glyph_faces():
        cmap = set(FT2Font(str(face)).get_charmap())
        common = cmap if common is None else common & cmap
    return tuple(sorted(c for c in (common or ()) if unicodedata.category(chr(c))[0] in "LNPS"))


# {dropped: kept}: homoglyph_table(common_characters(), glyph_faces()) with matplotlib 3.11's
# fonts (tests/test_datasets.py recomputes it), fixed here so that the class list does not
# depend on the renderer
HOMOGLYPHS: dict[int, int] = {
    0x2010: 0x002D,  # hyphen -> hyphen-minus
    0x2011: 0x002D,  # non-breaking hyphen -> hyphen-minus
    0x0391: 0x0041,  # greek capital letter alpha -> latin capital letter a
    0x0410: 0x0041,  # cyrillic capital letter a -> latin capital letter a
    0x0392: 0x0042,  # greek capital letter beta -> latin capital letter b
    0x0412: 0x0042,  # cyrillic capital letter ve -> latin capital letter b
    0x0421: 0x0043,  # cyrillic capital letter es -> latin capital letter c
    0x0395: 0x0045,  # greek capital letter epsilon -> latin capital letter e
    0x0415: 0x0045,  # cyrillic capital letter ie -> latin capital letter e
    0x03DC: 0x0046,  # greek letter digamma -> latin capital letter f
    0x0397: 0x0048,  # greek capital letter eta -> latin capital letter h
    0x041D: 0x0048,  # cyrillic capital letter en -> latin capital letter h
    0x0399: 0x0049,  # greek capital letter iota -> latin capital letter i
    0x0406: 0x0049,  # cyrillic capital letter byelorussian-ukrainian i -> latin capital letter i
    0x0408: 0x004A,  # cyrillic capital letter je -> latin capital letter j
    0x039A: 0x004B,  # greek capital letter kappa -> latin capital letter k
    0x039C: 0x004D,  # greek capital letter mu -> latin capital letter m
    0x041C: 0x004D,  # cyrillic capital letter em -> latin capital letter m
    0x039D: 0x004E,  # greek capital letter nu -> latin capital letter n
    0x039F: 0x004F,  # greek capital letter omicron -> latin capital letter o
    0x041E: 0x004F,  # cyrillic capital letter o -> latin capital letter o
    0x03A1: 0x0050,  # greek capital letter rho -> latin capital letter p
    0x0420: 0x0050,  # cyrillic capital letter er -> latin capital letter p
    0x0405: 0x0053,  # cyrillic capital letter dze -> latin capital letter s
    0x03A4: 0x0054,  # greek capital letter tau -> latin capital letter t
    0x0422: 0x0054,  # cyrillic capital letter te -> latin capital letter t
    0x03A7: 0x0058,  # greek capital letter chi -> latin capital letter x
    0x0425: 0x0058,  # cyrillic capital letter ha -> latin capital letter x
    0x03A5: 0x0059,  # greek capital letter upsilon -> latin capital letter y
    0x0396: 0x005A,  # greek capital letter zeta -> latin capital letter z
    0x203E: 0x005F,  # overline -> low line
    0x0430: 0x0061,  # cyrillic small letter a -> latin small letter a
    0x0441: 0x0063,  # cyrillic small letter es -> latin small letter c
    0x0435: 0x0065,  # cyrillic small letter ie -> latin small letter e
    0x0456: 0x0069,  # cyrillic small letter byelorussian-ukrainian i -> latin small letter i
    0x0458: 0x006A,  # cyrillic small letter je -> latin small letter j
    0x03BF: 0x006F,  # greek small letter omicron -> latin small letter o
    0x043E: 0x006F,  # cyrillic small letter o -> latin small letter o
    0x0440: 0x0070,  # cyrillic small letter er -> latin small letter p
    0x0455: 0x0073,  # cyrillic small letter dze -> latin small letter s
    0x0445: 0x0078,  # cyrillic small letter ha -> latin small letter x
    0x0443: 0x0079,  # cyrillic small letter u -> latin small letter y
    0x0384: 0x00B4,  # greek tonos -> acute accent
    0x03BC: 0x00B5,  # greek small letter mu -> micro sign
    0x0387: 0x00B7,  # greek ano teleia -> middle dot
    0x0110: 0x00D0,  # latin capital letter d with stroke -> latin capital letter eth
    0x0457: 0x00EF,  # cyrillic small letter yi -> latin small letter i with diaeresis
    0x03B5: 0x025B,  # greek small letter epsilon -> latin small letter open e
    0x0473: 0x0275,  # cyrillic small letter fita -> latin small letter barred o
    0x2018: 0x02BB,  # left single quotation mark -> modifier letter turned comma
    0x02E4: 0x02C1,  # modifier letter small reversed glottal stop -> modifier letter reversed glottal stop
    0x0413: 0x0393,  # cyrillic capital letter ghe -> greek capital letter gamma
    0x041F: 0x03A0,  # cyrillic capital letter pe -> greek capital letter pi
    0x0472: 0x03F4,  # cyrillic capital letter fita -> greek capital theta symbol
}


@lru_cache(maxsize=1)
def glyph_classes() -> tuple[int, ...]:
    """The classes: the common characters less the homoglyphs of a kept one (HOMOGLYPHS)."""
    return tuple(c for c in common_characters() if c not in HOMOGLYPHS)


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


def canonical_bitmap(codepoint: int, face: Path, size: int = CANONICAL_SIZE) -> bytes:
    """The character's ink in one face, unjittered and cropped to its bounding box, as bytes.

    Instances are centred on their ink (``render_glyph``), so two characters whose cropped
    ink is identical give identical instances: position within the em box (``_`` against
    ``‾``) does not tell them apart either.
    """
    from PIL import Image, ImageDraw

    font = _font(str(face), size)
    side = 2 * size
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, _, _ = draw.textbbox((0, 0), chr(codepoint), font=font)
    draw.text((size // 4 - left, size // 4 - top), chr(codepoint), fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return b""
    ink = canvas.crop(box)
    return f"{ink.width}x{ink.height}:".encode() + ink.tobytes()


def identical_face_counts(codepoints: tuple[int, ...], faces: tuple[Path, ...]) -> dict[tuple[int, int], int]:
    """{(a, b): number of faces in which a and b have the same canonical bitmap}, a < b, for
    the pairs identical in at least one face."""
    counts: dict[tuple[int, int], int] = {}
    for face in faces:
        by_bitmap: dict[bytes, list[int]] = {}
        for codepoint in codepoints:
            by_bitmap.setdefault(canonical_bitmap(codepoint, face), []).append(codepoint)
        for group in by_bitmap.values():
            for i, a in enumerate(group):
                for b in group[i + 1 :]:
                    counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def homoglyph_table(
    codepoints: tuple[int, ...], faces: tuple[Path, ...], min_faces: int = HOMOGLYPH_MIN_FACES
) -> dict[int, int]:
    """{dropped code point: the one kept}: characters linked by being identical in at least
    ``min_faces`` faces form a group, and the group's lowest code point is kept (so Latin
    before Greek before Cyrillic, ASCII ``-`` before U+2010). How HOMOGLYPHS was computed."""
    keep = {c: c for c in codepoints}

    def root(c: int) -> int:
        while keep[c] != c:
            c = keep[c]
        return c

    for (a, b), n in sorted(identical_face_counts(codepoints, faces).items()):
        if n >= min_faces:
            ra, rb = root(a), root(b)
            keep[max(ra, rb)] = min(ra, rb)
    return {c: root(c) for c in codepoints if root(c) != c}


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
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
    small = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
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
