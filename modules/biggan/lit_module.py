"""LightningModule for BigGAN: class-conditional adversarial training on the shared phase
machinery (`kiln.modules.gan.lit_module`): hinge loss, Adam with beta1 = 0, orthogonal
regularisation of G added to its loss every step, cross-replica BatchNorm in G when the run has
more than one rank, and an EMA of G (the `kiln.trainers.callbacks.ema.EMA` callback) for sampling.

Sampling uses the truncation trick: latent entries beyond the threshold are redrawn.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from kiln.modules.biggan.networks import Discriminator, Generator, orthogonal_regularisation, truncated_normal
from kiln.modules.gan.lit_module import AdversarialModule, GANPair, GanLoss
from kiln.modules.blocks.cross_replica_bn import convert_cross_replica
from kiln.modules.blocks.images import to_shape
from kiln.modules.ema import weights_for_sampling
from kiln.modules.family import Generated, Grid, Spec


class BigGANModule(AdversarialModule):
    """BigGAN.

    Args:
        num_classes: classes (labels in [0, num_classes)).
        image_size / channels: images generated and judged (real images are resized and
            grey <-> RGB converted to match).
        ch_g, g_channel_mult, g_attention, dim_z, shared_dim: the generator (`Generator`); its
            first feature map is image_size / 2 ** (len(g_channel_mult) - 1) wide.
        ch_d, d_channel_mult, d_downsample, d_attention: the discriminator (`Discriminator`).
        orth_reg: beta of orthogonal regularisation on G (the paper: 1e-4; 0 turns it off), at the
            paper's code's strength (`orthogonal_regularisation`: half the paper's formula's).
        cross_replica_bn: G's BatchNorm statistics over all ranks when there are several.
        truncation: the sampling threshold for grids, evaluation and `kiln sample` (None: no truncation).
        grid_classes, grid_per_class: the sample grid: one row per class, fixed noise.
        loss, lr_g, lr_d, betas_g, betas_d, eps, d_steps: as `AdversarialModule` (the paper:
            hinge, 5e-5 / 2e-4, (0, 0.999), 2 D steps per G step).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        ch_g: int = 32,
        g_channel_mult: list[int] = [4, 4, 2, 1],  # noqa: B006 - jsonargparse reads the default
        g_attention: list[int] = [],  # noqa: B006
        dim_z: int = 120,
        shared_dim: int = 128,
        ch_d: int = 32,
        d_channel_mult: list[int] = [1, 2, 4, 4],  # noqa: B006
        d_downsample: list[bool] | None = None,
        d_attention: list[int] = [],  # noqa: B006
        orth_reg: float = 1e-4,
        cross_replica_bn: bool = True,
        truncation: float | None = None,
        grid_classes: list[int] | None = None,
        grid_per_class: int = 8,
        loss: GanLoss = "hinge",
        lr_g: float = 5e-5,
        lr_d: float = 2e-4,
        betas_g: tuple[float, float] = (0.0, 0.999),
        betas_d: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-6,
        d_steps: int = 2,
    ):
        super().__init__(loss=loss, lr_g=lr_g, lr_d=lr_d, betas_g=betas_g, betas_d=betas_d, eps=eps, r1_gamma=0.0,
                         g_reg_interval=None, d_steps=d_steps)
        blocks = len(g_channel_mult) - 1
        if blocks < 1 or image_size % 2 ** blocks:
            raise ValueError(f"image_size {image_size} is not a whole number of {2 ** blocks}s: g_channel_mult "
                             f"{list(g_channel_mult)} up-samples {blocks} times")
        if orth_reg < 0:
            raise ValueError(f"orth_reg must be non-negative, got {orth_reg}")
        if truncation is not None and not truncation > 0:
            raise ValueError(f"truncation must be positive (or null for none), got {truncation}")
        grid_classes = list(range(num_classes)) if grid_classes is None else list(grid_classes)
        self._check_classes(grid_classes, num_classes)
        self.save_hyperparameters()
        generator = Generator(num_classes, ch_g, tuple(g_channel_mult), image_size // 2 ** blocks, dim_z, shared_dim,
                              tuple(g_attention), channels)
        discriminator = Discriminator(num_classes, image_size, ch_d, tuple(d_channel_mult),
                                      None if d_downsample is None else tuple(d_downsample), tuple(d_attention), channels)
        self.model = GANPair(generator, discriminator)

    @staticmethod
    def _check_classes(classes: list[int], num_classes: int) -> None:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is outside [0, {num_classes})")

    # -- declared to trainers/ -------------------------------------------------------------------
    def spec(self) -> Spec:
        return self.gan_spec("biggan", conditions=("classes",), options={"truncation": "truncation"})

    def plan_inputs(self, batch_size: int) -> tuple[Tensor, Tensor]:
        z = torch.zeros(batch_size, self.hparams.dim_z, device=self.device)
        return z, torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def plan_batch(self, batch_size: int) -> dict[str, Tensor]:
        hp = self.hparams
        return {"image": torch.zeros(batch_size, hp.channels, hp.image_size, hp.image_size, device=self.device),
                "label": torch.zeros(batch_size, dtype=torch.long, device=self.device)}

    def configure_model(self) -> None:
        if self.hparams.cross_replica_bn and self.trainer.world_size > 1:
            convert_cross_replica(self.generator, functools.partial(self.sum_over_ranks, differentiable=True))

    # -- training --------------------------------------------------------------------------------
    def _images(self, images: Tensor) -> Tensor:
        return to_shape(images, (self.hparams.channels, self.hparams.image_size, self.hparams.image_size))

    def real(self, batch: dict) -> tuple[Tensor, Tensor]:
        return self._images(batch["image"]), batch["label"]

    def fake(self, batch: dict, n: int) -> tuple[Tensor, Tensor]:
        # Conditioned on the real batch's classes: a fake for each real, class for class.
        labels = batch["label"][:n]
        return self.generator(self.randn(len(labels), self.hparams.dim_z), labels), labels

    def has_generator_regulariser(self) -> bool:
        return self.hparams.orth_reg > 0

    def generator_regulariser(self, batch: dict) -> Tensor:
        # Every weight matrix of G but the shared embedding (the paper's code exempts it), whole:
        # under FSDP2 a weight read outside a forward is this rank's rows (a DTensor), which the
        # penalty cannot split; gathering it is differentiable, each rank's rows take their share.
        weights = [p.full_tensor() if hasattr(p, "full_tensor") else p
                   for name, p in self.generator.named_parameters() if p.ndim >= 2 and not name.startswith("shared.")]
        return orthogonal_regularisation(weights, self.hparams.orth_reg)

    # -- sampling --------------------------------------------------------------------------------
    def latents(self, seeds: list[int], truncation: float | None) -> Tensor:
        """One latent per seed (sample i depends on its seed only), truncated at `truncation`."""
        return torch.stack([truncated_normal((self.hparams.dim_z,), truncation, torch.Generator().manual_seed(s))
                            for s in seeds]).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(self, labels: Tensor, seeds: list[int], truncation: float | None, use_ema: bool | None = None) -> Tensor:
        net = weights_for_sampling(self, use_ema)
        was_training = net.training
        net.eval()  # BatchNorm's running statistics, and no power iteration in spectral norm
        images = net(self.latents(seeds, truncation), labels.to(self.device))
        net.train(was_training)
        return images

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None,
                 classes: list[int] | None = None) -> Tensor:
        """`kiln sample`: `num` images of each class in `classes` (no classes: `num` images going
        through the classes in turn), at the configured truncation."""
        n, truncation = self.hparams.num_classes, self.hparams.truncation
        if truncation is not None and not truncation > 0:
            raise ValueError(f"--truncation must be positive, got {truncation}")
        if classes is None:
            labels = torch.arange(num) % n
        else:
            self._check_classes(list(classes), n)
            labels = torch.tensor([c for c in classes for _ in range(num)])
        seeds = [seed * 1_000_003 + i for i in range(len(labels))]
        return self.sample(labels, seeds, truncation, use_ema)

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        """Sample i: class i mod num_classes, latent from (seed, i) only, at the configured truncation."""
        labels = torch.tensor([i % self.hparams.num_classes for i in indices])
        images = self.sample(labels, [seed * 1_000_003 + i for i in indices], self.hparams.truncation, use_ema)
        return {"": (images.cpu(), labels)}

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid:
        """`grid_classes` x `grid_per_class`, fixed noise, a row per class labelled with its
        index (the SampleGrid callback)."""
        hp = self.hparams
        # hparams hold the argument as given (None under the CLI): every class, as documented
        classes = list(range(hp.num_classes)) if hp.grid_classes is None else list(hp.grid_classes)
        return Grid(self.generate(hp.grid_per_class, 0, classes=classes, use_ema=use_ema), hp.grid_per_class,
                    [f"class {c}" for c in classes])
