"""Packing the raw benchmark layouts: tiny fake copies in the real file formats (list files,
a MATLAB cars_annos.mat, small JPEGs) into a local folder and a SeaweedFS bucket; bad
input reported or skipped; an interrupted pack resumed without rewriting shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlray.cli import main
from dmlray.data import storage
from dmlray.data.pack import Recipe, load_recipe, pack, reader_names, reader_options
from dmlray.data.shards import read_manifest
from dmlray.data.sources import BadInputError
from dmlray.data.stream import iter_shard

REPO = Path(__file__).resolve().parents[1]


def jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    """A small, distinct JPEG."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 60 + rng.integers(0, 190, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)


# ------------------------------------------------------------------ fake raw layouts


def make_cub(root: Path, classes=(1, 2, 3, 101, 102), per_class: int = 3) -> Path:
    images, labels = [], []
    n = 0
    for c in classes:
        folder = f"{c:03d}.Bird_{c}"
        for j in range(per_class):
            n += 1
            rel = f"{folder}/Bird_{c}_{j:04d}_{n}.jpg"
            jpeg(root / "images" / rel, n)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def make_cars(root: Path, classes=(1, 2, 99, 100), per_class: int = 3) -> Path:
    import scipy.io

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    n = 0
    for c in classes:
        for j in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            jpeg(root / rel, 100 + n)
            # the test flag disagrees with the class split on purpose: the DML split is by class
            records.append((rel, 1, 2, 30, 20, c, j % 2))
    annotations = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        for f, v in zip(fields, rec, strict=True):
            annotations[0, i][f] = (
                np.array([[v]], dtype=np.uint8 if f == "test" else None) if f != "relative_im_path" else np.array([v])
            )
    class_names = np.empty((1, 196), dtype=object)
    for i in range(196):
        class_names[0, i] = np.array([f"Maker Model {i + 1}"])
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


