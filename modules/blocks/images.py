"""Bringing images to a network's shape, written once for every family and the evaluator."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def to_shape(images: Tensor, shape: tuple[int, int, int], mode: str = "bilinear") -> Tensor:
    """Images in [-1, 1], (N, C, H, W), brought to (C', H', W'): grey from RGB as the channels'
    mean, RGB from grey as the one channel repeated, then an antialiased resize (`mode`:
    "bilinear" or "bicubic"), clamped to [-1, 1] (bicubic overshoots). Nothing is copied for
    images already of the shape."""
    c, h, w = shape
    if images.shape[1] != c:
        images = images.mean(1, keepdim=True) if c == 1 else images.expand(-1, c, -1, -1)
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode=mode, antialias=True).clamp(-1, 1)
    return images
