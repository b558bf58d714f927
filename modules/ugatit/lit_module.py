"""LightningModule for U-GAT-IT (Kim et al. 2020, "U-GAT-IT: Unsupervised Generative Attentional
Networks with Adaptive Layer-Instance Normalization for Image-to-Image Translation") on the
unpaired translators' machinery (`kiln.modules.gan.unpaired`).

Two generators with CAM attention and AdaLIN (`kiln.modules.ugatit.networks`), and per domain a
global and a local discriminator, each with its own CAM. The losses (2.2; weights of 3.1 and the
authors' code):

    D phase   least squares on each D's logits map and on its CAM logits, real against G's output,
              for the four discriminators (weight 1 each)
    G phase   least squares on the four discriminators' logits and CAM logits of the translations
              (lambda_1 = 1), cycle L1 (lambda_2 = 10), identity L1 (lambda_3 = 10), and the CAM
              loss (lambda_4 = 1000): G_ab's auxiliary classifier must tell a's images (logit 1,
              "to translate") from b's (0, "already in b's domain"), G_ba's alike

Adam at 1e-4, betas (0.5, 0.999), weight decay 1e-4 (L2, as the code adds it), the learning rate
decaying linearly to 0 over the second half of training (`lr_constant_steps`, `lr_decay_steps`).
Every AdaLIN and LIN rho is clipped to [0, 1] after each generator step (`clip_rho`). The light
variant (`light: true`) is the authors' `--light`. Sampling runs G in `eval()`: instance, layer
and AdaLIN normalisation use each image's own statistics, so an output does not depend on its batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.modules.family import Spec
from kiln.modules.gan.lit_module import GANPair
from kiln.modules.gan.unpaired import MODES, Networks, UnpairedModule
from kiln.modules.ugatit.networks import Discriminator, Generator, clip_rho

DISCRIMINATORS = ("global_a", "local_a", "global_b", "local_b")


def _least_squares(logits: Tensor, target: float) -> Tensor:
    return (logits - target).square().mean()


class UGATITModule(UnpairedModule):
    """U-GAT-IT: batches of `a` and `b` images (`kiln.datamodules.mappers.UnpairedImages`).

    Args:
        image_size / channels: the side and channels images are translated at (divisible by 4).
        g_channels / g_blocks: each generator (64 and 4 in the paper).
        light: the light variant (the MLP on pooled features).
        d_channels: each discriminator's first width (64).
        global_layers / local_layers: the global and local discriminators' 4x4 convolutions (7 and
            5 at 256 px: 6x6 and 30x30 logits; fewer below, so that each still sees what it should).
        adv_weight / cycle_weight / identity_weight / cam_weight: lambda_1..4 (1, 10, 10, 1000).
        grid_size: images per row of the sample grid.
        lr, betas, weight_decay, lr_constant_steps, lr_decay_steps: the optimisers (both alike).
    """

    def __init__(self, image_size: int = 256, channels: int = 3, g_channels: int = 64, g_blocks: int = 4,
                 light: bool = False, d_channels: int = 64, global_layers: int = 7, local_layers: int = 5,
                 adv_weight: float = 1.0, cycle_weight: float = 10.0, identity_weight: float = 10.0,
                 cam_weight: float = 1000.0, grid_size: int = 8, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-4,
                 lr_constant_steps: int | None = None, lr_decay_steps: int = 0):
        super().__init__(loss="least_squares", lr_g=lr, lr_d=lr, betas_g=betas, betas_d=betas, d_reg_interval=None,
                         lr_constant_steps=lr_constant_steps, lr_decay_steps=lr_decay_steps, weight_decay=weight_decay)
        for name, value in (("adv_weight", adv_weight), ("cycle_weight", cycle_weight),
                            ("identity_weight", identity_weight), ("cam_weight", cam_weight)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        self.save_hyperparameters()
        generator = Networks(**{m: Generator(channels, channels, g_channels, g_blocks, image_size, light) for m in MODES})
        layers = {"global": global_layers, "local": local_layers}
        discriminator = Networks(**{name: Discriminator(channels, d_channels, layers[name.split("_")[0]])
                                    for name in DISCRIMINATORS})
        self.model = GANPair(generator, discriminator)

    def spec(self) -> Spec:
        return self.unpaired_spec("ugatit")

    def _judged(self, domain: str, images: Tensor) -> list[Tensor]:
        """The logits map and the CAM logits of both of `domain`'s discriminators."""
        out = []
        for scale in ("global", "local"):
            logits, cam_logits, _ = getattr(self.discriminator, f"{scale}_{domain}")(self.augmented(images))
            out += [logits, cam_logits]
        return out

    def d_main(self, batch: dict) -> dict[str, Tensor]:
        a, b = self.domains(batch)
        (fake_b, *_), (fake_a, *_) = self.generated_pair(batch)
        out = {}
        for domain, real, fake in (("a", a, fake_a.detach()), ("b", b, fake_b.detach())):
            out[f"d_{domain}"] = self.hparams.adv_weight * sum(
                _least_squares(r, 1.0) + _least_squares(f, 0.0) for r, f in zip(self._judged(domain, real), self._judged(domain, fake)))
        out["loss"] = out["d_a"] + out["d_b"]
        return out

    def g_main(self, batch: dict) -> dict[str, Tensor]:
        hp = self.hparams
        a, b = self.domains(batch)
        (fake_b, cam_ab, _), (fake_a, cam_ba, _) = self.generated_pair(batch)
        same_a, cam_aa, _ = self.generator.b2a(a)  # identity passes: a is already in b2a's target domain
        same_b, cam_bb, _ = self.generator.a2b(b)
        out = {"adversarial": hp.adv_weight * sum(_least_squares(x, 1.0) for x in [*self._judged("b", fake_b), *self._judged("a", fake_a)]),
               "cycle": hp.cycle_weight * (F.l1_loss(self.generator.b2a(fake_b)[0], a) + F.l1_loss(self.generator.a2b(fake_a)[0], b)),
               "identity": hp.identity_weight * (F.l1_loss(same_a, a) + F.l1_loss(same_b, b))}
        bce = F.binary_cross_entropy_with_logits
        out["cam"] = hp.cam_weight * (bce(cam_ab, torch.ones_like(cam_ab)) + bce(cam_bb, torch.zeros_like(cam_bb))
                                      + bce(cam_ba, torch.ones_like(cam_ba)) + bce(cam_aa, torch.zeros_like(cam_aa)))
        out["loss"] = sum(out.values())
        return out

    def step(self, optimizer, counted: bool) -> None:
        super().step(optimizer, counted)
        if counted:  # the generators' step: AdaLIN's and LIN's rho back into [0, 1]
            clip_rho(self.generator)
