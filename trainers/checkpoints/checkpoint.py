"""Reading kiln checkpoints back: as data, never as code.

Checkpoints are loaded with `weights_only=True` (tensors and plain containers only, no
unpickling of arbitrary objects). The model and data module are rebuilt from the resolved
config that `RunDirectory` stamps into every checkpoint, restricted to kiln's own classes.
"""
from __future__ import annotations

import os
from typing import Any

import lightning as L
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from jsonargparse import ArgumentParser

from kiln.modules import loading
from kiln.modules.ema import attach
from kiln.modules.family import Family
from kiln.trainers.checkpoints.files import CheckpointError, load_checkpoint_dict
from kiln.trainers.checkpoints.sharded import SHARDS, as_single_file, consolidate
from kiln.trainers.checkpoints.trust import UntrustedConfig, check_config, is_trusted


def load_checkpoint(path: str) -> dict[str, Any]:
    """A kiln checkpoint with its full `state_dict`; a sharded one is consolidated in memory."""
    ckpt = load_checkpoint_dict(path)
    if SHARDS in ckpt:
        ckpt = consolidate(path)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a kiln checkpoint (no state_dict)")
    return ckpt


def family_of(ckpt: dict[str, Any]) -> str:
    return ckpt["kiln"]["family"]


def check_family(path: str, expected: str) -> None:
    family = family_of(load_checkpoint_dict(path))
    if family != expected:
        raise CheckpointError(f"{path} is a '{family}' checkpoint, but this config trains '{expected}'")


def _check(config: Any) -> None:
    try:
        check_config(config)
    except UntrustedConfig as e:
        raise CheckpointError(str(e)) from None


def _instantiate(section: dict, base: type) -> Any:
    class_path = section.get("class_path", "") if isinstance(section, dict) else ""
    if not is_trusted(class_path):  # a bare name would be looked up among every imported subclass
        raise CheckpointError(f"checkpoint config names a class outside kiln: {class_path!r} "
                              "(trust its package with KILN_TRUSTED_PACKAGES)")
    _check(section)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "obj", required=True)
    cfg = parser.parse_object({"obj": section})
    return parser.instantiate_classes(cfg).obj


def build_from_checkpoint(ckpt: dict[str, Any], load_weights: bool = True) -> tuple[Family, L.LightningDataModule | None]:
    """(family, data module) of the run that wrote `ckpt`; without `load_weights`, the same
    untrained (an EMA copy too, equal to the weights, if the run kept one: the run at step 0)."""
    config = yaml.safe_load(ckpt["kiln"]["config"]) or {}
    _check(config)  # the whole config, trainer and callbacks included, before any of it is imported
    model = _instantiate(config["model"], Family)
    data = _instantiate(config["data"], L.LightningDataModule) if config.get("data") else None
    if any(k.startswith("ema.") for k in ckpt["state_dict"]):  # trained with the EMA callback
        attach(model, model.spec().ema_target)
    if load_weights:
        model.load_state_dict(ckpt["state_dict"])
    return model, data


def open_run(path: str, doing: str) -> tuple[dict[str, Any], Family, L.LightningDataModule | None]:
    """(checkpoint, family, data module) of the kiln checkpoint at `path`, for a command that
    will `doing` it; a config that cannot be rebuilt is one line naming the family."""
    ckpt = load_checkpoint(path)
    try:
        model, data = build_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"cannot {doing} this '{family_of(ckpt)}' checkpoint: {e}") from None
    return ckpt, model, data


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint under a temporary name and renames it into place, so a crash
    mid-save leaves the previous `last.ckpt` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        fs = get_filesystem(path)
        path = str(path)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        _atomic_save(checkpoint, tmp)
        fs.mv(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        # Read as data only; a sharded checkpoint (FSDP2) is gathered into the single-file layout.
        return as_single_file(str(path))


# model code (a GLIDE upsampler's base_ckpt) loads checkpoints through this, trust checks included
loading.register(lambda path: build_from_checkpoint(load_checkpoint(path))[0])
