"""Pix2Pix's networks (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks"): the U-Net generator (`kiln.modules.blocks.translators.UNetGenerator`) and a conditional
PatchGAN, which judges the input and an output side by side, concatenated along the channels
(2.2.2: D sees the pair, so it learns whether the output fits its input, not only whether it looks
real).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.modules.blocks.adversarial import GANPair
from kiln.modules.blocks.patchgan import Norm, PatchGAN


class PairDiscriminator(nn.Module):
    """D(image, input) -> a map of logits, one per 70x70 patch (at `layers` 3) of the pair."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 64, layers: int = 3,
                 norm: Norm = "batch"):
        super().__init__()
        self.patchgan = PatchGAN(in_channels + out_channels, channels, layers, norm)

    def forward(self, image: Tensor, condition: Tensor) -> Tensor:
        return self.patchgan(torch.cat([condition, image], 1))


class ConditionalPair(GANPair):
    """G and D of a conditional translator; `forward` (`kiln plan`'s one pass) is D(G(x), x)."""

    def forward(self, inputs: Tensor) -> Tensor:
        return self.discriminator(self.generator(inputs), inputs)
