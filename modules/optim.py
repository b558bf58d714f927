"""Optimiser recipes shared by the families."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def adamw_with_warmup_cosine(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    total_steps: int,
) -> dict:
    """AdamW with decay on matrices only (not gains, biases or scalars), linear warm-up and a
    cosine decay to 0 at `total_steps` (constant after warm-up when total_steps <= 0)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps, foreach=True,
    )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps <= 0:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def constant_then_linear_decay(constant_steps: int, decay_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of Pix2Pix and CycleGAN (Zhu et al. 2017, 4: "the same learning
    rate for the first 100 epochs and linearly decay the rate to zero over the next 100"), by
    step: 1 for `constant_steps`, then down by 1 / (decay_steps + 1) a step, as the authors'
    `1 - max(0, t + 1 - n) / (n_decay + 1)`; 0 after both. For `LambdaLR`."""
    if constant_steps < 0 or decay_steps < 0:
        raise ValueError(f"constant and decay steps must be >= 0, got {constant_steps} and {decay_steps}")

    def factor(step: int) -> float:
        return max(0.0, 1.0 - max(0, step + 1 - constant_steps) / (decay_steps + 1))

    return factor
