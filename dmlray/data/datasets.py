"""Readers of the raw DML benchmark layouts (and of any class-per-folder tree or CSV list).

Each reader lists its images without opening them and returns
``{split: (class ids, samples grouped by class)}``; the shard writers read the files in
parallel. Splits follow the zero-shot protocol of the DML literature (REFERENCE.md):
test classes are never trained on. Every sample's json keeps the image's path relative to
``--src`` and its label. Options common to all readers:

- ``resize``: shrink the shorter side to this many pixels when packing (0 = original bytes);
- ``quality``: JPEG quality of re-encoded images;
- ``verify``: decode every image once while packing (cheaply) to catch corrupt files.

A list file that does not match the images, a missing image or a split with no class is
an error naming the file (``dmlray pack --skip-bad`` leaves bad images out instead).
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlray.data.pack import register_reader
from dmlray.data.records import Sample
from dmlray.data.sources import BadInputError, ImageFile, sanitise_key

Splits = dict[str, tuple[list[int], Iterator[Sample]]]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Entry:
    """One listed image: its path relative to the source root, label and extra metadata."""

    relpath: str
    label: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Encoding:
    """How listed files become shard samples (the options common to every reader)."""

    resize: int = 0
    quality: int = 95
    verify: bool = True


def source_root(src: str | None, reader: str) -> Path:
    if not src:
        raise ValueError(f"the {reader} reader needs --src: the folder of the raw dataset")
    root = Path(src).expanduser()
    if not root.exists():
        raise BadInputError(f"{reader}: source {root} does not exist", str(root))
    return root


def list_file(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise BadInputError(f"missing list file {path} (is --src the dataset's root folder?)", str(path))
    return path


def read_rows(path: Path, columns: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line after ``skip`` lines; a line with
    another number of whitespace-separated fields is an error naming the file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) != columns:
                raise BadInputError(
                    f"{path}, line {number}: expected {columns} fields, got {len(fields)}: {line.strip()!r}", str(path)
                )
            rows.append((number, fields))
    return rows


def to_int(value: str, path: Path, number: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadInputError(f"{path}, line {number}: {what} {value!r} is not an integer", str(path)) from None


def build_splits(
    root: Path, entries: dict[str, list[Entry]], listed_in: str | dict[str, str], encoding: Encoding, rule: str
) -> Splits:
    """Splits of samples grouped by class (classes ascending, listed order within a class).

    ``listed_in`` names the list file (per split, or one for all) for error messages;
    ``rule`` describes how classes were split; it completes the zero-class error.
    """
    used: set[str] = set()
    out: Splits = {}
    for split, items in entries.items():
        where = listed_in if isinstance(listed_in, str) else listed_in[split]
        classes = sorted({e.label for e in items})
        if not classes:
            raise BadInputError(f"split {split!r} has zero classes ({where}; {rule})", where)
        ordered = sorted(items, key=lambda e: e.label)  # stable: listed order within a class
        keys = []
        for e in ordered:
            key = sanitise_key(e.relpath)
            while key in used:  # two paths that sanitise alike: keep both, distinguishably
                key = f"{key[:70]}_{hashlib.sha1(f'{e.relpath}|{key}'.encode()).hexdigest()[:8]}"
            used.add(key)
            keys.append(key)
        out[split] = (classes, _samples(root, ordered, keys, where, encoding))
    return out


def _samples(root: Path, entries: list[Entry], keys: list[str], listed_in: str, encoding: Encoding) -> Iterator[Sample]:
    for entry, key in zip(entries, keys, strict=True):
        suffix = Path(entry.relpath).suffix.lower()
        ext = "png" if suffix == ".png" or (suffix not in (".jpg", ".jpeg") and not encoding.resize) else "jpg"
        source = ImageFile(
            str(root / entry.relpath),
            listed_in=listed_in,
            resize=encoding.resize,
            quality=encoding.quality,
            verify=encoding.verify,
        )
        yield Sample(
            key=key,
            label=entry.label,
            ext=ext,
            source=source,
            meta={"path": entry.relpath, "label": entry.label, **entry.meta},
        )


def class_split(names: list, test_fraction: float, seed: int) -> set:
    """The test classes: a seeded ``test_fraction`` of the classes (none when 0)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if test_fraction == 0 or len(names) < 2:
        return set()
    order = sorted(names)
    random.Random(seed).shuffle(order)
    count = min(len(order) - 1, max(1, round(test_fraction * len(order))))
    return set(order[:count])


