"""``dmlray pack``: read a raw dataset with a recipe and write shards plus a manifest."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmlray.data import shards, storage
from dmlray.data.records import Sample

SplitReader = Callable[..., dict[str, tuple[list[int], Iterator[Sample]]]]
_READERS: dict[str, SplitReader] = {}
log = logging.getLogger(__name__)


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
    """Target shard size in bytes (whole classes per shard unless a class is bigger)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reader (split seed, image size, ...)."""
    workers: int = 0
    """Threads writing shards in parallel; 0 = a default from the CPU count."""


RECIPE_KEYS = ("dataset", "shard_bytes", "options", "workers")


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
        raise FileNotFoundError(
            f"no recipe {name_or_path!r}: not a file, not shards/{name_or_path}.yaml, "
            f"not a dataset name ({', '.join(reader_names())})"
        )
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - set(RECIPE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: {', '.join(RECIPE_KEYS)}")
    if "dataset" not in data:
        raise ValueError(f"{path}: a recipe needs 'dataset' (one of {', '.join(reader_names())})")
    return Recipe(**data)


def reader_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options a reader runs with: its defaults updated by the recipe's (recorded in
    the manifest, so a dataset says exactly how it was split and encoded)."""
    import inspect

    fn = _READERS[name]
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = set(options) - set(params) - {"src"}
    if unknown and not accepts_any:
        known = [p for p in params if p != "src" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
        raise ValueError(f"dataset reader {name!r} has no option(s) {sorted(unknown)}; its options: {', '.join(known)}")
    out = {
        k: p.default
        for k, p in list(params.items())[1:]
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    out.update(options)
    return out


def pack(
    recipe: Recipe,
    dst: str,
    src: str | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
) -> str:
    """Pack every split of the recipe's dataset under ``dst``; returns the manifest URL.

    Shards are written in parallel (``workers`` threads, default the recipe's); a run
    that stopped half-way is resumed: complete shards are not written again. Bad images
    stop the run with a message naming the file, unless ``skip_bad``: then they are left
    out and listed in the manifest. The manifest is written last.

    A destination that already holds a complete dataset (a manifest) is refused unless
    ``overwrite``: then the old manifest is removed before any shard is replaced, so no
    reader ever sees new shards under the old manifest's checksums (shards whose planned
    content is unchanged are kept, not written again).
    """
    from dmlray.data import writer

    _load_builtin_readers()
    if recipe.dataset not in _READERS:
        raise ValueError(f"unknown dataset reader {recipe.dataset!r}; known: {', '.join(reader_names())}")
    storage.check_bucket(dst)
    known = _clear_for_packing(dst, overwrite)
    options = reader_options(recipe.dataset, recipe.options)
    splits = _READERS[recipe.dataset](src, **recipe.options)
    if not splits:
        raise ValueError(f"dataset reader {recipe.dataset!r} returned no splits")
    made_by = {
        "dataset": recipe.dataset,
        "options": options,
        "shard_bytes": recipe.shard_bytes,
        "src": src,
        "skip_bad": skip_bad,
        "versions": _versions(),
    }
    salt = json.dumps({k: made_by[k] for k in ("dataset", "options", "shard_bytes")}, sort_keys=True, default=str)
    bar = _progress("pack", progress)
    try:
        results = writer.write_splits(
            dst,
            {split: samples for split, (_, samples) in splits.items()},
            recipe.shard_bytes,
            salt=salt,
            workers=workers or recipe.workers,
            skip_bad=skip_bad,
            on_shard=bar.advance,
            known=known,
        )
    finally:
        bar.close()
    for split, result in results.items():
        if not result.shards:
            where = f" (read from {src})" if src else ""
            raise ValueError(
                f"split {split!r} has zero classes{where}: nothing to write"
                + (f"; {len(result.skipped)} bad images were skipped" if result.skipped else "")
            )
        if result.reused:
            log.info("split %s: %d complete shard(s) from an earlier run reused", split, result.reused)
    manifest = shards.build_manifest(
        {split: (classes, results[split].shards) for split, (classes, _) in splits.items()},
        made_by,
        skipped={split: r.skipped for split, r in results.items()},
    )
    url = shards.write_manifest(dst, manifest)
    writer.remove_partials(dst, results)
    return url


def _clear_for_packing(dst: str, overwrite: bool) -> dict[str, dict] | None:
    """Refuse to pack over a complete dataset unless ``overwrite``; with it, remember the
    old manifest's reusable shards and remove the manifest first. None: no manifest."""
    from dmlray.data import writer

    manifest = storage.join(dst, shards.MANIFEST_NAME)
    if not storage.exists(manifest):
        return None
    if not overwrite:
        raise FileExistsError(f"{dst} already holds a complete dataset ({manifest}); pass --overwrite to replace it")
    known = writer.known_shards(dst)
    storage.delete(manifest)
    log.info("--overwrite: removed %s before replacing its shards", manifest)
    return known


def _versions() -> dict[str, str]:
    """Library versions that shape the bytes (pre-resizing re-encodes with Pillow)."""
    import PIL

    from dmlray import __version__ as dmlray_version

    return {"dmlray": dmlray_version, "pillow": PIL.__version__}


class _progress:
    """A tqdm bar counting samples, with MB/s in the postfix (silent when disabled)."""

    def __init__(self, desc: str, enabled: bool):
        self.bar = None
        self.bytes = 0
        self.lock = threading.Lock()  # shards complete in writer threads
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit=" samples", file=sys.stderr, mininterval=0.5)

    def advance(self, samples: int, nbytes: int) -> None:
        if self.bar is None:
            return
        with self.lock:
            self.bytes += nbytes
            self.bar.update(samples)
            elapsed = max(self.bar.format_dict["elapsed"], 1e-6)
            self.bar.set_postfix_str(f"{self.bytes / 2**20 / elapsed:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
