"""A class-conditional "generator" small enough to train in seconds: one learned image per class
plus fixed noise. A family like any other, through the contract only (kiln.modules.family): it
trains (the class means move towards the data), samples, is evaluated and planned, and so
exercises the trainers end to end without a real family's cost and without anything of its own
under trainers/."""
from __future__ import annotations

import torch

from kiln.modules.family import Family, Generated, Grid, PlanPhase, Spec


class ClassMeans(Family):
    """Args:
        start_from: a ClassMeans checkpoint whose class images this one starts from (a second
            stage: a learn config names it as `stage:NAME`).
    """

    def __init__(self, num_classes: int = 10, size: int = 8, noise: float = 0.05, lr: float = 0.05,
                 start_from: str | None = None):
        super().__init__()
        self.noise, self.lr = noise, lr
        self.model = torch.nn.ParameterDict({"means": torch.nn.Parameter(torch.zeros(num_classes, 1, size, size))})
        if start_from:
            from kiln.modules.loading import load_module

            with torch.no_grad():
                self.means.copy_(load_module(start_from).means)

    @property
    def means(self) -> torch.nn.Parameter:
        return self.model["means"]

    def spec(self) -> Spec:
        return Spec("toy", conditions=("classes",))

    def plan_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return ()

    def plan_phases(self, batch_size: int):
        labels = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        return [PlanPhase("step", "model", ("model",), lambda: self.means[labels].square().mean().backward())]

    def training_step(self, batch, _):
        return (self.means[batch["label"]] - batch["image"].mean(1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def images(self, labels: torch.Tensor) -> torch.Tensor:
        return self.means[labels]

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        labels = torch.tensor([i % len(self.means) for i in indices])
        noise = torch.stack([torch.randn(self.means.shape[1:], generator=torch.Generator().manual_seed(seed * 100003 + i))
                             for i in indices])
        return {"": ((self.images(labels) + self.noise * noise).clamp(-1, 1), labels)}

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None, classes: list[int] | None = None):
        """`kiln sample`: `num` images of each class in `classes` (default: every class)."""
        classes = list(range(len(self.means))) if classes is None else classes
        bad = [c for c in classes if not 0 <= c < len(self.means)]
        if bad:
            raise ValueError(f"class {bad[0]} outside [0, {len(self.means)})")
        indices = [c + len(self.means) * k for c in classes for k in range(num)]
        return self.generate_for_eval(indices, seed)[""][0]

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid:
        return Grid(self.generate(2, 0), 2, [f"class {c}" for c in range(len(self.means))])


class TwoStages(ClassMeans):
    """ClassMeans as a two-stage cascade: a 4 px "base" image and its 8 px "upsampled" version."""

    def spec(self) -> Spec:
        return Spec("toy", conditions=("classes",), stages=("base", "upsampled"))

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        images, labels = super().generate_for_eval(indices, seed)[""]
        low = torch.nn.functional.avg_pool2d(images, 2)
        return {"base": (low, labels), "upsampled": (images, labels)}


class ShardedClassMeans(ClassMeans):
    """ClassMeans whose class images come out of a small network that FSDP2 shards (one unit per
    Linear): every generation call runs a sharded forward, a collective, as a real family's does."""

    def __init__(self, num_classes: int = 10, size: int = 8, noise: float = 0.05, lr: float = 0.05):
        super().__init__(num_classes, size, noise, lr)
        self.net = torch.nn.Sequential(torch.nn.Linear(num_classes, 32), torch.nn.Linear(32, size * size))

    def spec(self) -> Spec:
        return Spec("toy", conditions=("classes",), shard_units=(torch.nn.Linear,))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(labels, len(self.means)).float()
        return self.net(onehot).view(-1, *self.means.shape[1:])

    def images(self, labels: torch.Tensor) -> torch.Tensor:
        return self(labels.to(self.device))

    def training_step(self, batch, _):
        return (self(batch["label"]) - batch["image"].mean(1, keepdim=True)).pow(2).mean()
