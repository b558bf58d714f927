"""Reading kiln checkpoints back: as data, never as code.

Checkpoints are loaded with `weights_only=True` (tensors and plain containers only, no
unpickling of arbitrary objects). The model and data module are rebuilt from the resolved
config that `RunDirectory` stamps into every checkpoint, restricted to kiln's own classes.
"""
from __future__ import annotations

import pickle
from typing import Any

import fsspec
import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser

from kiln.modules import loading
from kiln.trainers.trust import UntrustedConfig, check_config, is_trusted


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, foreign, or from another family."""


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


def load_checkpoint(path: str) -> dict[str, Any]:
    """A kiln checkpoint with its full `state_dict`; a sharded one is consolidated in memory."""
    from kiln.trainers.sharded import SHARDS, consolidate

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


def build_from_checkpoint(ckpt: dict[str, Any], load_weights: bool = True):
    """(LightningModule, LightningDataModule) of the run that wrote `ckpt`."""
    config = yaml.safe_load(ckpt["kiln"]["config"]) or {}
    _check(config)  # the whole config, trainer and callbacks included, before any of it is imported
    model = _instantiate(config["model"], L.LightningModule)
    data = _instantiate(config["data"], L.LightningDataModule) if config.get("data") else None
    if load_weights:
        if any(k.startswith("ema.") for k in ckpt["state_dict"]):  # trained with the EMA callback
            from kiln.trainers.ema import attach

            attach(model)
        model.load_state_dict(ckpt["state_dict"])
    return model, data


# model code (a GLIDE upsampler's base_ckpt) loads checkpoints through this, trust checks included
loading.register(lambda path: build_from_checkpoint(load_checkpoint(path))[0])
