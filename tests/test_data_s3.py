"""Packing into a real SeaweedFS bucket and streaming it back."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import boto3
import pytest
from recipes import RECIPE_40

from dmlray.data import storage
from dmlray.data.pack import pack
from dmlray.data.pk_batches import PKBatches
from dmlray.data.shards import read_manifest
from dmlray.data.stream import iter_eval_batches, iter_shard, rank_shards
from dmlray.data.transforms import ImageTransform

pytestmark = pytest.mark.slow


def test_every_sample_arrives_and_shards_are_class_grouped(glyphs_s3, s3_env):
    manifest = read_manifest(glyphs_s3)
    assert set(manifest.splits) == {"train", "test"}
    train, test = set(manifest.classes("train")), set(manifest.classes("test"))
    assert len(train) == len(test) == 20 and not train & test  # zero-shot split
    for split in ("train", "test"):
        keys, per_class_shards = [], {}
        for info, url in zip(manifest.split(split)["shards"], manifest.shard_urls(split), strict=True):
            labels = []
            for key, label, data in iter_shard(url):
                keys.append(key)
                labels.append(label)
                assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert len(labels) == info["samples"] and sorted(set(labels)) == info["classes"]
            # class-grouped: each class is one contiguous run within the shard
            runs = [c for c, _ in itertools.groupby(labels)]
            assert len(runs) == len(set(runs))
            for c in set(labels):
                per_class_shards.setdefault(c, set()).add(url)
        assert len(keys) == len(set(keys)) == manifest.num_samples(split) == 16 * 20
        assert all(len(s) == 1 for s in per_class_shards.values())  # small classes never straddle shards
    # the manifest is an object in the bucket, with checksums of what was written
    body = boto3.client("s3").get_object(Bucket="dmlray-test", Key="glyphs40/manifest.json")["Body"].read()
    assert json.loads(body)["splits"]["train"]["shards"][0]["sha256"]


def test_pk_batches_from_s3_are_balanced_and_ranks_draw_disjoint_classes(glyphs_s3, s3_env):
    manifest = read_manifest(glyphs_s3)
    tf = ImageTransform(32, 1, train=True)
    layouts = manifest.layouts("train")
    streams = [
        PKBatches(layouts, 4, 3, tf, seed=7, rank=r, world_size=2, class_buffer=12, open_shards=2) for r in (0, 1)
    ]
    draws = []
    for stream in streams:
        batches = list(itertools.islice(iter(stream), 5))
        for images, labels, keys in batches:
            assert images.shape == (12, 1, 32, 32) and len(set(keys)) == 12
            counts = Counter(labels.tolist())
            assert len(counts) == 4 and set(counts.values()) == {3}
        draws.append([b[1].tolist() for b in batches])
    classes = [{c for batch in d for c in batch} for d in draws]
    assert classes[0].isdisjoint(classes[1]), "a class belongs to one rank"
    again = [b[1].tolist() for b in itertools.islice(iter(streams[0]), 5)]
    assert again == draws[0], "the same (seed, rank) must give the same batches"


def test_eval_pass_reads_every_sample_once_across_ranks(glyphs_s3, s3_env):
    manifest = read_manifest(glyphs_s3)
    urls = manifest.shard_urls("test")
    tf = ImageTransform(32, 1, train=False)
    keys = []
    for rank in range(3):
        for _, _, batch_keys in iter_eval_batches(rank_shards(urls, rank, 3), tf, 50):
            keys += batch_keys
    assert len(keys) == len(set(keys)) == manifest.num_samples("test")


def test_wrong_secret_names_endpoint_and_bucket(glyphs_s3, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_clients()
    with pytest.raises(storage.StorageError) as info:
        read_manifest(glyphs_s3)
    message = str(info.value)
    assert s3_env.endpoint in message and "dmlray-test" in message and "secret key is wrong" in message


def test_missing_bucket_is_a_clear_error_before_packing(s3_env):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        pack(RECIPE_40, "s3://no-such-bucket/x", progress=False)
