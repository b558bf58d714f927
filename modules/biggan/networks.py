"""BigGAN (Brock et al. 2019, "Large Scale GAN Training for High Fidelity Natural Image
Synthesis"), the architecture of its appendix B (the "BigGAN" residual blocks, not BigGAN-deep):

- Generator: z is split into one chunk per residual block plus one for the first linear layer
  (hierarchical latents); each block's conditional BatchNorms take their gains and biases from
  linear projections of [shared class embedding, that block's z chunk]; self-attention (SAGAN) at
  the chosen resolutions; BN, ReLU, 3x3 conv and tanh at the output.
- Discriminator: residual down-sampling blocks, self-attention, ReLU, global sum pooling, and a
  projection head (Miyato & Koyama 2018): logit = linear(h) + <embed(y), h>.
- Spectral normalisation on every layer of both networks except G's shared embedding, with
  orthogonal initialisation.

Sizes follow the paper's code: channel multipliers of `ch` per block, e.g. at 128 px
G (16, 16, 8, 4, 2, 1) from 4 px up and D (1, 2, 4, 8, 16, 16) down to 4 px.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def _ortho(module: nn.Module) -> nn.Module:
    """Orthogonal initialisation (the paper's G and D); skipped on the meta device (plans)."""
    if not module.weight.is_meta:
        nn.init.orthogonal_(module.weight)
    if getattr(module, "bias", None) is not None and not module.bias.is_meta:
        nn.init.zeros_(module.bias)
    return module


def sn(module: nn.Module, eps: float = 1e-6) -> nn.Module:
    """Spectral normalisation: one power iteration per training forward, as in the paper."""
    return spectral_norm(_ortho(module), eps=eps)


def sn_conv(cin: int, cout: int, kernel: int = 3, bias: bool = True) -> nn.Module:
    return sn(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias))


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; gain 1 + W_g c and bias W_b c from the conditioning c
    ([shared class embedding, z chunk]), the projections spectrally normalised and bias-free."""

    def __init__(self, channels: int, cond_dim: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=eps)
        self.gain = sn(nn.Linear(cond_dim, channels, bias=False))
        self.bias = sn(nn.Linear(cond_dim, channels, bias=False))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gain = 1 + self.gain(c)[:, :, None, None]
        return self.bn(x) * gain + self.bias(c)[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019) as BigGAN uses it: keys and values max-pooled 2x,
    query/key width C/8, value width C/2, no 1/sqrt(d) scaling, output scaled by a learned gamma
    that starts at 0 (so the block starts as the identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.theta = sn_conv(channels, channels // 8, 1, bias=False)
        self.phi = sn_conv(channels, channels // 8, 1, bias=False)
        self.g = sn_conv(channels, channels // 2, 1, bias=False)
        self.o = sn_conv(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no 0-d parameter

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if (gamma := state_dict.get(prefix + "gamma")) is not None and gamma.dim() == 0:
            state_dict[prefix + "gamma"] = gamma.reshape(1)  # written while gamma was a 0-d tensor
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C/8)
        k = F.max_pool2d(self.phi(x), 2).flatten(2).transpose(1, 2)  # (N, HW/4, C/8)
        v = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)  # (N, HW/4, C/2)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return x + self.gamma * self.o(out.transpose(1, 2).reshape(n, c // 2, h, w))


class GBlock(nn.Module):
    """BN-ReLU-up-conv-BN-ReLU-conv, plus an up-sampled 1x1-conv shortcut (appendix B, fig. 15)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, bn_eps: float = 1e-5):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, cond_dim, bn_eps)
        self.conv1 = sn_conv(cin, cout)
        self.bn2 = ConditionalBatchNorm2d(cout, cond_dim, bn_eps)
        self.conv2 = sn_conv(cout, cout)
        self.shortcut = sn_conv(cin, cout, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, c)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """(ReLU-)conv-ReLU-conv(-avgpool) plus a 1x1-conv shortcut where the shape changes; the first
    block skips the leading ReLU (its input is the image) and pools before its shortcut conv."""

    def __init__(self, cin: int, cout: int, downsample: bool, preactivation: bool):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = sn_conv(cin, cout)
        self.conv2 = sn_conv(cout, cout)
        self.shortcut = sn_conv(cin, cout, 1) if cin != cout or downsample else None

    def _down(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self._down(self.conv2(F.relu(self.conv1(h))))
        if self.shortcut is None:
            return h + x
        skip = self._down(self.shortcut(x)) if self.preactivation else self.shortcut(self._down(x))
        return h + skip


class Generator(nn.Module):
    """(z (N, dim_z), y (N,) class ids) -> images (N, out_channels, size, size) in [-1, 1].

    Args:
        num_classes: classes of the shared embedding.
        ch, channel_mult: channels ch * m at each resolution, from `bottom_width` up (one block per step).
        bottom_width: side of the first feature map (4 in the paper; 7 gives 28 px in two blocks).
        dim_z: latent size, split evenly over the len(channel_mult) slots (first linear + each block).
        shared_dim: the shared class embedding's width.
        attention: resolutions after whose block self-attention runs.
        out_channels: image channels.
    """

    def __init__(self, num_classes: int, ch: int = 96, channel_mult: tuple[int, ...] = (16, 16, 8, 4, 2, 1),
                 bottom_width: int = 4, dim_z: int = 120, shared_dim: int = 128, attention: tuple[int, ...] = (64,),
                 out_channels: int = 3, bn_eps: float = 1e-5):
        super().__init__()
        if len(channel_mult) < 2:
            raise ValueError(f"the generator needs at least two channel multipliers (one block), got {list(channel_mult)}")
        slots = len(channel_mult)
        if dim_z % slots:
            raise ValueError(f"dim_z {dim_z} must split evenly into {slots} hierarchical chunks "
                             f"(one per block, plus the first layer)")
        self.dim_z, self.chunk, self.bottom_width = dim_z, dim_z // slots, bottom_width
        resolutions = [bottom_width * 2 ** (i + 1) for i in range(slots - 1)]
        for r in attention:
            if r not in resolutions or r % 2:
                raise ValueError(f"generator attention at {r} px: choose an even one of the block resolutions {resolutions}")
        widths = [ch * m for m in channel_mult]
        cond_dim = shared_dim + self.chunk
        self.shared = _ortho(nn.Embedding(num_classes, shared_dim))
        self.linear = sn(nn.Linear(self.chunk, widths[0] * bottom_width ** 2))
        self.blocks = nn.ModuleList(GBlock(a, b, cond_dim, bn_eps) for a, b in zip(widths, widths[1:]))
        self.attention = nn.ModuleList(SelfAttention(w) if r in attention else nn.Identity()
                                       for w, r in zip(widths[1:], resolutions))
        self.output = nn.Sequential(nn.BatchNorm2d(widths[-1], eps=bn_eps), nn.ReLU(),
                                    sn_conv(widths[-1], out_channels), nn.Tanh())
        self.image_size = resolutions[-1]

    shard_units = (GBlock, SelfAttention)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        zs = z.split(self.chunk, dim=1)
        shared = self.shared(y)
        h = self.linear(zs[0]).view(len(z), -1, self.bottom_width, self.bottom_width)
        for block, attention, chunk in zip(self.blocks, self.attention, zs[1:]):
            h = attention(block(h, torch.cat([shared, chunk], dim=1)))
        return self.output(h)


class Discriminator(nn.Module):
    """(images (N, in_channels, size, size), y (N,)) -> logits (N,), with a projection head.

    Args:
        num_classes: classes of the projection embedding.
        image_size: input side.
        ch, channel_mult: each block's output channels ch * m.
        downsample: per block, whether it halves the resolution (default: all but the last).
        attention: resolutions after whose block self-attention runs.
        in_channels: image channels.
    """

    def __init__(self, num_classes: int, image_size: int = 128, ch: int = 96,
                 channel_mult: tuple[int, ...] = (1, 2, 4, 8, 16, 16), downsample: tuple[bool, ...] | None = None,
                 attention: tuple[int, ...] = (64,), in_channels: int = 3):
        super().__init__()
        downsample = tuple(downsample) if downsample is not None else (True,) * (len(channel_mult) - 1) + (False,)
        if len(downsample) != len(channel_mult):
            raise ValueError(f"discriminator downsample has {len(downsample)} entries for {len(channel_mult)} blocks")
        widths = [in_channels] + [ch * m for m in channel_mult]
        resolutions, r = [], image_size
        for d in downsample:
            r = r // 2 if d else r
            resolutions.append(r)
        for a in attention:
            if a not in resolutions or a % 2:
                raise ValueError(f"discriminator attention at {a} px: choose an even one of the block resolutions "
                                 f"{sorted(set(resolutions), reverse=True)}")
        self.blocks = nn.ModuleList(DBlock(a, b, d, preactivation=i > 0)
                                    for i, (a, b, d) in enumerate(zip(widths, widths[1:], downsample)))
        attended = {resolutions.index(a) for a in attention}  # after the first block at that resolution
        self.attention = nn.ModuleList(SelfAttention(w) if i in attended else nn.Identity()
                                       for i, w in enumerate(widths[1:]))
        self.linear = sn(nn.Linear(widths[-1], 1))
        self.embed = sn(nn.Embedding(num_classes, widths[-1]))

    shard_units = (DBlock, SelfAttention)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = x
        for block, attention in zip(self.blocks, self.attention):
            h = attention(block(h))
        h = F.relu(h).sum((2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


def orthogonal_regularisation(parameters, beta: float) -> Tensor:
    """BigGAN's orthogonal regularisation (section 3.1) at the strength of the paper's code:
    beta / 2 * ||W W^T (.) (1 - I)||_F^2 summed over weights W (each viewed as filters x fan-in).
    It pushes filters towards orthogonality without constraining their norms, unlike Brock et al.
    2017's ||W W^T - I||^2.

    The factor 1/2: BigGAN-PyTorch (`utils.ortho`) adds beta * 2 (W W^T (.) (1 - I)) W straight to
    W's gradient, and since d/dW ||W W^T (.) (1 - I)||_F^2 = 4 (W W^T (.) (1 - I)) W, that is the
    gradient of this penalty. The paper's R_beta(W) = beta ||W^T W (.) (1 - I)||_F^2 (its W^T W is
    the code's W W^T, filters as rows) would pull twice as hard at the same beta (the paper's 1e-4)."""
    total = None
    for w in parameters:
        w = w.flatten(1)
        gram = w @ w.t()
        term = (gram * (1 - torch.eye(len(gram), device=w.device, dtype=w.dtype))).square().sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonal regularisation needs at least one weight matrix")
    return beta / 2 * total


def truncated_normal(shape: tuple[int, ...], threshold: float | None, generator: torch.Generator) -> Tensor:
    """N(0, I) with every entry whose magnitude exceeds `threshold` resampled until none does
    (the truncation trick, section 3.1); None: the plain normal."""
    z = torch.randn(shape, generator=generator)
    if threshold is None:
        return z
    if not threshold > 0 or math.isinf(threshold):
        raise ValueError(f"truncation must be a positive, finite threshold (or null for none), got {threshold}")
    while (outside := z.abs() > threshold).any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
    return z
