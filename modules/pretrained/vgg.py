"""VGG16's convolutional trunk (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks
for Large-Scale Image Recognition"): 13 3x3 convolutions in 5 stages, a ReLU after each, 2x2
max-pools between the stages (no pool5: nothing here reads past relu5_3).

`forward` returns the activations it is asked for by name, so one trunk serves HED's side
outputs (the last ReLU of each stage, the default), perceptual losses (Johnson et al. 2016:
relu1_2 .. relu4_3) and Deep Image Analogy (Liao et al. 2017: relu1_1 .. relu5_1). Inputs are
Caffe-style (BGR, 0-255, mean subtracted: `caffe_input`), as the trained weights that ship
offline, HED's (`kiln.modules.pretrained.hed.load_hed(...).vgg`), expect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = (2, 2, 3, 3, 3)  # convolutions per stage
WIDTHS = (64, 128, 256, 512, 512)
LAYERS = tuple(f"{kind}{s}_{i}" for s, n in enumerate(DEPTHS, 1) for i in range(1, n + 1) for kind in ("conv", "relu"))
STAGE_OUTPUTS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# The per-channel means the Caffe VGG (and so HED) was trained with, BGR order, 0-255 scale.
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)


def caffe_input(images: torch.Tensor) -> torch.Tensor:
    """RGB images in [0, 1], (B, 3, H, W) -> BGR in 0-255 minus `CAFFE_MEAN_BGR`."""
    mean = images.new_tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    return images.flip(1) * 255.0 - mean


class VGG16(nn.Module):
    """Convolutions named as in the paper's Caffe model: `conv1_1` .. `conv5_3`."""

    def __init__(self):
        super().__init__()
        channels = 3
        for stage, (depth, width) in enumerate(zip(DEPTHS, WIDTHS), 1):
            for i in range(1, depth + 1):
                self.add_module(f"conv{stage}_{i}", nn.Conv2d(channels, width, 3, padding=1))
                channels = width
        # ceil_mode: an odd last row or column is pooled alone, as Keras' padding="same" does.
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)

    def forward(self, x: torch.Tensor, layers: tuple[str, ...] | list[str] = STAGE_OUTPUTS) -> list[torch.Tensor]:
        """The activations named in `layers` ("conv3_1" before its ReLU, "relu3_1" after), in
        that order; the trunk stops after the deepest one."""
        unknown = [name for name in layers if name not in LAYERS]
        if unknown or not layers:
            raise ValueError(f"unknown VGG16 layers {unknown}; choose from {', '.join(LAYERS)}")
        wanted, found = set(layers), {}
        for stage, depth in enumerate(DEPTHS, 1):
            if stage > 1:
                x = self.pool(x)
            for i in range(1, depth + 1):
                x = getattr(self, f"conv{stage}_{i}")(x)
                if f"conv{stage}_{i}" in wanted:
                    found[f"conv{stage}_{i}"] = x
                x = F.relu(x)
                if f"relu{stage}_{i}" in wanted:
                    found[f"relu{stage}_{i}"] = x
                if len(found) == len(wanted):
                    return [found[name] for name in layers]
        raise AssertionError("unreachable: every layer name was checked")
