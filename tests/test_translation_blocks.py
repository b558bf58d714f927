"""The shared pieces of the image-to-image GANs (issue #27): the PatchGAN discriminator, the U-Net
and ResNet generators, the least-squares loss, the image history pool, the constant-then-linear
learning rate and the translation scores."""
from __future__ import annotations

import pytest
import torch

from kiln.modules.blocks.adversarial import discriminator_loss, generator_loss
from kiln.modules.blocks.image_pool import ImagePool
from kiln.modules.blocks.patchgan import PatchGAN
from kiln.modules.blocks.translators import AlwaysDropout, ResnetGenerator, UNetGenerator
from kiln.modules.eval.translation import nearest_targets, translation_scores
from kiln.modules.optim import constant_then_linear_decay


def test_the_70x70_patchgan_has_the_papers_size_and_receptive_field():
    d = PatchGAN(in_channels=6, channels=64, layers=3, norm="batch")
    # The authors' pix2pix D (input 3 + 3 channels, batch norm) prints 2.769 M parameters.
    assert sum(p.numel() for p in d.parameters()) == 2_768_705
    assert d.receptive_field == 70
    assert d(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)
    # What one logit sees, measured: the input pixels its gradient reaches span 70 x 70.
    d.eval()
    image = torch.randn(1, 6, 128, 128, requires_grad=True)
    out = d(image)
    out[0, 0, 7, 7].backward()
    rows, cols = image.grad.abs().sum((0, 1)).nonzero(as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (70, 70)
    assert PatchGAN(layers=1).receptive_field == 16 and PatchGAN(layers=5).receptive_field == 286


def test_instance_norm_patchgan_judges_each_image_alone():
    d = PatchGAN(in_channels=3, layers=2, norm="instance")
    a, b = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(d(torch.cat([a, b]))[:1], d(a))
    with pytest.raises(ValueError, match="unknown normalisation 'group'"):
        PatchGAN(norm="group")


def test_least_squares_losses_follow_lsgan():
    real, fake = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 2.0]])
    # D: mean (D(x) - 1)^2 + mean D(G(z))^2; G: mean (D(G(z)) - 1)^2
    assert discriminator_loss(real, fake, "least_squares").item() == pytest.approx(0.125 + 2.0)
    assert generator_loss(fake, "least_squares").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="choose one of 'hinge', 'non_saturating', 'least_squares'"):
        generator_loss(fake, "wasserstein")


def test_image_pool_hands_back_history_half_the_time_once_full():
    pool = ImagePool(size=50, seed=0)
    first = torch.arange(50.0).view(50, 1, 1, 1).expand(50, 3, 2, 2)
    assert torch.equal(pool.query(first), first) and len(pool) == 50  # filling: each image as it is
    new = -1 - torch.arange(4000.0).view(4000, 1, 1, 1).expand(4000, 3, 2, 2)
    out = pool.query(new)
    from_history = out[:, 0, 0, 0] != new[:, 0, 0, 0]
    assert 0.45 < from_history.float().mean().item() < 0.55
    # What comes back is older: a first image, or a new one stored earlier in this batch.
    assert all(o > n for o, n in zip(out[from_history, 0, 0, 0], new[from_history, 0, 0, 0]))
    assert len(pool) == 50


def test_image_pool_resumes_its_draws_and_differs_per_rank():
    def run(pool: ImagePool, start: int, stop: int) -> list[torch.Tensor]:
        return [pool.query(torch.full((4, 1, 2, 2), float(i))) for i in range(start, stop)]

    whole = run(ImagePool(size=8, seed=3), 0, 10)
    part = ImagePool(size=8, seed=3)
    first = run(part, 0, 5)
    resumed = ImagePool(size=8, seed=3)
    resumed.load_state_dict(part.state_dict())
    for a, b in zip(whole, first + run(resumed, 5, 10)):
        assert torch.equal(a, b)
    other_rank = run(ImagePool(size=8, seed=3, rank=1), 0, 10)
    assert any(not torch.equal(a, b) for a, b in zip(whole, other_rank))
    with pytest.raises(ValueError, match="holds 8 images, this run's 50"):
        ImagePool(size=50).load_state_dict(part.state_dict())


def test_learning_rate_is_constant_then_decays_linearly_to_zero():
    factor = constant_then_linear_decay(100, 100)  # CycleGAN's 100 + 100 epochs
    assert [factor(s) for s in (0, 99)] == [1.0, 1.0]
    assert factor(100) == pytest.approx(1 - 1 / 101) and factor(199) == pytest.approx(1 / 101)
    assert factor(200) == 0.0 and factor(10_000) == 0.0


def test_generators_have_the_papers_sizes():
    # The authors' code prints 54.414 M parameters for unet_256 and 11.378 M for resnet_9blocks.
    unet, resnet = UNetGenerator(downs=8, norm="batch"), ResnetGenerator(blocks=9, norm="instance")
    assert sum(p.numel() for p in unet.parameters()) == 54_413_955
    assert sum(p.numel() for p in resnet.parameters()) == 11_378_179
    assert resnet(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="a 5-level U-Net needs sides divisible by 32, got \\(48, 40\\)"):
        UNetGenerator(downs=5)(torch.zeros(1, 3, 48, 40))


def test_unet_dropout_is_noise_at_test_time():
    g = UNetGenerator(downs=5, norm="instance").eval()
    x = torch.randn(2, 3, 32, 32)
    a, b = g(x), g(x)
    assert a.shape == x.shape and a.abs().max() <= 1
    assert not torch.equal(a, b)  # dropout stays on in eval(): the paper's noise
    assert sum(isinstance(m, AlwaysDropout) for m in g.modules()) == 3
    quiet = UNetGenerator(downs=5, norm="instance", dropout=False).eval()
    torch.testing.assert_close(quiet(x), quiet(x))


def test_translation_scores_beside_identity_and_a_lookup():
    g = torch.Generator().manual_seed(0)
    train_inputs, held_inputs = torch.rand(40, 3, 4, 4, generator=g), torch.rand(6, 3, 4, 4, generator=g)
    invert = lambda x: 1 - x  # noqa: E731 - the true translation of this toy domain pair
    train_targets, held_targets = invert(train_inputs), invert(held_inputs)
    perfect = translation_scores(invert(held_inputs), held_targets, held_inputs, train_inputs, train_targets)
    assert perfect["l1"] == 0 and perfect["l1_identity"] > 0.2
    # The lookup answers with the target of the nearest training input: exact for a held-out
    # input that is a training input, far for new ones.
    near = nearest_targets(torch.cat([train_inputs[7:8], held_inputs]), train_inputs, train_targets)
    torch.testing.assert_close(near[0], train_targets[7])
    assert 0 < perfect["l1_nearest"] < perfect["l1_identity"]
    assert "l1_nearest" not in translation_scores(held_inputs, held_targets, held_inputs)
    with pytest.raises(ValueError, match="must match in shape"):
        translation_scores(held_inputs[:2], held_targets, held_inputs)
