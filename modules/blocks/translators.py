"""The image-to-image generators of Pix2Pix and CycleGAN, plain PyTorch.

`UNetGenerator` (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", 2.2.1 and appendix 6.1.1): an encoder C64-C128-C256-C512-C512-C512-C512-C512 (4x4
convolutions of stride 2, LeakyReLU 0.2, no normalisation on the first) and a decoder that mirrors
it, each layer's input the previous layer's output concatenated with the encoder layer of the same
size (the skips that carry the input's structure across the bottleneck). The decoder's first three
layers (CD512-CD1024-CD1024 in the paper's notation, counting the skips) keep dropout 0.5 at
training and test time alike: the paper's only source of noise (G learned to ignore an input z).
kiln places it by position, as the paper describes, also below 256 px where those layers are
narrower; the authors' code puts it on the C512 levels above the bottleneck, which a 32 px U-Net
does not have. Its output goes through tanh. `downs` sets the depth: 8 for 256 px (the bottleneck
is 1x1), 5 for 32 px.

`ResnetGenerator` (Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", appendix 7.2, after Johnson et al. 2016): c7s1-64, d128, d256, nine residual
blocks R256 (six below 256 px), u128, u64, c7s1-3, with reflection padding and instance
normalisation, tanh at the end.

Normalisation follows `kiln.modules.blocks.patchgan.norm_layer`: a convolution followed by batch
norm has no bias, as in the authors' code. With batch norm, what is used at sampling time is the
caller's choice (`train()` uses the batch's statistics, as the paper tests with batch size 1;
`eval()` the running ones): `kiln sample` states which.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.modules.blocks.patchgan import Norm, init_normal, norm_layer


class AlwaysDropout(nn.Dropout):
    """Dropout that stays on in `eval()`: Pix2Pix's noise is part of the generator at test time
    (2.2.1); `kiln sample` draws with it unless the family says otherwise.

    `share` = (rank, ranks): the mask is drawn for the global batch of `ranks` equal shares and
    this rank's rows kept, so that a run over several processes draws the masks one process
    holding the global batch would (the default (0, 1): the batch is the global batch)."""

    share: tuple[int, int] = (0, 1)

    def forward(self, x: Tensor) -> Tensor:
        rank, ranks = self.share
        keep = torch.rand((ranks * len(x), *x.shape[1:]), device=x.device, dtype=x.dtype)[rank * len(x):(rank + 1) * len(x)]
        return x * (keep >= self.p) / (1 - self.p)


class _Skip(nn.Module):
    """One level of the U-Net: down, the levels below, up; its output is [input, up(...)] except at
    the outermost level."""

    def __init__(self, outer: int, inner: int, below: nn.Module | None, norm: Norm, dropout: bool,
                 in_channels: int | None = None, outermost: bool = False):
        super().__init__()
        bias = norm != "batch"
        down = nn.Conv2d(in_channels or outer, inner, 4, 2, 1, bias=bias)
        up_in = inner if below is None else inner * 2
        if outermost:
            up = nn.ConvTranspose2d(up_in, outer, 4, 2, 1)
            layers = [down, below, nn.ReLU(True), up, nn.Tanh()]
        else:  # the innermost has no normalisation on its 1x1 bottleneck
            up = nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=bias)
            inside = [down] if below is None else [down, norm_layer(norm, inner), below]
            layers = [nn.LeakyReLU(0.2, True), *inside, nn.ReLU(True), up, norm_layer(norm, outer)]
            if dropout:
                layers.append(AlwaysDropout(0.5))
        self.outermost = outermost
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UNetGenerator(nn.Module):
    """G(input) -> output in [-1, 1], same size; the input's side must be divisible by 2**downs.

    Args:
        in_channels / out_channels: image channels (3 and 3).
        channels: filters of the outermost layer (64); doubled per level up to 8x.
        downs: levels (8: unet_256; 5: 32 px).
        norm: "batch" (the paper) or "instance".
        dropout: dropout 0.5 in the three decoder layers nearest the bottleneck.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 64, downs: int = 8,
                 norm: Norm = "batch", dropout: bool = True):
        super().__init__()
        if downs < 5:
            raise ValueError(f"a U-Net generator needs downs >= 5 (C64 to C512 and a bottleneck), got {downs}")
        self.downs = downs
        wide = channels * 8
        # (outer, inner) channels of each level below the outermost, the bottleneck first.
        levels = [(wide, wide)] * (downs - 4) + [(channels * 4, wide), (channels * 2, channels * 4), (channels, channels * 2)]
        block = None
        for i, (outer, inner) in enumerate(levels):
            block = _Skip(outer, inner, block, norm, dropout and i < 3)  # the decoder's first three layers
        self.net = _Skip(out_channels, channels, block, norm, False, in_channels=in_channels, outermost=True)
        init_normal(self)

    def forward(self, image: Tensor) -> Tensor:
        side = 2 ** self.downs
        if image.shape[-1] % side or image.shape[-2] % side:
            raise ValueError(f"a {self.downs}-level U-Net needs sides divisible by {side}, got {tuple(image.shape[-2:])}")
        return self.net(image)


class ResidualBlock(nn.Module):
    """x + [reflect-pad, 3x3 conv, norm, ReLU, reflect-pad, 3x3 conv, norm](x): same channels."""

    def __init__(self, channels: int, norm: Norm = "instance"):
        super().__init__()
        bias = norm != "batch"
        self.net = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), norm_layer(norm, channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), norm_layer(norm, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ResnetGenerator(nn.Module):
    """G(input) -> output in [-1, 1], same size (sides divisible by 4).

    Args:
        in_channels / out_channels: image channels.
        channels: filters of c7s1 (64); d128 and d256 double it.
        blocks: residual blocks at the lowest resolution (9: resnet_9blocks; 6 below 256 px).
        norm: "instance" (the paper) or "batch".
    """

    shard_units = (ResidualBlock,)

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 64, blocks: int = 9,
                 norm: Norm = "instance"):
        super().__init__()
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, channels, 7, bias=bias),
                                   norm_layer(norm, channels), nn.ReLU(True)]
        for mult in (1, 2):  # d128, d256
            layers += [nn.Conv2d(channels * mult, channels * mult * 2, 3, 2, 1, bias=bias),
                       norm_layer(norm, channels * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(channels * 4, norm) for _ in range(blocks)]
        for mult in (4, 2):  # u128, u64
            layers += [nn.ConvTranspose2d(channels * mult, channels * mult // 2, 3, 2, 1, output_padding=1, bias=bias),
                       norm_layer(norm, channels * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)
