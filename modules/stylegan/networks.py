"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"),
config-f's networks:

- Mapping: z normalised by its second moment, 8 fully connected layers with leaky ReLU and a
  learning-rate multiplier of 0.01, -> w; `w_avg`, a running mean of w, for truncation.
- Synthesis: a learned constant 4x4 input; per resolution an up-sampling modulated 3x3 conv and a
  second one (weights scaled per input channel by a style from w, then demodulated to unit output
  variance: section 2.2), each followed by per-pixel noise scaled by one learned strength per layer
  (the paper's code; StyleGAN's, Karras et al. 2019, had one per channel), a bias and leaky ReLU;
  "skip" outputs: a toRGB (modulated 1x1, not demodulated) at every resolution, summed into an
  up-sampled image (section 4.1). w is broadcast to one copy per layer
  (`num_ws`), so style mixing and W+ projection can give layers different ones.
- Discriminator: "residual" (section 4.1): fromRGB at the input resolution, per resolution two
  3x3 convs with a down-sampled 1x1 shortcut, summed and scaled by 1/sqrt(2); at 4x4 the
  minibatch standard deviation (Karras et al. 2018) as one more channel, a conv, two FC layers.
- Equalised learning rate everywhere (Karras et al. 2018): weights drawn N(0, 1) / lr_mul and
  scaled at run time by lr_mul / sqrt(fan_in), biases by lr_mul; activations scaled by sqrt(2).

Resampling is the paper's code's (`kiln.modules.blocks.fir`, the [1, 3, 3, 1] filter): G's
up-sampling conv is a stride-2 transposed conv followed by the filter (gain 4), the skip image is
up-sampled by zero insertion and the filter; D's down-sampling convs filter first and then stride
2 (a 3x3 conv filters with 2 pixels of padding, a 1x1 one downsamples before it convolves).
Channels follow the paper's code: min(channel_base / resolution, channel_max).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.modules.blocks.fir import BINOMIAL, upfirdn2d, upsample2d

ACT_GAIN = math.sqrt(2)  # keeps leaky ReLU's output variance near its input's


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


def _init_normal(shape: tuple[int, ...], scale: float) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    if not p.is_meta:
        nn.init.normal_(p, std=scale)
    return p


