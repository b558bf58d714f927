"""A one-parameter LightningModule that writes down which samples each rank trained on, so
tests can compare the data two runs saw (resume, rank split) without a real model's cost."""
from __future__ import annotations

import os

import lightning as L
import torch


class KeyRecorder(L.LightningModule):
    family = "key_recorder"

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        with open(os.path.join(self.out, f"keys-rank{self.global_rank}.txt"), "a") as f:
            f.write(f"{self.global_step} {' '.join(batch['key'])}\n")
        return (self.weight - batch["image"].mean()) ** 2

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
