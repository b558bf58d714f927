"""LightningModule for Pix2Pix (Isola et al. 2017, "Image-to-Image Translation with Conditional
Adversarial Networks") on the shared phase machinery (`kiln.modules.gan.lit_module`): a U-Net G
and a conditional 70x70 PatchGAN D, the cross-entropy GAN loss (G's non-saturating form, 3.1)
plus L1 to the target weighted 100 (eq. 4), D's loss halved (3.3), Adam at 2e-4 with betas
(0.5, 0.999), N(0, 0.02) initialisation. One G pass per iteration serves both phases, so its
dropout noise is one draw per iteration (`reuse_fake`); with batch norm D sees real and generated
pairs in separate passes. Over several ranks, batch norm normalises by the global batch
(cross-replica, `kiln.modules.blocks.cross_replica_bn`) and the dropout masks are drawn for the
global batch, so that N processes train as one holding the global batch would.

Sampling (`kiln sample --input`, `translate`, the evaluator) keeps the paper's dropout noise and
normalises with the running statistics batch norm kept in training (`eval()`), not the batch's:
the paper tested with the test batch's statistics at batch size 1, where they are one image's; kiln
uses the running ones so that an output does not depend on what else is in its batch, and draws
each image's dropout noise from its own seed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.modules.blocks.cross_replica_bn import convert_cross_replica
from kiln.modules.blocks.images import to_shape
from kiln.modules.blocks.patchgan import Norm
from kiln.modules.blocks.translators import AlwaysDropout, UNetGenerator
from kiln.modules.ema import weights_for_sampling
from kiln.modules.family import Grid, Spec
from kiln.modules.gan.lit_module import AdversarialModule, GanLoss
from kiln.modules.gan.unpaired import keep_first
from kiln.modules.pix2pix.networks import ConditionalPair, PairDiscriminator


class Pix2PixModule(AdversarialModule):
    """Pix2Pix: batches of `input` and `target` images (`kiln.datamodules.mappers.PairedImages`).

    Args:
        image_size: the side images are translated at (a multiple of 2 ** downs).
        in_channels / out_channels: the input's and the target's channels.
        g_channels / downs: the U-Net (64 and 8 for unet_256).
        d_channels / d_layers: the PatchGAN (64 and 3: 70x70 patches).
        norm: "batch" (the paper) or "instance", in both networks.
        l1_weight: lambda of the L1 term (100).
        grid_size: pairs in the sample grid (the first training batch's, kept).
        loss, lr_g, lr_d, betas, lr_constant_steps, lr_decay_steps: as `AdversarialModule`.
    """

    reuse_fake = True

    def __init__(self, image_size: int = 256, in_channels: int = 3, out_channels: int = 3, g_channels: int = 64,
                 downs: int = 8, d_channels: int = 64, d_layers: int = 3, norm: Norm = "batch",
                 l1_weight: float = 100.0, grid_size: int = 8, loss: GanLoss = "non_saturating", lr_g: float = 2e-4,
                 lr_d: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), lr_constant_steps: int | None = None,
                 lr_decay_steps: int = 0):
        super().__init__(loss=loss, lr_g=lr_g, lr_d=lr_d, betas_g=betas, betas_d=betas, d_reg_interval=None,
                         d_loss_weight=0.5, lr_constant_steps=lr_constant_steps, lr_decay_steps=lr_decay_steps)
        if image_size % 2 ** downs:
            raise ValueError(f"image_size {image_size} is not a multiple of 2 ** downs = {2 ** downs}")
        if l1_weight < 0:
            raise ValueError(f"l1_weight must be non-negative, got {l1_weight}")
        self.save_hyperparameters()
        self.model = ConditionalPair(UNetGenerator(in_channels, out_channels, g_channels, downs, norm),
                             PairDiscriminator(in_channels, out_channels, d_channels, d_layers, norm))
        self._grid: tuple[Tensor, Tensor] | None = None  # (inputs, targets) of the sample grid

    def spec(self) -> Spec:
        return self.gan_spec("pix2pix", conditions=("inputs",), evaluation="translation")

    def plan_inputs(self, batch_size: int) -> tuple[Tensor]:
        hp = self.hparams
        return (torch.zeros(batch_size, hp.in_channels, hp.image_size, hp.image_size, device=self.device),)

    def plan_batch(self, batch_size: int) -> dict[str, Tensor]:
        hp = self.hparams
        shape = (batch_size, hp.in_channels, hp.image_size, hp.image_size)
        return {"input": torch.zeros(shape, device=self.device),
                "target": torch.zeros(batch_size, hp.out_channels, hp.image_size, hp.image_size, device=self.device)}

    def configure_model(self) -> None:
        # Over several ranks, batch norm normalises by the global batch's statistics, as one
        # process holding it would (and its running statistics follow the global batch).
        if self.hparams.norm == "batch" and self.trainer.world_size > 1:
            for net in (self.generator, self.discriminator):
                convert_cross_replica(net, functools.partial(self.sum_over_ranks, differentiable=True))

    # -- training --------------------------------------------------------------------------------
    def _images(self, images: Tensor, channels: int) -> Tensor:
        return to_shape(images, (channels, self.hparams.image_size, self.hparams.image_size))

    def _pair(self, batch: dict) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        inputs, targets = self._images(batch["input"], hp.in_channels), self._images(batch["target"], hp.out_channels)
        self._grid = keep_first(self._grid, (inputs, targets), hp.grid_size)  # the grid: the first pairs trained on
        return inputs, targets

    def training_step(self, batch: dict, batch_idx: int) -> None:
        # Dropout masks drawn for the global batch, this rank's share kept (sampling: one image's).
        dropouts = [m for m in self.generator.modules() if isinstance(m, AlwaysDropout)]
        for m in dropouts:
            m.share = self.share()
        try:
            super().training_step(batch, batch_idx)
        finally:
            for m in dropouts:
                m.share = (0, 1)

    def real(self, batch: dict) -> tuple[Tensor, Tensor]:
        inputs, targets = self._pair(batch)
        return targets, inputs

    def fake(self, batch: dict, n: int) -> tuple[Tensor, Tensor]:
        inputs, _ = self._pair(batch)
        return self.generator(inputs[:n]), inputs[:n]

    def generator_extra(self, batch: dict, fake: Tensor, condition: Tensor | None) -> dict[str, Tensor]:
        _, targets = self._pair(batch)
        return {"l1": F.l1_loss(fake, targets[:len(fake)]) * self.hparams.l1_weight}

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, inputs: Tensor, mode: str = "a2b", seeds: list[int] | None = None, *,
                  use_ema: bool | None = None) -> Tensor:
        """Each input alone, its dropout noise from its seed, batch norm's running statistics."""
        if mode != "a2b":
            raise ValueError(f"Pix2Pix translates one way (a2b), not {mode!r}")
        seeds = list(range(len(inputs))) if seeds is None else seeds
        net = weights_for_sampling(self, use_ema)
        was_training = net.training
        net.eval()
        inputs = self._images(inputs.to(self.device, self.dtype), self.hparams.in_channels)
        outputs = []
        for image, seed in zip(inputs, seeds):
            with torch.random.fork_rng(devices=[]):  # AlwaysDropout draws from the global generator
                torch.manual_seed(seed)
                outputs.append(net(image[None]))
        net.train(was_training)
        return torch.cat(outputs)

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None,
                 inputs: Tensor | None = None) -> Tensor:
        """`kiln sample --input`: `num` translations of each input (each its own dropout noise)."""
        if inputs is None or not len(inputs):
            raise ValueError("Pix2Pix translates images: give at least one --input")
        repeated = inputs.repeat_interleave(num, 0)
        return self.translate(repeated, seeds=[seed * 1_000_003 + i for i in range(len(repeated))], use_ema=use_ema)

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid | None:
        """Rows of inputs, their translations and the targets (the first training pairs)."""
        if self._grid is None:
            return None
        outputs = self.translate(self._grid[0], use_ema=use_ema)
        inputs, targets = (to_shape(x.to(outputs), outputs.shape[1:]) for x in self._grid)
        return Grid(torch.cat([inputs, outputs, targets]), len(outputs), ["input", "output", "target"])