class EqualLinear(nn.Module):
    """A fully connected layer with equalised learning rate (and `lr_mul` for the mapping network)."""

    def __init__(self, cin: int, cout: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = _init_normal((cout, cin), 1 / lr_mul)
        self.bias = nn.Parameter(torch.full((cout,), bias_init / lr_mul))
        self.weight_gain, self.lr_mul, self.activate = lr_mul / math.sqrt(cin), lr_mul, activate

    def forward(self, x: Tensor) -> Tensor:
        gain = ACT_GAIN if self.activate else 1.0  # lrelu(a) * g = lrelu(a * g): the gain rides on the weights
        x = F.linear(x, self.weight * (self.weight_gain * gain), self.bias * (self.lr_mul * gain))
        return F.leaky_relu(x, 0.2, inplace=True) if self.activate else x


class EqualConv2d(nn.Module):
    """A convolution with equalised learning rate; `down` halves the resolution, the FIR filter first."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True, activate: bool = True, down: bool = False,
                 taps: Sequence[float] = BINOMIAL):
        super().__init__()
        self.weight = _init_normal((cout, cin, kernel, kernel), 1.0)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain, self.activate, self.down = 1 / math.sqrt(cin * kernel * kernel), activate, down
        self.taps = tuple(taps)

    def forward(self, x: Tensor) -> Tensor:
        gain = ACT_GAIN if self.activate else 1.0
        bias = None if self.bias is None else self.bias * gain
        weight, k = self.weight * (self.weight_gain * gain), self.weight.shape[-1]
        if not self.down:
            x = F.conv2d(x, weight, bias, padding=k // 2)
        elif k == 1:  # a 1x1 conv commutes with the filter: filter only the samples it keeps
            x = F.conv2d(upfirdn2d(x, self.taps, down=2, padding=(len(self.taps) - 2) // 2), weight, bias)
        else:  # the conv's own padding and the filter's, applied once before both
            x = F.conv2d(upfirdn2d(x, self.taps, padding=k // 2 + (len(self.taps) - 2) // 2), weight, bias, stride=2)
        return F.leaky_relu(x, 0.2, inplace=True) if self.activate else x


def _conv(x: Tensor, weight: Tensor, groups: int, up: bool, taps: Sequence[float] = BINOMIAL) -> Tensor:
    """A same-size conv, or (up) the paper's code's 2x up-sampling conv: the weights scattered at
    stride 2 by a transposed conv, then the FIR filter with gain 4 and the padding that leaves
    exactly 2H x 2W."""
    k = weight.shape[-1]
    if not up:
        return F.conv2d(x, weight, padding=k // 2, groups=groups)
    o, i = weight.shape[:2]
    weight = weight.reshape(groups, o // groups, i, k, k).transpose(1, 2).reshape(groups * i, o // groups, k, k)
    x = F.conv_transpose2d(x, weight, stride=2, groups=groups)  # (2H + k - 2) x (2W + k - 2)
    pad = k // 2 + (len(taps) + 1) // 2 - (k - 1)
    return upfirdn2d(x, taps, padding=pad, gain=4.0)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, grouped: bool = True,
                     gain: float = 1.0, up: bool = False, taps: Sequence[float] = BINOMIAL) -> Tensor:
    """Section 2.2: w'_ijk = s_i w_ijk, then (demodulate) w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps);
    the output times `gain`. x (N, I, H, W), weight (O, I, k, k), styles (N, I); `up`: the output
    is 2H x 2W (see `_conv`), resampled with the filter `taps`.

    grouped: one grouped convolution with a group per sample and its own modulated weights (the
    paper's implementation). Otherwise the same function as a plain batched convolution of the
    input scaled by the styles, its output scaled by the demodulation coefficients, which is
    several times faster to train on CPUs (the paper's code also trains this way)."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    if not grouped:
        if not demodulate:
            return _conv(x * (styles * gain)[:, :, None, None], weight, 1, up, taps)
        out = _conv(x * styles[:, :, None, None], weight, 1, up, taps)
        # sum_ik (s_i w_oik)^2 = sum_i s_i^2 sum_k w_oik^2: no (N, O, I, k, k) tensor
        d = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8) * gain
        return out * d[:, :, None, None]
    weight = weight[None] * (styles * gain)[:, None, :, None, None]  # (N, O, I, k, k)
    if demodulate:
        weight = weight * (torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8) * gain)
    out = _conv(x.reshape(1, n * cin, h, w), weight.reshape(n * cout, cin, kh, kw), n, up, taps)
    return out.view(n, cout, *out.shape[2:])


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally up-sampling 2x), noise, bias, leaky ReLU."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, up: bool = False,
                 taps: Sequence[float] = BINOMIAL):
        super().__init__()
        self.taps = tuple(taps)
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)  # styles start at 1: plain convs at init
        self.weight = _init_normal((cout, cin, 3, 3), 1.0)
        self.bias = nn.Parameter(torch.zeros(cout))
        # learned from 0; one element, not 0-d, because FSDP2 shards every parameter along dim 0
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))  # the "const" noise
        self.weight_gain, self.up, self.resolution = 1 / math.sqrt(cin * 9), up, resolution

    def forward(self, x: Tensor, w: Tensor, noise: Tensor | str = "random") -> Tensor:
        """`noise`: "random" (fresh per call), "const" (this layer's fixed map), "none", or a (N, 1, H, W) tensor."""
        if isinstance(noise, str) and noise not in ("random", "const", "none"):
            raise ValueError(f"unknown noise mode {noise!r}; choose 'random', 'const' or 'none'")
        # lrelu(a) * g = lrelu(a * g): the activation gain scales the conv, noise and bias; the
        # conv's output is a fresh tensor no backward needs, so noise, bias and activation update it in place
        x = modulated_conv2d(x, self.weight * self.weight_gain, self.affine(w), grouped=not self.training, gain=ACT_GAIN,
                             up=self.up, taps=self.taps)
        strength = self.noise_strength * ACT_GAIN
        if isinstance(noise, Tensor):
            x = x.addcmul_(noise, strength)
        elif noise == "random":
            x = x.addcmul_(torch.randn(len(x), 1, *x.shape[2:], device=x.device, dtype=x.dtype), strength)
        elif noise == "const":
            x = x.addcmul_(self.noise_const, strength)
        return F.leaky_relu(x.add_((self.bias * ACT_GAIN)[:, None, None]), 0.2, inplace=True)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, not demodulated (section 2.2), plus a bias."""

    def __init__(self, cin: int, channels: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, bias_init=1.0)
        self.weight = _init_normal((channels, cin, 1, 1), 1.0)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.weight_gain = 1 / math.sqrt(cin)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(x, self.weight, styles, demodulate=False, grouped=not self.training) + self.bias[None, :, None, None]


class SynthesisBlock(nn.Module):
    """One resolution: (the constant at 4x4 | up-sampling conv), conv, toRGB added to the up-sampled image.
    Uses 2 ws at 4x4 (conv, toRGB) and 3 above (conv0, conv1, toRGB)."""

    def __init__(self, cin: int, cout: int, w_dim: int, resolution: int, channels: int,
                 taps: Sequence[float] = BINOMIAL):
        super().__init__()
        self.resolution, self.taps = resolution, tuple(taps)
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(cout, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(cin, cout, w_dim, resolution, up=True, taps=taps)
        self.conv1 = SynthesisLayer(cout, cout, w_dim, resolution)
        self.torgb = ToRGB(cout, channels, w_dim)
        self.num_ws = 2 if self.conv0 is None else 3

    def forward(self, x: Tensor | None, image: Tensor | None, ws: Tensor, noise: list) -> tuple[Tensor, Tensor]:
        """ws (N, num_ws, w_dim); noise: one entry per conv layer (see `SynthesisLayer`)."""
        if self.conv0 is None:
            # channels-last activations from here on (convolutions keep their input's layout): the
            # CPU's convolution, resampling and pooling kernels run 1.3-4x faster on them than on NCHW
            x = self.const[None].expand(len(ws), -1, -1, -1).contiguous(memory_format=torch.channels_last)
            x = self.conv1(x, ws[:, 0], noise[0])
        else:
            x = self.conv0(x, ws[:, 0], noise[0])
            x = self.conv1(x, ws[:, 1], noise[1])
        rgb = self.torgb(x, ws[:, -1])
        if image is not None:
            image = upsample2d(image, self.taps)
        return x, rgb if image is None else image + rgb


class MappingNetwork(nn.Module):
    """z -> w: second-moment normalisation, `layers` FC layers at `lr_mul`; tracks `w_avg`."""

    def __init__(self, z_dim: int = 512, w_dim: int = 512, layers: int = 8, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.layers = nn.Sequential(*(EqualLinear(a, b, lr_mul=lr_mul, activate=True) for a, b in zip(dims, dims[1:])))
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = w_avg_beta

    def forward(self, z: Tensor, psi: float = 1.0, update_w_avg: bool = False) -> Tensor:
        """(N, z_dim) -> (N, w_dim); psi < 1 pulls w towards `w_avg` (the truncation trick)."""
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        w = self.layers(z)
        if update_w_avg:
            self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if psi != 1:
            w = self.w_avg.lerp(w, psi)
        return w


class Generator(nn.Module):
    """z (N, z_dim) -> images (N, channels, resolution, resolution), roughly in [-1, 1].

    Args:
        resolution: output side, a power of two >= 4.
        channels: image channels.
        z_dim / w_dim: latent and intermediate latent widths.
        mapping_layers / mapping_lr_mul: the mapping network.
        channel_base / channel_max: channels at resolution r are min(channel_base / r, channel_max).
        resample_filter: the FIR filter's taps (`kiln.modules.blocks.fir`); the paper's
            [1, 3, 3, 1], or [1, 1] for nearest-neighbour up-sampling (the paper's code takes the same argument).
    """

    def __init__(self, resolution: int = 1024, channels: int = 3, z_dim: int = 512, w_dim: int = 512,
                 mapping_layers: int = 8, mapping_lr_mul: float = 0.01, channel_base: int = 32768,
                 channel_max: int = 512, w_avg_beta: float = 0.995, resample_filter: Sequence[float] = BINOMIAL):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"StyleGAN2 resolution must be a power of two >= 4, got {resolution}")
        self.resolution, self.z_dim, self.w_dim = resolution, z_dim, w_dim
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, mapping_lr_mul, w_avg_beta)
        resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        self.blocks = nn.ModuleList()
        cin = 0
        for r in resolutions:
            cout = channels_at(r, channel_base, channel_max)
            self.blocks.append(SynthesisBlock(cin, cout, w_dim, r, channels, resample_filter))
            cin = cout
        # toRGB shares its w with the next block's first conv, so num_ws = 2 * log2(resolution) - 2
        self.num_ws = 2 * len(resolutions)

    shard_units = (SynthesisBlock, MappingNetwork)

    def noise_layers(self) -> list[SynthesisLayer]:
        return [layer for b in self.blocks for layer in (b.conv0, b.conv1) if layer is not None]

    def mapping_ws(self, z: Tensor, psi: float = 1.0, update_w_avg: bool = False) -> Tensor:
        """(N, num_ws, w_dim): w broadcast to every layer."""
        return self.mapping(z, psi, update_w_avg)[:, None].expand(-1, self.num_ws, -1)

    def synthesis(self, ws: Tensor, noise: str | list[Tensor] = "random") -> Tensor:
        """ws (N, num_ws, w_dim) -> images; `noise` a mode for every layer or one tensor per layer."""
        if ws.shape[1] != self.num_ws:
            raise ValueError(f"this generator takes {self.num_ws} ws per image, got {ws.shape[1]}")
        layers = self.noise_layers()
        noises = list(noise) if not isinstance(noise, str) else [noise] * len(layers)
        if len(noises) != len(layers):
            raise ValueError(f"this generator has {len(layers)} noise inputs, got {len(noises)}")
        x = image = None
        i = 0  # first w of the block; each block's toRGB w is the next block's first
        for block in self.blocks:
            used = block.num_ws - 1
            x, image = block(x, image, ws[:, i:i + block.num_ws], noises[:used])
            noises, i = noises[used:], i + block.num_ws - 1
        return image

    def forward(self, z: Tensor, psi: float = 1.0, noise: str | list[Tensor] = "random") -> Tensor:
        return self.synthesis(self.mapping_ws(z, psi), noise)


class DiscriminatorBlock(nn.Module):
    """Residual: (conv3x3, conv3x3 down) + 1x1 down shortcut, times 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, taps: Sequence[float] = BINOMIAL):
        super().__init__()
        self.conv0 = EqualConv2d(cin, cin, 3)
        self.conv1 = EqualConv2d(cin, cout, 3, down=True, taps=taps)
        self.skip = EqualConv2d(cin, cout, 1, bias=False, activate=False, down=True, taps=taps)

    def forward(self, x: Tensor) -> Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


