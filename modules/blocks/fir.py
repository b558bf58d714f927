"""Resampling with a separable FIR low-pass filter, as StyleGAN (Karras et al. 2019, "A Style-Based
Generator Architecture for Generative Adversarial Networks", section 2, after Zhang 2019, "Making
Convolutional Networks Shift-Invariant Again") and StyleGAN2 (Karras et al. 2020, "Analyzing and
Improving the Image Quality of StyleGAN") resample G's and D's activations: the binomial filter
[1, 3, 3, 1] after every 2x upsampling and before every 2x downsampling.

`upfirdn2d` is the StyleGAN2 code's op of that name, in plain PyTorch: upsample by inserting
up - 1 zeros after every sample, pad with zeros, convolve with the filter along x and y,
keep every down-th sample. The filter is normalised to sum 1 per axis; upsampling multiplies it
by `gain` = up^2 in all, as only one sample in up^2 of the zero-inserted image is non-zero.

Two facts the tests check: in the interior, 2x upsampling with [1, 3, 3, 1] is bilinear
interpolation (each output is 3/4 of its nearer and 1/4 of its farther input), except that at
the border the filter reads zeros beyond the image, as in the paper's code (`F.interpolate`
repeats the edge instead); 2x downsampling attenuates a frequency w (radians per input sample) by cos(w / 2)^3 per axis, where a
2x2 box (average pooling) passes cos(w / 2).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BINOMIAL = (1.0, 3.0, 3.0, 1.0)


@functools.lru_cache(maxsize=64)
def _kernel(taps: tuple[float, ...], channels: int, gain: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The depthwise weight (C, 1, k, k): the outer product of the normalised taps, times `gain`;
    flipped, so that conv2d's correlation is the filter's convolution."""
    f = torch.tensor(taps, dtype=torch.float64, device="cpu").flip(0)
    f = f / f.sum()
    return (torch.outer(f, f) * gain).to(dtype=dtype, device=device).expand(channels, 1, -1, -1).contiguous()


def _pairs(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        padding = (padding,) * 4
    if len(padding) != 4 or min(padding) < 0:
        raise ValueError(f"padding must be one non-negative int or (x_before, x_after, y_before, y_after), got {padding}")
    return tuple(int(p) for p in padding)


def upfirdn2d(x: Tensor, taps: Sequence[float] = BINOMIAL, up: int = 1, down: int = 1,
              padding: int | Sequence[int] = 0, gain: float = 1.0) -> Tensor:
    """(N, C, H, W) -> (N, C, (H * up + py0 + py1 - k) // down + 1, likewise for W), k = len(taps).

    padding: (x_before, x_after, y_before, y_after) zeros around the zero-inserted image, in the
    order of the StyleGAN2 code (or one int for all four)."""
    px0, px1, py0, py1 = _pairs(padding)
    n, c, h, w = x.shape
    same = 0  # padding conv2d applies itself when it is the same on all four sides
    if up > 1:
        padded = x.new_zeros(n, c, h * up + py0 + py1, w * up + px0 + px1)
        padded[:, :, py0:py0 + h * up:up, px0:px0 + w * up:up] = x
        x = padded
    elif px0 == px1 == py0 == py1:
        same = px0
    else:
        x = F.pad(x, (px0, px1, py0, py1))
    f = _kernel(tuple(float(t) for t in taps), c, float(gain), x.dtype, x.device)
    # the filter is separable, but one k x k depthwise conv ran faster on CPUs than two k-tap ones;
    # the stride skips the samples that downsampling drops
    return F.conv2d(x, f, stride=down, padding=same, groups=c)


def upsample2d(x: Tensor, taps: Sequence[float] = BINOMIAL) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W), the padding of the StyleGAN2 code's `upsample2d`."""
    k = len(taps)
    p0, p1 = (k + 1) // 2, (k - 2) // 2
    return upfirdn2d(x, taps, up=2, padding=(p0, p1, p0, p1), gain=4.0)


def downsample2d(x: Tensor, taps: Sequence[float] = BINOMIAL) -> Tensor:
    """(N, C, H, W) -> (N, C, H / 2, W / 2), the padding of the StyleGAN2 code's `downsample2d`."""
    k = len(taps)
    p0, p1 = (k - 1) // 2, (k - 2) // 2
    return upfirdn2d(x, taps, down=2, padding=(p0, p1, p0, p1))
