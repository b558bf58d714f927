"""The EMA copy of a family's network, below the trainers that average it: `attach` registers
the copy as `ema` (the `kiln.trainers.callbacks.ema.EMA` callback, and loading a checkpoint
trained with it), and `weights_for_sampling` says which weights sampling and evaluation run.
Networks are named by attribute path from the family's module ("model", "model.generator"),
as a family's `Spec.ema_target` names them."""
from __future__ import annotations

import copy
import functools

from torch import nn


def network(module: nn.Module, path: str) -> nn.Module:
    """The network at attribute path `path` of `module`."""
    return functools.reduce(getattr, path.split("."), module)


def weights_for_sampling(module: nn.Module, use_ema: bool | None = None) -> nn.Module:
    """The network sampling and evaluation run: the EMA copy when there is one (None), the EMA
    copy or a clear error (True), the live weights (False)."""
    if use_ema is not False and hasattr(module, "ema"):
        return module.ema
    if use_ema:
        raise ValueError(f"this {module.spec().name} checkpoint has no EMA weights (trained "
                         "without kiln.trainers.callbacks.ema.EMA): use the live weights (--no-ema)")
    return network(module, getattr(module, "_ema_source", None) or module.spec().ema_target)


def attach(module: nn.Module, target: str) -> nn.Module:
    """Register `module.ema`, a frozen copy of the network at `target` to average (once)."""
    if hasattr(module, "ema"):
        return module.ema
    try:
        live = network(module, target)
    except AttributeError:
        live = None
    if not isinstance(live, nn.Module):
        raise ValueError(f"EMA: {type(module).__name__} has no network '{target}' to average")
    module.ema = copy.deepcopy(live).requires_grad_(False)
    module._ema_source = target
    return module.ema