def minibatch_stddev(x: Tensor, group_size: int) -> Tensor:
    """One more channel: the standard deviation over groups of `group_size` consecutive samples,
    averaged over features and pixels. Groups are consecutive so that a batch of reals followed
    by fakes (one D pass in kiln's Dmain) never mixes the two when each half divides evenly."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    while n % g:
        g -= 1
    y = x.view(n // g, g, c, h, w)
    y = (y - y.mean(1, keepdim=True)).square().mean(1).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (n / g,)
    y = y.repeat_interleave(g).view(n, 1, 1, 1).expand(-1, 1, h, w)
    return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4: minibatch stddev, conv, FC, FC -> one logit."""

    def __init__(self, cin: int, mbstd_group: int = 4):
        super().__init__()
        self.mbstd_group = mbstd_group
        self.conv = EqualConv2d(cin + 1, cin, 3)
        self.fc = EqualLinear(cin * 16, cin, activate=True)
        self.out = EqualLinear(cin, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(minibatch_stddev(x, self.mbstd_group))
        return self.out(self.fc(x.flatten(1))).squeeze(1)


class Discriminator(nn.Module):
    """images (N, channels, resolution, resolution) -> logits (N,); the residual architecture.

    Args: as `Generator` (channel_base / channel_max for D's widths; resample_filter [1, 1]: 2x2
    average pooling), and `mbstd_group`.
    """

    def __init__(self, resolution: int = 1024, channels: int = 3, channel_base: int = 32768, channel_max: int = 512,
                 mbstd_group: int = 4, resample_filter: Sequence[float] = BINOMIAL):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"StyleGAN2 resolution must be a power of two >= 4, got {resolution}")
        ch = [channels_at(2 ** i, channel_base, channel_max) for i in range(int(math.log2(resolution)), 1, -1)]
        self.fromrgb = EqualConv2d(channels, ch[0], 1)
        self.blocks = nn.ModuleList(DiscriminatorBlock(a, b, resample_filter) for a, b in zip(ch, ch[1:]))
        self.epilogue = DiscriminatorEpilogue(ch[-1], mbstd_group)

    shard_units = (DiscriminatorBlock, DiscriminatorEpilogue)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fromrgb(x).contiguous(memory_format=torch.channels_last)  # as SynthesisBlock (4x4)
        for block in self.blocks:
            x = block(x)
        return self.epilogue(x)
