"""How model code loads another kiln checkpoint (a cascade's earlier stage, named by path in its
config) without importing the trainers above it: the trainers' checkpoint reader
(trainers/checkpoints/checkpoint.py) registers its loader, which checks the stored config's
trust before anything is imported, when it is imported (every kiln command imports it)."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

_loader: Callable[[str], nn.Module] | None = None


def register(loader: Callable[[str], nn.Module]) -> None:
    global _loader
    _loader = loader


def load_module(path: str) -> nn.Module:
    """The module of the kiln checkpoint at `path`, built by the registered loader."""
    if _loader is None:
        raise RuntimeError("no kiln checkpoint loader is registered: import the trainers' checkpoint reader "
                           "(trainers/checkpoints/checkpoint.py) first")
    return _loader(path)
