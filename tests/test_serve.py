"""After training, retrieval: one tiny glyphs run on SeaweedFS, indexed into its run folder
on S3 (exact and approximate), then served by a real Ray Serve application."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from recipes import TINY_RUN

from dmlray.cli import main
from dmlray.data import storage

pytestmark = pytest.mark.slow

RUNS = "s3://dmlray-test/serve-runs"


@pytest.fixture(scope="module")
def s3_module(seaweed):
    """The SeaweedFS credentials in this process's environment for the whole module (the
    local Ray cluster started below inherits them; no runtime_env carries them)."""
    with seaweed.activated():
        yield seaweed


@pytest.fixture(scope="module")
def tiny_run(s3_module, glyphs_s3):
    """A glyphs run trained for a few seconds in local mode, its folder on S3."""
    from dmlray.devtools.ports import free_ports

    rc = main(
        [
            "train",
            "demo",
            f"data.url={glyphs_s3}",
            f"run.storage_path={RUNS}",
            "run.name=tiny",
            f"run.metrics_port={free_ports(1)[0]}",
            "train.eval_every=30",
            "train.log_every=10",
            *TINY_RUN,
        ]
    )
    assert rc == 0
    return f"{RUNS}/tiny"


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    """``dmlray eval --export`` of the run: the numbers and embeddings the index must match."""
    assert main(["eval", tiny_run, "--export"]) == 0
    result = json.loads(storage.read_bytes(f"{tiny_run}/eval.json"))
    with np.load(io.BytesIO(storage.read_bytes(f"{tiny_run}/embeddings-test.npz")), allow_pickle=False) as data:
        exported = {k: data[k] for k in data.files}
    return result, exported


def test_exact_index_on_s3_answers_what_the_evaluation_scored(tiny_run, evaluated, capsys):
    from dmlray.evaluation.index import load_index, neighbours_of_members
    from dmlray.evaluation.knn import knn
    from dmlray.evaluation.metrics import recall_at_k

    result, exported = evaluated
    assert main(["index", tiny_run, "--kind", "exact", "--no-progress"]) == 0
    assert f"wrote {tiny_run}/index-test-exact" in capsys.readouterr().out
    index = load_index(f"{tiny_run}/index-test-exact")
    assert index.meta["checkpoint"] == result["checkpoint"] and index.meta["split"] == "test"
    assert index.keys == exported["keys"].tolist()
    np.testing.assert_allclose(index.embeddings, exported["embeddings"], atol=1e-5)
    ids = np.arange(len(index))
    idx, _, _ = neighbours_of_members(index, ids, 8)
    _, ref = knn(index.embeddings, 8)  # the evaluation's leave-one-out search
    np.testing.assert_array_equal(idx, ref.numpy())
    labels = index.labels
    hits = {k: float(np.mean([(labels[idx[i, :k]] == labels[i]).any() for i in ids])) for k in (1, 2, 4, 8)}
    assert hits == pytest.approx(recall_at_k(index.embeddings, labels, ks=(1, 2, 4, 8)))
    assert hits[1] == pytest.approx(result["metrics"]["recall@1"], abs=1.5 / len(index))


def test_approximate_index_on_s3_reaches_its_reported_recall(tiny_run, capsys):
    from dmlray.evaluation.index import load_index, measure

    assert main(["index", tiny_run, "--kind", "hnsw", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "hnsw" in out and "recall@10 vs exact" in out
    index = load_index(f"{tiny_run}/index-test-hnsw")
    reported = index.meta["measured"]
    again = measure(index, k=10)
    assert again["recall@10_vs_exact"] >= reported["recall@10_vs_exact"] - 1e-9
    assert reported["recall@10_vs_exact"] > 0.9, reported
    listing = storage.list_dir(f"{tiny_run}/index-test-hnsw")
    assert listing == ["faiss.index", "gallery.npz", "index.json"]


def test_eval_with_reranking_reports_both_tables(tiny_run, evaluated, capsys):
    import torch

    from dmlray.evaluation.rerank import ranking_metrics, rerank

    plain, exported = evaluated
    assert main(["eval", tiny_run, "--rerank", "kreciprocal"]) == 0
    out = capsys.readouterr().out
    assert "re-ranked (kreciprocal)" in out and "dmlray + kreciprocal" in out
    result = json.loads(storage.read_bytes(f"{tiny_run}/eval.json"))
    assert result["metrics"] == pytest.approx(plain["metrics"])  # the plain scores are unchanged
    emb, labels = torch.from_numpy(exported["embeddings"]), torch.from_numpy(exported["labels"])
    expected = ranking_metrics(rerank("kreciprocal", emb), labels)
    assert result["reranked"]["method"] == "kreciprocal"
    assert result["reranked"]["metrics"] == pytest.approx(expected, abs=2 / len(labels))


def test_an_index_embedded_by_ray_workers_equals_the_one_embedded_here(tiny_run):
    """``dmlray index --workers 2``: two Ray actors (a local Ray with this process's S3
    credentials) share the shards; the index holds the one-process index's rows, in order."""
    import ray

    from dmlray.data.shards import read_manifest
    from dmlray.evaluation.index import load_index

    assert len(read_manifest(result_data(tiny_run)).shard_urls("test")) >= 2  # both actors get shards
    here = f"{tiny_run}/index-test-exact"
    if not storage.exists(f"{here}/index.json"):
        assert main(["index", tiny_run, "--kind", "exact", "--no-progress"]) == 0
    started = not ray.is_initialized()
    try:
        out = f"{tiny_run}/index-by-ray"
        assert main(["index", tiny_run, "--workers", "2", "--out", out, "--no-progress"]) == 0
    finally:
        if started:
            ray.shutdown()  # the service below starts its own
    local, distributed = load_index(here), load_index(out)
    assert distributed.keys == local.keys
    np.testing.assert_array_equal(distributed.labels, local.labels)
    np.testing.assert_allclose(distributed.embeddings, local.embeddings, atol=1e-6)
    assert distributed.meta["checkpoint"] == local.meta["checkpoint"]


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def service(tiny_run, evaluated):
    """The search application of the tiny run over its exact index, on a local Ray cluster
    (started here, with this process's environment: the S3 credentials reach the replica
    that way, never through a runtime_env or the deployment's arguments)."""
    import ray
    from ray import serve

    from dmlray.devtools.ports import free_ports
    from dmlray.jobs.launch import ensure_ray
    from dmlray.serving.app import build_app

    index = f"{tiny_run}/index-test-exact"
    if not storage.exists(f"{index}/index.json"):
        assert main(["index", tiny_run, "--kind", "exact", "--no-progress"]) == 0
    started = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(tiny_run, index), name="dmlray-search", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def post(url: str, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_concurrent_searches_are_all_answered_batched_and_agree_with_eval(service, tiny_run, evaluated):
    import base64
    import time
    from concurrent.futures import ThreadPoolExecutor

    from dmlray.data.shards import read_manifest
    from dmlray.data.stream import iter_shard

    result, exported = evaluated
    samples = [s for url in read_manifest(result_data(tiny_run)).shard_urls("test") for s in iter_shard(url)]
    assert len(samples) == len(exported["keys"])
    # every test image once: 8-image JSON batches and single raw images, 8 clients at a time
    groups = [samples[i : i + 8] for i in range(0, len(samples) - 32, 8)] + [[s] for s in samples[-32:]]

    def ask(group):
        if len(group) == 1:
            return group, post(f"{service}/search?k=3", group[0][2], "image/png")
        body = json.dumps({"images": [base64.b64encode(s[2]).decode() for s in group]}).encode()
        return group, post(f"{service}/search?k=3", body, "application/json")

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, groups))
    assert time.monotonic() - t0 < 120
    top1_same, batches = [], []
    for group, (status, body) in answers:
        assert status == 200, body
        batches.append(body["batch"])
        assert len(body["results"]) == len(group)
        for (key, label, _), hits in zip(group, body["results"], strict=True):
            # the query itself is among its top 3 (first, unless an identical glyph ties with
            # it); without it, the ranking is the evaluation's leave-one-out one
            assert key in [h["key"] for h in hits] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
            others = [h for h in hits if h["key"] != key]
            top1_same.append(others[0]["label"] == label)
    assert len(top1_same) == len(samples)
    accuracy = sum(top1_same) / len(top1_same)
    assert accuracy > 0.5 and accuracy == pytest.approx(result["metrics"]["recall@1"], abs=2 / len(samples))
    assert max(batches) > 1, "concurrent requests are embedded together"


