"""The run directory: one place (a local path or an fsspec URL) per run holding the resolved
config, checkpoints, metrics.jsonl and sample grids.

    DIR/config.yaml              resolved config, as `kiln fit -c DIR/config.yaml` would rerun it
    DIR/checkpoints/last.ckpt    written atomically, with kiln metadata (family, config)
    DIR/metrics.jsonl            one JSON object per logged step, keys like "train/loss"
    DIR/samples/                 sample grids
    DIR/wandb/                   the offline W&B run (local run dirs)
"""
from __future__ import annotations

import json
import os
from importlib.metadata import version

import fsspec
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from kiln.launch.env import global_rank
from kiln.trainers.checkpoints.files import is_url


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of this run directory: made once by rank 0 and kept in `DIR/wandb-id`, so a
    resumed or requeued run logs into the same W&B run."""
    import uuid

    path = f"{run_dir.rstrip('/')}/wandb-id"
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        return fs.cat_file(p).decode().strip()
    run_id = uuid.uuid4().hex[:12]
    if global_rank() == 0:
        fs.makedirs(os.path.dirname(p), exist_ok=True)
        fs.pipe_file(p, run_id.encode())
    return run_id


class JsonlLogger(Logger):
    """metrics.jsonl: one line per `log_metrics` call, {"step": N, "train/loss": ...}."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = run_dir
        self.path = f"{run_dir.rstrip('/')}/metrics.jsonl"
        self._lines: list[str] = []  # kept only for URLs, which have no append

    @property
    def name(self) -> str:
        return "kiln"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self.run_dir

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # config.yaml holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        line = json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if is_url(self.path):
            self._lines.append(line)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    @rank_zero_only
    def save(self) -> None:
        if self._lines:
            with fsspec.open(self.path, "w") as f:
                f.write("\n".join(self._lines) + "\n")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


class RunDirectory(L.Callback):
    """Lays out the run directory, writes config.yaml, stamps checkpoints with kiln metadata."""

    def __init__(self, run_dir: str, config_yaml: str):
        self.run_dir = run_dir.rstrip("/")
        self.config_yaml = config_yaml

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            for sub in ("checkpoints", "samples"):
                fs.makedirs(f"{root}/{sub}", exist_ok=True)
            with fsspec.open(f"{self.run_dir}/config.yaml", "w") as f:
                f.write(self.config_yaml)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["kiln"] = {
            "family": pl_module.spec().name,
            "config": self.config_yaml,
            "version": version("kiln"),
        }


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every N steps and, always, at the end of training: Lightning's own end-of-fit
    save is skipped once any `last` was written, which would leave a time-limited run's final
    steps unsaved. A rerun into the same run directory (a resume, typically) replaces
    `last.ckpt` instead of writing `last-v1.ckpt` beside a stale one."""

    def __init__(self, dirpath: str, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
