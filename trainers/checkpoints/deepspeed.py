"""DeepSpeed ZeRO checkpoints read as data: every file through `torch.load(weights_only=True)`
with only DeepSpeed's own metadata classes allowed, and consolidated to full weights in this
process. DeepSpeed reads and writes local directories; URLs are staged through a temporary one."""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import torch

from kiln.trainers.checkpoints.files import CheckpointError


class WeightsOnlyEngine:
    """DeepSpeed's checkpoint engine, reading every file as data (`weights_only=True`)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_file(path, map_location)


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str, map_location=None) -> Any:
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"refusing to load {path}: it holds more than weights ({first})") from None


class local_dir:
    """DeepSpeed reads and writes local directories: for a URL, stage through a temporary one."""

    def __init__(self, url: str, upload: bool):
        self.url, self.upload = url, upload
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.remote = not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def __enter__(self) -> str:
        if not self.remote:
            os.makedirs(self.path, exist_ok=True)
            return self.path
        self.tmp = tempfile.mkdtemp(prefix="kiln-ds-")
        if not self.upload:
            self.fs.get(f"{self.path}/", f"{self.tmp}/", recursive=True)
        return self.tmp

    def __exit__(self, exc_type, *exc) -> None:
        if not self.remote:
            return
        try:
            if self.upload and exc_type is None:
                self.fs.put(f"{self.tmp}/", f"{self.path}/", recursive=True)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def consolidate(url: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed ZeRO-2/3 checkpoint directory, in this process."""
    from deepspeed.utils import zero_to_fp32

    with local_dir(url, upload=False) as local:
        for f in Path(local, "checkpoint").glob("*.pt"):
            load_file(str(f))  # refuse anything but data before DeepSpeed's own reader
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(local, tag="checkpoint")
    return {k: v.clone() for k, v in state.items()}
