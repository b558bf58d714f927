"""Random number generator state in checkpoints, per rank, so a resumed run draws the same
dropout masks, diffusion noise and timesteps as the uninterrupted one (Lightning seeds once at
the start but does not save the generators' state)."""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import reset_seed


def _capture() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomState(L.Callback):
    """Saves every rank's generators (gathered to the checkpoint rank 0 writes) and gives each
    rank its own back on resume; a resume on a different number of ranks starts them afresh."""

    def __init__(self):
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        # Lightning re-seeds every process it starts for DDP/FSDP2/DeepSpeed, after the model was
        # built, but not a single process, whose generators the model's initialisation has moved
        # on. Seeding here too starts training's draws from the seed at any world size (a resume
        # then restores its own state over this).
        reset_seed()

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        mine = _capture()
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return {"ranks": [mine]}
        ranks: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks", [])
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(ranks) == world:
            _restore(ranks[rank])
