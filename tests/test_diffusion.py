"""Unit tests of the shared diffusion blocks (kiln.modules.blocks.diffusion): schedules, the
parameterisations, losses, samplers against a Gaussian oracle whose optimal denoiser is known in
closed form, classifier-free guidance and dynamic thresholding. CPU, a few seconds."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kiln.modules.blocks.diffusion import (
    GaussianDiffusion, beta_schedule, classifier_free_guidance, discretized_gaussian_log_likelihood,
    drop_condition, dynamic_thresholding, normal_kl, schedule_terms, timestep_respacing,
)

MU, S = 0.3, 0.2  # the oracle's data: x0 ~ N(MU, S^2) per pixel


def _coeffs(d: GaussianDiffusion, t: torch.Tensor, ndim: int = 4):
    shape = (-1,) + (1,) * (ndim - 1)
    return d.sqrt_alpha_bar[t].view(shape), d.sqrt_one_minus_alpha_bar[t].view(shape)


def _as_output(d: GaussianDiffusion, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The raw output that encodes (x0, eps) in d's parameterisation, written out independently."""
    a, b = _coeffs(d, t, x0.ndim)
    return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[d.parameterization]


def gaussian_oracle(d: GaussianDiffusion, learned_variance: bool = False):
    """The exact E[x0 | x_t] for x0 ~ N(MU, S^2), in d's parameterisation. With learned_variance,
    also the variance channels that give the true reverse variance beta~ + coef1^2 Var[x0 | x_t]."""
    def model_fn(x, t):
        a, b = _coeffs(d, t)
        x0 = MU + a * S**2 / (a**2 * S**2 + b**2) * (x - a * MU)
        out = _as_output(d, x0, (x - a * x0) / b, t)
        if not learned_variance:
            return out
        var_x0 = S**2 * b**2 / (a**2 * S**2 + b**2)
        coef1 = d.posterior_mean_coef1[t].view(-1, 1, 1, 1)
        log_var = (d.posterior_variance[t].view(-1, 1, 1, 1) + coef1**2 * var_x0).log()
        lo, hi = d.posterior_log_variance[t].view(-1, 1, 1, 1), d.log_betas[t].view(-1, 1, 1, 1)
        return torch.cat([out, (2 * (log_var - lo) / (hi - lo) - 1).expand_as(out)], dim=1)
    return model_fn


# ----------------------------------------------------------------------------- schedules

def test_linear_schedule_matches_ddpm():
    betas = beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert 3.9e-5 < alpha_bar[-1].item() < 4.2e-5  # DDPM's x_T is almost pure noise
    # improved DDPM: other T scale both ends by 1000 / T
    betas = beta_schedule("linear", 4000)
    assert betas[0].item() == pytest.approx(2.5e-5) and betas[-1].item() == pytest.approx(0.005)


def test_cosine_schedule_matches_improved_ddpm():
    T, s = 1000, 0.008
    betas = beta_schedule("cosine", T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 750, 990):  # alpha_bar at index t is the paper's alpha_bar(t + 1)
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999) and betas[-1].item() == pytest.approx(0.999)
    assert 1 - alpha_bar[0].item() < 1e-4 and alpha_bar[-1].item() < 1e-8


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_monotone_in_open_unit_interval(schedule):
    d = GaussianDiffusion(1000, schedule)
    assert d.alpha_bar.dtype == torch.float32
    assert (d.alpha_bar > 0).all() and (d.alpha_bar < 1).all()
    assert (d.alpha_bar[1:] < d.alpha_bar[:-1]).all()
    snr = d.snr(torch.arange(1000))
    assert (snr[1:] < snr[:-1]).all()


def test_buffers_move_with_the_module_and_stay_out_of_state_dict():
    d = GaussianDiffusion(50).to("meta")
    assert d.alpha_bar.device.type == "meta" and d.posterior_mean_coef1.device.type == "meta"
    assert GaussianDiffusion(50).state_dict() == {}


def test_timestep_respacing():
    assert torch.equal(timestep_respacing(1000, None), torch.arange(1000))
    kept = timestep_respacing(1000, 50)
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    assert (kept[1:] > kept[:-1]).all()
    assert (kept[1:] - kept[:-1]).min() >= 20 and (kept[1:] - kept[:-1]).max() <= 21
    assert timestep_respacing(1000, 1).tolist() == [999]
    with pytest.raises(ValueError):
        timestep_respacing(10, 11)


