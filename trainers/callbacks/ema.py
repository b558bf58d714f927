"""Exponential moving average of a family's weights, under any strategy.

The average is a frozen copy of the family's network registered on the LightningModule as
`ema` (a submodule, added before the strategy wraps the model). Strategies then treat it as
they treat everything else: DDP keeps it whole on every rank, FSDP2 shards it with the same
layout as the live weights, ZeRO-3 partitions it the same way, and checkpoints (single-file,
DCP or DeepSpeed) save and restore it as `ema.*` weights. Each rank updates only the part it
holds: element-wise, so sharded and unsharded averages agree.

    decay_t = min(decay, (1 + t) / (10 + t))    with warm-up (t: optimizer steps), else decay
    ema     = decay_t * ema + (1 - decay_t) * weights

Sampling and evaluation read `ema` when it exists (`kiln.modules.ema.weights_for_sampling`).
"""
from __future__ import annotations

import lightning as L
import torch

from kiln.modules.ema import attach, network
from kiln.modules.family import Family


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: a DTensor's local shard, a ZeRO-3 partition."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor.data
    if hasattr(t, "to_local"):
        return t.to_local()
    return t.data


class EMA(L.Callback):
    """Args:
        decay: the average's decay per optimizer step.
        warmup: ramp the decay up from 0.1 as (1 + t) / (10 + t), so early weights fade fast.
        every_n_steps: update every N optimizer steps (the decay is applied N times at once).
        target: the attribute path of the network to average (default: the family's `Spec.ema_target`).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1, target: str | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.every_n_steps, self.target = decay, warmup, every_n_steps, target
        self._averaged_at = 0

    def setup(self, trainer: L.Trainer, pl_module: Family, stage: str) -> None:
        attach(pl_module, self.target or pl_module.spec().ema_target)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._averaged_at = trainer.global_step  # a resumed run has averaged up to here

    def decay_at(self, step: int) -> float:
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        return decay ** self.every_n_steps

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        # A batch ends once per micro-batch: under gradient accumulation the weights move only at
        # every k-th, and averaging at each would make the decay decay^k.
        if step == self._averaged_at or step % self.every_n_steps:
            return
        self._averaged_at = step
        live = network(pl_module, pl_module._ema_source)
        averages = [_local(p) for p in pl_module.ema.parameters()]
        weights = [_local(p) for p in live.parameters()]
        torch._foreach_lerp_(averages, weights, 1.0 - self.decay_at(step - 1))
        for a, b in zip(pl_module.ema.buffers(), live.buffers()):  # BatchNorm statistics: copied
            _local(a).copy_(_local(b))