# ---------------------------------------------------------------- the four benchmarks


@register_reader("cub")
def cub(src: str | None, split_at: int = 100, resize: int = 0, quality: int = 95, verify: bool = True) -> Splits:
    """CUB-200-2011: ``images.txt`` (id path), ``image_class_labels.txt`` (id class),
    ``images/<class>/<file>.jpg``. Classes 1..split_at train, the rest test."""
    root = source_root(src, "cub")
    images_txt, labels_txt = list_file(root, "images.txt"), list_file(root, "image_class_labels.txt")
    images = {f[0]: (n, f[1]) for n, f in read_rows(images_txt, 2)}
    labels = {f[0]: to_int(f[1], labels_txt, n, "class id") for n, f in read_rows(labels_txt, 2)}
    _same_ids(images, labels, images_txt, labels_txt)
    entries: dict[str, list[Entry]] = {"train": [], "test": []}
    for image_id, (_, path) in images.items():
        label = labels[image_id]
        entries["train" if label <= split_at else "test"].append(
            Entry(f"images/{path}", label, {"id": int(image_id) if image_id.isdigit() else image_id})
        )
    return build_splits(
        root,
        entries,
        str(labels_txt),
        Encoding(resize=resize, quality=quality, verify=verify),
        f"classes 1-{split_at} train, the others test",
    )


def _same_ids(images: dict, labels: dict, images_txt: Path, labels_txt: Path) -> None:
    unlabelled = [i for i in images if i not in labels]
    unknown = [i for i in labels if i not in images]
    if unlabelled or unknown:
        parts = []
        if unlabelled:
            parts.append(
                f"{len(unlabelled)} image id(s) of {images_txt.name} have no label "
                f"(e.g. {unlabelled[0]}: {images[unlabelled[0]][1]})"
            )
        if unknown:
            parts.append(f"{len(unknown)} id(s) are labelled but not listed in {images_txt.name} (e.g. {unknown[0]})")
        raise BadInputError(f"{labels_txt} does not match {images_txt}: " + "; ".join(parts), str(labels_txt))


