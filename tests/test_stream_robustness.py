"""The stream under bad conditions: corrupt images, truncated or tampered shards, reads that
fail mid-shard, wrong credentials; plus the determinism, worker and transform contracts."""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlray.data import storage
from dmlray.data.health import StreamStats
from dmlray.data.pk_batches import DatasetTooSmall, PKBatches
from dmlray.data.records import Sample
from dmlray.data.shards import write_tar
from dmlray.data.stream import EvalStream, iter_eval_batches, iter_shard
from dmlray.data.tario import ShardError
from dmlray.data.transforms import ImageTransform, NaturalImageTransform, make_transform, transform_style

# torchvision 0.29 deprecates its JPEG decoder; the natural transform falls back to Pillow when it goes
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def encoded(seed: int, size=(48, 36), fmt="JPEG", smooth: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if smooth:  # a photograph-like image: gradients and a few blobs, little pixel noise
        y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
        channels = [np.sin(6 * x * rng.uniform(0.5, 2) + k) * np.cos(5 * y * rng.uniform(0.5, 2) - k) for k in range(3)]
        pixels = ((np.stack(channels, -1) + 1) * 110 + rng.random((size[1], size[0], 3)) * 20).astype(np.uint8)
    else:
        pixels = (rng.random((size[1], size[0], 3)) * 80 + rng.integers(0, 170, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_shard(path: Path, classes, per_class: int = 4, corrupt: set[str] = frozenset(), seed: int = 0) -> list[str]:
    """A class-grouped shard on disk; keys in ``corrupt`` get bytes that are not an image."""
    samples = []
    for c in classes:
        for j in range(per_class):
            key = f"c{c}_{j}"
            data = b"\xff\xd8\xff\xe0 garbage, not a JPEG" if key in corrupt else encoded(seed + 100 * c + j)
            samples.append(Sample(key=key, label=c, data=data, ext="jpg", meta={"path": f"{c}/{j}.jpg"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        write_tar(f, samples)
    return [s.key for s in samples]


GREY = ImageTransform(16, 1, train=True)


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


# ------------------------------------------------------------------ bad samples and shards


def test_corrupt_jpeg_is_skipped_counted_and_logged_once(tmp_path, caplog):
    url = str(tmp_path / "a.tar")
    make_shard(Path(url), classes=range(6), per_class=5, corrupt={"c2_1"})
    seen = []
    stats = StreamStats(on_skip=lambda shard, key, reason: seen.append((shard, key)))
    stream = PKBatches([url], 3, 4, GREY, seed=0, class_buffer=6, open_shards=1, stats=stats)
    with caplog.at_level("WARNING", logger="dmlray.data.stream"):
        batches = take(stream, 12)
    for images, labels, keys in batches:
        assert images.shape == (12, 1, 16, 16) and sorted(Counter(labels.tolist()).values()) == [4, 4, 4]
        assert len(set(keys)) == 12 and "c2_1" not in keys
    assert stream.skipped >= 1 and stats.get("samples_skipped") == len(seen) >= 1
    assert all(s == (url, "c2_1") for s in seen)
    logged = [r.getMessage() for r in caplog.records if "c2_1" in r.getMessage()]
    assert len(logged) == 1 and url in logged[0]  # once per shard and key, naming both
    # evaluation: with stats the sample is skipped and counted; without, it is an error
    stats = StreamStats()
    keys = [k for _, _, ks in iter_eval_batches([url], ImageTransform(16, 1, train=False), 7, stats=stats) for k in ks]
    assert len(keys) == 29 and "c2_1" not in keys and stats.get("samples_skipped") == 1
    with pytest.raises(ValueError, match="c2_1 cannot be decoded"):
        list(iter_eval_batches([url], ImageTransform(16, 1, train=False), 7))


def test_truncated_tar_is_cut_short_and_training_continues(tmp_path):
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    make_shard(good, classes=range(0, 5))
    keys = make_shard(bad, classes=range(5, 10))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    with pytest.raises(ShardError, match="truncated"):
        list(iter_shard(str(bad)))
    stats = StreamStats()
    got = [k for k, _, _ in iter_shard(str(bad), stats=stats)]
    assert 0 < len(got) < len(keys) and got == keys[: len(got)] and stats.get("shards_skipped") == 1
    # cut exactly after the last member (no end-of-archive block): also truncated
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    bad.write_bytes(data[: last.offset_data + -(-last.size // 512) * 512])
    assert [k for k, _, _ in iter_shard(str(bad), stats=StreamStats())] == keys[:-1]
    with pytest.raises(ShardError, match="without an end-of-archive block"):
        list(iter_shard(str(bad)))
    stream = PKBatches([str(good), str(bad)], 2, 2, GREY, seed=1, class_buffer=4, open_shards=2)
    batches = take(stream, 25)
    assert len(batches) == 25 and stream.stats.get("shards_skipped") >= 1
    assert stream.stats.bad_shards == 1  # excluded for the rest of the run: found bad once, not every epoch
    # nothing readable at all: a clear error at once instead of spinning forever
    bad.write_bytes(data[:700])
    with pytest.raises(DatasetTooSmall, match="0 eligible classes"):
        PKBatches([str(bad)], 2, 2, GREY, class_buffer=4, open_shards=1)


def test_checksum_mismatch_is_counted_and_verify_skips_the_shard(tmp_path):
    import hashlib

    path = tmp_path / "s.tar"
    keys = make_shard(path, classes=range(3))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(list(iter_shard(str(path), sha256=sha, stats=StreamStats()))) == len(keys)
    data = bytearray(path.read_bytes())
    data[1500] ^= 0xFF  # inside the first image: the tar still parses
    path.write_bytes(bytes(data))
    stats = StreamStats()
    assert len(list(iter_shard(str(path), sha256=sha, stats=stats))) == len(keys)  # streamed, then found out
    assert stats.get("checksum_failures") == 1
    stats = StreamStats()
    assert list(iter_shard(str(path), sha256=sha, verify=True, stats=stats)) == []  # checked before any sample
    assert stats.get("checksum_failures") == 1
    with pytest.raises(ShardError, match="sha256"):
        list(iter_shard(str(path), sha256=sha, verify=True))


class Flaky:
    """An opener whose streams fail after ``after`` bytes, the first ``failures`` times."""

    def __init__(self, failures: int, after: int = 5000):
        self.failures = failures
        self.after = after
        self.starts: list[int] = []

    def __call__(self, url: str, start: int = 0):
        self.starts.append(start)
        stream = storage.open_read(url, start)
        if self.failures <= 0:
            return stream
        self.failures -= 1
        return _Breaking(stream, self.after)


class _Breaking:
    def __init__(self, stream, after):
        self.stream, self.left = stream, after

    def read(self, n=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer (simulated)")
        data = self.stream.read(min(n, self.left) if n > 0 else self.left)
        self.left -= len(data)
        return data

    def close(self):
        self.stream.close()


def test_read_failing_mid_shard_resumes_from_its_offset(tmp_path):
    path = tmp_path / "s.tar"
    keys = make_shard(path, classes=range(4))
    flaky = Flaky(failures=2)
    stats = StreamStats()
    got = [k for k, _, _ in iter_shard(str(path), stats=stats, backoff=0.01, open_at=flaky)]
    assert got == keys and stats.get("retries") == 2
    assert flaky.starts == [0, 5000, 10000]  # resumed where it broke, not from the start
    with pytest.raises(ShardError, match="after 3 retries"):
        list(iter_shard(str(path), backoff=0.01, open_at=Flaky(failures=9, after=0)))


def test_custom_read_shard_errors_are_counted_too(tmp_path):
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    make_shard(good, classes=range(4))
    make_shard(bad, classes=range(4, 8))
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.6)])  # classes 4 and 5 whole, then cut short

    def only_even(url):  # the kind of wrapper worker.py builds around iter_shard
        return (s for s in iter_shard(url) if s[1] % 2 == 0)

    stream = PKBatches([str(good), str(bad)], 2, 2, GREY, class_buffer=2, open_shards=2, read_shard=only_even)
    batches = take(stream, 6)
    assert all(set(b[1].tolist()) <= {0, 2, 4, 6} for b in batches) and stream.stats.get("shards_skipped") >= 1
    filtered = PKBatches([str(good)], 2, 2, GREY, class_buffer=2, open_shards=1, class_filter=lambda c: c in (1, 3))
    assert all(set(b[1].tolist()) == {1, 3} for b in take(filtered, 4))


# ------------------------------------------------------------------ determinism, memory, workers


def test_batches_are_deterministic_per_seed_and_rank_and_resume_where_they_stopped(tmp_path):
    urls = [str(tmp_path / f"{i}.tar") for i in range(3)]
    for i, url in enumerate(urls):
        make_shard(Path(url), classes=range(10 * i, 10 * i + 6), per_class=6)

    def keys(n=8, **kw):
        stream = PKBatches(urls, 3, 2, GREY, class_buffer=8, open_shards=2, **kw)
        return [b[2] for b in take(stream, n)]

    base = keys(seed=3)
    assert keys(seed=3) == base and keys(seed=4) != base
    ranks = [keys(seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert {k.split("_")[0] for b in ranks[0] for k in b}.isdisjoint({k.split("_")[0] for b in ranks[1] for k in b})
    # a resumed stream continues the sequence: no batch replayed, none skipped
    full = keys(n=30, seed=3)
    assert keys(n=20, seed=3, start_batch=10) == full[10:]
    stats = PKBatches(urls, 3, 2, GREY, class_buffer=8, open_shards=2, seed=3)
    take(stats, 12)
    # bounded reading: nearly every sample read ends up in a batch
    assert stats.stats.get("samples_used") >= 0.6 * stats.stats.get("samples_read")


def test_loader_workers_draw_distinct_streams_and_share_the_skip_counter(tmp_path):
    url = str(tmp_path / "0.tar")
    make_shard(Path(url), classes=range(6), per_class=4, corrupt={f"c{c}_0" for c in range(6)})
    stream = PKBatches([url], 2, 2, GREY, seed=5, class_buffer=4, open_shards=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
    batches = list(itertools.islice(iter(loader), 20))
    worker0, worker1 = [b[1].tolist() for b in batches[0::2]], [b[1].tolist() for b in batches[1::2]]
    assert worker0 != worker1  # different seeds per worker: no two workers repeat each other
    assert stream.skipped >= 1  # counted in the workers, visible here


def test_eval_stream_splits_shards_over_workers_exactly_once(tmp_path):
    urls = [str(tmp_path / f"{i}.tar") for i in range(5)]
    keys = [
        k for i, url in enumerate(urls) for k in make_shard(Path(url), classes=range(3 * i, 3 * i + 3), per_class=2)
    ]
    loader = torch.utils.data.DataLoader(
        EvalStream(urls, ImageTransform(16, 1, train=False), 4),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
    )
    got = [k for _, _, ks in loader for k in ks]
    assert sorted(got) == sorted(keys) and len(got) == len(set(got))


# ------------------------------------------------------------------ transforms


def test_natural_transform_follows_the_seed_recipe():
    data = encoded(7, size=(500, 375), smooth=True)
    train = NaturalImageTransform(227, train=True)
    a, b = train(data, random.Random(1)), train(data, random.Random(1))
    assert a.shape == (3, 227, 227) and torch.equal(a, b)
    assert not torch.equal(a, train(data, random.Random(2)))
    # eval = resize 256 + centre crop 227, done the slow way for comparison
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(image, size=(256, 341), mode="bilinear", antialias=True)[0] / 255
    reference = resized[:, 14:241, 57:284]  # centre 227 × 227
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ours = NaturalImageTransform(227, train=False)(data)
    assert (ours * std + mean - reference).abs().mean() < 0.02
    # BN-Inception's convention: the colleague's InputConvention applied to the same pixels
    from dmlray.models.inputs import input_convention

    rgb = NaturalImageTransform(227, train=False).pixels(data).float()[None] / 255
    bgr = NaturalImageTransform(227, train=False, convention="bgr255")(data)
    torch.testing.assert_close(bgr, input_convention("bgr255").from_rgb(rgb)[0], atol=1e-3, rtol=1e-5)
    # uint8 batches normalised later (on the GPU) give the same floats
    for tf in (NaturalImageTransform(227, train=False), NaturalImageTransform(227, train=False, convention="bgr255")):
        pixels = [tf.pixels(data), tf.pixels(encoded(8, size=(300, 400), smooth=True))]
        torch.testing.assert_close(tf.normalise(tf.stack_pixels(pixels)), tf.collate(pixels))


def test_draft_decoding_of_large_jpegs_matches_a_full_decode(monkeypatch):
    from PIL import JpegImagePlugin

    big = encoded(3, size=(1200, 900), smooth=True)
    fast = NaturalImageTransform(227, train=False, draft=True)(big)
    full = NaturalImageTransform(227, train=False, draft=False)(big)
    assert (fast - full).abs().mean() < 0.05
    # training crops: a shorter side of 900 holds 3.5× the recipe's 256, so even crops
    # smaller than the output decode at 1/2 scale; the pixels match a full decode
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *args):
        calls.append(size)
        return original(self, mode, size, *args)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    for seed in range(8):
        fast = NaturalImageTransform(227, train=True, draft=True)(big, random.Random(seed))
        full = NaturalImageTransform(227, train=True, draft=False)(big, random.Random(seed))
        assert (fast - full).abs().mean() < 0.05
    assert len(calls) == 8


def test_transform_style_is_explicit_or_derived_from_the_data_config():
    assert transform_style(32, 1) == "glyph" and transform_style(227, 3) == "natural"
    glyph = make_transform("auto", 32, 1, train=True)
    assert isinstance(glyph, ImageTransform)
    png = encoded(4, size=(32, 32), fmt="PNG")
    torch.testing.assert_close(glyph(png, random.Random(0)), ImageTransform(32, 1, train=True)(png, random.Random(0)))
    assert isinstance(make_transform("natural", 224, 3, train=False, convention="bgr255"), NaturalImageTransform)
    with pytest.raises(ValueError, match="unknown transform style"):
        make_transform("fancy", 32, 1, train=True)


# ------------------------------------------------------------------ on SeaweedFS


@pytest.mark.slow
def test_s3_stream_resumes_with_range_requests_and_skips_a_truncated_object(tmp_path, s3_env):
    client = s3_env.client()
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    keys = make_shard(good, classes=range(4))
    make_shard(bad, classes=range(4, 8))
    client.upload_file(str(good), "dmlray-test", "robust/good.tar")
    data = bad.read_bytes()  # classes 4 and 5 whole, then cut short
    client.put_object(Bucket="dmlray-test", Key="robust/bad.tar", Body=data[: int(len(data) * 0.6)])
    good_url, bad_url = "s3://dmlray-test/robust/good.tar", "s3://dmlray-test/robust/bad.tar"
    flaky = Flaky(failures=1, after=3000)
    stats = StreamStats()
    assert [k for k, _, _ in iter_shard(good_url, stats=stats, backoff=0.01, open_at=flaky)] == keys
    assert flaky.starts == [0, 3000] and stats.get("retries") == 1
    stream = PKBatches([good_url, bad_url], 2, 2, GREY, class_buffer=4, open_shards=2)
    assert len(take(stream, 10)) == 10 and stream.stats.get("shards_skipped") >= 1


@pytest.mark.slow
def test_s3_wrong_credentials_and_missing_objects_raise_instead_of_being_skipped(tmp_path, s3_env, monkeypatch):
    path = tmp_path / "s.tar"
    make_shard(path, classes=range(2))
    s3_env.client().upload_file(str(path), "dmlray-test", "robust/creds.tar")
    url = "s3://dmlray-test/robust/creds.tar"
    with pytest.raises(storage.StorageError, match="does not exist"):
        take(PKBatches(["s3://dmlray-test/robust/missing.tar"], 2, 2, GREY), 1)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    storage.reset_clients()
    with pytest.raises(storage.StorageError) as info:
        take(PKBatches([url], 2, 2, GREY), 1)
    assert (
        "secret key is wrong" in str(info.value)
        and s3_env.endpoint in str(info.value)
        and "dmlray-test" in str(info.value)
    )
