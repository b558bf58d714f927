"""Which of a family's networks sampling and evaluation run: the EMA copy that
`kiln.trainers.ema.EMA` registers as `ema`, or the live weights. Model code asks here, below the
trainers that make the copy."""
from __future__ import annotations

from torch import nn


def weights_for_sampling(module: nn.Module, use_ema: bool | None = None) -> nn.Module:
    """The network sampling and evaluation run: the EMA copy when there is one (None), the EMA
    copy or a clear error (True), the live weights (False)."""
    if use_ema is not False and hasattr(module, "ema"):
        return module.ema
    if use_ema:
        raise ValueError(f"this {getattr(module, 'family', 'kiln')} checkpoint has no EMA weights (trained "
                         "without kiln.trainers.ema.EMA): use the live weights (--no-ema)")
    return getattr(module, getattr(module, "_ema_source", None) or getattr(module, "ema_target", "model"))
