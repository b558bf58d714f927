"""LightningModule for StyleGAN2 with ADA (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"; "Training Generative Adversarial Networks with Limited Data") on the shared
phase machinery (`kiln.modules.gan.lit_module`):

    Dmain  non-saturating loss on augmented reals and fakes (ADA's controller reads D(real))
    Dreg   R1 (gamma / 2 * ||grad D(x)||^2) every 16 iterations
    Gmain  non-saturating loss, with style mixing (prob 0.9: one random layer cut-off per batch)
    Greg   path-length regularisation every 4 iterations on half a batch (section 3.2):
           a = sqrt(E_y[||J_w^T y||^2] / num_ws) for y ~ N(0, I / pixels),
           loss = pl_weight * (a - mean)^2, mean a running average (decay 0.01)

lazily, with the lr/beta rescaling; Adam 0.002, betas (0, 0.99). `w_avg` tracks the mean w for the
truncation trick (w' = w_avg + psi (w - w_avg)); an EMA of G (`kiln.trainers.callbacks.ema.EMA`) samples.

`kiln sample --mode project --input IMG` inverts G (appendix D's projector): w (or w+ with
`--mode project-w+`) starts at the mean w, the noise maps at random, both optimised by Adam with
the paper's ramped learning rate and decaying w noise, against a distance (pixel MSE, or an
LPIPS-style distance on VGG16 features: HED's trained trunk) plus the noise maps' autocorrelation
regulariser at every scale; the noise maps are renormalised after each step.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.modules.blocks.ada import PRESETS, AdaptiveAugment
from kiln.modules.blocks.images import to_shape
from kiln.modules.gan.lit_module import AdversarialModule, GANPair, _size
from kiln.modules.stylegan.networks import Discriminator, Generator
from kiln.modules.ema import weights_for_sampling
from kiln.modules.family import Generated, Grid, Spec

MODES = ("sample", "project", "project-w+")
SEED_STRIDE = 1_000_003  # sample i of seed s draws from seed s * stride + i


class StyleGAN2Module(AdversarialModule):
    """StyleGAN2 (config-f by default, at `image_size`), unconditional.

    Args:
        image_size / channels: images generated and judged (real ones are resized and grey <-> RGB
            converted to match); image_size a power of two.
        z_dim, w_dim, mapping_layers, mapping_lr_mul: the mapping network.
        channel_base, channel_max: G's widths, min(channel_base / resolution, channel_max);
            d_channel_base, d_channel_max: D's (default: G's).
        mbstd_group: minibatch-stddev group size.
        resample_filter: G's and D's 2x resampling filter, the paper's [1, 3, 3, 1] (binomial), or
            [1, 1] (G: nearest neighbour, D: 2x2 average), for images so small that the 4-tap
            filter's zero-padded border is most of them (see tests/test_stylegan.py's short run).
        r1_gamma, d_reg_interval: R1 and its lazy interval (the paper: 10 at 1024 px, 16).
        pl_weight, g_reg_interval, pl_batch_shrink, pl_decay: path-length regularisation (2, 4, 2, 0.01).
        style_mixing: probability of mixing two ws in a training batch (0.9).
        w_avg_beta: decay of the running mean of w.
        truncation: psi for sample grids, evaluation and `kiln sample` (1: none).
        augment: ADA's op set ("bgc", "bg", "b", "c") or None for no augmentation; augment_p its
            starting p; ada_target (None: p stays fixed), ada_kimg, ada_interval: the controller.
        project_steps, project_distance, project_noise_weight: the projector (1000 steps, "mse"
            or "vgg", 1e5).
        grid_size: sample grids are grid_size x grid_size, fixed seeds.
        loss, lr_g, lr_d, betas_g, betas_d, eps, d_steps: as `AdversarialModule`.
    """

    def __init__(
        self,
        image_size: int = 1024,
        channels: int = 3,
        z_dim: int = 512,
        w_dim: int = 512,
        mapping_layers: int = 8,
        mapping_lr_mul: float = 0.01,
        channel_base: int = 32768,
        channel_max: int = 512,
        d_channel_base: int | None = None,
        d_channel_max: int | None = None,
        mbstd_group: int = 4,
        resample_filter: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0),
        r1_gamma: float = 10.0,
        d_reg_interval: int | None = 16,
        pl_weight: float = 2.0,
        g_reg_interval: int | None = 4,
        pl_batch_shrink: int = 2,
        pl_decay: float = 0.01,
        style_mixing: float = 0.9,
        w_avg_beta: float = 0.995,
        truncation: float = 1.0,
        augment: str | None = None,
        augment_p: float = 0.0,
        ada_target: float | None = 0.6,
        ada_kimg: float = 500.0,
        ada_interval: int = 4,
        project_steps: int = 1000,
        project_distance: Literal["mse", "vgg"] = "mse",
        project_noise_weight: float = 1e5,
        grid_size: int = 8,
        loss: Literal["hinge", "non_saturating"] = "non_saturating",
        lr_g: float = 0.002,
        lr_d: float = 0.002,
        betas_g: tuple[float, float] = (0.0, 0.99),
        betas_d: tuple[float, float] = (0.0, 0.99),
        eps: float = 1e-8,
        d_steps: int = 1,
    ):
        super().__init__(loss=loss, lr_g=lr_g, lr_d=lr_d, betas_g=betas_g, betas_d=betas_d, eps=eps, r1_gamma=r1_gamma,
                         d_reg_interval=d_reg_interval, g_reg_interval=g_reg_interval, d_steps=d_steps)
        if not 0 <= style_mixing <= 1:
            raise ValueError(f"style_mixing is a probability, got {style_mixing}")
        if pl_weight < 0 or pl_batch_shrink < 1:
            raise ValueError(f"pl_weight must be >= 0 and pl_batch_shrink >= 1, got {pl_weight}, {pl_batch_shrink}")
        self._check_truncation(truncation)
        if augment is not None and augment not in PRESETS:
            raise ValueError(f"unknown augmentation {augment!r}; choose from {', '.join(PRESETS)} (or null for none)")
        if project_distance not in ("mse", "vgg"):
            raise ValueError(f"unknown projection distance {project_distance!r}; choose 'mse' or 'vgg'")
        if len(resample_filter) < 2 or sum(resample_filter) <= 0:
            raise ValueError(f"resample_filter needs at least 2 taps with a positive sum, got {list(resample_filter)}")
        self.save_hyperparameters()
        generator = Generator(image_size, channels, z_dim, w_dim, mapping_layers, mapping_lr_mul, channel_base,
                              channel_max, w_avg_beta, resample_filter)
        discriminator = Discriminator(image_size, channels, d_channel_base or channel_base, d_channel_max or channel_max,
                                      mbstd_group, resample_filter)
        self.model = GANPair(generator, discriminator)
        if augment is not None:
            self.augment = AdaptiveAugment(augment, augment_p, ada_target, ada_kimg, ada_interval)
        self.register_buffer("pl_mean", torch.zeros(()))

    @staticmethod
    def _check_truncation(psi: float) -> None:
        if not psi >= 0:
            raise ValueError(f"truncation psi must be non-negative (1: none), got {psi}")

    # -- declared to trainers/ -------------------------------------------------------------------
    def spec(self) -> Spec:
        # path length backpropagates through J^T y, as R1 through D's gradient
        return self.gan_spec("stylegan", conditions=("inputs",), modes=MODES,
                             options={"truncation": "truncation", "steps": "project_steps"},
                             double_backward=self.r1_gamma > 0 or self.has_generator_regulariser())

    def plan_inputs(self, batch_size: int) -> tuple[Tensor]:
        return (torch.zeros(batch_size, self.hparams.z_dim, device=self.device),)

    def plan_batch(self, batch_size: int) -> dict[str, Tensor]:
        hp = self.hparams
        return {"image": torch.zeros(batch_size, hp.channels, hp.image_size, hp.image_size, device=self.device)}

    # -- training --------------------------------------------------------------------------------
    def _images(self, images: Tensor) -> Tensor:
        return to_shape(images, (self.hparams.channels, self.hparams.image_size, self.hparams.image_size))

    def real(self, batch: dict) -> tuple[Tensor, None]:
        return self._images(batch["image"]), None

    def mix(self, ws: Tensor) -> Tensor:
        """Style mixing: with probability `style_mixing`, layers from a random cut-off on take a second
        latent's w (one cut-off per batch, as the paper's code)."""
        num_ws = ws.shape[1]
        if not self.hparams.style_mixing or torch.rand(()) >= self.hparams.style_mixing:
            return ws
        cutoff = int(torch.randint(1, num_ws, ()))
        other = self.generator.mapping_ws(self.randn(len(ws), self.hparams.z_dim))
        return torch.cat([ws[:, :cutoff], other[:, cutoff:]], dim=1)

    def noise(self, n: int) -> list[Tensor]:
        """Every noise input's maps for this rank's n images (drawn for the global batch)."""
        return [self.randn(n, 1, layer.resolution, layer.resolution) for layer in self.generator.noise_layers()]

    def fake(self, batch: dict, n: int) -> tuple[Tensor, None]:
        ws = self.generator.mapping_ws(self.randn(n, self.hparams.z_dim))
        if self.training:
            self.track_w_avg(ws[:, 0])
        return self.generator.synthesis(self.mix(ws), self.noise(n)), None

    @torch.no_grad()
    def track_w_avg(self, w: Tensor) -> None:
        """w_avg moves towards the mean w of the global batch (the same on every rank)."""
        mapping = self.generator.mapping
        mapping.w_avg.copy_(self.mean_over_ranks(w.mean(0)).lerp(mapping.w_avg, mapping.w_avg_beta))

    def has_generator_regulariser(self) -> bool:
        return self.hparams.pl_weight > 0

    def path_length(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(pl_weight * mean (a - running mean)^2, the lengths a); updates the running mean."""
        n = max(1, _size(batch) // self.hparams.pl_batch_shrink)
        ws = self.mix(self.generator.mapping_ws(self.randn(n, self.hparams.z_dim)))
        images = self.generator.synthesis(ws, self.noise(n))
        y = self.randn(n, *images.shape[1:]) / math.sqrt(images.shape[2] * images.shape[3])
        (grads,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)
        lengths = grads.square().sum(2).mean(1).sqrt()
        # The running mean of the global batch's lengths, through which the gradient reaches every rank.
        mean = self.pl_mean.lerp(self.mean_over_ranks(lengths.mean(), differentiable=True), self.hparams.pl_decay)
        self.pl_mean.copy_(mean.detach())
        return (lengths - mean).square().mean() * self.hparams.pl_weight, lengths

    def generator_regulariser(self, batch: dict) -> Tensor:
        return self.path_length(batch)[0]

    def g_reg(self, batch: dict) -> dict[str, Tensor]:
        loss, lengths = self.path_length(batch)
        return {"loss": loss, "pl_length": lengths.detach().mean(), "pl_mean": self.pl_mean.clone()}

    # -- sampling --------------------------------------------------------------------------------
    def latents(self, seeds: list[int]) -> tuple[Tensor, list[Tensor]]:
        """z and every layer's noise map per seed: sample i depends on its seed only."""
        layers = self.generator.noise_layers()
        zs, noises = [], [[] for _ in layers]
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            zs.append(torch.randn(self.hparams.z_dim, generator=g))
            for out, layer in zip(noises, layers):
                out.append(torch.randn(1, layer.resolution, layer.resolution, generator=g))
        return torch.stack(zs).to(self.device, self.dtype), [torch.stack(n).to(self.device, self.dtype) for n in noises]

    @torch.no_grad()
    def sample(self, seeds: list[int], psi: float, use_ema: bool | None = None) -> Tensor:
        net = weights_for_sampling(self, use_ema)
        z, noise = self.latents(seeds)
        return net(z, psi, noise)

    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None, mode: str | None = None,
                 inputs: Tensor | None = None) -> Tensor:
        """`kiln sample`: `num` images at the configured truncation psi (mode "sample"), or, with
        --mode project / project-w+ and --input images, G's reconstruction of each input
        (`project_steps` optimiser steps)."""
        mode = mode or ("project" if inputs is not None else "sample")
        if mode not in MODES:
            raise ValueError(f"unknown StyleGAN sampling mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "sample":
            if inputs is not None:
                raise ValueError("--input is for --mode project (or project-w+)")
            psi = self.hparams.truncation
            self._check_truncation(psi)
            return self.sample([seed * SEED_STRIDE + i for i in range(num)], psi, use_ema)
        if inputs is None:
            raise ValueError(f"--mode {mode} needs an image to project: --input IMG")
        steps = self.hparams.project_steps
        if steps < 1:
            raise ValueError(f"projection needs at least 1 step, got {steps}")
        targets = self._images(inputs.to(self.device).float()).repeat_interleave(num, 0)
        with torch.enable_grad():
            images, _ = self.project(targets, steps, w_plus=mode == "project-w+", seed=seed, use_ema=use_ema)
        return images

    def project(self, targets: Tensor, steps: int, w_plus: bool = False, seed: int = 0,
                w_avg_samples: int = 10_000, use_ema: bool | None = None) -> tuple[Tensor, Tensor]:
        """Appendix D's projector, each target optimised independently: -> (reconstructions, ws)."""
        net = weights_for_sampling(self, use_ema)
        g = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            w = net.mapping(torch.randn(w_avg_samples, self.hparams.z_dim, generator=g, device=self.device))
            w_avg, w_std = w.mean(0), (w - w.mean(0)).square().sum(1).mean().sqrt()
        n, num_ws = len(targets), net.num_ws
        w_opt = w_avg.repeat(n, num_ws if w_plus else 1, 1).requires_grad_(True)
        noise = [torch.randn(n, 1, layer.resolution, layer.resolution, generator=g, device=self.device).requires_grad_(True)
                 for layer in net.noise_layers()]
        optimizer = torch.optim.Adam([w_opt, *noise], betas=(0.9, 0.999), lr=0.1)
        distance = self._distance()
        for step in range(steps):
            t = step / steps
            w_noise = w_std * 0.05 * max(0.0, 1 - t / 0.75) ** 2
            ramp = min(1.0, (1 - t) / 0.25)
            lr = 0.1 * (0.5 - 0.5 * math.cos(ramp * math.pi)) * min(1.0, t / 0.05)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ws = (w_opt + torch.randn(w_opt.shape, generator=g, device=self.device) * w_noise).expand(-1, num_ws, -1)
            images = net.synthesis(ws, noise)
            loss = distance(images, targets).sum() + self.hparams.project_noise_weight * noise_regulariser(noise).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # keep the noise maps N(0, 1)
                for v in noise:
                    v -= v.mean(dim=(1, 2, 3), keepdim=True)
                    v *= v.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
        with torch.no_grad():
            ws = w_opt.detach().expand(-1, num_ws, -1)
            return net.synthesis(ws, [v.detach() for v in noise]), ws

    def _distance(self):
        """Per-image distance (N,): pixel MSE, or LPIPS-style on VGG16 relu1_2..relu4_3 (channel-unit
        features, squared differences averaged over pixels, summed over layers) with HED's trained trunk."""
        if self.hparams.project_distance == "mse":
            return lambda a, b: (a - b).square().mean(dim=(1, 2, 3))
        from kiln.modules.pretrained.hed import load_hed
        from kiln.modules.pretrained.vgg import caffe_input

        vgg = load_hed().vgg.to(self.device).eval().requires_grad_(False)
        layers = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")

        def features(x: Tensor) -> list[Tensor]:
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            if x.shape[-1] < 64:  # room for VGG's three pools
                x = F.interpolate(x, size=64, mode="bilinear", align_corners=False)
            return [f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10) for f in vgg(caffe_input((x + 1) / 2), layers)]

        def distance(a: Tensor, b: Tensor) -> Tensor:
            return sum((fa - fb).square().sum(1).mean(dim=(1, 2)) for fa, fb in zip(features(a), features(b)))

        return distance

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        """Unconditional: sample i from (seed, i) only, at the configured truncation."""
        return {"": (self.sample([seed * SEED_STRIDE + i for i in indices], self.hparams.truncation, use_ema).cpu(), None)}

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid:
        """grid_size x grid_size images from fixed seeds (the SampleGrid callback)."""
        k = self.hparams.grid_size
        return Grid(self.generate(k * k, 0, use_ema=use_ema), k)


def noise_regulariser(noise: list[Tensor]) -> Tensor:
    """Per image (N,): squared autocorrelation of each noise map at a one-pixel shift in x and y,
    at every scale of its pyramid down to 8x8 (appendix D), summed."""
    total = 0
    for v in noise:
        while True:
            total = total + (v * v.roll(1, 3)).mean(dim=(1, 2, 3)).square() + (v * v.roll(1, 2)).mean(dim=(1, 2, 3)).square()
            if v.shape[-1] <= 8:
                break
            v = F.avg_pool2d(v, 2)
    return total