def make_sop(root: Path) -> Path:
    n = 0
    for name, classes in (("Ebay_train.txt", (1, 2)), ("Ebay_test.txt", (3, 4))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(3):
                n += 1
                rel = f"bicycle_final/{1000 + c}_{j}.JPG"
                jpeg(root / rel, 200 + n)
                lines.append(f"{n} {c} 1 {rel}")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def make_inshop(root: Path) -> Path:
    rows = []
    n = 0
    for item, statuses in (
        ("id_00000001", ["train"] * 3),
        ("id_00000007", ["train"] * 2),
        ("id_00000003", ["query", "gallery", "gallery"]),
        ("id_00000004", ["query", "query", "gallery"]),
    ):
        for j, status in enumerate(statuses):
            n += 1
            rel = f"img/WOMEN/Dresses/{item}/{j + 1:02d}_1_front.jpg"
            jpeg(root / rel, 300 + n)
            rows.append(f"{rel}    {item}    {status}")
    (root / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def make_folder(root: Path, classes=("ant", "bee", "cat", "dog"), per_class: int = 3) -> Path:
    for i, name in enumerate(classes):
        for j in range(per_class):
            jpeg(root / name / f"img_{j}.jpg", 400 + 10 * i + j)
    return root


def make_csv(root: Path) -> Path:
    lines = ["path,label,split"]
    for i, (name, split) in enumerate((("red", "train"), ("green", "train"), ("blue", "test"))):
        for j in range(2):
            jpeg(root / "pics" / f"{name}{j}.jpg", 500 + 10 * i + j)
            lines.append(f"pics/{name}{j}.jpg,{name},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


LAYOUTS = {
    # reader: (maker, recipe options, {split: (classes, samples)})
    "cub": (make_cub, {}, {"train": ([1, 2, 3], 9), "test": ([101, 102], 6)}),
    "cars196": (make_cars, {}, {"train": ([1, 2], 6), "test": ([99, 100], 6)}),
    "sop": (make_sop, {}, {"train": ([1, 2], 6), "test": ([3, 4], 6)}),
    "inshop": (make_inshop, {}, {"train": ([1, 7], 5), "query": ([3, 4], 3), "gallery": ([3, 4], 3)}),
    "folder": (make_folder, {"test_fraction": 0.5, "resize": 0}, {"train": (2, 6), "test": (2, 6)}),
    "csv": (make_csv, {}, {"train": ([2, 3], 4), "test": ([1], 2)}),
}


def shard_members(path: Path) -> dict[str, dict]:
    """{key: {"cls": int, "json": dict, "image": bytes}} of a local shard (read with tarfile)."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            entry = out.setdefault(key, {})
            if ext == "cls":
                entry["cls"] = int(data)
            elif ext == "json":
                entry["json"] = json.loads(data)
            else:
                entry["image"], entry["ext"] = data, ext
    return out


def check_manifest(root: str, expected: dict) -> None:
    manifest = read_manifest(root)
    assert set(manifest.splits) == set(expected)
    for split, (classes, samples) in expected.items():
        got = manifest.classes(split)
        assert (len(got) == classes) if isinstance(classes, int) else (got == classes), (split, got)
        assert manifest.num_samples(split) == samples
        keys = [k for url in manifest.shard_urls(split) for k, _, _ in iter_shard(url)]
        assert len(keys) == len(set(keys)) == samples


@pytest.mark.parametrize("reader", sorted(LAYOUTS))
def test_each_layout_packs_into_a_local_folder(reader, tmp_path):
    maker, options, expected = LAYOUTS[reader]
    src = maker(tmp_path / "raw")
    dst = tmp_path / "packed"
    pack(Recipe(dataset=reader, shard_bytes=8 * 1024, options=options, workers=2), str(dst), str(src), progress=False)
    check_manifest(str(dst), expected)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["made_by"]["dataset"] == reader and "resize" in manifest["made_by"]["options"]
    assert not (dst / "_partial").exists()  # progress records go once the manifest is there
    # every sample keeps its original relative path and label, and its bytes are the file's
    for split in expected:
        for shard in manifest["splits"][split]["shards"]:
            members = shard_members(dst / shard["name"])
            assert sorted({m["cls"] for m in members.values()}) == shard["classes"]
            for m in members.values():
                assert m["json"]["label"] == m["cls"]
                assert m["image"] == (src / m["json"]["path"]).read_bytes()


def test_layout_specifics(tmp_path):
    cars = tmp_path / "cars"
    pack(Recipe(dataset="cars196", shard_bytes=1 << 20), str(tmp_path / "c"), str(make_cars(cars)), progress=False)
    members = shard_members(tmp_path / "c" / "train" / "shard-000000.tar")
    flags = {m["json"]["test_flag"] for m in members.values()}
    assert flags == {0, 1}, "split by class, whatever the file's test flag says"
    assert {m["json"]["class_name"] for m in members.values()} == {"Maker Model 1", "Maker Model 2"}
    # In-Shop: query and gallery share their class ids; train classes are other items
    pack(
        Recipe(dataset="inshop", shard_bytes=1 << 20),
        str(tmp_path / "i"),
        str(make_inshop(tmp_path / "inshop")),
        progress=False,
    )
    m = read_manifest(str(tmp_path / "i"))
    assert m.classes("query") == m.classes("gallery") == [3, 4] and not set(m.classes("train")) & {3, 4}
    # folder with test_fraction 0: one split holding every class
    pack(
        Recipe(dataset="folder", shard_bytes=1 << 20, options={"test_fraction": 0, "resize": 0}),
        str(tmp_path / "f"),
        str(make_folder(tmp_path / "folder")),
        progress=False,
    )
    assert read_manifest(str(tmp_path / "f")).splits == ["train"]
    assert read_manifest(str(tmp_path / "f")).classes("train") == [1, 2, 3, 4]


def test_pre_resize_shrinks_the_shorter_side(tmp_path):
    src = tmp_path / "raw"
    jpeg(src / "a" / "big.jpg", 1, size=(120, 90))
    jpeg(src / "a" / "small.jpg", 2, size=(20, 16))
    jpeg(src / "b" / "big.jpg", 3, size=(90, 120))
    pack(
        Recipe(dataset="folder", shard_bytes=1 << 20, options={"test_fraction": 0, "resize": 32}),
        str(tmp_path / "p"),
        str(src),
        progress=False,
    )
    members = shard_members(tmp_path / "p" / "train" / "shard-000000.tar")
    sizes = {m["json"]["path"]: Image.open(io.BytesIO(m["image"])).size for m in members.values()}
    assert sizes == {"a/big.jpg": (43, 32), "a/small.jpg": (20, 16), "b/big.jpg": (32, 43)}


def test_shards_hold_whole_classes_and_are_reproducible(tmp_path):
    src = make_folder(tmp_path / "raw", classes=tuple(f"c{i:02d}" for i in range(12)), per_class=4)
    recipe = Recipe(dataset="folder", shard_bytes=40 * 1024, options={"test_fraction": 0, "resize": 0})
    pack(recipe, str(tmp_path / "a"), str(src), progress=False, workers=1)
    pack(recipe, str(tmp_path / "b"), str(src), progress=False, workers=4)
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"]["train"]["shards"]
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(a) > 2 and [s["sha256"] for s in a] == [s["sha256"] for s in b]  # thread count changes nothing
    owners: dict[int, set] = {}
    for s in a:
        for c in s["classes"]:
            owners.setdefault(c, set()).add(s["name"])
    assert all(len(v) == 1 for v in owners.values())


def test_recipes_in_shards_folder_name_real_readers_and_options():
    for path in sorted((REPO / "shards").glob("*.yaml")):
        recipe = load_recipe(str(path))
        assert recipe.dataset in reader_names(), path
        reader_options(recipe.dataset, recipe.options)  # unknown options would raise
        assert path.read_text().lstrip().startswith("#"), f"{path} should say what --src holds"
    assert {"cub", "cars196", "sop", "inshop", "folder", "csv"} <= {p.stem for p in (REPO / "shards").glob("*.yaml")}


# ------------------------------------------------------------------ bad input


def test_missing_image_names_the_file_or_is_skipped_and_listed(tmp_path, capsys):
    src = make_cub(tmp_path / "raw")
    missing = src / "images" / "002.Bird_2" / "Bird_2_0001_5.jpg"
    missing.unlink()
    with pytest.raises(
        BadInputError, match=f"missing image {missing}.*images.txt|missing image {missing}.*image_class_labels"
    ):
        pack(Recipe(dataset="cub"), str(tmp_path / "a"), str(src), progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()
    # the command line: the same message, exit status 2; --skip-bad packs the rest
    recipe = str(REPO / "shards" / "cub.yaml")
    assert main(["pack", recipe, "--src", str(src), "--dst", str(tmp_path / "b"), "--no-progress"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["pack", recipe, "--src", str(src), "--dst", str(tmp_path / "c"), "--no-progress", "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 8
    assert [s["path"] for s in manifest["splits"]["train"]["skipped"]] == [str(missing)]


def test_corrupt_image_is_reported_or_skipped(tmp_path):
    src = make_folder(tmp_path / "raw")
    bad = src / "bee" / "img_1.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated JPEG
    recipe = Recipe(dataset="folder", shard_bytes=1 << 20, options={"test_fraction": 0, "resize": 0})
    with pytest.raises(BadInputError, match=f"cannot decode image {bad}"):
        pack(recipe, str(tmp_path / "a"), str(src), progress=False)
    pack(recipe, str(tmp_path / "b"), str(src), progress=False, skip_bad=True)
    split = json.loads((tmp_path / "b" / "manifest.json").read_text())["splits"]["train"]
    assert split["num_samples"] == 11 and split["skipped"][0]["path"] == str(bad)
    assert split["skipped"][0]["shard"] == "train/shard-000000.tar"


def test_label_file_that_does_not_match_the_images_is_an_error(tmp_path):
    src = make_cub(tmp_path / "raw")
    labels = src / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-2]) + "\n")
    with pytest.raises(BadInputError, match="image_class_labels.txt does not match .*images.txt: 2 image id"):
        pack(Recipe(dataset="cub"), str(tmp_path / "a"), str(src), progress=False)
    labels.write_text(labels.read_text() + "99 1 extra\n")
    with pytest.raises(BadInputError, match="image_class_labels.txt, line .*: expected 2 fields"):
        pack(Recipe(dataset="cub"), str(tmp_path / "a"), str(src), progress=False)


def test_split_with_zero_classes_is_an_error(tmp_path):
    src = make_cub(tmp_path / "raw", classes=(1, 2))
    with pytest.raises(BadInputError, match="split 'test' has zero classes .*image_class_labels.txt"):
        pack(Recipe(dataset="cub"), str(tmp_path / "a"), str(src), progress=False)
    # every image of a split bad and skipped: still a clear error, no manifest
    src = make_folder(tmp_path / "raw2", classes=("a", "b"), per_class=1)
    for f in src.rglob("*.jpg"):
        f.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="split 'train' has zero classes.*2 bad images were skipped"):
        pack(
            Recipe(dataset="folder", options={"test_fraction": 0}),
            str(tmp_path / "b"),
            str(src),
            progress=False,
            skip_bad=True,
        )
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_unknown_reader_option_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="has no option.*'splitat'.*split_at"):
        pack(Recipe(dataset="cub", options={"splitat": 3}), str(tmp_path), str(tmp_path), progress=False)


# ------------------------------------------------------------------ interrupted packing


class Crash(RuntimeError):
    pass


REAL_PUT_FILE = storage.put_file


def counting_put_file(monkeypatch, crash_after: int | None = None) -> list[str]:
    """Patch storage.put_file to record each published URL (and crash after N)."""
    calls: list[str] = []
    real = REAL_PUT_FILE

    def put_file(src, url):
        if crash_after is not None and len(calls) >= crash_after:
            raise Crash(f"simulated crash before publishing {url}")
        calls.append(url)
        real(src, url)

    monkeypatch.setattr(storage, "put_file", put_file)
    return calls


def interrupted_then_resumed(monkeypatch, src: Path, dst: str, recipe: Recipe) -> tuple[list[str], list[str]]:
    """Crash after 3 shards, re-run; returns (URLs published by run 1, by run 2)."""
    first = counting_put_file(monkeypatch, crash_after=3)
    with pytest.raises(Crash):
        pack(recipe, dst, str(src), progress=False)
    assert not storage.exists(storage.join(dst, "manifest.json")), "a half-written dataset must stay invisible"
    second = counting_put_file(monkeypatch)
    pack(recipe, dst, str(src), progress=False)
    return first, second


def test_interrupted_pack_resumes_without_rewriting_complete_shards(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "raw", classes=tuple(f"c{i:02d}" for i in range(10)), per_class=3)
    recipe = Recipe(dataset="folder", shard_bytes=6 * 1024, options={"test_fraction": 0.3, "resize": 0}, workers=2)
    dst = tmp_path / "packed"
    clean = tmp_path / "clean"
    pack(recipe, str(clean), str(src), progress=False)
    total = sum(len(s["shards"]) for s in json.loads((clean / "manifest.json").read_text())["splits"].values())
    assert total >= 6

    first = counting_put_file(monkeypatch, crash_after=3)
    with pytest.raises(Crash):
        pack(recipe, str(dst), str(src), progress=False)
    assert len(first) == 3 and not (dst / "manifest.json").exists()
    written = {u: os.stat(storage.local_path(u)).st_mtime_ns for u in first}
    second = counting_put_file(monkeypatch)
    pack(recipe, str(dst), str(src), progress=False)
    assert len(second) == total - 3 and not set(second) & set(first)
    assert {u: os.stat(storage.local_path(u)).st_mtime_ns for u in first} == written  # untouched
    a = json.loads((clean / "manifest.json").read_text())["splits"]
    b = json.loads((dst / "manifest.json").read_text())["splits"]
    assert {s: [x["sha256"] for x in a[s]["shards"]] for s in a} == {
        s: [x["sha256"] for x in b[s]["shards"]] for s in b
    }
    # a changed source image changes its shard's fingerprint: only that shard is written again,
    # once --overwrite allows replacing a complete dataset, and after its old manifest is gone
    jpeg(src / "c00" / "img_0.jpg", 999)
    with pytest.raises(FileExistsError, match="already holds a complete dataset.*--overwrite"):
        pack(recipe, str(dst), str(src), progress=False)
    manifest_at_publish = []
    third = counting_put_file(monkeypatch)
    counted = storage.put_file

    def watching_put_file(src_file, url):
        manifest_at_publish.append((dst / "manifest.json").exists())
        counted(src_file, url)

    monkeypatch.setattr(storage, "put_file", watching_put_file)
    pack(recipe, str(dst), str(src), progress=False, overwrite=True)
    assert len(third) == 1 and manifest_at_publish == [False]
    assert (dst / "manifest.json").exists()  # the new one, written last


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(LAYOUTS))
def test_each_layout_packs_into_seaweedfs(reader, tmp_path, s3_env):
    maker, options, expected = LAYOUTS[reader]
    src = maker(tmp_path / "raw")
    url = f"s3://dmlray-test/layouts/{reader}"
    pack(Recipe(dataset=reader, shard_bytes=8 * 1024, options=options, workers=2), url, str(src), progress=False)
    check_manifest(url, expected)
    keys = [
        o["Key"] for o in s3_env.client().list_objects_v2(Bucket="dmlray-test", Prefix=f"layouts/{reader}/")["Contents"]
    ]
    assert f"layouts/{reader}/manifest.json" in keys and not any("_partial" in k for k in keys)


@pytest.mark.slow
def test_interrupted_pack_to_seaweedfs_resumes(tmp_path, monkeypatch, s3_env):
    src = make_folder(tmp_path / "raw", classes=tuple(f"c{i:02d}" for i in range(8)), per_class=3)
    recipe = Recipe(dataset="folder", shard_bytes=6 * 1024, options={"test_fraction": 0, "resize": 0}, workers=2)
    url = "s3://dmlray-test/resume"
    first, second = interrupted_then_resumed(monkeypatch, src, url, recipe)
    manifest = read_manifest(url)
    assert len(first) == 3 and len(second) == len(manifest.shard_urls("train")) - 3
    assert not set(first) & set(second)
    assert manifest.num_samples("train") == 24


@pytest.mark.slow
def test_wrong_credentials_and_missing_bucket_are_clear_errors(tmp_path, monkeypatch, s3_env):
    src = make_cub(tmp_path / "raw", classes=(1, 101), per_class=1)
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        pack(Recipe(dataset="cub"), "s3://no-such-bucket/cub", str(src), progress=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    storage.reset_clients()
    with pytest.raises(storage.StorageError) as info:
        pack(Recipe(dataset="cub"), "s3://dmlray-test/cub", str(src), progress=False)
    assert s3_env.endpoint in str(info.value) and "dmlray-test" in str(info.value)
    assert "access key" in str(info.value) or "credentials" in str(info.value)
