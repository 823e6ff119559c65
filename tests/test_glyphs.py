"""The glyphs dataset's classes: no two of them are the same picture under two labels."""

from __future__ import annotations

import numpy as np

from dmlray.data.glyphs import (
    CANONICAL_SIZE,
    HOMOGLYPH_MIN_FACES,
    HOMOGLYPHS,
    common_characters,
    glyph_classes,
    glyph_faces,
    homoglyph_table,
)


def matplotlib_ink(font, codepoint: int) -> bytes:
    """The character's ink cropped to its bounding box, rasterised by matplotlib's own FreeType
    (unhinted): a second renderer, independent of the Pillow one the dataset uses."""
    from matplotlib.ft2font import LoadFlags

    font.clear()
    font.set_text(chr(codepoint), 0.0, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    image = np.asarray(font.get_image())
    ys, xs = np.nonzero(image)
    if len(ys) == 0:
        return b""
    ink = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return repr(ink.shape).encode() + ink.tobytes()


def test_the_committed_homoglyph_table_is_what_the_installed_fonts_give():
    assert homoglyph_table(common_characters(), glyph_faces()) == HOMOGLYPHS
    classes = set(glyph_classes())
    assert len(classes) == len(common_characters()) - len(HOMOGLYPHS)
    assert set(HOMOGLYPHS.values()) <= classes and not set(HOMOGLYPHS) & classes
    # the examples: one of Latin A, Greek Alpha, Cyrillic A; one of hyphen-minus and U+2010
    assert {ord("A"), 0x0391, 0x0410} & classes == {ord("A")}
    assert {ord("-"), 0x2010, 0x2011} & classes == {ord("-")}
    # look-alikes that differ in most faces stay apart
    assert {ord("0"), ord("O"), ord("l"), ord("1"), ord("I")} <= classes


def same_ink_counts(codepoints: tuple[int, ...]) -> dict[tuple[int, int], int]:
    """{(a, b): faces in which matplotlib draws a and b with identical ink}."""
    from matplotlib.ft2font import FT2Font

    same: dict[tuple[int, int], int] = {}
    for face in glyph_faces():
        font = FT2Font(str(face))
        font.set_size(CANONICAL_SIZE, 72)
        by_ink: dict[bytes, list[int]] = {}
        for c in codepoints:
            by_ink.setdefault(matplotlib_ink(font, c), []).append(c)
        assert b"" not in by_ink, f"{face.name}: characters without ink {by_ink.get(b'')}"
        for group in by_ink.values():
            for i, a in enumerate(group):
                for b in group[i + 1 :]:
                    same[(a, b)] = same.get((a, b), 0) + 1
    return same


def test_no_two_classes_render_identically_in_half_the_faces():
    same = same_ink_counts(glyph_classes())
    alike = {f"{chr(a)} U+{a:04X} / {chr(b)} U+{b:04X}": n for (a, b), n in same.items() if n >= HOMOGLYPH_MIN_FACES}
    assert not alike, alike
    # the same check catches the dropped characters: A / Greek Alpha / Cyrillic A, - / U+2010
    caught = same_ink_counts((ord("-"), ord("A"), 0x0391, 0x0410, 0x2010))
    assert {p for p, n in caught.items() if n >= HOMOGLYPH_MIN_FACES} == {
        (ord("-"), 0x2010),
        (ord("A"), 0x0391),
        (ord("A"), 0x0410),
        (0x0391, 0x0410),
    }
