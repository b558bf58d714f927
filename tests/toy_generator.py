"""A class-conditional "generator" small enough to train in seconds: one learned image per class
plus fixed noise. It trains (the class means move towards the data), samples, and so exercises
the judging machinery end to end without a real family's cost."""
from __future__ import annotations

import lightning as L
import torch


class ClassMeans(L.LightningModule):
    family = "toy"

    def __init__(self, num_classes: int = 10, size: int = 8, noise: float = 0.05, lr: float = 0.05):
        super().__init__()
        self.noise, self.lr = noise, lr
        self.means = torch.nn.Parameter(torch.zeros(num_classes, 1, size, size))

    def training_step(self, batch, _):
        return (self.means[batch["label"]] - batch["image"].mean(1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int):
        labels = torch.tensor([i % len(self.means) for i in indices])
        noise = torch.stack([torch.randn(self.means.shape[1:], generator=torch.Generator().manual_seed(seed * 100003 + i))
                             for i in indices])
        return (self.means[labels] + self.noise * noise).clamp(-1, 1), labels

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, classes: list[int] | None = None):
        """`kiln sample`: `num` images of each class in `classes` (default: every class)."""
        classes = list(range(len(self.means))) if classes is None else classes
        bad = [c for c in classes if not 0 <= c < len(self.means)]
        if bad:
            raise ValueError(f"class {bad[0]} outside [0, {len(self.means)})")
        indices = [c + len(self.means) * k for c in classes for k in range(num)]
        return self.generate_for_eval(indices, seed)[0]


class TwoStages(ClassMeans):
    """ClassMeans as a two-stage cascade: a 4 px "base" image and its 8 px "upsampled" version."""

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int):
        images, labels = super().generate_for_eval(indices, seed)
        low = torch.nn.functional.avg_pool2d(images, 2)
        return {"base": (low, labels), "upsampled": (images, labels)}



class ShardedClassMeans(ClassMeans):
    """ClassMeans whose class images come out of a small network that FSDP2 shards (one unit per
    Linear): every generation call runs a sharded forward, a collective, as a real family's does."""

    def __init__(self, num_classes: int = 10, size: int = 8, noise: float = 0.05, lr: float = 0.05):
        super().__init__(num_classes, size, noise, lr)
        self.net = torch.nn.Sequential(torch.nn.Linear(num_classes, 32), torch.nn.Linear(32, size * size))

    def shard_units(self) -> tuple[type, ...]:
        return (torch.nn.Linear,)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(labels, len(self.means)).float()
        return self.net(onehot).view(-1, *self.means.shape[1:])

    def training_step(self, batch, _):
        return (self(batch["label"]) - batch["image"].mean(1, keepdim=True)).pow(2).mean()

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int):
        labels = torch.tensor([i % len(self.means) for i in indices])
        noise = torch.stack([torch.randn(self.means.shape[1:], generator=torch.Generator().manual_seed(seed * 100003 + i))
                             for i in indices])
        return (self(labels) + self.noise * noise).clamp(-1, 1), labels
