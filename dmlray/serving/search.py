"""The search a replica runs, without Ray: requests checked and decoded, images embedded
with a run's model, the gallery index searched.

Every way a request can be wrong ends as :class:`BadRequest` (an HTTP status and a
message naming the problem) before anything reaches the model, so bad input never costs
a replica.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dmlray.evaluation.kreciprocal_gallery import KReciprocalGallery

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MAX_BATCH = 64
MAX_K = 100
# k-reciprocal re-ranking keeps every gallery row's neighbour sets in memory, built on the first
# such request: every gallery row's distances once, O(N²) (one thread of a 2-core Xeon: 0.8 s
# at 4,000 items, 2.7 s at 8,000, 9.2 s at 16,000, so ~14 s at this cap, which holds the CUB,
# Cars196 and In-Shop galleries; at SOP's 60,502 the first request would wait ~2 minutes).
MAX_KRECIPROCAL_GALLERY = 20_000
RERANK_METHODS = ("aqe", "kreciprocal")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class BadRequest(ValueError):
    """A request the service refuses: ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_k(raw: str | int | None, default: int) -> int:
    """The number of results asked for, 1..MAX_K."""
    if raw is None or raw == "":
        return default
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(400, f"k must be an integer, got {raw!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(400, f"k must be between 1 and {MAX_K}, got {k}")
    return k


def check_image(data: bytes, name: str = "image") -> bytes:
    """``data`` if it is an image of an accepted format and size; BadRequest otherwise.

    Only the header is parsed before the size checks, so a huge (or decompression-bomb)
    image is refused before its pixels are decoded.
    """
    from PIL import Image

    if not data:
        raise BadRequest(400, f"{name} is empty: send the bytes of a {', '.join(FORMATS)} image")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadRequest(413, f"{name} is {len(data)} bytes, more than the {MAX_IMAGE_BYTES} byte limit")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise BadRequest(400, f"{name} is not an image (no image format recognises its bytes)") from None
    except Exception as exc:  # PIL raises several types for unreadable headers
        raise BadRequest(400, f"{name} is not an image ({type(exc).__name__}: {exc})") from None
    if image.format not in FORMATS:
        raise BadRequest(415, f"{name} is a {image.format} image; accepted formats: {', '.join(FORMATS)}")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadRequest(413, f"{name} is {width}x{height} pixels, more than the {MAX_PIXELS} pixel limit")
    try:
        image.load()
    except Exception as exc:
        raise BadRequest(400, f"{name} is a damaged {image.format} image ({type(exc).__name__}: {exc})") from None
    return data


def images_of_request(body: bytes, content_type: str) -> list[bytes]:
    """The images of a POST /search body: raw image bytes (``image/*`` or
    ``application/octet-stream``), or JSON ``{"images": [base64, ...]}``."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [check_image(body)]
    if kind != "application/json":
        raise BadRequest(
            415,
            f"Content-Type {content_type or '(none)'!r} is not accepted: send image bytes (image/png, image/jpeg, ...)"
            ' or application/json {"images": [base64, ...]}',
        )
    if len(body) > MAX_IMAGE_BYTES * 2:
        raise BadRequest(413, f"request body is {len(body)} bytes, more than the {MAX_IMAGE_BYTES * 2} byte limit")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc})") from None
    items = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise BadRequest(400, 'JSON body must be {"images": [base64 string, ...]} with at least one image')
    if len(items) > MAX_BATCH:
        raise BadRequest(413, f"{len(items)} images in one request, more than the {MAX_BATCH} allowed")
    images = []
    for n, item in enumerate(items):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"images[{n}] is not valid base64") from None
        images.append(check_image(data, f"images[{n}]"))
    return images


@dataclass
class Hit:
    """One result: a gallery item and its similarity to the query."""

    key: str
    label: int
    score: float


class SearchEngine:
    """A run's model and a gallery index: images in, ranked gallery items out."""

    def __init__(
        self,
        model: torch.nn.Module,
        transform: Callable[[bytes], torch.Tensor],
        index,
        device: torch.device,
        images: dict[str, bytes] | None = None,
        queries: Sequence[tuple[str, int]] = (),
    ):
        self.model = model.eval().to(device)
        self.transform = transform
        self.index = index
        self.device = device
        self.images = images or {}
        self.queries = list(queries)
        self._dtype = next(model.parameters()).dtype
        self._k_reciprocal: KReciprocalGallery | None = None
        self._k_reciprocal_lock = threading.Lock()

    def to_tensor(self, data: bytes, name: str = "image") -> torch.Tensor:
        """One checked image as the model's input; a transform failure is a BadRequest."""
        try:
            return self.transform(data)
        except Exception as exc:
            raise BadRequest(400, f"{name} cannot be read as a model input ({type(exc).__name__}: {exc})") from None

    @torch.no_grad()
    def embed(self, inputs: list[torch.Tensor]) -> np.ndarray:
        batch = torch.stack(inputs).to(self.device, self._dtype)
        return self.model(batch).float().cpu().numpy()

    def search(self, embeddings: np.ndarray, k: int, rerank: str = "") -> list[list[Hit]]:
        """The top k of each query; ``rerank="aqe"`` searches with the α-query-expanded
        queries (``dmlray.evaluation.rerank``; scores are then the expanded queries'),
        ``rerank="kreciprocal"`` ranks by each query's own k-reciprocal distance d to the
        gallery (``dmlray.evaluation.kreciprocal_gallery``; scores are then 1 - d)."""
        check_rerank(rerank)
        if rerank == "kreciprocal":
            scores, idx = self.k_reciprocal_search(embeddings, k)
        else:
            if rerank == "aqe":
                from dmlray.evaluation.rerank import alpha_query_expansion

                expanded = alpha_query_expansion(torch.from_numpy(embeddings), torch.from_numpy(self.index.embeddings))
                embeddings = expanded.numpy()
            scores, idx = self.index.search(embeddings, k)
        return [
            [
                Hit(self.index.keys[j], int(self.index.labels[j]), float(s))
                for s, j in zip(row_s, row_i, strict=True)
                if j >= 0
            ]
            for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]

    def k_reciprocal_search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(1 - re-ranked distance, gallery index) of each query's k best, each query re-ranked
        on its own against the gallery (ties to the lower index)."""
        gallery = self.k_reciprocal_gallery()
        k = min(k, len(gallery))
        scores, idx = np.empty((len(embeddings), k)), np.empty((len(embeddings), k), dtype=np.int64)
        for row, query in enumerate(torch.from_numpy(embeddings)):
            distance = gallery.distances(query)
            order = torch.sort(distance, stable=True).indices[:k]
            scores[row], idx[row] = (1 - distance[order]).numpy(), order.numpy()
        return scores, idx

    def k_reciprocal_gallery(self) -> KReciprocalGallery:
        """The gallery's k-reciprocal structures, built by the first request that needs them."""
        from dmlray.evaluation.kreciprocal_gallery import KReciprocalGallery

        size = len(self.index.embeddings)
        if size > MAX_KRECIPROCAL_GALLERY:
            raise BadRequest(
                400,
                f"rerank=kreciprocal needs a gallery of at most {MAX_KRECIPROCAL_GALLERY} items; this one holds "
                f"{size}: use rerank=aqe",
            )
        with self._k_reciprocal_lock:
            if self._k_reciprocal is None:
                self._k_reciprocal = KReciprocalGallery(torch.from_numpy(np.asarray(self.index.embeddings)))
        return self._k_reciprocal

    def random_query(self, rng: random.Random) -> tuple[str, int]:
        """A (key, label) of the test images held for the page."""
        if not self.queries:
            raise BadRequest(404, "this service holds no test images")
        return rng.choice(self.queries)


def check_rerank(method: str) -> str:
    """A re-ranking method a request may ask for ("" for none)."""
    if method and method not in RERANK_METHODS:
        raise BadRequest(400, f"rerank must be one of {', '.join(RERANK_METHODS)} (or absent), got {method!r}")
    return method


def image_media_type(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return "application/octet-stream"


def load_split_images(
    data_url: str, split: str, limit_bytes: int, read_shard: Callable | None = None
) -> tuple[dict[str, bytes], list[tuple[str, int]]]:
    """({key: encoded image}, [(key, label)]) of a split, up to ``limit_bytes`` of images
    (the page's thumbnails; the search itself needs none of them)."""
    from dmlray.data.shards import read_manifest
    from dmlray.data.stream import iter_shard

    read = read_shard or iter_shard
    images: dict[str, bytes] = {}
    items: list[tuple[str, int]] = []
    total = 0
    for url in read_manifest(data_url).shard_urls(split):
        for key, label, data in read(url):
            if total + len(data) > limit_bytes:
                return images, items
            images[key] = data
            items.append((key, int(label)))
            total += len(data)
    return images, items
