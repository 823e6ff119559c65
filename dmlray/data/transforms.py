"""Decoding and augmentation: encoded bytes → float tensors (C, H, W).

Two styles, chosen explicitly by name (:func:`make_transform`) or derived from the data
config's ``image_size`` and ``channels`` (:func:`transform_style`):

- ``glyph``: the built-in glyphs (grey, 32 px): resize, then a small random shift; [0, 1].
- ``natural``: the seed papers' recipe for photographs: train = random-resized crop of
  the image resized to 256 (shorter side) + horizontal flip, eval = resize 256 + centre
  crop; RGB, normalised per the backbone's input convention (``rgb_imagenet``: ImageNet
  mean/std; ``bgr255``: BN-Inception's BGR in [0, 255] minus its mean).

Transforms that can also produce uint8 ``pixels`` and ``collate`` them (the natural one)
let the stream normalise each image straight into the batch tensor: 4× less memory
traffic per image than float tensors stacked afterwards.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def decode_image(data: bytes, channels: int):
    """PIL image in L (grey) or RGB mode."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return image.convert("L" if channels == 1 else "RGB")


def to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageTransform:
    """Resize to the input size, then (train) a random shift by padding and cropping.

    The glyph instances already carry rendering jitter; the shift adds variety at no cost.
    Natural-image recipes (random-resized-crop, flip) plug in here too.
    """

    def __init__(self, image_size: int, channels: int, train: bool, max_shift: int = 2):
        self.image_size = image_size
        self.channels = channels
        self.train = train
        self.max_shift = max_shift

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        from PIL import Image

        image = decode_image(data, self.channels)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        if self.train and self.max_shift > 0 and rng is not None:
            # numpy on uint8: torch's replicate pad costs ~10 ms per small image on CPU
            s = self.max_shift
            array = np.asarray(image, dtype=np.uint8)
            pad = ((s, s), (s, s)) + (((0, 0),) if array.ndim == 3 else ())
            padded = np.pad(array, pad, mode="edge")
            dx, dy = rng.randint(0, 2 * s), rng.randint(0, 2 * s)
            image = padded[dy : dy + self.image_size, dx : dx + self.image_size]
        return to_tensor(image)


def default_resize(image_size: int) -> int:
    """The shorter side images are resized to before the crop: 256 for the usual 224/227
    crops (the seed recipes), else the same 8:7 proportion."""
    return 256 if 224 <= image_size <= 256 else round(image_size * 8 / 7)


