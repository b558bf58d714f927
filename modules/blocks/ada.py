"""Adaptive discriminator augmentation (Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data"): every image the discriminator sees, real or generated, goes through
the same random, differentiable augmentations, each applied with probability p, so D cannot
memorise a small training set while G still learns the un-augmented distribution (the ops are
"non-leaking": p < ~0.8 keeps them invertible in distribution).

The pipeline is the paper's section 2.3 / appendix B, in its order:

    blit      xflip, rotate90, xint                 (pixel-exact: flips, quarter turns, integer shifts)
    geom      scale, rotate, aniso, xfrac           (isotropic scale, rotation, anisotropic scale, fractional shift)
    color     brightness, contrast, lumaflip, hue, saturation

The geometric ops compose one 3x3 matrix per image, applied with one `affine_grid` +
`grid_sample` (bilinear, reflection padding; the paper's code pads by reflection and resamples
with a wavelet filter, which this simplifies), the colour ops one 4x4 matrix on RGB. Both are
linear in the image for fixed random draws, so gradients reach G through them.

The adaptive controller (section 3): r_t = E[sign(D(x_real))] over the images seen since the last
adjustment; every `interval` iterations p += sign(r_t - target) * images / (kimg * 1000), clamped
at 0. p and the running sums are buffers, so checkpoints save them and a resumed run continues.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLIT = ("xflip", "rotate90", "xint")
GEOM = ("scale", "rotate", "aniso", "xfrac")
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
OPS = BLIT + GEOM + COLOR
PRESETS = {"b": BLIT, "bg": BLIT + GEOM, "bgc": OPS, "c": COLOR}
Share = tuple[int, int]  # (index, count): which of `count` equal shares of a batch the images are
_Source = tuple["torch.Generator | None", Share]

# The paper's strengths (appendix B): uniform ranges and log2 standard deviations.
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, HUE_MAX, SATURATION_STD = 0.2, 0.5, 1.0, 1.0


def _eye(n: int, batch: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).repeat(batch, 1, 1)


def _matrix(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """A batch of matrices from per-sample entries (tensors (N,) or constants)."""
    n = len(like)
    entries = [torch.as_tensor(e, dtype=like.dtype, device=like.device).expand(n) for row in rows for e in row]
    return torch.stack(entries, dim=1).view(n, len(rows), len(rows[0]))


def _translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate2d(theta: Tensor) -> Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _translate3d(t: Tensor) -> Tensor:
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def _scale3d(s: Tensor) -> Tensor:
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def _luma_outer(like: Tensor) -> Tensor:
    """v v^T for the luma axis v = (1, 1, 1, 0) / sqrt(3), as a 4x4 matrix."""
    v = like.new_tensor([1.0, 1.0, 1.0, 0.0]) / math.sqrt(3)
    return torch.outer(v, v)


def _rotate3d_luma(theta: Tensor) -> Tensor:
    """Rotation by theta about the luma axis (a hue rotation), by Rodrigues' formula."""
    a = 1 / math.sqrt(3)
    cross = theta.new_tensor([[0, -a, a, 0], [a, 0, -a, 0], [-a, a, 0, 0], [0, 0, 0, 0]])
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    eye = _eye(4, len(theta), theta)
    vv = _luma_outer(theta)
    rotation = c * eye + s * cross + (1 - c) * vv
    rotation[:, 3, :] = eye[:, 3, :]  # the homogeneous row stays (0, 0, 0, 1)
    return rotation


