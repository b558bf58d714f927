"""The pieces of adversarial training that are plain PyTorch, shared by kiln's GAN families: the
hinge, non-saturating and least-squares losses, the R1 penalty, the lazy-regularisation
rescaling of an optimiser's settings (StyleGAN2, appendix B), and `GANPair`, the two networks. The phases that
train them live in `kiln.modules.gan.lit_module.AdversarialModule`.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GanLoss = Literal["hinge", "non_saturating", "least_squares"]
GAN_LOSSES = ("hinge", "non_saturating", "least_squares")


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: GanLoss) -> Tensor:
    """Hinge (Lim & Ye 2017; BigGAN): relu(1 - D(x)) + relu(1 + D(G(z))); non-saturating
    (Goodfellow et al. 2014; StyleGAN, and Pix2Pix's "vanilla" cross-entropy): softplus(-D(x)) +
    softplus(D(G(z))); least squares (Mao et al. 2017, LSGAN, with a = 0, b = c = 1; CycleGAN):
    (D(x) - 1)^2 + D(G(z))^2. Logits of any shape (a PatchGAN's map) are averaged over every
    element."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "non_saturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    check_gan_loss(kind)
    return (real_logits - 1).square().mean() + fake_logits.square().mean()


def generator_loss(fake_logits: Tensor, kind: GanLoss) -> Tensor:
    """Hinge: -D(G(z)); non-saturating: softplus(-D(G(z))); least squares: (D(G(z)) - 1)^2."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    check_gan_loss(kind)
    return (fake_logits - 1).square().mean()


def check_gan_loss(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {', '.join(map(repr, GAN_LOSSES))}")


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """Per-sample ||d D(x) / d x||^2 on real images (which must require grad); differentiable,
    so its gradient reaches the discriminator's weights."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(1)


def lazy_rescale(lr: float, betas: tuple[float, float], interval: int | None) -> tuple[float, tuple[float, float]]:
    """The optimiser settings of a network regularised every `interval` iterations (StyleGAN2
    appendix B): lr * c, betas ** c, c = interval / (interval + 1); unchanged when not lazy."""
    if interval is None:
        return lr, betas
    c = interval / (interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)


class GANPair(nn.Module):
    """The two networks of a GAN. `forward` (used by `kiln plan` for FLOPs and activation
    memory) is one D(G(inputs)) pass; training never calls it."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator

    def forward(self, *generator_inputs: Tensor) -> Tensor:
        images = self.generator(*generator_inputs)
        return self.discriminator(images, *generator_inputs[1:])