def test_respaced_chain_recomputes_betas_from_alpha_bar():
    full = torch.cumprod(1 - beta_schedule("cosine", 1000), 0)
    kept = timestep_respacing(1000, 100)
    terms = schedule_terms(full[kept])
    assert torch.allclose(torch.cumprod(1 - terms["betas"], 0), full[kept], rtol=1e-12)
    ab, ab_prev, beta = terms["alpha_bar"], terms["alpha_bar_prev"], terms["betas"]
    assert torch.allclose(terms["posterior_variance"], beta * (1 - ab_prev) / (1 - ab))
    # the posterior mean of the respaced chain is still a weighted mean of x0 and x_t that
    # reproduces E[x_{t-1}] = sqrt(ab_prev) x0 for x_t at its mean sqrt(ab) x0
    mean = terms["posterior_mean_coef1"] + terms["posterior_mean_coef2"] * ab.sqrt()
    assert torch.allclose(mean, ab_prev.sqrt(), rtol=1e-10)


# ----------------------------------------------------------------------------- forward process

def test_q_sample_moments():
    d = GaussianDiffusion(1000, "linear")
    g = torch.Generator().manual_seed(0)
    for step in (10, 500, 990):
        x0 = torch.full((40_000, 1), 0.5)
        t = torch.full((40_000,), step)
        x = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = d.alpha_bar[step].item()
        assert x.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=4 * math.sqrt((1 - abar) / 40_000))
        assert x.var().item() == pytest.approx(1 - abar, rel=0.03)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_predict_inverts_q_sample(parameterization):
    d = GaussianDiffusion(1000, "cosine", parameterization)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 900, 980])
    x_t = d.q_sample(x0, t, noise)
    out = _as_output(d, x0, noise, t)
    for output in (out, torch.cat([out, torch.randn_like(out)], dim=1)):  # extra channels ignored
        x0_pred, eps_pred = d.predict(output, x_t, t)
        assert torch.allclose(x0_pred, x0, atol=1e-4) and torch.allclose(eps_pred, noise, atol=1e-4)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_training_loss_is_zero_for_the_true_target(parameterization):
    d = GaussianDiffusion(100, "cosine", parameterization)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 3, 50, 99])
    losses = d.training_losses(lambda x, tt: _as_output(d, x0, noise, tt), x0, t, noise)
    assert losses["loss"].item() < 1e-10 and losses["mse"].item() < 1e-10
    assert losses["vlb"].item() == 0.0
    wrong = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise)
    assert wrong["loss"].item() > 0.01