class AdaptiveAugment(nn.Module):
    """The augmentation pipeline and its adaptive probability.

    Args:
        ops: a preset ("bgc": the paper's default, "bg", "b", "c") or a list of op names from `OPS`.
        p: the starting probability of each op.
        target: r_t the controller aims for (the paper: 0.6); None keeps p fixed.
        kimg: thousands of images over which p can move from 0 to 1 (the paper: 500).
        interval: iterations between adjustments (the paper's code: 4).
    """

    def __init__(self, ops: str | Sequence[str] = "bgc", p: float = 0.0, target: float | None = 0.6,
                 kimg: float = 500.0, interval: int = 4):
        super().__init__()
        names = PRESETS.get(ops) if isinstance(ops, str) else tuple(ops)
        if names is None:
            raise ValueError(f"unknown augmentation preset {ops!r}; choose from {', '.join(PRESETS)} or list ops")
        unknown = [o for o in names if o not in OPS]
        if unknown:
            raise ValueError(f"unknown augmentation op {unknown[0]!r}; choose from {', '.join(OPS)}")
        if not p >= 0:
            raise ValueError(f"augmentation probability must be non-negative, got {p}")
        if kimg <= 0 or interval < 1:
            raise ValueError(f"ADA needs kimg > 0 and interval >= 1, got kimg={kimg}, interval={interval}")
        self.ops = frozenset(names)
        self.target, self.kimg, self.interval = target, kimg, interval
        self.register_buffer("p", torch.tensor(float(p)))
        # sum of sign(D(real)) and the number of real images since the last adjustment
        self.register_buffer("signs", torch.zeros(2, dtype=torch.float64))

    # -- the controller --------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, real_logits: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Add D's signs on real images to the running sums. `reduce` sums a (sum, count) pair over
        ranks: every rank then holds the sums over all ranks' images, so a checkpoint (which saves one
        rank's buffers) keeps them whole and DDP's broadcast of rank 0's buffers changes nothing."""
        tally = torch.stack([real_logits.sign().sum().double(), real_logits.new_tensor(real_logits.numel()).double()])
        self.signs += tally if reduce is None else reduce(tally)

    @torch.no_grad()
    def adjust(self, signs: Tensor | None = None) -> float:
        """Move p by sign(r_t - target) * images / (kimg * 1000) and start a new count; `signs`
        is the (sum, count) pair to use, default the running sums. Returns r_t."""
        total, count = (self.signs if signs is None else signs).tolist()
        self.signs.zero_()
        if count == 0:
            return float("nan")
        r_t = total / count
        if self.target is not None:
            step = math.copysign(count / (self.kimg * 1000), r_t - self.target) if r_t != self.target else 0.0
            self.p.copy_((self.p + step).clamp(min=0))
        return r_t

    # -- the pipeline ----------------------------------------------------------------------------
    # Every draw is per image. `source` is (generator, share): the images are share `index` of
    # `count` equal shares of one batch (a rank's part of the global batch). Each draw is made for
    # the whole batch and this share's images keep theirs, so a batch split over ranks is augmented
    # as one process would augment it whole, and no two ranks give their images the same draws.
    def _draw(self, name: str, n: int, like: Tensor, source: _Source, p: float | None = None) -> Tensor:
        """A per-sample mask: which images get op `name` (probability p, or this module's)."""
        p = float(self.p) if p is None else p
        generator, (index, count) = source
        u = torch.rand(count * n, generator=generator, device=like.device)[index * n:(index + 1) * n]
        return (u < p) & (name in self.ops)

    def _rand(self, n: int, like: Tensor, source: _Source, rows: int = 1) -> Tensor:
        """Uniform draws, (n,) or (rows, n)."""
        generator, (index, count) = source
        u = torch.rand(rows, count * n, generator=generator, device=like.device, dtype=like.dtype)
        return u[:, index * n:(index + 1) * n].squeeze(0)

    def _randn(self, n: int, like: Tensor, source: _Source, rows: int = 1) -> Tensor:
        """Normal draws, (n,) or (rows, n)."""
        generator, (index, count) = source
        x = torch.randn(rows, count * n, generator=generator, device=like.device, dtype=like.dtype)
        return x[:, index * n:(index + 1) * n].squeeze(0)

    def geometry(self, images: Tensor, generator: torch.Generator | None = None, share: Share = (0, 1)) -> Tensor:
        """(N, 3, 3): output pixel -> input pixel (pixel units, origin at the image centre)."""
        n, _, h, w = images.shape
        source = (generator, share)
        like = images.new_zeros(n)
        G = _eye(3, n, like)
        one = torch.ones_like(like)

        def where(mask: Tensor, value: Tensor, identity: Tensor | float) -> Tensor:
            return torch.where(mask, value, identity)

        # Each is drawn for every image (so the draws do not depend on which ops are on), then
        # kept where the image's mask says so. Inverse transforms, composed as the paper's code does.
        flip = torch.floor(self._rand(n, like, source) * 2)
        G = G @ _scale2d(where(self._draw("xflip", n, like, source), 1 - 2 * flip, one), one)
        quarter = torch.floor(self._rand(n, like, source) * 4)
        G = G @ _rotate2d(where(self._draw("rotate90", n, like, source), -math.pi / 2 * quarter, like))
        t = (self._rand(n, like, source, rows=2) * 2 - 1) * XINT_MAX
        mask = self._draw("xint", n, like, source)
        G = G @ _translate2d(where(mask, -torch.round(t[0] * w), like), where(mask, -torch.round(t[1] * h), like))
        s = torch.exp2(self._randn(n, like, source) * SCALE_STD)
        s = where(self._draw("scale", n, like, source), s, one)
        G = G @ _scale2d(1 / s, 1 / s)
        # Rotation twice, around the anisotropic scaling, each with 1 - sqrt(1 - p): together the
        # probability that an image is rotated at all is p (the paper's code).
        p_rot = 1 - math.sqrt(max(0.0, 1 - min(float(self.p), 1.0)))
        theta = (self._rand(n, like, source) * 2 - 1) * math.pi * ROTATE_MAX
        G = G @ _rotate2d(where(self._draw("rotate", n, like, source, p_rot), -theta, like))
        s = torch.exp2(self._randn(n, like, source) * ANISO_STD)
        mask = self._draw("aniso", n, like, source)
        G = G @ _scale2d(where(mask, 1 / s, one), where(mask, s, one))
        theta = (self._rand(n, like, source) * 2 - 1) * math.pi * ROTATE_MAX
        G = G @ _rotate2d(where(self._draw("rotate", n, like, source, p_rot), -theta, like))
        t = self._randn(n, like, source, rows=2) * XFRAC_STD
        mask = self._draw("xfrac", n, like, source)
        return G @ _translate2d(where(mask, -t[0] * w, like), where(mask, -t[1] * h, like))

    def color(self, images: Tensor, generator: torch.Generator | None = None, share: Share = (0, 1)) -> Tensor:
        """(N, 4, 4) acting on homogeneous RGB in [-1, 1]."""
        n = len(images)
        source = (generator, share)
        like = images.new_zeros(n)
        one = torch.ones_like(like)
        C = _eye(4, n, like)
        b = self._randn(n, like, source) * BRIGHTNESS_STD
        C = _translate3d(torch.where(self._draw("brightness", n, like, source), b, like)) @ C
        c = torch.exp2(self._randn(n, like, source) * CONTRAST_STD)
        C = _scale3d(torch.where(self._draw("contrast", n, like, source), c, one)) @ C
        vv = _luma_outer(like)
        flip = torch.floor(self._rand(n, like, source) * 2)
        flip = torch.where(self._draw("lumaflip", n, like, source), flip, like)
        C = (_eye(4, n, like) - 2 * vv * flip[:, None, None]) @ C
        theta = (self._rand(n, like, source) * 2 - 1) * math.pi * HUE_MAX
        C = _rotate3d_luma(torch.where(self._draw("hue", n, like, source), theta, like)) @ C
        s = torch.exp2(self._randn(n, like, source) * SATURATION_STD)
        s = torch.where(self._draw("saturation", n, like, source), s, one)[:, None, None]
        return (vv + (_eye(4, n, like) - vv) * s) @ C

    def forward(self, images: Tensor, generator: torch.Generator | None = None, share: Share = (0, 1)) -> Tensor:
        """Augmented images (N, C, H, W) in the input's range; p == 0 returns the input itself.
        `share` = (index, count): the images are share `index` of `count` equal shares of one batch
        (this rank's part of the global batch; see `_draw`)."""
        if float(self.p) == 0:
            return images
        n, channels, h, w = images.shape
        if self.ops & set(BLIT + GEOM):
            G = self.geometry(images, generator, share)
            # pixel units -> affine_grid's normalised units ([-1, 1] across the image)
            to_norm = _scale2d(images.new_full((n,), 2 / w), images.new_full((n,), 2 / h))
            from_norm = _scale2d(images.new_full((n,), w / 2), images.new_full((n,), h / 2))
            theta = (to_norm @ G @ from_norm)[:, :2, :]
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.ops & set(COLOR):
            C = self.color(images, generator, share)
            rgb = images.expand(-1, 3, -1, -1) if channels == 1 else images
            if rgb.shape[1] != 3:
                raise ValueError(f"colour augmentation needs 1 or 3 channels, got {channels}")
            out = torch.einsum("nij,njhw->nihw", C[:, :3, :3], rgb) + C[:, :3, 3, None, None]
            images = out.mean(1, keepdim=True) if channels == 1 else out
        return images
