"""The networks of U-GAT-IT (Kim et al. 2020, "U-GAT-IT: Unsupervised Generative Attentional
Networks with Adaptive Layer-Instance Normalization for Image-to-Image Translation", ICLR), section
2.1, with the sizes and details of the authors' PyTorch code (znxlwm/UGATIT-pytorch,
networks.py), plain PyTorch.

- `Generator` (2.1.1, figure 1): an encoder (c7s1-64, two 3x3 stride-2 down-samplings, instance
  norm and ReLU, reflection padding) and `blocks` residual blocks; the attention module (CAM) whose
  auxiliary classifier eta_s tells the source domain from the target from the global average- and
  max-pooled features, its weights scaling the feature map; an MLP that gives AdaLIN's gamma and
  beta; `blocks` residual blocks with AdaLIN; two nearest-neighbour up-samplings with LIN; c7s1-3
  and tanh. `light=True` is the authors' light version (their code's `--light`): the MLP sees
  the globally average-pooled features instead of the whole flattened map, so its size no longer
  grows with the image's.
- `Discriminator` (2.1.2, figure 1): spectrally normalised 4x4 convolutions with LeakyReLU 0.2 and
  reflection padding, the same CAM (spectrally normalised classifier eta_D), a last convolution to
  one channel: a map of logits. U-GAT-IT trains a global (`layers=7`: five stride-2 convolutions)
  and a local (`layers=5`: three) discriminator per domain; `layers` counts every 4x4 convolution,
  the last included, as the code's `n_layers` does.
- `AdaLIN` (2.1.1) and `LIN`, the per-channel mix rho * instance norm + (1 - rho) *
  layer norm, and `clip_rho`, which keeps every rho in [0, 1] after each generator step.

Sizes at 256 px with the paper's settings (64 channels, 4 residual blocks), equal to those of the
reference classes built from the authors' code: Generator full 278,959,808 parameters (268,435,456
of them in the MLP's first layer, 64 * 64 * 256 -> 256), light 10,589,888; Discriminator global
(`layers=7`, 2048 channels at the CAM) 53,130,176, local (`layers=5`, 512) 3,290,560. At 256 px
the global D's logits are 6x6 and the local D's 30x30; G's heatmap is 64x64.

Details kept from the authors' code, where the paper says nothing: no convolution of G has a bias
except the CAM's 1x1 (instance norm, AdaLIN and LIN follow each one; the last c7s1-3 has none
either); D's convolutions have biases except the last, and D's 1x1 is not spectrally normalised;
the variances in AdaLIN and LIN are the unbiased (Bessel-corrected) ones; AdaLIN's rho starts at
0.9, LIN's at 0 with gamma 1 and beta 0; the MLP's layers and the gamma/beta projections have no
bias; all of AdaLIN's layers share the one gamma and beta; PyTorch's default initialisation. In D
the feature map is scaled by the classifier's raw weights (the spectral norm's `original`), while the
CAM logits use the normalised ones, as the code does (it reads the parameter, `weight_orig`).

One departure: spectral normalisation is PyTorch's parametrisation (as in kiln's BigGAN), not the
older hook the code uses. Parameters and, in eval mode, outputs are the same; in training its one
power iteration per forward updates u before v (the hook v before u), and it starts from 15
iterations at construction, so early estimates of sigma differ slightly until both converge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


def _layer_instance_mix(x: Tensor, rho: Tensor, eps: float) -> Tensor:
    """rho * instance-normalised x + (1 - rho) * layer-normalised x (AdaLIN, 2.1.1, before gamma and
    beta); unbiased variances, as in the authors' code."""
    x_in = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), keepdim=True) + eps)
    x_ln = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(x.var((1, 2, 3), keepdim=True) + eps)
    return rho * x_in + (1 - rho) * x_ln


