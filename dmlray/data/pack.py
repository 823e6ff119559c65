"""``dmlray pack``: read a raw dataset with a recipe and write shards plus a manifest."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from dmlray.data import shards, storage
from dmlray.data.records import Sample

SplitReader = Callable[..., dict[str, tuple[list[int], Iterator[Sample]]]]
_READERS: dict[str, SplitReader] = {}


def register_reader(name: str):
    """Decorator: ``fn(src, **options) -> {split: (class ids, samples grouped by class)}``."""

    def add(fn: SplitReader) -> SplitReader:
        if name in _READERS:
            raise ValueError(f"dataset reader {name!r} is already registered")
        _READERS[name] = fn
        return fn

    return add


def reader_names() -> list[str]:
    _load_builtin_readers()
    return sorted(_READERS)


@register_reader("glyphs")
def _glyphs(src: str | None, image_size: int = 32, per_face: int = 1, split_seed: int = 0, max_classes: int = 0):
    from dmlray.data.glyphs import glyph_splits

    if src:
        raise ValueError("the glyphs dataset is rendered from matplotlib's fonts; it takes no --src")
    return glyph_splits(image_size=image_size, per_face=per_face, split_seed=split_seed, max_classes=max_classes)


def _load_builtin_readers() -> None:
    """Import the modules that register the benchmark readers (when present)."""
    try:
        import dmlray.data.datasets  # noqa: F401  (registers cub, cars196, sop, inshop, folder, csv)
    except ModuleNotFoundError as exc:
        if exc.name != "dmlray.data.datasets":
            raise


@dataclass(kw_only=True)
class Recipe:
    """How a raw dataset becomes shards (a YAML file in shards/)."""

    dataset: str
    """Reader name (see reader_names())."""
    shard_bytes: int = 256 * 2**20
    """Target shard size in bytes (whole classes per shard)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reader (split seed, image size, ...)."""


def find_recipe(name_or_path: str) -> Path | None:
    """A recipe file: the path itself, or shards/<name>.yaml in the working directory."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = Path("shards") / f"{name_or_path}.yaml"
    return candidate if candidate.is_file() else None


def load_recipe(name_or_path: str) -> Recipe:
    """Load a recipe file; a bare reader name (e.g. ``glyphs``) gives its defaults."""
    path = find_recipe(name_or_path)
    if path is None:
        if name_or_path in reader_names():
            return Recipe(dataset=name_or_path)
        raise FileNotFoundError(f"no recipe {name_or_path!r}: not a file, not shards/{name_or_path}.yaml, not a dataset name ({', '.join(reader_names())})")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"dataset", "shard_bytes", "options"}
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: dataset, shard_bytes, options")
    if "dataset" not in data:
        raise ValueError(f"{path}: a recipe needs 'dataset' (one of {', '.join(reader_names())})")
    return Recipe(**data)


def pack(recipe: Recipe, dst: str, src: str | None = None, progress: bool = True) -> str:
    """Pack every split of the recipe's dataset under ``dst``; returns the manifest URL."""
    _load_builtin_readers()
    if recipe.dataset not in _READERS:
        raise ValueError(f"unknown dataset reader {recipe.dataset!r}; known: {', '.join(reader_names())}")
    storage.check_bucket(dst)
    splits = _READERS[recipe.dataset](src, **recipe.options)
    written: dict[str, tuple[list[int], list[shards.ShardInfo]]] = {}
    for split, (classes, samples) in splits.items():
        bar = _progress(f"pack {split}", progress)
        try:
            infos = shards.write_split(dst, split, samples, recipe.shard_bytes, on_progress=bar.advance)
        finally:
            bar.close()
        written[split] = (classes, infos)
    manifest = shards.build_manifest(written, made_by={"dataset": recipe.dataset, "options": recipe.options, "shard_bytes": recipe.shard_bytes, "src": src})
    return shards.write_manifest(dst, manifest)


class _progress:
    """A tqdm bar counting samples, with MB/s in the postfix (silent when disabled)."""

    def __init__(self, desc: str, enabled: bool):
        self.bar = None
        self.bytes = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit=" samples", file=sys.stderr, mininterval=0.5)

    def advance(self, samples: int, nbytes: int) -> None:
        if self.bar is None:
            return
        self.bytes += nbytes
        self.bar.update(samples)
        elapsed = max(self.bar.format_dict["elapsed"], 1e-6)
        self.bar.set_postfix_str(f"{self.bytes / 2**20 / elapsed:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
