"""LightningModule for CycleGAN (Zhu et al. 2017, "Unpaired Image-to-Image Translation using
Cycle-Consistent Adversarial Networks") on the shared phase machinery (`kiln.modules.gan.lit_module`).

Two ResNet generators, G_ab and G_ba, and two 70x70 PatchGANs, D_a and D_b, with instance norm
(appendix 7.2), trained on unpaired batches of `a` and `b` images
(`kiln.datamodules.mappers.UnpairedImages`):

    D phase   LSGAN (3.1, 4 "Training details"): D_b on real b against G_ab(a), D_a on real a
              against G_ba(b), each generated image drawn through a 50-image history pool; each D's
              loss halved (the authors' code: it slows D relative to G)
    G phase   LSGAN on both generated batches, plus the cycle losses lambda (|G_ba(G_ab(a)) - a| +
              |G_ab(G_ba(b)) - b|) with lambda = 10 (eq. 2-3), plus the identity losses
              0.5 lambda (|G_ab(b) - b| + |G_ba(a) - a|) (5.2, Taigara et al.)

One Adam (2e-4, betas (0.5, 0.999)) steps both generators and one both discriminators, as in the
authors' code; the learning rate is held, then decays linearly to 0 (`lr_constant_steps`,
`lr_decay_steps`; the paper: 100 epochs each). Each network is its own component (`kiln plan`,
FSDP2 units): `generator_a2b`, `generator_b2a`, `discriminator_a`, `discriminator_b`.

The generated batches of an iteration are made once and serve both phases
(`kiln.modules.gan.unpaired`, as are sampling both ways and the grid). kiln
steps D before G within an iteration, as every kiln GAN does (the authors' code steps G first);
D's pools then hold this iteration's images as G is about to be scored on them.

Each process keeps its own two pools (as each GPU would); a checkpoint holds every rank's, gathered,
and a resumed run gives each rank its own back (`kiln.modules.blocks.image_pool`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.modules.blocks.adversarial import discriminator_loss, generator_loss
from kiln.modules.blocks.image_pool import ImagePool
from kiln.modules.blocks.patchgan import Norm, PatchGAN
from kiln.modules.blocks.translators import ResnetGenerator
from kiln.modules.family import Spec
from kiln.modules.gan.lit_module import GANPair, GanLoss
from kiln.modules.gan.unpaired import MODES, Networks, UnpairedModule


class CycleGANModule(UnpairedModule):
    """CycleGAN.

    Args:
        image_size / channels: the side and channels images are translated at (sides divisible by 4).
        g_channels / g_blocks: each ResNet generator (64 and 9: resnet_9blocks; the paper: 6 below 256 px).
        d_channels / d_layers: each PatchGAN (64 and 3: 70x70 patches).
        norm: "instance" (the paper) or "batch", in all four networks.
        cycle_weight: lambda of the cycle losses (10).
        identity_weight: the identity losses' weight as a fraction of lambda (0.5; 0 turns them off).
        pool_size: generated images each D's history pool holds (50; 0: no pool).
        grid_size: images per row of the sample grid.
        loss, lr_g, lr_d, betas, lr_constant_steps, lr_decay_steps: as `AdversarialModule`.
    """

    def __init__(self, image_size: int = 256, channels: int = 3, g_channels: int = 64, g_blocks: int = 9,
                 d_channels: int = 64, d_layers: int = 3, norm: Norm = "instance", cycle_weight: float = 10.0,
                 identity_weight: float = 0.5, pool_size: int = 50, grid_size: int = 8,
                 loss: GanLoss = "least_squares", lr_g: float = 2e-4, lr_d: float = 2e-4,
                 betas: tuple[float, float] = (0.5, 0.999), lr_constant_steps: int | None = None,
                 lr_decay_steps: int = 0):
        super().__init__(loss=loss, lr_g=lr_g, lr_d=lr_d, betas_g=betas, betas_d=betas, d_reg_interval=None,
                         d_loss_weight=0.5, lr_constant_steps=lr_constant_steps, lr_decay_steps=lr_decay_steps)
        if image_size % 4:
            raise ValueError(f"image_size {image_size} is not a multiple of 4 (the generators down-sample twice)")
        for name, value in (("cycle_weight", cycle_weight), ("identity_weight", identity_weight)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.save_hyperparameters()
        generator = Networks(**{m: ResnetGenerator(channels, channels, g_channels, g_blocks, norm) for m in MODES})
        discriminator = Networks(a=PatchGAN(channels, d_channels, d_layers, norm), b=PatchGAN(channels, d_channels, d_layers, norm))
        self.model = GANPair(generator, discriminator)
        self.pools = {domain: ImagePool(pool_size) for domain in ("a", "b")}

    def spec(self) -> Spec:
        return self.unpaired_spec("cyclegan")

    def setup(self, stage: str) -> None:
        # Each rank's pools draw from their own generator (a resumed run's come back from the checkpoint after this).
        self.pools = {domain: ImagePool(self.hparams.pool_size, rank=self.share()[0]) for domain in ("a", "b")}

    # -- training ----------------------------------------------------------------------------------
    def d_main(self, batch: dict) -> dict[str, Tensor]:
        a, b = self.domains(batch)
        fake_b, fake_a = (x.detach() for x in self.generated_pair(batch))
        if not fake_b.is_meta:  # `kiln plan` runs the phases on the meta device, without data to pool
            fake_b, fake_a = self.pools["b"].query(fake_b), self.pools["a"].query(fake_a)
        out = {f"d_{domain}": discriminator_loss(self._judge(domain, real), self._judge(domain, fake), self.gan_loss)
               * self.d_loss_weight for domain, real, fake in (("a", a, fake_a), ("b", b, fake_b))}
        out["loss"] = out["d_a"] + out["d_b"]
        return out

    def g_main(self, batch: dict) -> dict[str, Tensor]:
        a, b = self.domains(batch)
        fake_b, fake_a = self.generated_pair(batch)
        hp = self.hparams
        out = {"adversarial": generator_loss(self._judge("b", fake_b), self.gan_loss)
               + generator_loss(self._judge("a", fake_a), self.gan_loss)}
        out["cycle"] = hp.cycle_weight * (F.l1_loss(self.generator.b2a(fake_b), a) + F.l1_loss(self.generator.a2b(fake_a), b))
        if hp.identity_weight > 0:
            out["identity"] = hp.identity_weight * hp.cycle_weight * (
                F.l1_loss(self.generator.a2b(b), b) + F.l1_loss(self.generator.b2a(a), a))
        out["loss"] = sum(out.values())
        return out

    def _judge(self, domain: str, images: Tensor) -> Tensor:
        return getattr(self.discriminator, domain)(self.augmented(images))

    # -- the pools in checkpoints ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every rank's pools, gathered (every rank saves, rank 0 writes)."""
        hp, pools = self.hparams, {}
        for domain, pool in self.pools.items():
            images = torch.zeros(hp.pool_size, hp.channels, hp.image_size, hp.image_size, device=self.device, dtype=self.dtype)
            if len(pool):
                images[:len(pool)] = torch.stack(pool.images).to(images)
            state = {"images": images, "count": torch.tensor(len(pool), device=self.device),
                     "generator": pool.generator.get_state().to(self.device)}
            gathered = {k: self.all_gather(v) for k, v in state.items()}
            if self.share()[1] == 1:
                gathered = {k: v[None] for k, v in gathered.items()}
            pools[domain] = {k: v.cpu() for k, v in gathered.items()}
        checkpoint["image_pools"] = pools

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        pools = checkpoint.get("image_pools")
        if pools is None:
            return
        rank, world = self.share()
        for domain, saved in pools.items():
            if len(saved["count"]) != world:
                continue  # another number of ranks: fresh pools (they refill within 50 images)
            count = int(saved["count"][rank])
            self.pools[domain].load_state_dict({"size": self.hparams.pool_size, "images": saved["images"][rank][:count],
                                                "generator": saved["generator"][rank]})