class AdaLIN(nn.Module):
    """Adaptive layer-instance normalisation (2.1.1): gamma * (rho * IN(x) + (1 - rho) *
    LN(x)) + beta, gamma and beta per sample (N, C) from the generator's MLP, rho a learned
    per-channel parameter (initially 0.9), kept in [0, 1] by `clip_rho`."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), 0.9))

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        return _layer_instance_mix(x, self.rho, self.eps) * gamma[:, :, None, None] + beta[:, :, None, None]


class LIN(nn.Module):
    """Layer-instance normalisation, AdaLIN with learned per-channel gamma (1) and beta (0) instead of
    the MLP's: the up-sampling blocks' normalisation. rho starts at 0 (layer norm)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _layer_instance_mix(x, self.rho, self.eps) * self.gamma + self.beta


def clip_rho(module: nn.Module) -> None:
    """Clamp the rho of every `AdaLIN` and `LIN` inside `module` to [0, 1] in place: the paper (2.1.1)
    bounds rho to [0, 1] at the parameter update, and the authors' code clips it after every
    generator step."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (AdaLIN, LIN)):
                m.rho.clamp_(0.0, 1.0)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    """Reflection padding, then a convolution with none of its own: [pad, conv]."""
    return [nn.ReflectionPad2d((kernel - 1) // 2), nn.Conv2d(cin, cout, kernel, stride, bias=bias)]


class ResidualBlock(nn.Module):
    """x + [pad, 3x3 conv, IN, ReLU, pad, 3x3 conv, IN](x), the encoder's blocks: convolutions without
    bias, instance norm without affine parameters (`kiln.modules.blocks.translators.ResidualBlock`
    keeps the biases, which the authors' code drops)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(*_conv(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
                                 *_conv(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class AdaLINBlock(nn.Module):
    """x + [pad, 3x3 conv, AdaLIN, ReLU, pad, 3x3 conv, AdaLIN](x), the decoder's residual blocks;
    both AdaLINs take the same gamma and beta."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv(channels, channels, 3))
        self.norm1 = AdaLIN(channels)
        self.conv2 = nn.Sequential(*_conv(channels, channels, 3))
        self.norm2 = AdaLIN(channels)

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x), gamma, beta))
        return x + self.norm2(self.conv2(h), gamma, beta)


def _raw_weight(linear: nn.Linear) -> Tensor:
    """The layer's weight parameter: under spectral normalisation the unnormalised `original`."""
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


class ClassActivation(nn.Module):
    """The attention module of G and D (2.1.1, 2.1.2), after CAM (Zhou et al. 2016).

    An auxiliary classifier, one bias-free linear layer on the global average-pooled and one on the
    global max-pooled features, gives two logits (N, 2) (source vs target domain in G, real vs fake
    in D). The feature map scaled channel-wise by each classifier's weights, the two concatenated,
    a 1x1 convolution back to `channels` and the activation give the attended features; their sum
    over channels is the attention heatmap (N, 1, h, w).
    """

    def __init__(self, channels: int, activation: nn.Module, spectral: bool = False):
        super().__init__()
        wrap = spectral_norm if spectral else (lambda m: m)
        self.gap_fc = wrap(nn.Linear(channels, 1, bias=False))
        self.gmp_fc = wrap(nn.Linear(channels, 1, bias=False))
        self.conv1x1 = nn.Conv2d(channels * 2, channels, 1)
        self.activation = activation

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gap_logit = self.gap_fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        gmp_logit = self.gmp_fc(F.adaptive_max_pool2d(x, 1).flatten(1))
        gap = x * _raw_weight(self.gap_fc)[:, :, None, None]
        gmp = x * _raw_weight(self.gmp_fc)[:, :, None, None]
        x = self.activation(self.conv1x1(torch.cat([gap, gmp], 1)))
        return x, torch.cat([gap_logit, gmp_logit], 1), x.sum(1, keepdim=True)


class Generator(nn.Module):
    """G(image) -> (image in [-1, 1] of the same size, CAM logits (N, 2), heatmap (N, 1, H/4, W/4)).

    Args:
        in_channels / out_channels: image channels (3 and 3).
        channels: filters of the first convolution (64); the down-samplings double it twice.
        blocks: residual blocks in the encoder and AdaLIN blocks in the decoder, each (4).
        image_size: the side of the (square) images; the full version's MLP is sized for it, and the
            light one accepts any side divisible by 4.
        light: the authors' light version: the MLP sees the pooled features.
    """

    shard_units = (ResidualBlock, AdaLINBlock)

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 64, blocks: int = 4,
                 image_size: int = 256, light: bool = False):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"U-GAT-IT's generator down-samples twice: image_size must be divisible by 4, "
                             f"got {image_size}")
        wide = channels * 4
        self.image_size, self.light = image_size, light
        encoder = [*_conv(in_channels, channels, 7), nn.InstanceNorm2d(channels), nn.ReLU(True)]
        for mult in (1, 2):
            encoder += [*_conv(channels * mult, channels * mult * 2, 3, 2), nn.InstanceNorm2d(channels * mult * 2),
                        nn.ReLU(True)]
        self.encoder = nn.Sequential(*encoder, *(ResidualBlock(wide) for _ in range(blocks)))
        self.cam = ClassActivation(wide, nn.ReLU(True))
        mlp_in = wide if light else (image_size // 4) ** 2 * wide
        self.mlp = nn.Sequential(nn.Linear(mlp_in, wide, bias=False), nn.ReLU(True),
                                 nn.Linear(wide, wide, bias=False), nn.ReLU(True))
        self.gamma = nn.Linear(wide, wide, bias=False)
        self.beta = nn.Linear(wide, wide, bias=False)
        self.bottleneck = nn.ModuleList(AdaLINBlock(wide) for _ in range(blocks))
        decoder: list[nn.Module] = []
        for mult in (4, 2):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), *_conv(channels * mult, channels * mult // 2, 3),
                        LIN(channels * mult // 2), nn.ReLU(True)]
        self.decoder = nn.Sequential(*decoder, *_conv(channels, out_channels, 7), nn.Tanh())

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if image.shape[-1] % 4 or image.shape[-2] % 4:
            raise ValueError(f"U-GAT-IT's generator needs sides divisible by 4, got {tuple(image.shape[-2:])}")
        if not self.light and tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the full generator's MLP is sized for {self.image_size} px images, got "
                             f"{tuple(image.shape[-2:])}; build it with that image_size or use light=True")
        x, cam_logit, heatmap = self.cam(self.encoder(image))
        style = F.adaptive_avg_pool2d(x, 1) if self.light else x
        style = self.mlp(style.flatten(1))
        gamma, beta = self.gamma(style), self.beta(style)
        for block in self.bottleneck:
            x = block(x, gamma, beta)
        return self.decoder(x), cam_logit, heatmap


class Discriminator(nn.Module):
    """D(image) -> (logits map (N, 1, H', W'), CAM logits (N, 2), heatmap (N, 1, h, w)).

    Args:
        in_channels: image channels (3).
        channels: filters of the first convolution (64), doubled by each convolution after it.
        layers: 4x4 convolutions in all (>= 3): `layers - 2` of stride 2, one of stride 1 before the
            CAM and the last one after it; 7 is the global D (2048 channels at the CAM, 6x6 logits at
            256 px), 5 the local D (512 channels, 30x30 logits).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 5):
        super().__init__()
        if layers < 3:
            raise ValueError(f"U-GAT-IT's discriminator needs layers >= 3, got {layers}")
        widths = [in_channels] + [channels * 2 ** i for i in range(layers - 1)]
        body: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 2 if i < layers - 2 else 1
            pad, conv = _conv(cin, cout, 4, stride, bias=True)
            body += [pad, spectral_norm(conv), nn.LeakyReLU(0.2, True)]
        self.body = nn.Sequential(*body)
        self.cam = ClassActivation(widths[-1], nn.LeakyReLU(0.2, True), spectral=True)
        pad, conv = _conv(widths[-1], 1, 4)
        self.head = nn.Sequential(pad, spectral_norm(conv))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, cam_logit, heatmap = self.cam(self.body(image))
        return self.head(x), cam_logit, heatmap