@register_reader("cars196")
def cars196(src: str | None, split_at: int = 98, resize: int = 0, quality: int = 95, verify: bool = True) -> Splits:
    """Cars196: ``cars_annos.mat`` (struct array ``annotations``: relative_im_path, bbox,
    class, test) and ``car_ims/``. Classes 1..split_at train, the rest test: split by
    class as the DML protocol does, not by the file's test flag (kept in the metadata)."""
    import numpy as np
    import scipy.io

    root = source_root(src, "cars196")
    mat_path = list_file(root, "cars_annos.mat")
    try:
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=True)
    except Exception as exc:
        raise BadInputError(f"cannot read {mat_path} as a MATLAB file: {exc}", str(mat_path)) from None
    if "annotations" not in mat:
        raise BadInputError(
            f"{mat_path} has no 'annotations' struct array "
            f"(variables: {sorted(k for k in mat if not k.startswith('__'))})",
            str(mat_path),
        )
    annotations = np.atleast_1d(mat["annotations"])
    needed = {"relative_im_path", "class", "test"}
    fields = set(annotations.dtype.names or ())
    if not needed <= fields:
        raise BadInputError(
            f"{mat_path}: annotations lack field(s) {sorted(needed - fields)} (has {sorted(fields)})", str(mat_path)
        )
    names = [str(n) for n in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
    entries: dict[str, list[Entry]] = {"train": [], "test": []}
    for record in annotations:
        label = int(record["class"])
        meta: dict[str, Any] = {"test_flag": int(record["test"])}
        if 0 < label <= len(names):
            meta["class_name"] = names[label - 1]
        entries["train" if label <= split_at else "test"].append(Entry(str(record["relative_im_path"]), label, meta))
    return build_splits(
        root,
        entries,
        str(mat_path),
        Encoding(resize=resize, quality=quality, verify=verify),
        f"classes 1-{split_at} train, the others test",
    )


@register_reader("sop")
def sop(src: str | None, resize: int = 0, quality: int = 95, verify: bool = True) -> Splits:
    """Stanford Online Products: ``Ebay_train.txt`` and ``Ebay_test.txt`` (a header, then
    image_id class_id super_class_id path); their classes are disjoint."""
    root = source_root(src, "sop")
    entries: dict[str, list[Entry]] = {}
    lists = {"train": str(root / "Ebay_train.txt"), "test": str(root / "Ebay_test.txt")}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = list_file(root, name)
        with open(path, encoding="utf-8") as f:
            header = f.readline().split()
        if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
            raise BadInputError(
                f"{path}: expected the header 'image_id class_id super_class_id path', got {' '.join(header)!r}",
                str(path),
            )
        entries[split] = [
            Entry(
                f[3],
                to_int(f[1], path, n, "class_id"),
                {
                    "image_id": to_int(f[0], path, n, "image_id"),
                    "super_class_id": to_int(f[2], path, n, "super_class_id"),
                },
            )
            for n, f in read_rows(path, 4, skip=1)
        ]
    overlap = {e.label for e in entries["train"]} & {e.label for e in entries["test"]}
    if overlap:
        raise BadInputError(
            f"{root / 'Ebay_test.txt'} shares {len(overlap)} class id(s) with Ebay_train.txt "
            f"(e.g. {min(overlap)}): not a zero-shot split",
            str(root / "Ebay_test.txt"),
        )
    return build_splits(
        root,
        entries,
        lists,
        Encoding(resize=resize, quality=quality, verify=verify),
        "classes as listed in Ebay_train.txt / Ebay_test.txt",
    )


@register_reader("inshop")
def inshop(src: str | None, resize: int = 0, quality: int = 95, verify: bool = True) -> Splits:
    """In-Shop Clothes: ``list_eval_partition.txt`` (a count, a header, then image_name
    item_id evaluation_status) and ``img/``. Splits train, query and gallery; item ids
    (``id_00000001``) become the integer class ids (1), the same in query and gallery."""
    root = source_root(src, "inshop")
    path = list_file(root, "list_eval_partition.txt")
    with open(path, encoding="utf-8") as f:
        count_line = f.readline().strip()
    rows = read_rows(path, 3, skip=2)
    if count_line.isdigit() and int(count_line) != len(rows):
        raise BadInputError(f"{path} announces {count_line} images but lists {len(rows)}", str(path))
    items = sorted({fields[1] for _, fields in rows})
    numeric = all(re.fullmatch(r"id_\d+", item) for item in items)
    # the numeric part when every id has one (stable across dataset versions), else the rank
    ids = {item: int(item[3:]) if numeric else i + 1 for i, item in enumerate(items)}
    entries: dict[str, list[Entry]] = {"train": [], "query": [], "gallery": []}
    for number, (image, item, status) in rows:
        if status not in entries:
            raise BadInputError(
                f"{path}, line {number}: evaluation_status {status!r} is not train, query or gallery", str(path)
            )
        entries[status].append(Entry(image, ids[item], {"item_id": item}))
    return build_splits(
        root,
        entries,
        str(path),
        Encoding(resize=resize, quality=quality, verify=verify),
        "train/query/gallery as listed",
    )


# ---------------------------------------------------------------- any other dataset


@register_reader("folder")
def folder(
    src: str | None,
    test_fraction: float = 0.5,
    split_seed: int = 0,
    resize: int = 0,
    quality: int = 95,
    verify: bool = True,
) -> Splits:
    """One sub-folder per class (images anywhere below it). Class ids 1..C in folder-name
    order; a seeded ``test_fraction`` of the classes is the test split (0 = all train)."""
    root = source_root(src, "folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    test = class_split(names, test_fraction, split_seed)
    entries: dict[str, list[Entry]] = {"train": []} if not test else {"train": [], "test": []}
    for label, name in enumerate(names, start=1):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        split = "test" if name in test else "train"
        entries[split] += [Entry(p.relative_to(root).as_posix(), label, {"class_name": name}) for p in files]
    return build_splits(
        root,
        entries,
        str(root),
        Encoding(resize=resize, quality=quality, verify=verify),
        f"{len(names)} class folders, test_fraction={test_fraction}",
    )


_HEADER_WORDS = {"path", "file", "filename", "image", "image_path", "label", "class", "class_id", "target", "split"}


@register_reader("csv")
def csv_list(
    src: str | None,
    file: str = "labels.csv",
    root: str = "",
    delimiter: str = "",
    test_fraction: float = 0.0,
    split_seed: int = 0,
    resize: int = 0,
    quality: int = 95,
    verify: bool = True,
) -> Splits:
    """A CSV/TSV list of ``path,label[,split]`` (an optional header row is recognised).

    ``--src`` is the list itself or the folder holding ``file``; image paths are relative
    to ``root`` (default: the list's folder). Integer labels are kept; other labels become
    1..C in sorted order (the name is kept in the metadata). Without a split column a
    seeded ``test_fraction`` of the classes is the test split (0 = all train).
    """
    given = source_root(src, "csv")
    path = given if given.is_file() else list_file(given, file)
    base = Path(root).expanduser() if root else path.parent
    sep = delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else None)
    text = path.read_text(encoding="utf-8")
    if sep is None:
        try:
            sep = csv.Sniffer().sniff(text[:4096], delimiters=",\t;").delimiter
        except csv.Error:
            sep = ","
    rows = [
        (n, [c.strip() for c in r])
        for n, r in enumerate(csv.reader(text.splitlines(), delimiter=sep), start=1)
        if any(c.strip() for c in r)
    ]
    if rows and {c.lower() for c in rows[0][1]} & _HEADER_WORDS and not rows[0][1][1].lstrip("-").isdigit():
        rows = rows[1:]
    widths = {len(r) for _, r in rows}
    if not rows:
        raise BadInputError(f"{path} lists no images", str(path))
    if not widths <= {2, 3} or len(widths) > 1:
        bad = next(n for n, r in rows if len(r) != len(rows[0][1]) or len(r) not in (2, 3))
        raise BadInputError(
            f"{path}, line {bad}: expected path,label[,split] on every line (all with or all without split)", str(path)
        )
    raw_labels = [r[1] for _, r in rows]
    numeric = all(re.fullmatch(r"-?\d+", v) for v in raw_labels)
    names = sorted(set(raw_labels))
    ids = {v: int(v) for v in names} if numeric else {v: i + 1 for i, v in enumerate(names)}
    test = set() if widths == {3} else class_split(names, test_fraction, split_seed)
    entries: dict[str, list[Entry]] = {}
    for _, r in rows:
        split = r[2] if len(r) == 3 else ("test" if r[1] in test else "train")
        meta = {} if numeric else {"class_name": r[1]}
        entries.setdefault(split, []).append(Entry(r[0], ids[r[1]], meta))
    return build_splits(
        base,
        entries,
        str(path),
        Encoding(resize=resize, quality=quality, verify=verify),
        "split column" if widths == {3} else f"test_fraction={test_fraction}",
    )
