"""Packing recipes shared by tests (a plain module: tests import it, unlike conftest)."""

from __future__ import annotations

from dmlray.data.pack import Recipe

# a 40-class glyph subset (20 train / 20 test classes): small enough for CI
RECIPE_40 = Recipe(dataset="glyphs", shard_bytes=64 * 1024, options={"max_classes": 40})