class NaturalImageTransform:
    """The seed recipe for natural images; see the module docstring.

    Implementation, for speed: the resize and the crop are one resampling of the crop's
    region of the original image (a random-resized crop's distribution does not change
    with a uniform resize before it; the eval crop is mapped back to original pixels).
    JPEGs larger than needed are decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode:
    DCT scaling, much cheaper than decoding everything and shrinking): enough that the
    crop keeps the output size, or that the shorter side keeps ``resize`` (the resolution
    the recipe resizes to before cropping: it never sees finer detail). The resampling is
    torch's antialiased bilinear on uint8, about twice as fast as Pillow's.
    """

    def __init__(
        self,
        image_size: int = 227,
        train: bool = True,
        resize: int = 0,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        convention: str = "rgb_imagenet",
        draft: bool = True,
    ):
        from dmlray.models.inputs import input_convention

        self.image_size = image_size
        self.train = train
        self.resize = resize or default_resize(image_size)
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.draft = draft
        self.convention = convention
        conv = input_convention(convention)
        std = torch.tensor(conv.std, dtype=torch.float32).view(3, 1, 1)
        # (pixel/255 · scale − mean) / std  ==  pixel · a − b, per channel in network order
        self._a = (conv.scale / 255.0) / std
        self._b = torch.tensor(conv.mean, dtype=torch.float32).view(3, 1, 1) / std
        self._bgr = conv.order == "BGR"

    def crop_box(self, width: int, height: int, rng: random.Random | None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in original pixels of the region that becomes the output."""
        if not self.train:
            side = min(width, height) * self.image_size / self.resize
            w, h = min(width, round(side)), min(height, round(side))
            left, top = (width - w) // 2, (height - h) // 2
            return left, top, left + w, top + h
        rng = rng or random.Random()
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):  # torchvision's RandomResizedCrop.get_params, on our seeded rng
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def pixels(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """uint8 (3, S, S): decoded, cropped, resized, maybe flipped; not normalised."""
        from PIL import Image

        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        left, top, right, bottom = self.crop_box(width, height, rng)
        hwc = None
        if image.format == "JPEG":
            # the smallest 1/2^k decoding scale that keeps the crop >= the output size, or
            # the shorter side >= the recipe's resize (its pixels are all the recipe ever
            # sees: a crop smaller than the output is upsampled from that resolution)
            need = (
                math.ceil(width * self.image_size / (right - left)),
                math.ceil(height * self.image_size / (bottom - top)),
            )
            shorter = min(width, height)
            need = (
                min(need[0], math.ceil(width * self.resize / shorter)),
                min(need[1], math.ceil(height * self.resize / shorter)),
            )
            if self.draft and min(width // need[0], height // need[1]) >= 2:
                image.draft("RGB", need)
                fx, fy = image.size[0] / width, image.size[1] / height
                left, right = math.floor(left * fx), max(math.floor(left * fx) + 1, round(right * fx))
                top, bottom = math.floor(top * fy), max(math.floor(top * fy) + 1, round(bottom * fy))
            else:
                hwc = _decode_jpeg_hwc(data)
        if hwc is None:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            hwc = torch.from_numpy(np.array(rgb))
        # a contiguous channels-last crop takes torch's vectorised uint8 path (~5× faster)
        region = hwc[top:bottom, left:right].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        size = (self.image_size, self.image_size)
        out = (
            region
            if region.shape[-2:] == size
            else torch.nn.functional.interpolate(
                region, size=size, mode="bilinear", antialias=True, align_corners=False
            )
        )
        if self.train and self.flip and (rng or random).random() < 0.5:
            out = out.flip(-1)
        return out[0]

    def stack_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images → one uint8 batch (N, 3, S, S), for :meth:`normalise` later (on
        the GPU): a quarter of the bytes to move between processes and to the device."""
        out = batch_tensor((len(pixels), 3, self.image_size, self.image_size), torch.uint8)
        for i, p in enumerate(pixels):
            out[i].copy_(p)
        return out

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 batch from :meth:`stack_pixels` → the float batch :meth:`collate` makes
        (on the batch's device)."""
        x = batch.to(torch.float32)
        if self._bgr:
            x = x.flip(1)
        return x.mul_(self._a.to(x.device)).sub_(self._b.to(x.device))

    def collate(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Normalise uint8 images straight into one float batch (N, 3, S, S)."""
        out = batch_tensor((len(pixels), 3, self.image_size, self.image_size))
        for i, p in enumerate(pixels):
            o = out[i]
            o.copy_(p.flip(0) if self._bgr else p)
            o.mul_(self._a).sub_(self._b)  # in cache, one image at a time
        return out

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        return self.collate([self.pixels(data, rng)])[0]


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty batch; in a DataLoader worker, in shared memory, so handing it to the
    training process copies nothing (torch's default_collate does the same)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _decode_jpeg_hwc(data: bytes) -> torch.Tensor | None:
    """A JPEG decoded by torchvision straight into an (H, W, 3) uint8 tensor: as fast as
    Pillow's decoder without the two copies out of a PIL image (~15% of the pipeline).
    None when it declines (corrupt or unusual files) or is gone (torchvision 0.29
    deprecated its image decoding): Pillow then decodes, or raises the error that names
    the problem."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return chw.permute(1, 2, 0)  # its memory is already (H, W, 3)


TRANSFORM_STYLES = ("glyph", "natural")


def transform_style(image_size: int, channels: int) -> str:
    """The style a data config implies: ``natural`` for RGB inputs of 64 px and more
    (photographs), else ``glyph`` (the built-in glyphs: grey, 32 px)."""
    return "natural" if channels == 3 and image_size >= 64 else "glyph"


def make_transform(
    style: str, image_size: int, channels: int, train: bool, convention: str = "rgb_imagenet", **options: Any
) -> Callable[..., torch.Tensor]:
    """The transform of a named style (``auto``: derived by :func:`transform_style`).

    ``convention`` is the backbone's ``input_convention`` (natural style only).
    """
    if style == "auto":
        style = transform_style(image_size, channels)
    if style == "glyph":
        return ImageTransform(image_size, channels, train=train, **options)
    if style == "natural":
        if channels != 3:
            raise ValueError(f"the natural transform makes RGB images: channels must be 3, got {channels}")
        return NaturalImageTransform(image_size, train=train, convention=convention, **options)
    raise ValueError(f"unknown transform style {style!r}; known: auto, {', '.join(TRANSFORM_STYLES)}")


def decode(transform: Callable, data: bytes, rng: random.Random | None) -> torch.Tensor:
    """One image as the transform's batch element (uint8 pixels when it collates them)."""
    pixels = getattr(transform, "pixels", None)
    return pixels(data, rng) if pixels is not None else transform(data, rng)


def collate(transform: Callable, items: list[torch.Tensor], uint8: bool = False) -> torch.Tensor:
    """Decoded images → the batch tensor the model takes (or, with ``uint8`` and a
    transform that has ``stack_pixels``, the uint8 batch its ``normalise`` finishes)."""
    if uint8 and hasattr(transform, "stack_pixels"):
        return transform.stack_pixels(items)
    gather = getattr(transform, "collate", None)
    return gather(items) if gather is not None else torch.stack(items)
