"""Per-sample mappers: a decoded WebDataset sample (PIL images, text) -> a family's example.

Transforms use PIL and torch only (no torchvision, see shared/INFRA.md).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance


def to_tensor(image: Image.Image, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W), normalised as (x / 255 - mean) / std."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1) - mean) / std


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> Image.Image:
    """A square crop covering `scale` of the area at a random place, resized to `size`."""
    w, h = image.size
    side = int(round(min(w, h) * rng.uniform(*scale) ** 0.5))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return image.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))


class ImageText:
    """Image + caption pairs (CLIP, text-to-image).

    Args:
        image_size: output side in pixels.
        image_key / caption_key: sample fields holding the image and the caption.
        crop_scale: random-resized-crop area range for training; None resizes the whole image.
        color_jitter: brightness, contrast and saturation each scaled by a factor drawn from
            [1 - color_jitter, 1 + color_jitter] (SimCLR-style); 0 disables it.
        caption_dropout: probability of replacing the caption by "" (classifier-free guidance).
    """

    def __init__(
        self,
        image_size: int = 64,
        image_key: str = "png",
        caption_key: str = "txt",
        crop_scale: tuple[float, float] | None = None,
        color_jitter: float = 0.0,
        caption_dropout: float = 0.0,
        seed: int | None = None,
    ):
        self.image_size, self.image_key, self.caption_key = image_size, image_key, caption_key
        self.crop_scale, self.color_jitter, self.caption_dropout = crop_scale, color_jitter, caption_dropout
        self.seed, self._rng_owner, self.rng = seed, None, random.Random(seed)

    def for_eval(self) -> "ImageText":
        """The same mapping without augmentation or caption dropout: held-out data is judged as it is."""
        return ImageText(self.image_size, self.image_key, self.caption_key, seed=self.seed)

    def _reseed(self) -> None:
        # DataLoader workers each get a copy of the mapper: draw their augmentations from the
        # worker's own torch seed (set by seed_everything), not from one copied state.
        owner = (os.getpid(), torch.initial_seed())
        if owner != self._rng_owner:
            self._rng_owner = owner
            self.rng = random.Random(torch.initial_seed() if self.seed is None else hash((self.seed, owner[1])))

    def __call__(self, sample: dict) -> dict:
        self._reseed()
        for k in (self.image_key, self.caption_key):
            if k not in sample:
                raise KeyError(f"sample {sample.get('__key__')} from {sample.get('__url__')} has no '{k}'")
        image = sample[self.image_key]
        if self.crop_scale is not None:
            image = random_resized_crop(image, self.image_size, self.crop_scale, self.rng)
        else:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        if self.color_jitter:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(1 + self.rng.uniform(-self.color_jitter, self.color_jitter))
        caption = sample[self.caption_key]
        if self.caption_dropout and self.rng.random() < self.caption_dropout:
            caption = ""
        return {"image": to_tensor(image), "caption": caption, "key": sample["__key__"]}
