"""Adversarial training, written once for kiln's GAN families (BigGAN, StyleGAN2, and the
image-to-image GANs): Lightning manual optimisation in named phases, as StyleGAN3's `loss.py`
runs them (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN", 2.4):

    Dmain   the discriminator's adversarial loss on real and generated images
    Dreg    its regulariser (R1, Mescheder et al. 2018), every `d_reg_interval` iterations
    Gmain   the generator's adversarial loss (and a family's extra terms: L1, cycle, ...)
    Greg    its regulariser (orthogonal regularisation, path length), every `g_reg_interval`

Lazy regularisation: a regulariser run every k iterations is weighted by k, and the optimiser of
the network it regularises, which also takes those steps, gets lr * c and betas ** c with
c = k / (k + 1), so that the optimiser sees the same statistics as if both losses were added every
iteration. A regulariser with interval None is added to its main loss every iteration instead.

One iteration (one batch) is: `d_steps` x (Dmain, Dreg when due), then Gmain, Greg when due
(D first, as BigGAN trains, so G's step answers the discriminator just updated). Only the Gmain
step counts as a Lightning step, so `trainer.global_step` (max_steps, checkpoints, EMA) counts
iterations whatever the number of phases. The EMA of G is the usual `kiln.trainers.callbacks.ema.EMA`
callback (`ema_target = "generator"`). Every image the discriminator sees goes through
`self.augment`: the identity unless a family sets a `kiln.modules.blocks.ada.AdaptiveAugment`
there, whose probability p the Dmain phases steer from D's outputs on real images (summed over
ranks as they are seen) and which is logged as `train/ada_p`.

Image-to-image GANs (Pix2Pix, CycleGAN) differ in three ways, each a setting here: a family
with `reuse_fake = True` generates once per iteration, before the phases, and D's phase sees that
output detached while G's backpropagates through it (Pix2Pix's dropout noise is then one draw per
iteration, as in the paper); a discriminator with batch normalisation sees real and generated
images in separate passes, so that neither batch's statistics normalise the other (a joint pass
otherwise); and `lr_constant_steps` / `lr_decay_steps` hold both learning rates, then decay them
linearly to 0 (`kiln.modules.optim.constant_then_linear_decay`), stepped once per iteration.

Over several ranks, each rank's batch is its share of the global batch, and everything random is
drawn for the global batch: every rank draws the whole global batch's latents, noise and
augmentation parameters from generators seeded alike, and keeps its own share's (`randn`). Ranks
then never share latents, and a run is the same function of the global batch at any world size;
the draws cost O(global batch) per rank, small next to the networks. Statistics the phases keep
(ADA's sums, a family's running means) are kept over the global batch too, so that every rank holds
the same values.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kiln.modules.blocks.ada import AdaptiveAugment
from kiln.modules.blocks.adversarial import (
    GanLoss,
    GANPair,
    check_gan_loss,
    discriminator_loss,
    generator_loss,
    lazy_rescale,
    r1_penalty,
)
from kiln.modules.family import Family, PlanPhase, Spec
from kiln.modules.optim import constant_then_linear_decay

__all__ = ["AdversarialModule", "GANPair", "GanLoss", "Phase"]

# Lightning warns that a checkpoint taken under manual optimisation holds the weights after the
# step. kiln checkpoints at the end of an iteration (all phases done), which is what resuming needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


@dataclass(frozen=True)
class Phase:
    """A phase: its name, the network whose optimiser it steps, and its interval (1: every
    iteration; k: lazy, every k iterations, loss weighted by k)."""

    name: Literal["Dmain", "Dreg", "Gmain", "Greg"]
    network: Literal["generator", "discriminator"]
    interval: int = 1


class AdversarialModule(Family):
    """Base class of the GAN families. A family builds `self.model = GANPair(G, D)` and defines:

        real(batch) -> (images, condition)          what D sees as real (condition: labels, an input image, or None)
        fake(batch, n) -> (images, condition)       n generated images for this batch's conditions
        generator_regulariser(batch) -> Tensor      optional (Greg): e.g. orthogonal regularisation;
                                                    has_generator_regulariser() says when it applies
        generator_extra(batch, fake, cond) -> dict  optional: extra Gmain terms (name -> loss), e.g. L1

    Args:
        loss: "hinge", "non_saturating" or "least_squares".
        lr_g / lr_d, betas_g / betas_d, eps: Adam for each network (before lazy rescaling).
        r1_gamma: R1 weight (gamma / 2 * ||grad||^2); 0 turns Dreg off.
        d_reg_interval / g_reg_interval: lazy-regularisation intervals (None: every iteration, in
            the main phase, no rescaling).
        d_steps: discriminator steps per generator step, each on its own share of the batch.
        d_loss_weight: D's adversarial loss times this (Pix2Pix halves it, 3.3 of the paper).
        lr_constant_steps / lr_decay_steps: with the first set, both learning rates stay constant
            that many iterations, then decay linearly to 0 over the second.
        weight_decay: Adam's L2 penalty on both networks (U-GAT-IT: 1e-4).
    """

    reuse_fake = False  # one generator pass per iteration, shared by D's and G's phases

    def __init__(self, loss: GanLoss = "hinge", lr_g: float = 2e-4, lr_d: float = 2e-4,
                 betas_g: tuple[float, float] = (0.0, 0.999), betas_d: tuple[float, float] = (0.0, 0.999),
                 eps: float = 1e-8, r1_gamma: float = 0.0, d_reg_interval: int | None = 16,
                 g_reg_interval: int | None = None, d_steps: int = 1, d_loss_weight: float = 1.0,
                 lr_constant_steps: int | None = None, lr_decay_steps: int = 0, weight_decay: float = 0.0):
        super().__init__()
        check_gan_loss(loss)
        for name, interval in (("d_reg_interval", d_reg_interval), ("g_reg_interval", g_reg_interval)):
            if interval is not None and interval < 1:
                raise ValueError(f"{name} must be at least 1 (or null: every iteration), got {interval}")
        if d_steps < 1:
            raise ValueError(f"d_steps must be at least 1, got {d_steps}")
        if r1_gamma < 0:
            raise ValueError(f"r1_gamma must be non-negative, got {r1_gamma}")
        if self.reuse_fake and d_steps != 1:
            raise ValueError(f"{type(self).__name__} reuses one generator pass per iteration: d_steps must be 1, got {d_steps}")
        if lr_constant_steps is not None:
            constant_then_linear_decay(lr_constant_steps, lr_decay_steps)  # checks the two
        self.automatic_optimization = False
        self.gan_loss, self.lr_g, self.lr_d, self.eps = loss, lr_g, lr_d, eps
        self.betas_g, self.betas_d = tuple(betas_g), tuple(betas_d)
        self.r1_gamma, self.d_reg_interval, self.g_reg_interval, self.d_steps = r1_gamma, d_reg_interval, g_reg_interval, d_steps
        self.augment: nn.Module = nn.Identity()  # a family may set an AdaptiveAugment (ADA)
        self.d_loss_weight, self.lr_constant_steps, self.lr_decay_steps = d_loss_weight, lr_constant_steps, lr_decay_steps
        self.weight_decay = weight_decay
        self._generated: tuple[Tensor, Tensor | None] | None = None  # this iteration's (fake, condition)

    # -- the networks ----------------------------------------------------------------------------
    @property
    def generator(self) -> nn.Module:
        return self.model.generator

    @property
    def discriminator(self) -> nn.Module:
        return self.model.discriminator

    def gan_spec(self, name: str, **declared) -> Spec:
        """What every GAN family declares, with `declared` added or overridden: its two networks,
        the EMA of G, each phase's backward reaching one network only (DDP must look for
        parameters without gradients, else it waits for them and fails at the next step), R1
        backpropagating through a gradient (create_graph: FSDP2 keeps the weights it gathered
        until the outer backward has run), and an optimizer per network."""
        units = (*getattr(self.generator, "shard_units", ()), *getattr(self.discriminator, "shard_units", ()))
        return Spec(name, **{
            "components": {"generator": "model.generator", "discriminator": "model.discriminator"},
            "ema_target": "model.generator", "shard_units": units, "find_unused_parameters": True,
            "double_backward": self.r1_gamma > 0, "optimizers": 2, **declared})

    def plan_batch(self, batch_size: int) -> dict[str, Tensor]:
        """A training batch as the data module hands it over, on the module's device (`kiln plan`
        runs the phases on it, on the meta device)."""
        raise NotImplementedError

    def plan_phases(self, batch_size: int) -> list[PlanPhase]:
        """Each phase as training runs it, on `plan_batch`. ADA's pipeline is left out: it decides
        on p's value, which a meta tensor does not have (a few image-sized tensors, small next to
        D's activations); `kiln plan` builds a module of its own."""
        self.augment = nn.Identity()
        batch, out = self.plan_batch(batch_size), []
        run = {"Dmain": self.d_main, "Dreg": self.d_reg, "Gmain": self.g_main, "Greg": self.g_reg}
        for phase in self.phases():
            share = _split(batch, self.d_steps)[0] if phase.network == "discriminator" else batch

            def step(phase: Phase = phase, share: dict = share) -> None:
                (run[phase.name](share)["loss"] * phase.interval).backward()

            # G main runs through D too; D main runs G without gradients, its weights gathered all the same.
            through = ("model",) if phase.name in ("Gmain", "Dmain") else (f"model.{phase.network}",)
            out.append(PlanPhase(phase.name, f"model.{phase.network}", through, step))
        return out

    # -- what a family defines -------------------------------------------------------------------
    def real(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def fake(self, batch: dict, n: int) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def has_generator_regulariser(self) -> bool:
        return type(self).generator_regulariser is not AdversarialModule.generator_regulariser

    def generator_regulariser(self, batch: dict) -> Tensor:
        raise NotImplementedError

    def generator_extra(self, batch: dict, fake: Tensor, condition: Tensor | None) -> dict[str, Tensor]:
        return {}

    def discriminate(self, images: Tensor | tuple[Tensor, ...], condition: Tensor | None) -> Tensor:
        """D's logits, (N,); every image D sees goes through `self.augment`. `images` is one batch, or
        several (Dmain: reals, fakes) that D takes in one pass, each augmented as its own batch."""
        batches = images if isinstance(images, tuple) else (images,)
        images = torch.cat([self.augmented(x) for x in batches]) if len(batches) > 1 else self.augmented(batches[0])
        return self.discriminator(images) if condition is None else self.discriminator(images, condition)

    def augmented(self, images: Tensor) -> Tensor:
        """`self.augment` of this rank's share of a global batch (ADA draws for the global batch)."""
        if isinstance(self.augment, AdaptiveAugment):
            return self.augment(images, share=self.share())
        return self.augment(images)

    # -- randomness over ranks (see the module docstring) ----------------------------------------
    def share(self) -> tuple[int, int]:
        """(this rank, ranks): which share of the global batch this process trains on."""
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def randn(self, n: int, *shape: int) -> Tensor:
        """N(0, 1) noise (n, *shape) for this rank's n samples: drawn for the global batch (n per
        rank), this rank's rows kept."""
        rank, world = self.share()
        noise = torch.randn(world * n, *shape, device=self.device)
        return noise[rank * n:(rank + 1) * n] if world > 1 else noise

    def sum_over_ranks(self, tensor: Tensor, differentiable: bool = False) -> Tensor:
        """The sum of `tensor` over ranks; with `differentiable`, gradients flow back to every rank's."""
        if self.share()[1] == 1:
            return tensor
        if differentiable:
            return self.all_gather(tensor, sync_grads=True).sum(0)
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def mean_over_ranks(self, tensor: Tensor, differentiable: bool = False) -> Tensor:
        """The mean over ranks of a per-rank mean (equal shares: the global batch's mean); with
        `differentiable`, gradients flow back to every rank's share."""
        if self.share()[1] == 1:
            return tensor
        if differentiable:
            return self.all_gather(tensor, sync_grads=True).mean(0)
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    # -- phases ----------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        """This family's phases, in the order of one iteration (see the module docstring)."""
        out = [Phase("Dmain", "discriminator")]
        if self.r1_gamma > 0 and self.d_reg_interval is not None:
            out.append(Phase("Dreg", "discriminator", self.d_reg_interval))
        out.append(Phase("Gmain", "generator"))
        if self.has_generator_regulariser() and self.g_reg_interval is not None:
            out.append(Phase("Greg", "generator", self.g_reg_interval))
        return out

    def due(self, phase: Phase, iteration: int) -> bool:
        return iteration % phase.interval == 0

    def generated(self, batch: dict, n: int, detach: bool) -> tuple[Tensor, Tensor | None]:
        """n generated images and their condition: this iteration's pass when the family reuses
        one (detached for D), else a new one (without a graph for D)."""
        if self._generated is not None:
            fake, condition = self._generated
            return (fake.detach(), condition) if detach else (fake, condition)
        if detach:
            with torch.no_grad():
                return self.fake(batch, n)
        return self.fake(batch, n)

    def batch_statistics(self) -> bool:
        """Whether D normalises by its batch's statistics (batch norm, synchronised or not)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.discriminator.modules())

    def d_main(self, batch: dict) -> dict[str, Tensor]:
        real, condition = self.real(batch)
        fake, fake_condition = self.generated(batch, len(real), detach=True)
        if self.batch_statistics():  # each batch normalised by its own statistics
            real_logits, fake_logits = self.discriminate(real, condition), self.discriminate(fake, fake_condition)
        else:
            # One pass over real and fake together, as BigGAN does (one power iteration of spectral
            # norm per D step, and one larger batch instead of two).
            both = None if condition is None else torch.cat([condition, fake_condition])
            real_logits, fake_logits = self.discriminate((real, fake), both).split([len(real), len(fake)])
        out = {"loss": discriminator_loss(real_logits, fake_logits, self.gan_loss) * self.d_loss_weight,
               "real_logits": real_logits.detach().mean(), "fake_logits": fake_logits.detach().mean()}
        if isinstance(self.augment, AdaptiveAugment):
            self.augment.observe(real_logits.detach(), reduce=self.sum_over_ranks)
        if self.r1_gamma > 0 and self.d_reg_interval is None:
            out["r1"] = self.r1(batch)["loss"]
            out["loss"] = out["loss"] + out["r1"]
        return out

    def d_reg(self, batch: dict) -> dict[str, Tensor]:
        return self.r1(batch)

    def r1(self, batch: dict) -> dict[str, Tensor]:
        """R1 on the real images before augmentation (gamma / 2 * ||grad||^2)."""
        real, condition = self.real(batch)
        real = real.detach().requires_grad_(True)
        penalty = r1_penalty(self.discriminate(real, condition), real)
        return {"loss": penalty.mean() * (self.r1_gamma / 2), "r1_penalty": penalty.detach().mean()}

    def g_main(self, batch: dict) -> dict[str, Tensor]:
        fake, condition = self.generated(batch, _size(batch), detach=False)
        out = {"adversarial": generator_loss(self.discriminate(fake, condition), self.gan_loss)}
        out |= self.generator_extra(batch, fake, condition)
        if self.has_generator_regulariser() and self.g_reg_interval is None:
            out["regulariser"] = self.generator_regulariser(batch)
        out["loss"] = sum(out.values())
        return out

    def g_reg(self, batch: dict) -> dict[str, Tensor]:
        return {"loss": self.generator_regulariser(batch)}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        iteration = self.global_step  # Gmain steps so far: one per iteration
        # Images become float32 after Lightning's precision plugin has converted the batch (the data
        # module decodes uint8 on the device); they enter the networks in the networks' own dtype
        # (float64 under precision "64-true").
        batch = {k: v.to(self.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in batch.items()}
        run = {"Dmain": self.d_main, "Dreg": self.d_reg, "Gmain": self.g_main, "Greg": self.g_reg}
        d_shares = _split(batch, self.d_steps)
        # Both networks take gradients here: the pass's graph reaches G for its phase.
        self._generated = self.fake(batch, _size(batch)) if self.reuse_fake else None
        for phase in self.phases():
            if not self.due(phase, iteration):
                continue
            optimizer = opt_g if phase.network == "generator" else opt_d
            shares = d_shares if phase.network == "discriminator" else [batch]
            for share in shares:
                self.toggle_optimizer(optimizer)  # only this network's weights take gradients
                out = run[phase.name](share)
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(out["loss"] * phase.interval)
                _zero_missing_grads(optimizer)
                self.step(optimizer, counted=phase.name == "Gmain")
                optimizer.zero_grad(set_to_none=True)  # no gradients held while the other network trains
                self.untoggle_optimizer(optimizer)
            for name, value in out.items():
                self.log(f"train/{phase.name}/{name}", value.detach(), prog_bar=name == "loss")
        self._generated = None
        if isinstance(self.augment, AdaptiveAugment):
            self.adapt_augmentation(iteration)
        if self.lr_constant_steps is not None:  # configure_optimizers made one scheduler a network
            for scheduler in self.lr_schedulers():
                scheduler.step()

    def adapt_augmentation(self, iteration: int) -> None:
        """ADA's controller: every `interval` iterations, r_t over all ranks' real images moves p."""
        ada = self.augment
        if (iteration + 1) % ada.interval == 0:
            self.log("train/ada_rt", ada.adjust())  # the sums are over all ranks already (d_main)
        self.log("train/ada_p", ada.p.item(), prog_bar=True)

    def step(self, optimizer, counted: bool) -> None:
        """Step through the strategy's precision plugin; only counted steps advance global_step."""
        if counted:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def configure_optimizers(self):
        lr_g, betas_g = lazy_rescale(self.lr_g, self.betas_g, self._lazy_interval("generator"))
        lr_d, betas_d = lazy_rescale(self.lr_d, self.betas_d, self._lazy_interval("discriminator"))
        g = [p for p in self.generator.parameters() if p.requires_grad]
        d = [p for p in self.discriminator.parameters() if p.requires_grad]
        optimizers = (torch.optim.Adam(g, lr=lr_g, betas=betas_g, eps=self.eps, weight_decay=self.weight_decay, foreach=True),
                      torch.optim.Adam(d, lr=lr_d, betas=betas_d, eps=self.eps, weight_decay=self.weight_decay, foreach=True))
        if self.lr_constant_steps is None:
            return optimizers
        factor = constant_then_linear_decay(self.lr_constant_steps, self.lr_decay_steps)
        return list(optimizers), [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]

    def _lazy_interval(self, network: str) -> int | None:
        return next((p.interval for p in self.phases() if p.network == network and p.name.endswith("reg")), None)


def _zero_missing_grads(optimizer) -> None:
    """A phase steps its whole network: a weight its loss does not reach (a ToRGB bias in path
    length, D's output bias in R1) gets a zero gradient, not none, so that Adam's step count and
    second moment advance alike for every weight and under every strategy (FSDP2 reduce-scatters
    zeros for such weights where one process or DDP would leave none). With beta1 = 0, as both
    families train, such a weight does not move."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def _size(batch: dict) -> int:
    return len(next(v for v in batch.values() if isinstance(v, (Tensor, list))))


def _split(batch: dict, n: int) -> list[dict]:
    """A batch as n shares (tensors and lists split along the first dimension)."""
    if n == 1:
        return [batch]
    size = _size(batch)
    if size < n:
        raise ValueError(f"a batch of {size} cannot feed d_steps={n} discriminator steps")
    bounds = [size * i // n for i in range(n + 1)]
    return [{k: v[a:b] if isinstance(v, (Tensor, list)) else v for k, v in batch.items()}
            for a, b in zip(bounds, bounds[1:])]
