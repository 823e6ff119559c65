"""The format promise: dmlray's shards are WebDataset tars, both ways.

The ``webdataset`` library (a test dependency only: dmlray reads and writes tars itself)
reads shards written by dmlray's writer, and dmlray's reader reads shards written by
``webdataset.TarWriter``; keys, labels and image bytes come through unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from dmlray.data.records import Sample
from dmlray.data.stream import iter_shard
from dmlray.data.writer import write_splits

wds = pytest.importorskip("webdataset")


def encoded_image(seed: int, fmt: str) -> bytes:
    """A small random RGB image, encoded (PNG or JPEG)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def make_samples(classes: int = 4, per_class: int = 5) -> list[Sample]:
    """Class-grouped samples with distinct images, alternating PNG and JPEG."""
    samples = []
    for label in range(classes):
        for i in range(per_class):
            ext = "png" if i % 2 == 0 else "jpg"
            data = encoded_image(100 * label + i, "PNG" if ext == "png" else "JPEG")
            key = f"c{label:03d}_{i:03d}"
            samples.append(Sample(key=key, label=10 + label, data=data, ext=ext, meta={"path": f"{key}.{ext}"}))
    return samples


def test_webdataset_reads_shards_written_by_dmlray(tmp_path):
    samples = make_samples()
    # ~1 KiB images and a 4 KiB shard size: the split spans several shards
    result = write_splits(str(tmp_path), {"train": samples}, shard_bytes=4096, workers=2)
    shards = result["train"].shards
    assert len(shards) > 1
    read = list(wds.WebDataset([s.url for s in shards], shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in read] == [s.key for s in samples]
    for record, sample in zip(read, samples, strict=True):
        assert int(record["cls"]) == sample.label
        assert record[sample.ext] == sample.data
        assert json.loads(record["json"]) == sample.meta
        other = {"png": "jpg", "jpg": "png"}[sample.ext]
        assert other not in record


def test_dmlray_reads_shards_written_by_webdataset(tmp_path):
    samples = make_samples(classes=3, per_class=4)
    rng = random.Random(0)
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for s in samples:
            # cls as webdataset encodes an int; json as a dict; extra fields are ignored
            sink.write({"__key__": s.key, s.ext: s.data, "cls": s.label, "json": s.meta, "txt": str(rng.random())})
    read = list(iter_shard(str(shard)))
    assert [(k, label, data) for k, label, data in read] == [(s.key, s.label, s.data) for s in samples]
    # the checksum path (read whole, verified, replayed) gives the same samples
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert list(iter_shard(str(shard), sha256=digest, verify=True)) == read
