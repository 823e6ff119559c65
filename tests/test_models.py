"""Backbones, pretrained loading, frozen BatchNorm, pooling, input conventions, head groups.

Everything runs on the CPU with random weights (nothing is downloaded); inputs are as
small as each architecture allows, so the file stays well under a minute.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from dmlray.models import (
    EmbeddingModel,
    GlobalPool,
    StateDictMismatchError,
    backbone_names,
    build_backbone,
    freeze_batchnorm,
    input_convention,
    load_pretrained,
    load_state_dict_from_url,
)
from dmlray.models.bn_inception import BNInception, bgr255_from_rgb, squeeze_caffe_shapes
from dmlray.models.frozen_bn import is_frozen_batchnorm
from dmlray.models.inputs import IMAGENET_MEAN, IMAGENET_STD

# name → (smallest convenient input side, out_dim, extra builder kwargs)
BACKBONES = {
    "resnet18": (32, 512, {}),
    "resnet34": (32, 512, {}),
    "resnet50": (32, 2048, {}),
    "resnet101": (32, 2048, {}),
    "resnet152": (32, 2048, {}),
    "googlenet": (32, 1024, {}),
    "bn_inception": (64, 1024, {}),
    # img_size shrinks the position embedding to 2×2 patches; the architecture is unchanged
    "vit_small_patch16_224": (32, 384, {"img_size": 32}),
    "vit_base_patch16_224": (32, 768, {"img_size": 32}),
}
CNNS = [n for n in BACKBONES if not n.startswith("vit")]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # one intra-op thread: these tiny inputs gain nothing from more, and on a shared CI
    # machine extra threads only fight the other jobs for cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _images(name: str, batch: int = 2) -> torch.Tensor:
    side = BACKBONES[name][0]
    return torch.randn(batch, 3, side, side)


def test_every_backbone_is_registered():
    assert set(BACKBONES) <= set(backbone_names())


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_backward_and_state_dict_round_trip(name, tmp_path):
    _side, out_dim, kwargs = BACKBONES[name]
    model = build_backbone(name, **kwargs)
    assert model.out_dim == out_dim
    x = _images(name)
    features = model(x)
    assert features.shape == (2, out_dim) and torch.isfinite(features).all()
    features.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    # save → load through the URL loader → identical features (eval mode: BN uses running stats)
    path = tmp_path / "backbone.pt"
    torch.save(model.state_dict(), path)
    restored = build_backbone(name, pretrained=str(path), **kwargs)
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


def test_file_url_and_checkpoint_wrappers(tmp_path):
    model = build_backbone("resnet18")
    state = model.state_dict()
    wrapped = {"epoch": 3, "model": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}
    path = tmp_path / "dir with space" / "ckpt.pth"
    path.parent.mkdir()
    torch.save(wrapped, path)
    loaded = load_state_dict_from_url(path.as_uri())  # file:///.../dir%20with%20space/ckpt.pth
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    from safetensors.torch import save_file  # timm / Hugging Face weights often come this way

    st_path = tmp_path / "model.safetensors"
    save_file(state, str(st_path))
    assert all(torch.equal(v, state[k]) for k, v in load_state_dict_from_url(str(st_path)).items())


def test_full_torchvision_checkpoint_loads_without_its_classifier(tmp_path):
    # torchvision's own layouts, classifier and GoogLeNet's auxiliary heads included
    for name, full, key in [
        ("resnet18", torchvision.models.resnet18(weights=None), "layer4.1.conv2.weight"),
        (
            "googlenet",
            torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False),
            "conv1.conv.weight",
        ),
    ]:
        path = tmp_path / f"{name}.pth"
        torch.save(full.state_dict(), path)
        backbone = build_backbone(name, pretrained=str(path))
        torch.testing.assert_close(backbone.state_dict()[key], full.state_dict()[key])


def test_full_timm_checkpoint_loads_without_its_head(tmp_path):
    import timm

    full = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32)
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("vit_small_patch16_224", pretrained=str(path), img_size=32)
    torch.testing.assert_close(backbone.pos_embed, full.pos_embed)
    # a checkpoint at another resolution gets its position embedding resampled by timm's filter
    at_48 = build_backbone("vit_small_patch16_224", pretrained=str(path), img_size=48)
    assert at_48.pos_embed.shape == (1, 1 + 9, 384)


def test_mismatched_state_dict_lists_missing_unexpected_and_shape_errors(tmp_path):
    state = build_backbone("resnet18").state_dict()
    del state["layer1.0.conv1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    state["layer4.1.bn2.bias"] = torch.zeros(7)
    state["fc.weight"] = torch.zeros(1000, 512)  # the dropped classifier: ignored, not reported
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError) as info:
        build_backbone("resnet18", pretrained=str(path))
    err = info.value
    assert err.missing == ["layer1.0.conv1.weight"]
    assert err.unexpected == ["layer9.weight"]
    assert err.mismatched == ["layer4.1.bn2.bias: checkpoint (7,) vs model (512,)"]
    message = str(err)
    for text in ("missing (1)", "layer1.0.conv1.weight", "unexpected (1)", "layer9.weight", "shape mismatch", "fc."):
        assert text in message
    assert "fc.weight" not in message.split("ignored")[0]


def test_unknown_url_scheme_and_empty_checkpoint_are_refused(tmp_path):
    with pytest.raises(ValueError, match="s3://"):
        load_state_dict_from_url("https://example.com/w.pth")
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(ValueError, match="no tensors"):
        load_state_dict_from_url(str(path))


def test_s3_urls_read_through_the_storage_client(monkeypatch):
    # the real SeaweedFS round trip belongs to the storage tests; here the project's S3
    # client is replaced by a fake that serves a saved checkpoint and records the request
    import io
    import types

    from dmlray.data import storage

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, buffer)
    requests = []

    def get_object(Bucket, Key):
        requests.append((Bucket, Key))
        return {"Body": io.BytesIO(buffer.getvalue())}

    monkeypatch.setattr(storage, "s3_client", lambda: types.SimpleNamespace(get_object=get_object))
    state = load_state_dict_from_url("s3://weights/imagenet/w.pth")
    assert torch.equal(state["w"], torch.arange(3.0))
    assert requests == [("weights", "imagenet/w.pth")]


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "bn_inception"])
def test_frozen_bn_stays_frozen_through_train(name):
    backbone = build_backbone(name, frozen_bn=True)
    model = EmbeddingModel(backbone, embedding_dim=8)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(is_frozen_batchnorm(m) for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    out = model(_images(name))
    out.sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    # the state dict keeps BatchNorm's keys, so frozen and unfrozen checkpoints interchange
    assert model.state_dict().keys() == EmbeddingModel(build_backbone(name), 8).state_dict().keys()
    groups = model.param_groups(backbone_lr=1e-5, head_lr=1e-3)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in grouped for m in bns for p in m.parameters())


def test_freeze_batchnorm_on_a_plain_module_and_refuses_syncbn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    weight = net[1].weight
    assert freeze_batchnorm(net) is net
    net.train()
    assert net[1].weight is weight  # same tensor: an optimizer built before still sees it
    assert not net[1].training and not net[2][0].training and net[0].training
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        freeze_batchnorm(nn.Sequential(nn.SyncBatchNorm(4)))


def test_vit_refuses_frozen_bn_and_unknown_pooling():
    with pytest.raises(ValueError, match="no BatchNorm"):
        build_backbone("vit_small_patch16_224", frozen_bn=True, img_size=32)
    with pytest.raises(ValueError, match="pooling"):
        build_backbone("vit_small_patch16_224", pooling="gem", img_size=32)


def test_global_pool_modes_on_a_hand_tensor():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, -1.0], [-1.0, -5.0]]]])  # (1, 2, 2, 2)
    assert GlobalPool("avg")(x).tolist() == [[3.0, -2.0]]
    assert GlobalPool("max")(x).tolist() == [[6.0, -1.0]]
    assert GlobalPool("avgmax")(x).tolist() == [[9.0, -3.0]]
    with pytest.raises(ValueError, match="avgmax"):
        GlobalPool("gem")


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "bn_inception", "vit_small_patch16_224"])
def test_avgmax_pooling_keeps_out_dim(name):
    _side, out_dim, kwargs = BACKBONES[name]
    model = build_backbone(name, pooling="avgmax", **kwargs).eval()
    with torch.no_grad():
        assert model(_images(name, batch=3)).shape == (3, out_dim)


def test_bn_inception_input_convention_on_a_hand_pixel():
    model = build_backbone("bn_inception")
    assert model.input_convention == "bgr255"
    conv = input_convention(model.input_convention)
    assert (conv.order, conv.scale, conv.mean, conv.std) == ("BGR", 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0))

    rgb = torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)  # R, G, B in [0, 1]
    # B = 255·1.0 − 104, G = 255·0.25 − 117, R = 255·0.5 − 128
    expected = torch.tensor([151.0, -53.25, -0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(bgr255_from_rgb(rgb), expected)
    # the same pixel after torchvision's ImageNet Normalize gives the same network input
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(bgr255_from_rgb((rgb - mean) / std, IMAGENET_MEAN, IMAGENET_STD), expected)


def test_bn_inception_rgb_input_option_converts_inside():
    plain = BNInception().eval()
    rgb_in = BNInception(rgb_input=True).eval()
    rgb_in.load_state_dict(plain.state_dict())
    assert rgb_in.input_convention == "rgb_imagenet"
    rgb = torch.rand(1, 3, 64, 64)
    normalised = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = plain(bgr255_from_rgb(rgb))
        # activations reach the hundreds (pixels in [0, 255], untrained BN): compare relative to scale
        torch.testing.assert_close(rgb_in(normalised), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_bn_inception_matches_the_converted_caffe_layout():
    state = BNInception().state_dict()
    for key in (
        "conv1_7x7_s2.bias",
        "conv2_3x3_bn.running_var",
        "inception_3c_double_3x3_2.weight",
        "inception_4e_3x3_bn.weight",
        "inception_5b_pool_proj_bn.running_mean",
    ):
        assert key in state
    assert not any(
        k.startswith(("inception_3c_1x1", "inception_3c_pool_proj", "inception_4e_pool_proj")) for k in state
    )
    assert state["inception_5a_1x1.weight"].shape == (352, 1056, 1, 1)
    n_params = sum(p.numel() for p in BNInception().parameters())
    assert n_params + 1024 * 1000 + 1000 == 11_295_240  # with the 1000-way classifier
    # the converted checkpoint stores BN tensors as (1, C) and carries last_linear.*
    caffe = {
        k: v.unsqueeze(0) if "_bn." in k and v.ndim == 1 else v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    caffe["last_linear.weight"], caffe["last_linear.bias"] = torch.zeros(1000, 1024), torch.zeros(1000)
    assert squeeze_caffe_shapes(caffe)["conv1_7x7_s2_bn.weight"].shape == (64,)
    model = BNInception()
    load_pretrained(model, caffe, ignore_prefixes=("last_linear.",), convert=squeeze_caffe_shapes)
    torch.testing.assert_close(model.inception_4d_3x3_bn.running_var, state["inception_4d_3x3_bn.running_var"])


def test_param_groups_give_the_head_its_own_learning_rate():
    model = EmbeddingModel(build_backbone("glyph_cnn"), embedding_dim=16, hidden_dim=32)
    groups = model.param_groups(backbone_lr=1e-4, head_lr=1e-2)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 1e-4), ("head", 1e-2)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.Adam(groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-2]
    assert [g["lr"] for g in model.param_groups(3e-5)] == [3e-5, 3e-5]


def test_models_package_imports_without_timm_or_boto3():
    code = (
        "import sys; sys.modules['timm'] = None; sys.modules['boto3'] = None\n"
        "import dmlray.models as m\n"
        "assert 'vit_small_patch16_224' in m.backbone_names()\n"
        "m.build_backbone('resnet18')\n"
        "try:\n    m.build_backbone('vit_small_patch16_224')\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('timm should have been needed')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_pretrained_from_a_real_s3_server(tmp_path, monkeypatch):
    """A backbone's weights uploaded to SeaweedFS load through build_backbone(pretrained=s3://...)."""
    import io

    from dmlray.data import storage
    from dmlray.devtools.seaweed import SeaweedS3

    model = build_backbone("googlenet").eval()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    with SeaweedS3(tmp_path / "s3", buckets=["weights"]) as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        storage.reset_clients()
        storage.write_bytes("s3://weights/googlenet/ckpt.pth", buffer.getvalue())
        restored = build_backbone("googlenet", pretrained="s3://weights/googlenet/ckpt.pth").eval()
    storage.reset_clients()
    x = _images("googlenet")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
