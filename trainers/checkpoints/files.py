"""Checkpoint files on any fsspec URL: written whole or not at all, read back as data only.

The bottom of kiln's checkpoint I/O: `sharded` (pointers and shards), `deepspeed` (ZeRO's files)
and `checkpoint` (rebuilding a run from one) are built on these.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import fsspec
import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, foreign, or from another family."""


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def write_atomic(url: str, data: bytes | str) -> None:
    """Write a whole file under a temporary name, then move it into place: readers see the old
    file or the new one, never half of one (a rename locally, a single PUT on object storage)."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    fs.mv(tmp, path)


def load_checkpoint_dict(path: str) -> dict[str, Any]:
    """Any checkpoint file (single-file, or a sharded checkpoint's pointer), read as data only."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise CheckpointError(f"checkpoint not found: {path}")
    if fs.isdir(p):
        raise CheckpointError(f"{path} is a directory, not a kiln checkpoint (give the .ckpt file beside its shards)")
    try:
        with fsspec.open(path, "rb") as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: it holds more than weights ({first})") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure is the same user-facing problem
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "kiln" not in ckpt:
        raise CheckpointError(f"{path} is not a kiln checkpoint (no kiln metadata)")
    return ckpt
