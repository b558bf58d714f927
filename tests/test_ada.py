"""ADA (kiln.modules.blocks.ada): every op differentiable (gradcheck against finite differences),
p = 0 the identity, the pixel-exact ops exact, the colour ops' invariants, the controller's
direction and step size, p surviving a state_dict round trip, and the shared GAN phases feeding it."""
from __future__ import annotations

import pytest
import torch

from kiln.modules.blocks.ada import OPS, AdaptiveAugment


def _images(n: int = 2, c: int = 3, size: int = 6, dtype=torch.float64) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(n, c, size, size, dtype=dtype) * 2 - 1)


@pytest.mark.parametrize("op", OPS)
def test_each_op_is_differentiable_and_changes_the_images(op):
    ada = AdaptiveAugment([op], p=1.0)
    x = _images().requires_grad_(True)
    # Fixed draws: the op is then affine in the image, and autograd must agree with finite differences.
    assert torch.autograd.gradcheck(lambda t: ada(t, generator=torch.Generator().manual_seed(3)), (x,), eps=1e-6,
                                    atol=1e-5)
    out = ada(x.detach(), generator=torch.Generator().manual_seed(3))
    changed = any(not torch.allclose(ada(x.detach(), generator=torch.Generator().manual_seed(s)), x.detach())
                  for s in range(8))  # flips and luma flips are the identity half the time
    assert out.shape == x.shape and changed


def test_p_zero_is_the_identity_and_p_one_augments_every_image():
    x = _images(8, size=8)
    assert AdaptiveAugment("bgc", p=0.0)(x) is x
    out = AdaptiveAugment(["brightness"], p=1.0)(x)
    assert all(not torch.allclose(o, i) for o, i in zip(out, x))


def test_blit_ops_are_pixel_exact():
    x = _images(64, size=8)
    out = AdaptiveAugment(["xflip", "rotate90"], p=1.0)(x, generator=torch.Generator().manual_seed(0))
    for o, i in zip(out, x):  # each output is one of the 8 flips/rotations of its input, exactly
        candidates = [torch.rot90(v, k, (1, 2)) for v in (i, i.flip(2)) for k in range(4)]
        assert min((o - c).abs().max().item() for c in candidates) < 1e-6
    shifted = AdaptiveAugment(["xint"], p=1.0)(x, generator=torch.Generator().manual_seed(1))
    interior = [(s[:, 2:-2, 2:-2] - torch.roll(i, (dy, dx), (1, 2))[:, 2:-2, 2:-2]).abs().max().item()
                for s, i in zip(shifted, x) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    # at 8 px a shift is at most 1 pixel: every image matches one integer shift away from the border
    assert sum(e < 1e-6 for e in interior) >= len(x)


def test_colour_ops_keep_grey_images_grey_and_hue_keeps_luma():
    grey = _images(4, c=1, size=4)
    for op in ("hue", "saturation"):  # no colour to rotate or scale in a grey image
        assert torch.allclose(AdaptiveAugment([op], p=1.0)(grey), grey, atol=1e-6)
    rgb = _images(16, size=4)
    out = AdaptiveAugment(["hue"], p=1.0)(rgb)
    assert torch.allclose(out.mean(1), rgb.mean(1), atol=1e-6)  # a rotation about the luma axis
    assert not torch.allclose(out, rgb)


def test_controller_raises_p_when_d_is_overconfident_and_lowers_it_otherwise():
    ada = AdaptiveAugment("bgc", p=0.0, target=0.6, kimg=1.0, interval=1)
    ada.observe(torch.full((100,), 3.0))  # r_t = 1 > 0.6: D tells every real apart
    assert ada.adjust() == pytest.approx(1.0)
    assert ada.p.item() == pytest.approx(100 / 1000)  # images / (kimg * 1000)
    ada.observe(torch.tensor([1.0] * 70 + [-1.0] * 30))  # r_t = 0.4 < 0.6
    assert ada.adjust() == pytest.approx(0.4) and ada.p.item() == pytest.approx(0.0, abs=1e-7)
    ada.observe(-torch.ones(500))
    ada.adjust()
    assert ada.p.item() == 0.0  # clamped at 0
    assert ada.signs.tolist() == [0.0, 0.0]  # a fresh count after each adjustment
    fixed = AdaptiveAugment("bgc", p=0.3, target=None)
    fixed.observe(torch.ones(10))
    fixed.adjust()
    assert fixed.p.item() == pytest.approx(0.3)


def test_p_survives_a_state_dict_round_trip():
    ada = AdaptiveAugment("bgc", p=0.0, kimg=1.0)
    ada.observe(torch.ones(250))
    ada.adjust()
    ada.observe(torch.ones(7))  # mid-interval sums are kept too
    restored = AdaptiveAugment("bgc")
    restored.load_state_dict(ada.state_dict())
    assert restored.p.item() == pytest.approx(0.25) and restored.signs.tolist() == [7.0, 7.0]


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown augmentation preset 'xyz'"):
        AdaptiveAugment("xyz")
    with pytest.raises(ValueError, match="unknown augmentation op 'cutout'"):
        AdaptiveAugment(["xflip", "cutout"])
    with pytest.raises(ValueError, match="must be non-negative"):
        AdaptiveAugment(p=-0.1)
    with pytest.raises(ValueError, match="colour augmentation needs 1 or 3 channels"):
        AdaptiveAugment(["brightness"], p=1.0)(torch.zeros(1, 2, 4, 4))


def test_the_gan_phases_observe_reals_and_log_p():
    """The shared machinery: Dmain feeds D(real) to the controller, p moves every `interval`
    iterations (over 2 x 8 real images) and is logged; D sees augmented images."""
    from test_adversarial import ToyGAN, _fit

    class Augmented(ToyGAN):
        def discriminate(self, images, condition):
            seen.append(self.augment.p.item())
            images = torch.cat(images) if isinstance(images, tuple) else images  # Dmain: (reals, fakes)
            return self.discriminator(self.augment(images.view(-1, 1, 2, 2)).flatten(1)).squeeze(1)

    seen: list[float] = []
    module = Augmented(lr_d=0.0)  # D stays as set: every real image scores positive, r_t = 1
    torch.nn.init.constant_(module.discriminator[2].bias, 10.0)
    module.augment = AdaptiveAugment(["brightness"], p=0.0, kimg=0.16, interval=2)  # +16 / 160 per adjustment
    module = _fit(module, steps=4)
    assert module.augment.p.item() == pytest.approx(0.2)
    assert module.augment.signs.tolist() == [0.0, 0.0]  # adjusted after iterations 2 and 4
    assert module.trainer.callback_metrics["train/ada_p"].item() == pytest.approx(0.2)
    assert max(seen) == pytest.approx(0.1)  # the augmentation in force during iterations 3-4