def test_training_losses_draws_t_and_noise_from_the_generator():
    d = GaussianDiffusion(100)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    a = d.training_losses(model_fn, x0, generator=torch.Generator().manual_seed(3))
    b = d.training_losses(model_fn, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss_per_sample"], b["loss_per_sample"]) and torch.equal(seen[0], seen[1])
    assert seen[0].dtype == torch.long and 0 <= seen[0].min() and seen[0].max() < 100
    assert len(seen[0].unique()) > 20
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(lambda x, t: torch.cat([x, x], 1), x0)


# ----------------------------------------------------------------------------- loss weighting

@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_loss_weights(parameterization):
    t = torch.tensor([0, 100, 400, 700, 999])
    d = GaussianDiffusion(1000, "cosine", parameterization, loss_weighting="min_snr")
    snr = d.snr(t)
    assert snr[0] > 5 > snr[-1]  # both branches of the min are exercised
    divisor = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[parameterization]
    assert torch.allclose(d.loss_weight(t), torch.minimum(snr, torch.tensor(5.0)) / divisor)
    d = GaussianDiffusion(1000, "cosine", parameterization, loss_weighting="snr_trunc")
    assert torch.allclose(d.loss_weight(t), torch.maximum(snr, torch.tensor(1.0)) / divisor)
    d = GaussianDiffusion(1000, "cosine", parameterization)
    assert torch.equal(d.loss_weight(t), torch.ones(5))


@pytest.mark.parametrize("weighting", ["min_snr", "snr_trunc"])
def test_weighted_losses_agree_across_parameterizations(weighting):
    """One x0 prediction written in each parameterisation gets the same weighted loss: each
    weighting is the same x0-space weight expressed in that space."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(6, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    x0_pred = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 50, 300, 600, 900, 999])
    per_sample = []
    for parameterization in ("eps", "x0", "v"):
        d = GaussianDiffusion(1000, "linear", parameterization, loss_weighting=weighting)

        def model_fn(x_t, tt, d=d):
            a, b = _coeffs(d, tt)
            return _as_output(d, x0_pred, (x_t - a * x0_pred) / b, tt)

        per_sample.append(d.training_losses(model_fn, x0, t, noise)["loss_per_sample"])
    x0_space = ((x0_pred - x0) ** 2).mean(dim=(1, 2, 3)) * GaussianDiffusion(
        1000, "linear", "x0", loss_weighting=weighting).loss_weight(t)
    for loss in per_sample:
        assert torch.allclose(loss, x0_space, rtol=1e-3)


# ----------------------------------------------------------------------------- variational bound

def test_likelihood_helpers():
    grid = torch.arange(256) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(grid, torch.tensor(0.1), torch.tensor(math.log(0.3)))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # far from the mean the bins are tiny but still finite
    assert torch.isfinite(discretized_gaussian_log_likelihood(grid, torch.tensor(-1.0), torch.tensor(-8.0))).all()
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    assert normal_kl(one, one, one, one).item() == 0.0
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    assert normal_kl(zero, zero, one, torch.tensor(math.log(4.0))).item() == pytest.approx(
        math.log(2) + 0.25 - 0.5, rel=1e-6)


def test_vlb_is_zero_for_the_true_posterior():
    d = GaussianDiffusion(100, "cosine", "eps", learned_variance=True)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([1, 40, 99])
    # exact mean, and v = -1 picks log beta~, the true posterior variance
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert d.vlb_terms(out, x0, d.q_sample(x0, t, noise), t).abs().max().item() < 1e-4
    out = torch.cat([noise, torch.ones_like(noise)], dim=1)  # beta instead: a positive KL
    assert (d.vlb_terms(out, x0, d.q_sample(x0, t, noise), t) > 0).all()


def test_learned_variance_gradients_reach_variance_only_through_vlb():
    torch.manual_seed(0)
    c = 3
    net = nn.Conv2d(c, 2 * c, 1)
    d = GaussianDiffusion(1000, "cosine", "eps", learned_variance=True)
    x0 = torch.randint(0, 256, (4, c, 4, 4)).float() / 127.5 - 1  # 8-bit data
    t = torch.tensor([0, 1, 500, 999])  # t = 0 is the decoder NLL
    losses = d.training_losses(lambda x, tt: net(x), x0, t)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert losses["vlb"].item() > 0
    expected = losses["mse"] + 1e-3 * losses["vlb"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    g_vlb, = torch.autograd.grad(losses["vlb"], net.weight, retain_graph=True)
    assert g_vlb[:c].abs().max().item() == 0.0  # stop-grad on the mean
    assert g_vlb[c:].abs().max().item() > 0
    g_mse, = torch.autograd.grad(losses["mse"], net.weight, retain_graph=True)
    assert g_mse[c:].abs().max().item() == 0.0
    g_loss, = torch.autograd.grad(losses["loss"], net.weight)
    assert torch.allclose(g_loss[:c], g_mse[:c]) and torch.allclose(g_loss[c:], 1e-3 * g_vlb[c:])


# ----------------------------------------------------------------------------- samplers

SHAPE = (32, 1, 16, 16)  # 8192 scalar samples; standard error of the mean 0.0022

# Few-step samplers shrink the spread of this narrow distribution by their discretisation
# error (measured 7-9% at these step counts on the cosine schedule), so they get a wider band.
SAMPLER_CASES = [
    ("ddpm", None, {}, 0.04),
    ("ddpm", None, {"variance": "fixed_large"}, 0.04),
    ("ddpm", 100, {}, 0.12),
    ("ddim", 50, {}, 0.12),
    ("ddim", 50, {"eta": 1.0}, 0.16),
    ("dpmpp_2m", 20, {}, 0.12),
    ("dpmpp_2m_sde", 20, {}, 0.12),
]


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler,steps,kwargs,std_rtol", SAMPLER_CASES)
def test_samplers_reproduce_the_data_distribution(sampler, steps, kwargs, std_rtol, parameterization):
    d = GaussianDiffusion(1000, "cosine", parameterization)
    x = d.sample(gaussian_oracle(d), SHAPE, sampler=sampler, steps=steps, clip_denoised=False,
                 generator=torch.Generator().manual_seed(0), **kwargs)
    assert x.shape == SHAPE
    assert x.mean().item() == pytest.approx(MU, abs=0.012)
    assert x.std().item() == pytest.approx(S, rel=std_rtol)


def test_ddpm_uses_the_learned_variance():
    d = GaussianDiffusion(1000, "cosine", "eps", learned_variance=True)
    # fewer samples: a per-element variance costs an exp per element and step
    x = d.sample(gaussian_oracle(d, learned_variance=True), (8, 1, 16, 16), sampler="ddpm",
                 clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(S, rel=0.05)
    with pytest.raises(ValueError, match="channels"):
        d.sample(gaussian_oracle(d), (2, 1, 2, 2), sampler="ddpm", steps=5)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_variance_channels_at_the_ends_equal_the_fixed_variances(variance):
    fixed = GaussianDiffusion(1000, "cosine", "eps")
    learned = GaussianDiffusion(1000, "cosine", "eps", learned_variance=True)
    ends = -1.0 if variance == "fixed_small" else 1.0
    oracle = gaussian_oracle(fixed)

    def with_variance(x, t):
        out = oracle(x, t)
        return torch.cat([out, torch.full_like(out, ends)], dim=1)

    kw = dict(sampler="ddpm", steps=25, clip_denoised=False, noise=torch.randn(4, 1, 4, 4))
    a = fixed.sample(oracle, (4, 1, 4, 4), variance=variance, generator=torch.Generator().manual_seed(1), **kw)
    b = learned.sample(with_variance, (4, 1, 4, 4), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_samplers_read_only_the_first_c_channels(sampler):
    d = GaussianDiffusion(1000, "cosine", "v", learned_variance=True)
    oracle, noise = gaussian_oracle(d), torch.randn(4, 2, 4, 4)

    def with_junk(x, t):
        out = oracle(x, t)
        return torch.cat([out, 100 * torch.ones_like(out)], dim=1)

    a, b = (d.sample(fn, noise.shape, sampler=sampler, steps=10, noise=noise, generator=torch.Generator().manual_seed(0))
            for fn in (oracle, with_junk))
    assert torch.equal(a, b)


def test_deterministic_samplers_converge_to_the_probability_flow_map():
    """For Gaussian data the probability-flow ODE keeps (x_t - a mu) / sqrt(a^2 s^2 + b^2)
    fixed, so the exact sample for each starting noise is known."""
    d = GaussianDiffusion(1000, "cosine", "eps")
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    a, b = d.sqrt_alpha_bar[-1], d.sqrt_one_minus_alpha_bar[-1]
    exact = MU + S * (noise - a * MU) / (a**2 * S**2 + b**2).sqrt()

    def error(sampler, steps):
        x = d.sample(gaussian_oracle(d), noise.shape, sampler=sampler, steps=steps, noise=noise, clip_denoised=False)
        return (x - exact).abs().max().item()

    assert error("ddim", 200) < 0.02
    assert error("dpmpp_2m", 50) < 0.01
    assert error("dpmpp_2m", 20) < error("ddim", 20) / 1.5  # second order beats first


def test_model_sees_the_original_timesteps():
    d = GaussianDiffusion(1000)
    seen = []

    def model_fn(x, t):
        seen.append(t[0].item())
        assert (t == t[0]).all() and t.dtype == torch.long
        return torch.zeros_like(x)

    for sampler in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        seen.clear()
        d.sample(model_fn, (2, 1, 2, 2), sampler=sampler, steps=10)
        assert seen == timestep_respacing(1000, 10).flip(0).tolist()


def test_ddim_determinism():
    d = GaussianDiffusion(100, "cosine", "eps")
    oracle, noise = gaussian_oracle(d), torch.randn(4, 1, 8, 8)
    a = d.sample(oracle, noise.shape, steps=20, noise=noise, generator=torch.Generator().manual_seed(0))
    b = d.sample(oracle, noise.shape, steps=20, noise=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # eta = 0 uses no randomness beyond the initial noise
    stochastic = [d.sample(oracle, noise.shape, steps=20, eta=1.0, noise=noise,
                           generator=torch.Generator().manual_seed(seed)) for seed in (0, 1, 0)]
    assert not torch.allclose(stochastic[0], stochastic[1], atol=1e-3)
    assert torch.equal(stochastic[0], stochastic[2])
    # without `noise`, the generator also draws the start
    c = d.sample(oracle, (4, 1, 8, 8), steps=5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c, d.sample(oracle, (4, 1, 8, 8), steps=5, generator=torch.Generator().manual_seed(5)))


def test_clipping_and_dynamic_thresholding_in_samplers():
    d = GaussianDiffusion(100, "cosine", "x0")
    blown_up = lambda x, t: 3 * torch.randn_like(x)  # noqa: E731
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        x = d.sample(blown_up, (4, 3, 8, 8), sampler=sampler, steps=10)
        assert x.abs().max().item() <= 1.0
        x = d.sample(blown_up, (4, 3, 8, 8), sampler=sampler, steps=10, clip_denoised=False, dynamic_threshold=0.9)
        assert x.abs().max().item() <= 1.0 + 1e-6
    x = d.sample(blown_up, (4, 3, 8, 8), steps=10, clip_denoised=False)
    assert x.abs().max().item() > 1.0


def test_ddim_keeps_eps_consistent_with_the_clipped_x0():
    """With x0 clipped to 1, eta = 0 DDIM moves along x_t = a_t * 1 + b_t * z with z fixed:
    the noise direction is re-derived from the clipped x0, not taken from the raw output."""
    d = GaussianDiffusion(1000, "cosine", "x0")
    seen = []

    def model_fn(x, t):
        a, b = _coeffs(d, t)
        seen.append((x - a) / b)
        return torch.full_like(x, 3.0)

    noise = torch.randn(2, 1, 4, 4)
    x = d.sample(model_fn, noise.shape, steps=10, noise=noise)
    assert torch.equal(x, torch.ones_like(x))
    for z in seen[1:]:
        assert torch.allclose(z, seen[0], atol=1e-3)


def test_dynamic_thresholding():
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9
    assert torch.equal(dynamic_thresholding(inside, 0.995), inside)
    # a few outliers above 1 but a p-th percentile below 1: only the outliers are clipped
    spiky = inside.clone()
    spiky[0, 0, 0, :2] = 4.0
    out = dynamic_thresholding(spiky, 0.95)
    assert torch.equal(out[1], inside[1]) and out[0, 0, 0, :2].eq(1.0).all()
    assert torch.equal(out[0].flatten()[2:], inside[0].flatten()[2:])
    # a sample that is mostly outside is rescaled by its percentile s, into [-1, 1]
    wide = torch.randn(2, 3, 8, 8, generator=g) * 3
    out = dynamic_thresholding(wide, 0.9)
    assert out.abs().max().item() <= 1.0
    flat = wide.abs().flatten(1)
    s = flat.sort(dim=1).values[:, math.ceil(0.9 * flat.shape[1]) - 1].view(-1, 1, 1, 1)
    assert torch.allclose(out, wide.clamp(-s, s) / s)


# ----------------------------------------------------------------------------- guidance

class CountingModel:
    """model(x, t, c): the first C channels depend on the condition, the next C are the
    condition's own value (a stand-in for learned-variance channels)."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, c):
        self.batches.append(x.shape[0])
        emb = c["emb"] * c["mask"] if isinstance(c, dict) else c
        emb = emb.view(-1, 1, 1, 1)
        return torch.cat([x * emb + t.view(-1, 1, 1, 1), (emb + 10).expand_as(x)], dim=1)


def test_guidance_scale_one_is_the_conditional_model():
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    out = classifier_free_guidance(model, cond, uncond, 1.0)(x, t)
    assert model.batches == [3]
    assert torch.equal(out, model(x, t, cond))


def test_guidance_extrapolates_in_one_batched_call():
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 0.0])
    out = classifier_free_guidance(model, cond, uncond, 4.0)(x, t)
    assert model.batches == [6]
    c_out, u_out = model(x, t, cond), model(x, t, uncond)
    assert out.shape == (3, 4, 4, 4)
    assert torch.allclose(out[:, :2], u_out[:, :2] + 4.0 * (c_out[:, :2] - u_out[:, :2]))
    assert torch.equal(out[:, 2:], c_out[:, 2:])  # variance channels from the conditional pass


