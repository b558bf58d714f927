"""Unit tests for U-GAT-IT's networks (modules/ugatit/networks.py): the paper's parameter counts on
the meta device, output shapes at 32 px, AdaLIN/LIN against instance and layer norm, rho clipping,
the light MLP's independence of the image size, and gradients reaching every parameter."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.modules.ugatit.networks import LIN, AdaLIN, Discriminator, Generator, clip_rho


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(channels=8, blocks=2, image_size=32)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_count(cls: type, **kwargs) -> int:
    with torch.device("meta"):
        model = cls(**kwargs)
    assert all(p.is_meta for p in model.parameters())
    return _count(model)


# The reference numbers: ResnetGenerator(3, 3, ngf=64, n_blocks=4, img_size=256, light=...) and
# Discriminator(3, ndf=64, n_layers=7 / 5) built from the authors' networks.py (znxlwm/UGATIT-pytorch,
# the settings of its main.py and UGATIT.py), counting `parameters()`; also docs/paper-sizes.md.
@pytest.mark.parametrize("cls, kwargs, expected", [
    (Generator, dict(channels=64, blocks=4, image_size=256, light=False), 278_959_808),
    (Generator, dict(channels=64, blocks=4, image_size=256, light=True), 10_589_888),
    (Discriminator, dict(channels=64, layers=7), 53_130_176),  # global
    (Discriminator, dict(channels=64, layers=5), 3_290_560),  # local
])
def test_parameter_counts_match_the_reference(cls, kwargs, expected):
    assert _meta_count(cls, **kwargs) == expected


@pytest.mark.parametrize("light", [False, True])
def test_generator_shapes(light):
    torch.manual_seed(0)
    g = Generator(**SMALL, light=light)
    image, cam_logit, heatmap = g(torch.randn(2, 3, 32, 32))
    assert image.shape == (2, 3, 32, 32)
    assert image.abs().max() <= 1
    assert cam_logit.shape == (2, 2)
    assert heatmap.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("layers, size, side, heat", [(5, 32, 2, 3), (7, 128, 2, 3)])
def test_discriminator_shapes(layers, size, side, heat):
    torch.manual_seed(0)
    d = Discriminator(channels=4, layers=layers)
    logits, cam_logit, heatmap = d(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, side, side)
    assert cam_logit.shape == (2, 2)
    assert heatmap.shape == (2, 1, heat, heat)


def test_paper_sized_discriminator_maps_on_meta():
    """At 256 px the global D's logits are 6x6 and the local D's 30x30 (the module docstring)."""
    with torch.device("meta"):
        x = torch.empty(1, 3, 256, 256)
        assert Discriminator(layers=7)(x)[0].shape == (1, 1, 6, 6)
        assert Discriminator(layers=5)(x)[0].shape == (1, 1, 30, 30)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible by 4"):
        Generator(**dict(SMALL, image_size=30))
    with pytest.raises(ValueError, match="sized for 32 px"):
        Generator(**SMALL)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="layers >= 3"):
        Discriminator(layers=2)


def _bessel(norm, x: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """AdaLIN uses unbiased variances (the authors' code): (x - m) / sqrt(var_b * n / (n - 1) + eps)
    equals sqrt((n - 1) / n) * (x - m) / sqrt(var_b + eps * (n - 1) / n), PyTorch's biased norms."""
    c = (n - 1) / n
    return math.sqrt(c) * norm(eps * c)


def test_adalin_is_instance_norm_at_rho_one_and_layer_norm_at_rho_zero():
    torch.manual_seed(0)
    x, gamma, beta = torch.randn(3, 5, 6, 7), torch.randn(3, 5), torch.randn(3, 5)
    norm = AdaLIN(5)
    assert torch.allclose(norm.rho, torch.full((1, 5, 1, 1), 0.9))
    affine = lambda y: y * gamma[:, :, None, None] + beta[:, :, None, None]  # noqa: E731
    with torch.no_grad():
        norm.rho.fill_(1.0)
        instance = _bessel(lambda e: F.instance_norm(x, eps=e), x, 6 * 7, norm.eps)
        torch.testing.assert_close(norm(x, gamma, beta), affine(instance))
        norm.rho.fill_(0.0)
        layer = _bessel(lambda e: F.layer_norm(x, x.shape[1:], eps=e), x, 5 * 6 * 7, norm.eps)
        torch.testing.assert_close(norm(x, gamma, beta), affine(layer))
        norm.rho.fill_(0.25)
        torch.testing.assert_close(norm(x, gamma, beta), affine(0.25 * instance + 0.75 * layer))


def test_lin_starts_as_layer_norm_with_learned_affine():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    norm = LIN(4)
    assert norm.rho.abs().sum() == 0 and (norm.gamma == 1).all() and (norm.beta == 0).all()
    with torch.no_grad():
        layer = _bessel(lambda e: F.layer_norm(x, x.shape[1:], eps=e), x, 4 * 5 * 5, norm.eps)
        torch.testing.assert_close(norm(x), layer)
        norm.gamma.fill_(2.0)
        norm.beta.fill_(-1.0)
        torch.testing.assert_close(norm(x), 2 * layer - 1)


def test_clip_rho_clamps_every_rho_and_nothing_else():
    g = Generator(**SMALL, light=True)
    norms = [m for m in g.modules() if isinstance(m, (AdaLIN, LIN))]
    assert len(norms) == 2 * 2 + 2  # two per AdaLIN block, one per up-sampling
    with torch.no_grad():
        for i, m in enumerate(norms):
            m.rho.copy_(torch.linspace(-1.0, 2.0, m.rho.numel()).view_as(m.rho) + i)
        before = {k: v.clone() for k, v in g.state_dict().items() if not k.endswith("rho")}
    clip_rho(g)
    for i, m in enumerate(norms):
        expected = (torch.linspace(-1.0, 2.0, m.rho.numel()).view_as(m.rho) + i).clamp(0, 1)
        torch.testing.assert_close(m.rho.detach(), expected)
    after = g.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_light_mlp_does_not_depend_on_image_size():
    small, large = dict(SMALL, image_size=32), dict(SMALL, image_size=64)
    assert _meta_count(Generator, **small, light=True) == _meta_count(Generator, **large, light=True)
    wide = SMALL["channels"] * 4  # the full MLP's first layer: (size / 4)^2 * wide -> wide
    grown = _meta_count(Generator, **large) - _meta_count(Generator, **small)
    assert grown == (16 ** 2 - 8 ** 2) * wide * wide
    torch.manual_seed(0)
    light = Generator(**small, light=True)
    assert light(torch.randn(1, 3, 48, 48))[0].shape == (1, 3, 48, 48)  # any side divisible by 4


def _assert_every_parameter_has_gradient(model: nn.Module, outputs) -> None:
    sum(o.float().mean() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("light", [False, True])
def test_backward_reaches_every_generator_parameter(light):
    torch.manual_seed(0)
    g = Generator(**SMALL, light=light)
    _assert_every_parameter_has_gradient(g, g(torch.randn(2, 3, 32, 32)))


def test_backward_reaches_every_discriminator_parameter():
    torch.manual_seed(0)
    d = Discriminator(channels=4, layers=5)
    _assert_every_parameter_has_gradient(d, d(torch.randn(2, 3, 32, 32)))
    names = [n for n, _ in d.named_parameters()]
    assert sum(n.endswith("parametrizations.weight.original") for n in names) == 5 + 2  # convs, CAM fcs


def test_discriminator_cam_scales_by_the_raw_classifier_weights():
    """As in the authors' code, the CAM logits use the spectrally normalised classifier and the
    feature map is scaled by its raw weights: doubling the raw weights (eval: u and v fixed) leaves
    the logits alone and changes the heatmap."""
    torch.manual_seed(0)
    d = Discriminator(channels=4, layers=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, cam_logit, heatmap = d(x)
        for fc in (d.cam.gap_fc, d.cam.gmp_fc):
            fc.parametrizations.weight.original.mul_(2)
        _, cam_logit2, heatmap2 = d(x)
    torch.testing.assert_close(cam_logit2, cam_logit)
    assert not torch.allclose(heatmap2, heatmap)
