"""The PatchGAN discriminator of Pix2Pix and CycleGAN (Isola et al. 2017, "Image-to-Image
Translation with Conditional Adversarial Networks", 2.2.2 and appendix 6.1.2): a stack of 4x4
convolutions whose output is a map of logits, one per overlapping patch of the input, so that D
judges local texture and leaves the low frequencies to the L1 (Pix2Pix) or cycle (CycleGAN) loss.

The paper's 70x70 discriminator is C64-C128-C256-C512 (Ck: 4x4 convolution with k filters,
normalisation, LeakyReLU 0.2), then a convolution to one channel; the first C64 has no
normalisation, the first three convolutions have stride 2 and the last two stride 1, with padding 1.
`layers` strided convolutions (3 for 70x70) set the patch size: 1 -> 16x16, 3 -> 70x70, 5 -> 286x286
(`receptive_field`). A convolution followed by batch normalisation has no bias (its mean is
removed); with instance normalisation (CycleGAN) neither has affine parameters, as in the authors'
code. The output is logits: the losses in `kiln.modules.blocks.adversarial` take the sigmoid or
the squares themselves.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Norm = Literal["batch", "instance", "none"]


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    """Batch norm (Pix2Pix), instance norm without affine parameters (CycleGAN), or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; choose 'batch', 'instance' or 'none'")


def init_normal(module: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases, batch-norm gains N(1, 0.02): the initialisation of the
    Pix2Pix paper (appendix 6.2) and CycleGAN's code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class PatchGAN(nn.Module):
    """D(image) -> (N, 1, H', W') logits, one per patch.

    Args:
        in_channels: channels of what D sees (Pix2Pix: input and output concatenated, 3 + 3).
        channels: filters of the first convolution (64); doubled each layer up to 8x.
        layers: strided convolutions after the first (3: the 70x70 PatchGAN).
        norm: "batch", "instance" or "none".
    """

    def __init__(self, in_channels: int = 6, channels: int = 64, layers: int = 3, norm: Norm = "batch"):
        super().__init__()
        if layers < 0:
            raise ValueError(f"PatchGAN needs layers >= 0, got {layers}")
        bias = norm != "batch"
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1  # the last C-layer keeps the size (C512 in the 70x70 D)
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=bias), norm_layer(norm, out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.layers = layers
        init_normal(self)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    @property
    def receptive_field(self) -> int:
        """The side of the input patch one output logit sees: 70 for layers=3."""
        strides = [2] * self.layers + [1, 1] if self.layers else [2, 1]
        size = 1
        for stride in reversed(strides):
            size = (size - 1) * stride + 4
        return size
