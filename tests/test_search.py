"""The search a replica runs, without Ray: request checks and an engine over a real model."""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import pytest
import torch

from dmlray.evaluation.index import build_index
from dmlray.serving.search import BadRequest, SearchEngine, check_image, images_of_request, parse_k


def png(size=(8, 8), mode="L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def refused(fn, *args) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        fn(*args)
    return info.value


def test_images_arrive_raw_or_as_a_json_batch():
    one = png()
    assert images_of_request(one, "image/png") == [one]
    assert images_of_request(one, "application/octet-stream; charset=binary") == [one]
    body = json.dumps({"images": [base64.b64encode(one).decode()] * 3}).encode()
    assert images_of_request(body, "application/json") == [one] * 3


def test_each_bad_request_has_its_status_and_names_the_problem():
    from PIL import Image

    tiff = io.BytesIO()
    Image.new("L", (4, 4)).save(tiff, format="TIFF")
    truncated = png((64, 64))[:60]
    cases = [
        ((b"plain text", "image/png"), 400, "image is not an image"),
        ((b"", "image/jpeg"), 400, "image is empty"),
        ((tiff.getvalue(), "image/tiff"), 415, "TIFF image; accepted formats"),
        ((png((5000, 4000)), "image/png"), 413, "5000x4000 pixels"),
        ((png(), "text/html"), 415, "Content-Type 'text/html'"),
        ((b"[1, 2]", "application/json"), 400, '{"images"'),
        ((json.dumps({"images": ["x"] * 65}).encode(), "application/json"), 413, "65 images"),
        ((json.dumps({"images": [base64.b64encode(b"no").decode()]}).encode(), "application/json"), 400, "images[0]"),
    ]
    for (body, content_type), status, message in cases:
        err = refused(images_of_request, body, content_type)
        assert err.status == status and message in err.message, (content_type, err.status, err.message)
    err = refused(check_image, truncated)
    assert err.status == 400 and ("damaged PNG" in err.message or "not an image" in err.message)
    assert refused(check_image, b"\x89PNG" + bytes(9 * 1024 * 1024)).status == 413


def test_k_is_checked():
    assert parse_k(None, 5) == 5 and parse_k("7", 5) == 7
    assert refused(parse_k, "0", 5).status == 400 and "between 1 and 100" in refused(parse_k, "101", 5).message
    assert "integer" in refused(parse_k, "ten", 5).message


def test_engine_ranks_a_gallery_image_first_and_matches_the_index():
    from dmlray.data.transforms import ImageTransform
    from dmlray.models import EmbeddingModel, build_backbone

    torch.manual_seed(0)
    model = EmbeddingModel(build_backbone("glyph_cnn", in_channels=1), 16, 0).eval()
    tf = ImageTransform(32, 1, train=False)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(12):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    with torch.no_grad():
        emb = model(torch.stack([tf(b) for b in images])).numpy()
    keys = [f"g{i}" for i in range(12)]
    index = build_index(emb, np.arange(12) % 3, keys, "exact")
    engine = SearchEngine(model, lambda b: tf(b), index, torch.device("cpu"), dict(zip(keys, images, strict=True)))
    got = engine.embed([engine.to_tensor(images[5]), engine.to_tensor(images[2])])
    np.testing.assert_allclose(got, emb[[5, 2]], atol=1e-5)
    hits = engine.search(got, 4)
    assert [h.key for h in hits[0]][0] == "g5" and [h.key for h in hits[1]][0] == "g2"
    assert hits[0][0].label == 2 and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    scores, idx = index.search(got, 4)
    assert [h.key for h in hits[0]] == [keys[j] for j in idx[0]]
    assert refused(engine.random_query, random.Random(0)).status == 404  # no test images held
    # with α-query expansion the ranking is rerank("aqe")'s over the same gallery
    from dmlray.evaluation.rerank import rerank

    expanded = engine.search(got, 12, rerank="aqe")
    order = rerank("aqe", torch.from_numpy(got), torch.from_numpy(emb))
    assert [[h.key for h in row] for row in expanded] == [[keys[j] for j in row] for row in order.tolist()]
    assert refused(engine.search, got, 3, "dba").status == 400
    # k-reciprocal: each query re-ranked on its own, as the dense re-ranking of that query alone
    from dmlray.evaluation.rerank import k_reciprocal_distances

    reranked = engine.search(got, 12, rerank="kreciprocal")
    for row, query in zip(reranked, torch.from_numpy(got), strict=True):
        distance = k_reciprocal_distances(query[None], torch.from_numpy(emb))[0]
        order = torch.sort(distance, stable=True).indices.tolist()
        assert [h.key for h in row] == [keys[j] for j in order]
        assert [h.score for h in row] == pytest.approx((1 - distance[order]).tolist(), abs=1e-9)


def test_k_reciprocal_refuses_a_gallery_over_its_cap_naming_both_and_the_way_out(monkeypatch):
    from dmlray.serving import search

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"g{i}" for i in range(12)]
    index = build_index(emb, np.arange(12) % 3, keys, "exact")
    engine = SearchEngine(torch.nn.Linear(8, 8), torch.as_tensor, index, torch.device("cpu"), {})
    monkeypatch.setattr(search, "MAX_KRECIPROCAL_GALLERY", 11)
    err = refused(engine.search, emb[:1], 3, "kreciprocal")
    assert err.status == 400 and "at most 11 items" in err.message and "holds 12" in err.message
    assert "rerank=aqe" in err.message
    assert engine.search(emb[:1], 3, "aqe")[0][0].key == "g0"  # αQE has no cap


def test_the_deployment_carries_urls_only_and_no_runtime_env(monkeypatch):
    pytest.importorskip("ray.serve", reason="needs ray[serve]")
    from dmlray.serving.app import app_builder, build_app

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-this")
    for app in (
        build_app("s3://b/runs/r", "s3://b/runs/r/index-test-exact", replicas="auto"),
        app_builder({"run": "s3://b/runs/r", "index": "s3://b/runs/r/index-test-exact"}),
    ):
        deployment = app._bound_deployment
        assert deployment.init_args[:2] == ("s3://b/runs/r", "s3://b/runs/r/index-test-exact")
        assert "runtime_env" not in (deployment.ray_actor_options or {})
        assert "do-not-leak-this" not in repr(
            (deployment.init_args, deployment.init_kwargs, deployment.ray_actor_options)
        )
    with pytest.raises(ValueError, match="args.index"):
        app_builder({"run": "s3://b/runs/r"})
