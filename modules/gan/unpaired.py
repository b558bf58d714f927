"""What the unpaired translators (CycleGAN, U-GAT-IT) share on top of `AdversarialModule`: a
generator per direction and discriminators per domain, each its own component; batches of `a`
and `b` images drawn independently (`kiln.datamodules.mappers.UnpairedImages`); one generator pass
per direction and iteration, shared by D's and G's phases (`reuse_fake`); and sampling both ways.

A generator may return its image alone or first in a tuple (U-GAT-IT's G also returns its CAM
logits and heatmap): `image_of` takes the image.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.modules.blocks.images import to_shape
from kiln.modules.ema import weights_for_sampling
from kiln.modules.family import Grid, Spec
from kiln.modules.gan.lit_module import AdversarialModule

MODES = ("a2b", "b2a")


class Networks(nn.Module):
    """Networks of one kind by name: the `a2b` and `b2a` generators, or a domain's discriminators.
    `forward` runs the first on an image or on a generator's output (`kiln plan` counts one
    network's pass: `GANPair` feeds G's output to D)."""

    def __init__(self, **networks: nn.Module):
        super().__init__()
        for name, net in networks.items():
            self.add_module(name, net)
        # in a fixed order (a set of types iterates differently in each process: FSDP2 units must agree)
        self.shard_units = tuple(dict.fromkeys(u for net in networks.values() for u in getattr(net, "shard_units", ())))

    def forward(self, image: Tensor | tuple):
        return next(iter(self.children()))(image_of(image))


def image_of(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def keep_first(kept: tuple[Tensor, ...] | None, batch: tuple[Tensor, ...], n: int) -> tuple[Tensor, ...]:
    """The first n images seen (of each of several aligned streams), kept detached for the sample
    grid: `kept` topped up from `batch` (batches of 1 fill it over n iterations)."""
    have = 0 if kept is None else len(kept[0])
    if have >= n:
        return kept
    new = tuple(x[:n - have].detach().clone() for x in batch)
    return new if kept is None else tuple(torch.cat([k, x]) for k, x in zip(kept, new))


class UnpairedModule(AdversarialModule):
    """The base of the unpaired translators. A family builds `self.model = GANPair(Networks(a2b=...,
    b2a=...), Networks(...))`, keeps `image_size`, `channels` and `grid_size` in its hyper-parameters,
    and defines `d_main` and `g_main` on `self.domains(batch)` and `self.generated_pair(batch)`."""

    reuse_fake = True
    _grid: tuple[Tensor, Tensor] | None = None  # the sample grid's a and b images (the first trained on)

    def unpaired_spec(self, name: str) -> Spec:
        components = {f"generator_{m}": f"model.generator.{m}" for m in MODES}
        components |= {f"discriminator_{d}": f"model.discriminator.{d}" for d, _ in self.discriminator.named_children()}
        return self.gan_spec(name, components=components, conditions=("inputs",), modes=MODES, evaluation="translation")

    def plan_inputs(self, batch_size: int) -> tuple[Tensor]:
        hp = self.hparams
        return (torch.zeros(batch_size, hp.channels, hp.image_size, hp.image_size, device=self.device),)

    def plan_batch(self, batch_size: int) -> dict[str, Tensor]:
        return {"a": self.plan_inputs(batch_size)[0], "b": self.plan_inputs(batch_size)[0]}

    # -- training --------------------------------------------------------------------------------
    def domains(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The batch's a and b images at the model's shape (the first ones kept for the grid)."""
        hp = self.hparams
        a, b = (to_shape(batch[k], (hp.channels, hp.image_size, hp.image_size)) for k in ("a", "b"))
        self._grid = keep_first(self._grid, (a, b), hp.grid_size)
        return a, b

    def fake(self, batch: dict, n: int) -> tuple[tuple, None]:
        """(G_ab(a), G_ba(b)), each the generator's whole output, for the batch's first n of each domain."""
        a, b = self.domains(batch)
        return (self.generator.a2b(a[:n]), self.generator.b2a(b[:n])), None

    def generated_pair(self, batch: dict) -> tuple:
        """This iteration's (G_ab(a), G_ba(b)) outputs (`kiln plan` runs a phase on its own: a new pass)."""
        if self._generated is not None:
            return self._generated[0]
        return self.fake(batch, len(batch["a"]))[0]

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, inputs: Tensor, mode: str = "a2b", seeds: list[int] | None = None, *,
                  use_ema: bool | None = None) -> Tensor:
        """The generator of `mode` on `inputs` in `eval()`: instance norm (and AdaLIN) normalise each
        image by its own statistics, so an output does not depend on its batch; no noise."""
        if mode not in MODES:
            raise ValueError(f"{self.spec().name} translates a2b or b2a, not {mode!r}")
        hp = self.hparams
        net = weights_for_sampling(self, use_ema)
        was_training = net.training
        net.eval()
        images = to_shape(inputs.to(self.device, self.dtype), (hp.channels, hp.image_size, hp.image_size))
        out = image_of(getattr(net, mode)(images))
        net.train(was_training)
        return out

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None, inputs: Tensor | None = None,
                 mode: str = "a2b") -> Tensor:
        """`kiln sample --input [--mode a2b|b2a]`: each input's translation (`num` alike: no noise)."""
        if inputs is None or not len(inputs):
            raise ValueError(f"{self.spec().name} translates images: give at least one --input")
        return self.translate(inputs.repeat_interleave(num, 0), mode, use_ema=use_ema)

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid | None:
        """Rows: a, G_ab(a), b, G_ba(b) (the first training batch's, kept)."""
        if self._grid is None:
            return None
        a, b = self._grid
        rows = [a, self.translate(a, "a2b", use_ema=use_ema), b, self.translate(b, "b2a", use_ema=use_ema)]
        return Grid(torch.cat([r.to(rows[1]) for r in rows]), len(a), ["a", "a -> b", "b", "b -> a"])
