"""The EMA copy of a family's network, below the trainers that average it: `attach` registers
the copy as `ema` (the `kiln.trainers.callbacks.ema.EMA` callback, and loading a checkpoint
trained with it), and `weights_for_sampling` says which weights sampling and evaluation run."""
from __future__ import annotations

import copy

from torch import nn


def weights_for_sampling(module: nn.Module, use_ema: bool | None = None) -> nn.Module:
    """The network sampling and evaluation run: the EMA copy when there is one (None), the EMA
    copy or a clear error (True), the live weights (False)."""
    if use_ema is not False and hasattr(module, "ema"):
        return module.ema
    if use_ema:
        raise ValueError(f"this {getattr(module, 'family', 'kiln')} checkpoint has no EMA weights (trained "
                         "without kiln.trainers.callbacks.ema.EMA): use the live weights (--no-ema)")
    return getattr(module, getattr(module, "_ema_source", None) or getattr(module, "ema_target", "model"))


def attach(pl_module: nn.Module, target: str | None = None) -> nn.Module:
    """Register `pl_module.ema`, a frozen copy of the network to average (once)."""
    if hasattr(pl_module, "ema"):
        return pl_module.ema
    name = target or getattr(pl_module, "ema_target", "model")
    network = getattr(pl_module, name, None)
    if not isinstance(network, nn.Module):
        raise ValueError(f"EMA: {type(pl_module).__name__} has no network '{name}' to average")
    pl_module.ema = copy.deepcopy(network).requires_grad_(False)
    pl_module._ema_source = name
    return pl_module.ema
