"""The shared adversarial-training machinery (kiln.modules.blocks.adversarial and the phases in
kiln.modules.gan.lit_module): losses, R1 against
per-sample autograd, lazy-regularisation rescaling, and one Lightning run of a toy GAN whose
phases are recorded: their order, the optimiser each steps, and that only that network's
weights received gradients; then the image-to-image settings: one generator pass shared by both
phases, real and generated images in separate D passes under batch statistics, and learning rates
held then decayed."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.modules.blocks.adversarial import GANPair, discriminator_loss, generator_loss, lazy_rescale, r1_penalty
from kiln.modules.gan.lit_module import AdversarialModule


def test_hinge_and_non_saturating_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # hinge: mean(relu(1 - real)) = (0 + 0.5 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 2) / 3
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(2.5 / 3 + 1.0)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0 / 3)
    expected = F.softplus(-real).mean() + F.softplus(fake).mean()
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected.item())
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(F.softplus(-fake).mean().item())
    with pytest.raises(ValueError, match="unknown GAN loss 'wasserstein'"):
        discriminator_loss(real, fake, "wasserstein")


def test_r1_matches_per_sample_autograd_and_reaches_the_weights():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = torch.tanh(x * w).flatten(1).sum(1) + (x.flatten(1) ** 2).sum(1)  # a toy D, nonlinear in x
    penalty = r1_penalty(logits, x)
    for i in range(5):  # one sample at a time: ||d D(x_i) / d x_i||^2
        xi = x[i].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.tanh(xi * w).sum() + (xi ** 2).sum(), xi)
        assert penalty[i].item() == pytest.approx(g.square().sum().item(), rel=1e-5)
    penalty.sum().backward()  # create_graph: the penalty is a function of the weights
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_lazy_rescaling_follows_stylegan2():
    lr, betas = lazy_rescale(2e-3, (0.0, 0.99), 16)
    c = 16 / 17
    assert lr == pytest.approx(2e-3 * c) and betas == pytest.approx((0.0, 0.99 ** c))
    assert lazy_rescale(2e-3, (0.0, 0.99), None) == (2e-3, (0.0, 0.99))


class ToyGAN(AdversarialModule):
    """4-number "images"; D is linear; G regularised by its weight norm; every phase recorded."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.model = GANPair(nn.Linear(2, 4), nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
        self.model.generator.forward = lambda z: nn.Linear.forward(self.model.generator, z)
        self.record: list[tuple] = []
        self._phase = None

    def real(self, batch):
        return batch["image"], None

    def fake(self, batch, n):
        return self.generator(torch.randn(n, 2)), None

    def discriminate(self, images, condition):
        return super().discriminate(images, condition).squeeze(1)

    def generator_regulariser(self, batch):
        return self.generator.weight.square().sum() * 1e-3

    def d_main(self, batch):
        self._phase = ("Dmain", len(batch["image"]))
        return super().d_main(batch)

    def d_reg(self, batch):
        self._phase = ("Dreg", len(batch["image"]))
        return super().d_reg(batch)

    def g_main(self, batch):
        self._phase = ("Gmain", len(batch["image"]))
        return super().g_main(batch)

    def g_reg(self, batch):
        self._phase = ("Greg", len(batch["image"]))
        return super().g_reg(batch)

    def step(self, optimizer, counted):
        g_opt, d_opt = self.optimizers()
        which = "G" if optimizer is g_opt else "D" if optimizer is d_opt else "?"
        other = self.discriminator if which == "G" else self.generator
        untouched = all(p.grad is None for p in other.parameters())
        self.record.append((self.global_step, *self._phase, which, untouched))
        super().step(optimizer, counted)


def _fit(module: ToyGAN, steps: int) -> ToyGAN:
    data = [{"image": torch.randn(8, 4) + 2} for _ in range(steps)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == steps  # one counted step (Gmain) per iteration
    return module


def test_phases_run_in_order_and_step_their_own_optimiser():
    module = _fit(ToyGAN(r1_gamma=1.0, d_reg_interval=2, g_reg_interval=3, d_steps=2, lr_d=1e-3), steps=4)
    expected = []
    for i in range(4):
        expected += [(i, "Dmain", 4, "D", True)] * 2  # d_steps=2: each D step on half the batch
        if i % 2 == 0:
            expected += [(i, "Dreg", 4, "D", True)] * 2
        expected.append((i, "Gmain", 8, "G", True))
        if i % 3 == 0:
            expected.append((i + 1, "Greg", 8, "G", True))  # after Gmain's step, which counts
    assert module.record == expected
    g_opt, d_opt = module.optimizers()
    assert d_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 3)  # lazy: c = 2 / 3
    assert d_opt.param_groups[0]["betas"] == pytest.approx((0.0, 0.999 ** (2 / 3)))
    assert g_opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 3 / 4)


