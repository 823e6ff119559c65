"""Decoding and augmentation: encoded bytes → float tensors (C, H, W) in [0, 1]."""

from __future__ import annotations

import io
import random

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
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        if self.train and self.max_shift > 0 and rng is not None:
            # numpy on uint8: torch's replicate pad costs ~10 ms per small image on CPU
            s = self.max_shift
            array = np.asarray(image, dtype=np.uint8)
            pad = ((s, s), (s, s)) + (((0, 0),) if array.ndim == 3 else ())
            padded = np.pad(array, pad, mode="edge")
            dx, dy = rng.randint(0, 2 * s), rng.randint(0, 2 * s)
            image = padded[dy : dy + self.image_size, dx : dx + self.image_size]
        return to_tensor(image)
