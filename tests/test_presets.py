"""The shipped presets (dmlray/presets/*.yaml): every one resolves, validates, and its loss
builds with its params and trains on random embeddings; every recipe documents what it
should reach, its global batch and how it scales; every recipe's dataset packs from a fake
copy of its raw layout into the splits the recipe reads; and every recipe trains 5 steps on
the CPU on that fake copy.

The fake datasets are tiny copies of each benchmark in its real raw layout (CUB's
``images.txt``, a ``cars_annos.mat`` written with scipy, SOP's ``Ebay_*.txt``, In-Shop's
``list_eval_partition.txt``; small JPEGs made with PIL), packed by the dataset's own reader.
The 5-step runs call ``run_worker(cfg, WorkerContext())`` in-process with the overrides of
``CPU`` plus, per recipe, ``cpu_overrides``: per-rank BN instead of SyncBatchNorm, a small
memory switched on at step 2, the ViT's img_size. All recipes run (not one per backbone and
loss): with one torch thread a run takes 1-10 s, about 1.5 minutes for the file on 2
shared cores, whereas two threads on busy cores made single runs take a minute.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlray import losses, models
from dmlray.config import config_from_dict, config_to_dict, load_config, preset_names, preset_path, term_ids
from dmlray.jobs.worker import WorkerContext, build_loss, run_worker

# search spaces of `dmlray tune` may live beside the presets; they are not run configs
PRESETS = [name for name in preset_names() if not name.endswith("_space")]
RECIPES = [name for name in PRESETS if name != "demo"]

K8S = Path(__file__).resolve().parents[1] / "k8s"
# presets the GPU RayJobs name (tests/test_deploy.py checks their entrypoints)
DEPLOYED = ["ms_bninception_cub", "ms_bninception_sop", "contrastive_xbm_resnet50_sop"]

# what makes a GPU recipe feasible on 2 CPU cores: small images and batches, no GPU, no bf16
CPU = [
    "run.use_gpu=false",
    "run.num_workers=0",
    "train.amp=none",
    "train.channels_last=false",
    "train.steps=5",
    "train.eval_every=5",
    "train.log_every=1",
    "data.image_size=64",
    "data.loader_workers=0",
    "data.classes_per_batch=2",
    "data.samples_per_class=2",
    "data.class_buffer=2",
    "eval.baseline=false",
    "model.pretrained=''",
]


def dataset_of(name: str) -> str:
    """The benchmark a recipe trains on: the last part of its data.url (s3://dmlray/cub)."""
    return load_config(name).data.url.rsplit("/", 1)[1]


def header(name: str) -> str:
    """The leading comment block of a preset, comment marks stripped."""
    lines = []
    for line in preset_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


# ------------------------------------------------------------------ every preset resolves


@pytest.mark.parametrize("name", PRESETS)
def test_preset_resolves_validates_and_its_loss_runs(name):
    cfg = load_config(name)
    assert cfg.model.backbone in models.backbone_names()
    assert cfg.loss.name in losses.names()
    # the resolved config round-trips (every run folder records it as config.yaml)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    if cfg.loss.terms:
        check_terms_run(cfg)
        return
    # the loss builds with the preset's params and trains on a P×K batch of the preset's
    # embedding size, and against a memory when the preset keeps one
    P, K, dim = cfg.data.classes_per_batch, cfg.data.samples_per_class, cfg.model.embedding_dim
    loss_fn = build_loss(cfg.loss, num_classes=P, embedding_dim=dim)
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(P * K, dim, generator=gen), dim=1).requires_grad_()
    labels = torch.arange(P).repeat_interleave(K)
    value = loss_fn(x, labels, x, labels, torch.arange(P * K))
    if cfg.memory.size:
        memory = torch.nn.functional.normalize(torch.randn(4 * P * K, dim, generator=gen), dim=1)
        value = value + cfg.memory.weight * loss_fn(x, labels, memory, torch.arange(P).repeat(4 * K))
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def check_terms_run(cfg) -> None:
    """Each term of a combined loss builds with its params, sized to its head(s), and gives
    a finite loss with gradient on a P×K batch of random embeddings of that head."""
    from dmlray.jobs.worker import build_term_loss

    model = models.EmbeddingModel(
        models.build_backbone("glyph_cnn"),
        0,
        heads=[models.HeadSpec(h.name, h.dim, h.hidden_dim) for h in cfg.model.heads],
    )
    P, K = cfg.data.classes_per_batch, cfg.data.samples_per_class
    gen = torch.Generator().manual_seed(0)
    out = torch.nn.functional.normalize(torch.randn(P * K, model.embedding_dim, generator=gen), dim=1).requires_grad_()
    labels = torch.arange(P).repeat_interleave(K)
    for i, term in enumerate(cfg.loss.terms):
        classes = cfg.pseudo_labels.clusters if term.labels == "pseudo" else P
        loss_fn = build_term_loss(term, classes, model, seed=i)
        x = out[:, model.columns(term.head)]
        if term.other_head:
            value = loss_fn(x, labels, aux_embeddings=out[:, model.columns(term.other_head)])
        else:
            value = loss_fn(x, labels % classes)
        (term.weight * value).backward()
        assert torch.isfinite(value) and value.item() != 0, f"loss.terms[{i}]"
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


