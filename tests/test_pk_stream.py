"""What the P×K training stream promises, checked over many dataset shapes.

1. Every step's global batch (all ranks) is P·R distinct classes × K distinct images.
2. Over steps worth three epochs of a balanced dataset every image is drawn, and the most
   used image is used at most twice as often as the least used.
3. Any dataset with P·R classes of at least K images trains, down to one shard; one that
   cannot fill a batch fails at once, naming the numbers.
4. The batch sequence is deterministic, and a resumed stream continues it.
5. Each shard is read by about one rank per epoch on large datasets.

R ranks and W loader workers are simulated in one process (worker w of a rank delivers
the rank's batches w, w+W, ...: a DataLoader's order), on in-memory shards; the last test
runs two real gloo processes on SeaweedFS.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlray.data.pack import Recipe, pack
from dmlray.data.partition import DatasetTooSmall, ShardLayout, eligible_classes, rank_slot, read_amplification
from dmlray.data.pk_batches import PKBatches
from dmlray.data.shards import read_manifest
from dmlray.data.transforms import ImageTransform


def no_decode(data: bytes, rng) -> torch.Tensor:
    return torch.zeros(1)


def layouts_for(per_class: list[int], shards: int) -> list[ShardLayout]:
    """Classes 0..C-1 (with these image counts) stored in order, cut into ``shards``
    shards of about equal sample counts: large classes span several shards."""
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    bounds = np.linspace(0, len(labels), shards + 1).round().astype(int)
    out = []
    for s in range(shards):
        runs: list[list[int]] = []
        for label in labels[bounds[s] : bounds[s + 1]]:
            if runs and runs[-1][0] == label:
                runs[-1][1] += 1
            else:
                runs.append([label, 1])
        out.append(ShardLayout(f"mem://{s}", tuple((c, n) for c, n in runs)))
    return [layout for layout in out if layout.classes]


def memory_reader(layouts: list[ShardLayout]):
    """read_shard over in-memory shards: keys name the class and the image's index in it."""
    by_url = {layout.url: layout for layout in layouts}
    offsets: dict[str, dict[int, int]] = {}
    seen: Counter = Counter()
    for layout in layouts:  # index of each run's first image within its class
        offsets[layout.url] = {}
        for label, n in layout.classes:
            offsets[layout.url][label] = seen[label]
            seen[label] += n

    def read(url: str):
        for label, n in by_url[url].classes:
            for j in range(n):
                yield f"c{label}_{offsets[url][label] + j}", label, b""

    return read


def rank_sequences(layouts, P, K, R, W, steps, seed=0, start=0):
    """Per step, the (class, keys) draws of every rank, as the trainer would get them."""
    read = memory_reader(layouts)
    slots = max(W, 1)
    streams = [
        PKBatches(layouts, P, K, no_decode, seed=seed, rank=r, world_size=R, read_shard=read, start_batch=start)
        for r in range(R)
    ]
    workers = [[stream.draws(w, slots) for w in range(slots)] for stream in streams]
    out = []
    for step in range(start, start + steps):
        per_rank = []
        for rank_workers in workers:
            index, draw = next(rank_workers[step % slots])
            assert index == step // slots
            per_rank.append([(label, tuple(k for k, _ in ticket.items)) for label, ticket in draw])
        out.append(per_rank)
    return out


def assert_global_batches(sequence, P, K, R):
    for step, per_rank in enumerate(sequence):
        classes = [label for draws in per_rank for label, _ in draws]
        keys = [k for draws in per_rank for _, ks in draws for k in ks]
        assert len(classes) == P * R and len(set(classes)) == P * R, f"step {step}: classes repeat: {classes}"
        assert all(len(ks) == K for draws in per_rank for _, ks in draws)
        assert len(set(keys)) == len(keys) == P * K * R, f"step {step}: an image appears twice"
        assert all(k.startswith(f"c{label}_") for draws in per_rank for label, ks in draws for k in ks)


