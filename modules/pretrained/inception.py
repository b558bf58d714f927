"""The InceptionV3 behind published FIDs (Heusel et al. 2017; network: Szegedy et al. 2016,
"Rethinking the Inception Architecture"): the TF graph of 2015-12-05 that the original FID code
used, as ported to PyTorch by pytorch-fid, so kiln's FIDs are the numbers papers report.

The port is torchvision's Inception3 layout (and state-dict key names) with the graph's quirks:
the average pools of the A, C and E blocks leave the padding out of the mean, the last E block
(Mixed_7c) max-pools in its pool branch, and BatchNorm eps is 0.001. The features are pool3, the
2048-d global average after Mixed_7c. Written here rather than imported because torchvision is
not a kiln dependency and pytorch-fid's network downloads its weights when built.
"""
from __future__ import annotations

import io
import pickle

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from kiln.modules.pretrained.extractors import _rgb

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the TF graph's SAME average


def _row_col(cin: int, cout: int, k: int, row_first: bool) -> BasicConv2d:
    """A 1xk (row) or kx1 (column) convolution, padded to keep the size."""
    return BasicConv2d(cin, cout, (1, k) if row_first else (k, 1), padding=(0, k // 2) if row_first else (k // 2, 0))


class InceptionA(nn.Module):  # Mixed_5b-5d, 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_pool_branch(x, "avg"))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e, 17x17, factorised 7x7
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c, 1)
        self.branch7x7_2 = _row_col(c, c, 7, row_first=True)
        self.branch7x7_3 = _row_col(c, 192, 7, row_first=False)
        self.branch7x7dbl_1 = BasicConv2d(cin, c, 1)
        self.branch7x7dbl_2 = _row_col(c, c, 7, row_first=False)
        self.branch7x7dbl_3 = _row_col(c, c, 7, row_first=True)
        self.branch7x7dbl_4 = _row_col(c, c, 7, row_first=False)
        self.branch7x7dbl_5 = _row_col(c, 192, 7, row_first=True)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_pool_branch(x, "avg"))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = _row_col(192, 192, 7, row_first=True)
        self.branch7x7x3_3 = _row_col(192, 192, 7, row_first=False)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b-7c, 8x8, split 3x3s
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = _row_col(384, 384, 3, row_first=True)
        self.branch3x3_2b = _row_col(384, 384, 3, row_first=False)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _row_col(384, 384, 3, row_first=True)
        self.branch3x3dbl_3b = _row_col(384, 384, 3, row_first=False)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                          self.branch_pool(_pool_branch(x, self.pool))], 1)


class FIDInception(nn.Module):
    """The network itself, attribute names as in the weights file; `forward` returns pool3."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # The 1008-way classifier (1000 ImageNet classes plus 8 unused) is not on the path to
        # pool3; it is kept so the file's keys load strictly.
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def _check_state(state, expected: dict[str, torch.Tensor], weights: str) -> dict[str, torch.Tensor]:
    """The file's tensors for `expected`, or a one-line ValueError naming the first key that differs."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{weights} is not an FID InceptionV3 state dict: {why}")

    if not isinstance(state, dict):
        raise bad(f"it holds a {type(state).__name__}, not a dict of tensors")
    # A torchvision Inception3 saved with its auxiliary classifier carries AuxLogits.*, which
    # pool3 never uses; num_batches_tracked is absent from files saved before torch 0.4.1.
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    for key, tensor in expected.items():
        if key not in state:
            if key.endswith(".num_batches_tracked"):
                continue
            raise bad(f"{key} is missing")
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise bad(f"{key} is a {type(value).__name__}, not a tensor")
        if value.shape != tensor.shape:
            raise bad(f"{key} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
    for key in state:
        if key not in expected:
            raise bad(f"unexpected key {key}")
    return {k: state.get(k, v) for k, v in expected.items()}


class InceptionV3FID(nn.Module):
    """FID InceptionV3 pool3 features. Inputs in [-1, 1] (the network's own convention), any
    size, resized to 299x299 bilinearly as pytorch-fid does.

    Args:
        weights: path or fsspec URL of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.
    """

    name = "inception-v3-fid"
    num_features = 2048

    def __init__(self, weights: str):
        super().__init__()
        if weights is None:
            raise ValueError(f"inception-v3-fid needs its weights file, {WEIGHTS_FILE} from the pytorch-fid "
                             "project's releases (--extractor-weights PATH or URL)")
        try:
            with fsspec.open(weights, "rb") as f:
                data = f.read()  # whole, since torch.load seeks and an HTTP stream may not
        except FileNotFoundError:
            raise FileNotFoundError(f"feature extractor weights not found: {weights}") from None
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # garbage makes torch.load raise nearly anything (KeyError, EOFError, ...)
            if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
                why = "it pickles objects other than tensors (save the module's state_dict())"
            elif isinstance(e, pickle.UnpicklingError):
                why = "torch.load cannot read it (not a file torch.save wrote)"
            else:
                message = str(e).strip().splitlines()
                why = f"torch.load cannot read it ({': '.join([type(e).__name__] + message[:1])})"
            raise ValueError(f"{weights} is not an FID InceptionV3 state dict: {why}") from None
        self.net = FIDInception()
        self.net.load_state_dict(_check_state(state, self.net.state_dict(), weights))
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always the frozen, eval-mode network
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _rgb(images)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).float()
