"""The Ray Serve search application: ``POST /search``, the search page and its images.

A replica loads the run's model (its latest checkpoint) and the gallery index from their
URLs; credentials come from the replica's environment (the local cluster's, a Kubernetes
Secret, an instance role), never from the deployment's arguments. Concurrent requests are
embedded together (``@serve.batch``), on the replica's GPU when it has one.

Routes
    GET  /                 the search page
    POST /search?k=5       image bytes, or JSON {"images": [base64, ...]}; &rerank=aqe: α-query expansion,
                           &rerank=kreciprocal: k-reciprocal re-ranking of each query on its own
                           -> {"results": [[{"key", "label", "score"}, ...], ...], "batch": n}
    GET  /random           a random test image: {"key", "label"}
    GET  /image/<key>      a gallery or test image
    GET  /healthz          {"items": gallery size, "kind": index kind}
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import asdict
from importlib import resources
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from dmlray.serving.search import (
    BadRequest,
    SearchEngine,
    check_rerank,
    image_media_type,
    images_of_request,
    parse_k,
)

log = logging.getLogger(__name__)

DEFAULT_K = 5
PAGE_IMAGE_BYTES = 256 * 1024 * 1024  # thumbnails held for the page, per split


def page_html() -> str:
    return resources.files("dmlray.serving").joinpath("page.html").read_text(encoding="utf-8")


def build_engine(run: str, index_url: str) -> SearchEngine:
    """The engine of a replica: the run's model on this process's GPU if any, the index,
    and the images the page shows."""
    import torch

    from dmlray.evaluation.index import load_index
    from dmlray.jobs.run_model import load_run_model
    from dmlray.serving.search import load_split_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_run_model(run, device)
    index = load_index(index_url, gpu=device.type == "cuda")
    model_config = json.loads(json.dumps(asdict(loaded.cfg.model)))  # as index.json holds it
    if index.meta.get("model") is not None and index.meta["model"] != model_config:
        raise ValueError(f"{index_url} was built with another model than {loaded.run}: {index.meta['model']}")
    data_url, split = index.meta.get("data_url", loaded.cfg.data.url), index.meta.get("split", "")
    images, items = load_split_images(data_url, split, PAGE_IMAGE_BYTES) if split else ({}, [])
    test_split = loaded.cfg.data.test_split
    if test_split and test_split != split:
        test_images, items = load_split_images(data_url, test_split, PAGE_IMAGE_BYTES)
        images.update(test_images)
    log.info("search replica: %d gallery items (%s) on %s, %d page images", len(index), index.kind, device, len(images))
    return SearchEngine(loaded.model, lambda data: loaded.transform(data, None), index, device, images, items)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class SearchReplica:
    """One replica of the search service."""

    def __init__(self, run: str, index: str, default_k: int = DEFAULT_K):
        self.engine = build_engine(run, index)
        self.default_k = default_k
        self.page = page_html()
        self.rng = random.Random()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed_batch(self, inputs: list[Any]) -> list[tuple[np.ndarray, int]]:
        """The concurrent requests' images embedded as one batch (and that batch's size)."""
        emb = self.engine.embed(inputs)
        return [(row, len(inputs)) for row in emb]

    async def search(self, request: Request) -> Response:
        k = parse_k(request.query_params.get("k"), self.default_k)
        rerank = check_rerank(request.query_params.get("rerank", ""))
        body = await request.body()
        images = images_of_request(body, request.headers.get("content-type", ""))
        inputs = [self.engine.to_tensor(data, f"images[{n}]") for n, data in enumerate(images)]
        embedded = await asyncio.gather(*(self.embed_batch(t) for t in inputs))
        hits = self.engine.search(np.stack([e for e, _ in embedded]), k, rerank)
        return JSONResponse(
            {"results": [[asdict(h) for h in row] for row in hits], "batch": max(n for _, n in embedded)}
        )

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/search":
                if method != "POST":
                    return error(405, "POST an image to /search")
                return await self.search(request)
            if method != "GET":
                return error(405, f"{method} is not served at {path}")
            if path == "/":
                return HTMLResponse(self.page)
            if path == "/random":
                key, label = self.engine.random_query(self.rng)
                return JSONResponse({"key": key, "label": label})
            if path == "/healthz":
                return JSONResponse({"items": len(self.engine.index), "kind": self.engine.index.kind})
            if path.startswith("/image/"):
                key = path[len("/image/") :]
                data = self.engine.images.get(key)
                if data is None:
                    return error(404, f"no image with key {key!r}")
                return Response(data, media_type=image_media_type(data))
            return error(404, f"nothing at {path}")
        except BadRequest as exc:
            return error(exc.status, exc.message)


# the Serve deployment (a wrapper typed Any, as Ray is untyped here: .options / .bind)
SearchDeployment = serve.deployment(max_ongoing_requests=64)(SearchReplica)


def build_app(run: str, index: str, replicas: int | str = 1, gpus: float = 0, default_k: int = DEFAULT_K):
    """The application; ``replicas`` "auto" scales between 1 and 4 replicas on load."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 1, "num_gpus": gpus}}
    if replicas == "auto":
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    else:
        options["num_replicas"] = int(replicas)
    return SearchDeployment.options(**options).bind(run, index, default_k)


def app_builder(args: dict[str, str]):
    """The import path of a Serve config (RayService ``serveConfigV2``): ``args`` holds
    ``run`` and ``index`` URLs; replicas and autoscaling come from the config itself."""
    for name in ("run", "index"):
        if not args.get(name):
            raise ValueError(f"the search application needs args.{name} (a URL), got {json.dumps(args)}")
    return SearchDeployment.bind(args["run"], args["index"], int(args.get("k", DEFAULT_K)))


def serve_forever(run: str, index: str, host: str, port: int, replicas: int | str, gpus: float) -> None:
    """``dmlray serve``: the application on RAY_ADDRESS's cluster (or a local one) until Ctrl-C."""
    import time

    from dmlray.jobs.launch import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(run, index, replicas, gpus), name="dmlray-search", route_prefix="/")
    print(f"search page: http://{host}:{port}/   (POST images to http://{host}:{port}/search; Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete("dmlray-search")