def test_guidance_with_dict_conditions_and_a_shared_null():
    model, x, t = CountingModel(), torch.randn(2, 1, 4, 4), torch.tensor([0, 9])
    cond = {"emb": torch.tensor([2.0, 3.0]), "mask": torch.tensor([1.0, 1.0])}
    uncond = {"emb": torch.tensor([0.5]), "mask": torch.tensor([1.0])}  # batch 1, shared
    out = classifier_free_guidance(model, cond, uncond, 2.0, channels=1)(x, t)
    full_uncond = {"emb": torch.tensor([0.5, 0.5]), "mask": torch.ones(2)}
    c_out, u_out = model(x, t, cond), model(x, t, full_uncond)
    assert torch.allclose(out[:, :1], 2 * c_out[:, :1] - u_out[:, :1])
    assert torch.equal(out[:, 1:], c_out[:, 1:])


def test_guided_sampling_runs_end_to_end():
    d = GaussianDiffusion(100, "cosine", "eps", learned_variance=True)
    model = CountingModel()
    fn = classifier_free_guidance(lambda x, t, c: 0.01 * model(x, t, c), torch.ones(2), torch.zeros(2), 3.0)
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        x = d.sample(fn, (2, 2, 4, 4), sampler=sampler, steps=5)
        assert torch.isfinite(x).all()


def test_drop_condition():
    mask = drop_condition(10_000, 0.1, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (10_000,)
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(mask, drop_condition(10_000, 0.1, torch.Generator().manual_seed(0)))
    assert not drop_condition((4, 2), 0.0).any() and drop_condition(5, 1.0).all()