def random_shape(seed: int) -> dict:
    rng = random.Random(seed)
    classes = rng.randint(5, 2000)
    per_class = rng.randint(1, 60)
    while classes * per_class > 12_000:  # keep each case to about a second
        classes = max(5, classes // 2)
    return dict(
        classes=classes,
        per_class=per_class,
        balanced=rng.random() < 0.6,
        shards=rng.randint(1, 60),
        P=rng.choice([2, 4, 8]),
        K=rng.choice([2, 4, 8]),
        R=rng.randint(1, 4),
        W=rng.randint(0, 3),
        seed=seed,
    )


@pytest.mark.parametrize("case", range(40))
def test_guarantees_hold_over_random_shapes(case):
    shape = random_shape(case)
    rng = random.Random(case)
    per_class = (
        [shape["per_class"]] * shape["classes"]
        if shape["balanced"]
        else [rng.randint(1, shape["per_class"]) for _ in range(shape["classes"])]
    )
    layouts = layouts_for(per_class, shape["shards"])
    P, K, R, W = shape["P"], shape["K"], shape["R"], shape["W"]
    eligible = [n for n in per_class if n >= K]
    if len(eligible) < P * R:  # guarantee 3, failing side: at once, naming the numbers
        t0 = time.monotonic()
        with pytest.raises(DatasetTooSmall) as info:
            PKBatches(layouts, P, K, no_decode, rank=0, world_size=R, read_shard=memory_reader(layouts))
        assert time.monotonic() - t0 < 5
        message = str(info.value)
        assert (
            f"{len(eligible)} eligible classes" in message and f"{P}·{R} = {P * R}" in message and f"K={K}" in message
        )
        return
    steps = -(-3 * sum(eligible) // (P * K * R))  # three epochs of the eligible images
    sequence = rank_sequences(layouts, P, K, R, W, steps, seed=case)
    assert_global_batches(sequence, P, K, R)  # guarantee 1
    if shape["balanced"]:  # guarantee 2
        uses = Counter(k for per_rank in sequence for draws in per_rank for _, ks in draws for k in ks)
        assert len(uses) == sum(eligible), f"{sum(eligible) - len(uses)} images never drawn in three epochs: {shape}"
        assert max(uses.values()) <= 2 * min(uses.values()), f"uses {min(uses.values())}..{max(uses.values())}: {shape}"
    # guarantee 4: the same sequence again, and from a later step on
    assert rank_sequences(layouts, P, K, R, W, min(steps, 12), seed=case) == sequence[:12]
    start = rng.randrange(1, steps)
    assert rank_sequences(layouts, P, K, R, W, steps - start, seed=case, start=start) == sequence[start:]


@pytest.mark.parametrize(
    "classes, per_class, shards, P, K, R, W",
    [
        (245, 59, 2, 8, 4, 2, 0),  # large classes, few shards: the classes read last must be used whole
        (50, 60, 5, 8, 4, 4, 2),  # loader workers sharing a rank's classes take turns along each cycle
        (1127, 5, 55, 8, 4, 1, 2),  # n = K + 1: what an epoch leaves over carries into the next
    ],
)
def test_coverage_in_shapes_that_once_broke_it(classes, per_class, shards, P, K, R, W):
    layouts = layouts_for([per_class] * classes, shards)
    sequence = rank_sequences(layouts, P, K, R, W, -(-3 * classes * per_class // (P * K * R)), seed=3)
    assert_global_batches(sequence, P, K, R)
    uses = Counter(k for per_rank in sequence for draws in per_rank for _, ks in draws for k in ks)
    assert len(uses) == classes * per_class and max(uses.values()) <= 2 * min(uses.values())


def test_classes_below_k_are_left_out_counted_and_a_single_shard_trains():
    per_class = [6] * 12 + [2] * 5  # 5 classes cannot give K=4 distinct images
    layouts = layouts_for(per_class, 1)
    eligibility = eligible_classes(layouts, 4)
    assert len(eligibility.counts) == 12 and eligibility.excluded == {c: 2 for c in range(12, 17)}
    assert "5 class(es) with fewer than K=4 images left out (10 images)" == eligibility.describe_excluded()
    sequence = rank_sequences(layouts, 3, 4, 2, 2, 30)
    assert_global_batches(sequence, 3, 4, 2)
    assert not {label for step in sequence for draws in step for label, _ in draws} & set(eligibility.excluded)


def test_read_amplification_at_sop_shape_stays_below_1_25():
    rng = random.Random(0)
    per_class = [rng.randint(2, 12) for _ in range(11_318)]  # SOP: 11,318 classes of 2-12 images
    layouts = layouts_for(per_class, 50)
    for K, R in ((2, 8), (4, 8), (4, 4)):
        eligibility = eligible_classes(layouts, K)
        slots = [rank_slot(layouts, eligibility, 16, r, R, seed=0) for r in range(R)]
        assert read_amplification(layouts, slots) <= 1.25
        assert sum(len(s.classes) for s in slots) == len(eligibility.counts)  # a partition: every class, once
    # a dataset with fewer shards than ranks is read by several ranks (the README says so)
    small = layouts_for([10] * 40, 2)
    slots = [rank_slot(small, eligible_classes(small, 4), 4, r, 4, seed=0) for r in range(4)]
    assert 1.0 < read_amplification(small, slots) <= 4.0


# ------------------------------------------------------------------ through `dmlray pack` of real images


def unique_folder(root: Path, classes: int, per_class: int) -> Path:
    """A class-per-folder tree of distinct JPEGs (each image its own random pixels)."""
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = np.random.default_rng(c * 1000 + j).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{j:02d}.jpg", quality=95)
    return root


def content_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images]


@pytest.fixture(scope="module")
def cub_shaped(tmp_path_factory) -> str:
    """100 classes × 24 unique images packed into about 15 shards (the issue's CUB-shaped case)."""
    tmp = tmp_path_factory.mktemp("cub-shaped")
    src = unique_folder(tmp / "raw", 100, 24)
    dst = tmp / "shards"
    pack(
        Recipe(dataset="folder", shard_bytes=1 << 20, options={"test_fraction": 0, "resize": 0}),
        str(dst),
        str(src),
        progress=False,
    )
    return str(dst)


def test_cub_shaped_folder_never_repeats_an_image_in_a_batch(cub_shaped):
    manifest = read_manifest(cub_shaped)
    assert 10 <= len(manifest.shard_urls("train")) <= 20
    tf = ImageTransform(24, 3, train=False)  # deterministic: equal bytes give equal tensors
    stream = PKBatches(manifest.layouts("train"), 8, 4, tf, seed=0, open_shards=4)
    for step, (images, labels, keys) in enumerate(itertools.islice(stream, 150)):
        assert len(set(keys)) == 32, f"batch {step} holds an image twice (keys)"
        assert len(set(content_hashes(images))) == 32, f"batch {step} holds an image twice (pixels)"
        assert sorted(Counter(labels.tolist()).values()) == [4] * 8


def test_small_datasets_train_and_impossible_requests_fail_at_once(tmp_path):
    src = unique_folder(tmp_path / "raw", 20, 6)
    dst = tmp_path / "shards"
    pack(Recipe(dataset="folder", options={"test_fraction": 0, "resize": 0}), str(dst), str(src), progress=False)
    manifest = read_manifest(str(dst))
    assert len(manifest.shard_urls("train")) == 1
    tf = ImageTransform(24, 3, train=False)
    t0 = time.monotonic()
    batches = list(itertools.islice(PKBatches(manifest.layouts("train"), 4, 4, tf), 10))
    assert len(batches) == 10 and time.monotonic() - t0 < 30  # the 20-class case used to never yield
    five = unique_folder(tmp_path / "five", 5, 6)
    pack(
        Recipe(dataset="folder", options={"test_fraction": 0, "resize": 0}),
        str(tmp_path / "s5"),
        str(five),
        progress=False,
    )
    t0 = time.monotonic()
    with pytest.raises(DatasetTooSmall, match=r"5 eligible classes .* P·R = 8·1 = 8"):
        PKBatches(read_manifest(str(tmp_path / "s5")).layouts("train"), 8, 4, tf)
    assert time.monotonic() - t0 < 5  # used to hang


def test_manifest_errors_name_the_manifest(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a/manifest.json is not valid JSON"):
        read_manifest(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"b/manifest.json is not a dmlray manifest.*list"):
        read_manifest(str(tmp_path / "b"))


def test_a_tar_header_claiming_more_bytes_than_the_shard_is_a_shard_error(tmp_path):
    from dmlray.data.stream import iter_shard
    from dmlray.data.tario import ShardError

    src = unique_folder(tmp_path / "raw", 2, 2)
    pack(
        Recipe(dataset="folder", options={"test_fraction": 0, "resize": 0}),
        str(tmp_path / "s"),
        str(src),
        progress=False,
    )
    url = read_manifest(str(tmp_path / "s")).shard_urls("train")[0]
    data = bytearray(Path(url).read_bytes())
    data[124:136] = b"77777777777\0"  # the first member now claims 8 GiB
    checksum = sum(data[:148]) + 8 * 32 + sum(data[156:512])
    data[148:156] = f"{checksum:06o}\0 ".encode()
    Path(url).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"claims 8589934591 bytes, but the shard ends at byte") as info:
        list(iter_shard(url))
    assert url in str(info.value)


# ------------------------------------------------------------------ two real gloo ranks on SeaweedFS


def _gloo_rank(rank: int, world_size: int, init_file: str, env: dict, data_url: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from dmlray.config import DataConfig
    from dmlray.jobs.worker import training_batches, training_layouts

    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    manifest = read_manifest(data_url)
    data = DataConfig(
        url=data_url,
        classes_per_batch=3,
        samples_per_class=4,
        class_buffer=8,
        open_shards=2,
        loader_workers=2,
        image_size=32,
    )
    tf = ImageTransform(32, 1, train=True)
    batches = training_batches(
        data,
        training_layouts(manifest, "train"),
        manifest.shard_checksums("train"),
        tf,
        seed=5,
        rank=rank,
        world_size=world_size,
        device=torch.device("cpu"),
    )
    steps = []
    for images, labels, keys in itertools.islice(batches, 40):
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (labels.tolist(), list(keys), content_hashes(images)))
        steps.append(gathered)
    if rank == 0:
        torch.save(steps, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_on_s3_get_distinct_classes_and_images_every_step(glyphs_s3, s3_env, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "steps.pt"
    mp.spawn(_gloo_rank, args=(2, str(tmp_path / "init"), dict(s3_env.env), glyphs_s3, str(out)), nprocs=2)
    steps = torch.load(out, weights_only=True)
    assert len(steps) == 40
    for step, gathered in enumerate(steps):
        labels = [label for rank_labels, _, _ in gathered for label in rank_labels]
        keys = [k for _, rank_keys, _ in gathered for k in rank_keys]
        per_rank_classes = [set(rank_labels) for rank_labels, _, _ in gathered]
        assert all(len(c) == 3 for c in per_rank_classes) and per_rank_classes[0].isdisjoint(per_rank_classes[1]), (
            f"step {step}: a class on both ranks"
        )
        assert Counter(Counter(labels).values()) == {4: 6}, f"step {step}: not 6 classes × 4 images"
        assert len(set(keys)) == 24, f"step {step}: an image twice in the global batch"


def test_evaluation_refuses_a_shard_that_differs_from_its_manifest(tmp_path):
    from dmlray.data.tario import ShardError
    from dmlray.evaluation.embedding import embed_split
    from dmlray.models import EmbeddingModel
    from dmlray.models.glyph_cnn import GlyphCNN

    src = unique_folder(tmp_path / "raw", 4, 3)
    pack(
        Recipe(dataset="folder", options={"test_fraction": 0, "resize": 0}),
        str(tmp_path / "s"),
        str(src),
        progress=False,
    )
    manifest = read_manifest(str(tmp_path / "s"))
    url = manifest.shard_urls("train")[0]
    model = EmbeddingModel(GlyphCNN(in_channels=3, width=4), embedding_dim=4)
    tf = ImageTransform(24, 3, train=False)
    checksums = manifest.shard_checksums("train")
    assert embed_split(model, [url], tf, 8, torch.device("cpu"), checksums=checksums)["labels"].shape[0] == 12
    data = bytearray(Path(url).read_bytes())
    data[900] ^= 0xFF  # inside the first image: the tar stays readable, the pixels change
    Path(url).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256") as info:
        embed_split(model, [url], tf, 8, torch.device("cpu"), checksums=checksums)
    assert url in str(info.value)


def test_launch_refuses_a_dataset_that_cannot_fill_the_global_batch_before_writing(glyphs_small, tmp_path):
    from dmlray.config import load_config
    from dmlray.jobs.launch import launch

    # 30 training classes; 2 ranks × P=16 need 32 (nothing starts: no Ray, no folder)
    cfg = load_config(
        "demo",
        [
            f"data.url={glyphs_small}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.num_workers=2",
            "data.classes_per_batch=16",
            "data.class_buffer=32",
            "memory.size=0",
        ],
    )
    t0 = time.monotonic()
    with pytest.raises(DatasetTooSmall, match=r"30 eligible classes .* P·R = 16·2 = 32"):
        launch(cfg)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "runs").exists()
