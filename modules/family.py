"""The family contract: what a family declares to the trainers, and what it provides them.

Every family's LightningModule subclasses `Family`. The trainers (`kiln.trainers`: commands,
callbacks, strategies, `kiln plan`) know a family only through what is here -- in the spirit of
torchtitan's TrainSpec, one typed declaration instead of attributes the trainers probe for:

    spec()              `Spec`: the family's name, its networks as named components, its shard
                        units and EMA target, what `kiln sample` may ask of it, its cascade
                        stages, whether it upsamples, how it is evaluated, what DDP and FSDP2
                        must know about its backward
    generate            `kiln sample`: images for the conditions it takes
    generate_for_eval   the evaluator (`kiln eval` and the in-training callback): sample i from
                        (seed, i) only, per stage
    use_labelled_prompts, labelled_prompts  `kiln eval --prompts`: the (class, prompt) pairs a
                        text-to-image family's generate_for_eval draws
    sample_grid         the sample grids a run saves
    super_resolution    an upsampler's judging on real images (`spec().upsamples`)
    embed               a retrieval family's judging (`spec().evaluation == "retrieval"`)
    translate           an image-to-image family's judging (`spec().evaluation == "translation"`)
    plan_inputs, plan_phases   `kiln plan`: one forward's inputs, one step's phases

Sampling runs the EMA copy when there is one (`kiln.modules.ema.weights_for_sampling`); every
method that samples takes `use_ema` (None: the EMA if trained with one; True: the EMA or an
error; False: the live weights) as an argument.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from kiln.modules.ema import network

# What `kiln sample` can hand a family (its flags: --prompt, --class, --input, --label-map).
Condition = Literal["prompts", "classes", "inputs", "label_maps"]
# Sampling settings `kiln sample` and `kiln eval` may override (--guidance-scale, --sampler,
# --steps, --truncation); a family keeps each in one of its hyper-parameters.
Option = Literal["guidance_scale", "sampler", "steps", "truncation", "augmentation_level"]


@dataclass(frozen=True)
class Spec:
    """What a family declares.

    Args:
        name: the family's name, stamped in its checkpoints ("glide").
        components: its networks by name -> attribute path from the module ("generator",
            "model.visual"), where it calls them on their own: `kiln plan` counts each, and FSDP2
            gives each a unit of its own (a network called on its own gathers only its own
            weights). None declared: the module's top-level children.
        frozen: frozen pretrained networks the family holds outside its module tree, by name ->
            attribute path (Imagen's text encoder): never trained, in the optimizer, the EMA, a
            checkpoint or DDP/FSDP2's parameters; `kiln plan` counts them as frozen parameters.
        ema_target: the attribute path of the network the EMA callback averages.
        shard_units: the block types FSDP2 shards one by one and activation checkpointing wraps.
        generates: draws images (`kiln sample`, sample grids, generative evaluation).
        conditions: what `kiln sample` may give `generate`.
        options: the sampling settings `kiln sample` and `kiln eval` may override, each -> the
            hyper-parameter that holds it ({"steps": "sample_steps"}).
        modes: the values `generate(mode=...)` takes (`kiln sample --mode`), if any.
        stages: a cascade's stages as `generate_for_eval` names them ("" for a single stage).
        upsamples: a super-resolution stage, judged by L1 against bicubic upsampling.
        evaluation: "generative" (FID/KID, judge, ...), "retrieval" (CLIP: `embed`) or
            "translation" (image-to-image: `translate` on held-out true pairs).
        find_unused_parameters: a step's backward reaches only part of the module (a GAN's
            phases): DDP must look for parameters without gradients.
        double_backward: a loss backpropagates through a gradient (R1, path length): FSDP2
            keeps gathered weights until the outer backward has run.
        optimizers: how many optimizers a step uses (Lightning's DeepSpeed strategy takes one).
    """

    name: str
    components: dict[str, str] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    ema_target: str = "model"
    shard_units: tuple[type, ...] = ()
    generates: bool = True
    conditions: tuple[Condition, ...] = ()
    options: dict[Option, str] = field(default_factory=dict)
    modes: tuple[str, ...] = ()
    stages: tuple[str, ...] = ("",)
    upsamples: bool = False
    evaluation: Literal["generative", "retrieval", "translation"] = "generative"
    find_unused_parameters: bool = False
    double_backward: bool = False
    optimizers: int = 1


@dataclass
class Grid:
    """A sample grid: images in [-1, 1], images per row, and optionally a label per row."""

    images: Tensor
    per_row: int
    labels: list[str] | None = None


@dataclass
class PlanPhase:
    """One phase of a training step for `kiln plan`: its name, the network whose optimizer it
    steps and the networks whose weights it runs through (attribute paths), and `run`, its
    forward and backward as training runs them (a lazy regulariser's loss weighted by its
    interval)."""

    name: str
    steps: str
    through: tuple[str, ...]
    run: Callable[[], None]


# What generate_for_eval returns: stage -> (images in [-1, 1], the class of each or None).
Generated = dict[str, tuple[Tensor, Tensor | None]]


class Family(L.LightningModule):
    """The base of every family's LightningModule (see the module docstring)."""

    def spec(self) -> Spec:
        raise NotImplementedError(f"{type(self).__name__} declares no Spec")

    def component(self, name: str) -> nn.Module:
        """A declared network, by its name in `spec().components`."""
        return self.resolve(self.spec().components[name])

    def resolve(self, path: str) -> nn.Module:
        """A network by attribute path ("model.visual")."""
        return network(self, path)

    # -- generating (families with spec().generates) ---------------------------------------------
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None, **given) -> Tensor | dict[str, Tensor]:
        """`kiln sample`: `num` images for each condition given (`spec().conditions`), settings
        from `spec().options`; a cascade returns stage -> images."""
        raise NotImplementedError(f"the '{self.spec().name}' family does not generate images")

    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        """Samples `indices` for the evaluator, sample i from (seed, i) only, per stage."""
        raise NotImplementedError(f"the '{self.spec().name}' family does not generate images")

    def use_labelled_prompts(self, pairs: list[tuple[int, str]] | None) -> None:
        """(text-to-image families, `kiln eval --prompts`) Judge on these (class, prompt) pairs:
        sample i draws pair i mod len(pairs), labelled with its class; None: the config's own."""
        if "prompts" not in self.spec().conditions:
            raise NotImplementedError(f"the '{self.spec().name}' family does not take prompts")
        self._labelled_prompts = pairs

    def labelled_prompts(self, indices: list[int]) -> tuple[list[str], Tensor | None]:
        """(text-to-image families) The prompt and class of samples `indices`: pair i mod len of
        `use_labelled_prompts`' pairs, else of the hyper-parameter `eval_prompts` (a prompt per
        class), else the empty prompt without classes."""
        pairs = getattr(self, "_labelled_prompts", None)
        labelled = bool(pairs or self.hparams.get("eval_prompts"))
        pairs = pairs or list(enumerate(self.hparams.get("eval_prompts") or [""]))
        chosen = [pairs[i % len(pairs)] for i in indices]
        return [p for _, p in chosen], torch.tensor([y for y, _ in chosen]) if labelled else None

    def sample_grid(self, *, use_ema: bool | None = None) -> Grid | None:
        """The grid a run saves (fixed conditions and noise); None: nothing to draw from."""
        return None

    def super_resolution(self, images: Tensor, prompts: list[str], seed: int = 0, *,
                         use_ema: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(spec().upsamples) Real images -> (them at the output size, the stage's output from
        their downsampled version, bicubic upsampling of that same input)."""
        raise NotImplementedError(f"the '{self.spec().name}' family does not upsample")

    def embed(self, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(spec().evaluation == "retrieval") Normalised image and text embeddings."""
        raise NotImplementedError(f"the '{self.spec().name}' family does not embed")

    def translate(self, inputs: Tensor, mode: str = "a2b", seeds: list[int] | None = None, *,
                  use_ema: bool | None = None) -> Tensor:
        """(spec().evaluation == "translation") Images in [-1, 1] -> their translations; output j
        is a function of input j and `seeds[j]` (its noise, if any; None: 0, 1, ...) only,
        whatever else is in the batch. `mode`: "a2b", or "b2a" for a family that translates both
        ways."""
        raise NotImplementedError(f"the '{self.spec().name}' family does not translate images")

    # -- kiln plan -------------------------------------------------------------------------------
    def plan_inputs(self, batch_size: int) -> tuple[Tensor, ...]:
        """The inputs of one forward of `self.model` on `batch_size` samples (FLOPs are counted on it)."""
        raise NotImplementedError(f"{type(self).__name__} declares no plan_inputs")

    def plan_phases(self, batch_size: int) -> list[PlanPhase]:
        """One training step, phase by phase: by default one phase, the model's forward on
        `plan_inputs` and a backward from the sum of its outputs."""
        inputs = self.plan_inputs(batch_size)

        def run() -> None:
            leaves = [t for t in tree_leaves(self.model(*inputs)) if isinstance(t, Tensor) and t.is_floating_point()]
            sum(t.float().sum() for t in leaves).backward()

        return [PlanPhase("step", "model", ("model",), run)]