def test_the_presets_the_deployments_name_are_shipped():
    named = set()
    for manifest in K8S.rglob("*.yaml"):
        named |= set(re.findall(r"\bdmlray (?:train|tune) ([a-z0-9_]+)", manifest.read_text()))
    assert set(DEPLOYED) <= named, "the GPU overlay no longer runs the seed recipes"
    assert named <= set(PRESETS), sorted(named - set(PRESETS))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_a_documented_gpu_run(name):
    cfg = load_config(name)
    text = header(name)
    for label in ("Paper:", "Target:", "GPUs:", "Scaling:", "Weights:", "Data:"):
        assert label in text, f"{name}: the header comment lacks {label!r}"
    # the global batch the header states is the one the config makes
    stated = re.search(r"global batch (\d+)", text)
    assert stated, f"{name}: the header must state the global batch"
    global_batch = cfg.run.num_workers * cfg.data.classes_per_batch * cfg.data.samples_per_class
    assert int(stated.group(1)) == global_batch
    assert f"{cfg.run.num_workers} workers" in text
    assert cfg.run.use_gpu and cfg.train.amp == "bf16" and cfg.run.num_workers >= 2
    # placeholders the user must fill: nothing downloads weights or data
    assert cfg.model.pretrained == "" and "model.pretrained=" in text
    assert re.fullmatch(r"s3://dmlray/(cub|cars196|sop|inshop)", cfg.data.url), cfg.data.url
    assert cfg.data.channels == 3 and cfg.data.image_size in (224, 227)
    if cfg.model.backbone.startswith("vit"):
        assert cfg.model.backbone_args.get("img_size") == cfg.data.image_size
        assert not cfg.train.channels_last
    else:
        assert cfg.train.channels_last  # convolutions are faster channels-last on GPUs
    dataset = dataset_of(name)
    if dataset == "inshop":
        assert (cfg.data.test_split, cfg.data.gallery_split) == ("query", "gallery")
        assert cfg.eval.ks == [1, 10, 20, 30, 40, 50]
    elif dataset == "sop":
        assert cfg.eval.ks == [1, 10, 100, 1000]
    else:
        assert cfg.eval.ks[:4] == [1, 2, 4, 8]


def test_cbml_type_switches_by_override():
    base = load_config("cbml_log_bninception_cub")
    for kind in ("sqrt", "const"):
        switched = load_config("cbml_log_bninception_cub", [f"loss.params.type={kind}"])
        assert switched.loss.params["type"] == kind
        assert load_config(f"cbml_{kind}_bninception_cub").loss == switched.loss
        assert build_loss(switched.loss, 100, 512).type == kind
    assert base.loss.params["type"] == "log"


# ------------------------------------------------------------------ fake raw datasets

TRAIN_CLASSES, TEST_CLASSES, PER_CLASS = 4, 3, 8


