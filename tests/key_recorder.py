"""A one-parameter LightningModule that writes down which samples each rank trained on, so
tests can compare the data two runs saw (resume, rank split) without a real model's cost."""
from __future__ import annotations

import os

import torch

from kiln.modules.family import Family, Spec


class KeyRecorder(Family):
    def spec(self) -> Spec:
        return Spec("key_recorder", generates=False)

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        # Unpaired batches carry one key per domain: a drawn pair is recorded as "a|b".
        keys = batch["key"] if "key" in batch else [f"{a}|{b}" for a, b in zip(batch["key_a"], batch["key_b"])]
        with open(os.path.join(self.out, f"keys-rank{self.global_rank}.txt"), "a") as f:
            f.write(f"{self.global_step} {' '.join(keys)}\n")
        image = batch["image"] if "image" in batch else batch["a"]
        return (self.weight - image.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def read_keys(out: str) -> list[str]:
    """Every key trained on, over all ranks, as a sorted list (a multiset)."""
    keys = []
    for name in sorted(os.listdir(out)):
        if name.startswith("keys-rank"):
            with open(os.path.join(out, name)) as f:
                keys += [k for line in f for k in line.split()[1:]]
    return sorted(keys)