def result_data(run: str) -> str:
    import yaml

    return yaml.safe_load(storage.read_bytes(f"{run}/config.yaml"))["data"]["url"]


def tiny_png(size: tuple[int, int] = (8, 8)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="TIFF")
    return buffer.getvalue()


BAD_INPUTS = {
    "not an image": (b"hello, not an image", "image/png", "", 400, "is not an image"),
    "empty": (b"", "image/png", "", 400, "is empty"),
    "too many bytes": (b"\x89PNG" + b"\0" * (8 * 1024 * 1024), "image/png", "", 413, "byte limit"),
    "too many pixels": (tiny_png((5000, 5000)), "image/png", "", 413, "pixel limit"),
    "wrong format": (tiff(), "image/tiff", "", 415, "TIFF"),
    "wrong content type": (tiny_png(), "text/plain", "", 415, "Content-Type 'text/plain'"),
    "bad json": (b"{not json", "application/json", "", 400, "not valid JSON"),
    "json without images": (b'{"x": 1}', "application/json", "", 400, '{"images"'),
    "bad base64": (b'{"images": ["***"]}', "application/json", "", 400, "images[0] is not valid base64"),
    "bad k": (tiny_png(), "image/png", "?k=0", 400, "k must be between"),
    "k not a number": (tiny_png(), "image/png", "?k=many", 400, "k must be an integer"),
    "unknown re-ranking": (tiny_png(), "image/png", "?rerank=dba", 400, "rerank must be one of aqe, kreciprocal"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_with_a_message_and_the_replica_lives_on(service, case):
    body, content_type, query, status, message = BAD_INPUTS[case]
    got, answer = post(f"{service}/search{query}", body, content_type)
    assert got == status and message in answer["error"], (case, got, answer)
    ok, answer = post(f"{service}/search?k=2", tiny_png(), "image/png")
    assert ok == 200 and len(answer["results"][0]) == 2


@pytest.mark.parametrize("method", ["aqe", "kreciprocal"])
def test_search_with_re_ranking_answers_k_items_best_first(service, method):
    ok, answer = post(f"{service}/search?k=4&rerank={method}", tiny_png(), "image/png")
    assert ok == 200 and len(answer["results"][0]) == 4
    scores = [h["score"] for h in answer["results"][0]]
    assert scores == sorted(scores, reverse=True)


def test_the_page_finds_results_in_headless_chromium(service, tmp_path):
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("headless browser test needs chromium and chromedriver on PATH (apt-get install chromium-driver)")
    selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (pip install selenium)")
    del selenium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(service + "/")
        assert driver.title == "dmlray search"
        query = tmp_path / "query.png"
        key = json.loads(urllib_get(service + "/random"))["key"]
        query.write_bytes(urllib_get(f"{service}/image/{key}"))
        driver.find_element(By.ID, "file").send_keys(str(query))
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 8)
        wait.until(lambda d: all(i.get_property("naturalWidth") > 0 for i in d.find_elements(By.CSS_SELECTOR, "img")))
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .result .label")]
        assert all(text.startswith("class ") for text in labels)
        assert key in [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .result .key")]  # itself
        driver.find_element(By.ID, "random").click()
        wait.until(lambda d: "query, class" in d.find_element(By.CSS_SELECTOR, "#query .label").text)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "8 results")
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 1000
    finally:
        driver.quit()


def urllib_get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()