def _jpeg(path, label: int, index: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label * 1000 + index)
    base = np.array([(label * 53) % 256, (label * 97) % 256, (label * 29) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, size=(56 + index % 3 * 8, 72, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def fake_cub(root) -> None:
    """images.txt, image_class_labels.txt, images/<class>/<file>.jpg; classes 1-100 train."""
    images, labels = [], []
    for label in list(range(1, TRAIN_CLASSES + 1)) + list(range(101, 101 + TEST_CLASSES)):
        folder = f"{label:03d}.Bird_{label}"
        for i in range(PER_CLASS):
            image_id = len(images) + 1
            rel = f"{folder}/Bird_{label}_{i:04d}.jpg"
            _jpeg(root / "images" / rel, label, i)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")


def fake_cars196(root) -> None:
    """cars_annos.mat (struct array ``annotations``) and car_ims/; classes 1-98 train."""
    import scipy.io

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    for label in list(range(1, TRAIN_CLASSES + 1)) + list(range(99, 99 + TEST_CLASSES)):
        for i in range(PER_CLASS):
            rel = f"car_ims/{len(records) + 1:06d}.jpg"
            _jpeg(root / rel, label, i)
            records.append((rel, 1, 1, 70, 50, label, i % 2))
    annotations = np.array(records, dtype=[(f, object) for f in fields])
    class_names = np.array([f"Car {c}" for c in range(1, 102)], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})


def fake_sop(root) -> None:
    """Ebay_train.txt, Ebay_test.txt (image_id class_id super_class_id path)."""
    image_id = 0
    for split, classes in (("train", range(1, TRAIN_CLASSES + 1)), ("test", range(11319, 11319 + TEST_CLASSES))):
        rows = ["image_id class_id super_class_id path"]
        for label in classes:
            for i in range(PER_CLASS):
                image_id += 1
                rel = f"bicycle_final/{label}_{i}.JPG"
                _jpeg(root / rel, label, i)
                rows.append(f"{image_id} {label} 1 {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")


def fake_inshop(root) -> None:
    """list_eval_partition.txt (count, header, image item status) and img/; test items
    appear in both query and gallery."""
    rows = []
    for item in range(1, TRAIN_CLASSES + TEST_CLASSES + 1):
        item_id = f"id_{item:08d}"
        for i in range(PER_CLASS):
            rel = f"img/WOMEN/Dresses/{item_id}/{i:02d}_1_front.jpg"
            _jpeg(root / rel, item, i)
            status = "train" if item <= TRAIN_CLASSES else ("query" if i < 3 else "gallery")
            rows.append(f"{rel} {item_id} {status}")
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (root / "list_eval_partition.txt").write_text(text)


FAKES = {"cub": fake_cub, "cars196": fake_cars196, "sop": fake_sop, "inshop": fake_inshop}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """{dataset: packed shard root}, each made from its fake raw layout by its own reader."""
    from dmlray.data.pack import Recipe, pack, reader_names

    missing = sorted(set(FAKES) - set(reader_names()))
    assert not missing, f"dataset readers {missing} are not registered (dmlray/data/datasets.py)"
    out = {}
    for dataset, make in FAKES.items():
        src = tmp_path_factory.mktemp(f"{dataset}-raw")
        make(src)
        dst = tmp_path_factory.mktemp(f"{dataset}-shards")
        pack(Recipe(dataset=dataset, shard_bytes=16 * 1024, workers=1), str(dst), src=str(src), progress=False)
        out[dataset] = str(dst)
    return out


@pytest.mark.parametrize("dataset", sorted(FAKES))
def test_recipe_datasets_pack_into_the_splits_the_recipes_read(dataset, packed):
    from dmlray.data.shards import read_manifest

    manifest = read_manifest(packed[dataset])
    users = [n for n in RECIPES if dataset_of(n) == dataset]
    assert users, f"no recipe trains on {dataset}"
    for name in users:
        data = load_config(name).data
        train = set(manifest.classes(data.train_split))
        assert len(train) == TRAIN_CLASSES
        for split in filter(None, (data.test_split, data.gallery_split)):
            test = set(manifest.classes(split))
            assert len(test) == TEST_CLASSES and not test & train, f"{name}: {split} is not zero-shot"
        if data.gallery_split:
            assert set(manifest.classes(data.test_split)) == set(manifest.classes(data.gallery_split))


def cpu_overrides(name: str, url: str) -> list[str]:
    cfg = load_config(name)
    out = CPU + [f"data.url={url}"]
    if cfg.model.batchnorm == "sync":
        out.append("model.batchnorm=train")  # SyncBatchNorm runs on GPUs only
    if cfg.memory.size:
        # a memory of a few global batches that switches on within the 5 steps
        out += ["memory.size=16", "memory.start=2"] + (["memory.ramp_steps=2"] if cfg.memory.ramp_steps else [])
    if "img_size" in cfg.model.backbone_args:
        out.append("model.backbone_args.img_size=64")
    if cfg.optim.warmup_steps:
        out.append("optim.warmup_steps=2")  # the warm-up, then its schedule, within the 5 steps
    if any(t.labels == "pseudo" for t in cfg.loss.terms):
        # as many clusters as the fake training split holds classes, re-clustered within the 5 steps
        out += [f"pseudo_labels.clusters={TRAIN_CLASSES}", "pseudo_labels.every=2"]
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_five_steps_on_cpu(name, packed, one_thread):
    cfg = load_config(name, cpu_overrides(name, packed[dataset_of(name)]))
    history = []
    final = run_worker(cfg, WorkerContext(report=lambda record, hist, state: history.append(record)))
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in history), [r["loss"] for r in history]
    assert final["step"] == 5 and 0.0 <= final["recall@1"] <= 1.0
    if cfg.memory.size:
        assert history[-1]["memory_loss"] is not None and history[-1]["memory_fill"] > 0
    for key in term_ids(cfg.loss):
        assert all(math.isfinite(r[f"loss/{key}"]) for r in history), key