def test_regularisers_without_interval_join_the_main_phase():
    module = _fit(ToyGAN(r1_gamma=1.0, d_reg_interval=None, g_reg_interval=None), steps=2)
    assert [r[1] for r in module.record] == ["Dmain", "Gmain"] * 2
    g_opt, d_opt = module.optimizers()
    assert d_opt.param_groups[0]["lr"] == pytest.approx(2e-4) and g_opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    batch = {"image": torch.randn(8, 4)}
    assert set(module.d_main(batch)) == {"loss", "real_logits", "fake_logits", "r1"}
    assert set(module.g_main(batch)) == {"loss", "adversarial", "regulariser"}


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="d_reg_interval must be at least 1"):
        ToyGAN(d_reg_interval=0)
    with pytest.raises(ValueError, match="d_steps must be at least 1"):
        ToyGAN(d_steps=0)
    with pytest.raises(ValueError, match="unknown GAN loss 'lsgan'"):
        ToyGAN(loss="lsgan")


class CountingToyGAN(ToyGAN):
    """ToyGAN that counts its generator's and discriminator's passes; D may batch-normalise."""

    def __init__(self, batch_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        if batch_norm:
            self.model.discriminator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.passes = {"G": 0, "D": 0}
        self.generator.register_forward_hook(lambda *_: self.passes.__setitem__("G", self.passes["G"] + 1))
        self.discriminator.register_forward_hook(lambda *_: self.passes.__setitem__("D", self.passes["D"] + 1))


class ReusingToyGAN(CountingToyGAN):
    reuse_fake = True


def test_a_family_can_reuse_one_generator_pass_per_iteration():
    fresh, reusing = _fit(CountingToyGAN(), steps=3), _fit(ReusingToyGAN(), steps=3)
    assert fresh.passes["G"] == 6 and reusing.passes["G"] == 3  # D's and G's phases share the pass
    # Each phase still steps only its own network, and G learns through the shared pass.
    assert [r[1:] for r in reusing.record] == [("Dmain", 8, "D", True), ("Gmain", 8, "G", True)] * 3
    before = ReusingToyGAN()
    weights = before.generator.weight.detach().clone()
    assert not torch.equal(_fit(before, steps=2).generator.weight, weights)
    with pytest.raises(ValueError, match="ReusingToyGAN reuses one generator pass per iteration: d_steps must be 1, got 2"):
        ReusingToyGAN(d_steps=2)


def test_batch_statistics_keep_real_and_fake_passes_apart():
    batch = {"image": torch.randn(8, 4)}
    joint, apart = CountingToyGAN(), CountingToyGAN(batch_norm=True)
    joint.d_main(batch), apart.d_main(batch)
    assert joint.passes["D"] == 1 and apart.passes["D"] == 2
    # Apart, the real logits are those of the real batch alone, whatever the fakes are.
    real_only = apart.discriminate(batch["image"], None)
    torch.testing.assert_close(apart.d_main(batch)["real_logits"], real_only.detach().mean())


def test_learning_rates_stay_then_decay_linearly_once_per_iteration():
    module = _fit(ToyGAN(lr_constant_steps=2, lr_decay_steps=2, lr_g=3e-4, lr_d=6e-4), steps=3)
    g_opt, d_opt = module.optimizers()
    # After 3 iterations: 1 - (3 + 1 - 2) / (2 + 1) = 1/3 of each network's rate.
    assert g_opt.param_groups[0]["lr"] == pytest.approx(1e-4) and d_opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert _fit(ToyGAN(lr_constant_steps=2, lr_decay_steps=2), steps=4).optimizers()[0].param_groups[0]["lr"] == 0
    with pytest.raises(ValueError, match="constant and decay steps must be >= 0"):
        ToyGAN(lr_constant_steps=-1)
