"""`kiln fit` (and validate/test): a LightningCLI. YAML checked against constructor type hints,
composed with repeated -c, any key overridable; kiln's run directory, loggers, callbacks and
strategy added around the user's config."""
from __future__ import annotations

import os
import sys
import warnings

import yaml
from dataclasses import dataclass, field
from typing import Literal

import fsspec
import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from kiln.datamodules.webdataset import DataMetrics
from kiln.modules.family import Family
from kiln.trainers.checkpoints.checkpoint import AtomicCheckpointIO, check_family
from kiln.launch.env import in_slurm_job, under_torchrun
from kiln.trainers.callbacks.preemption import Preemption
from kiln.trainers.callbacks.progress import ModelSummary, progress_bar, quiet
from kiln.trainers.callbacks.rng import RandomState
from kiln.trainers.callbacks.samples import SampleGrid
from kiln.trainers.strategies import ParameterSharding, for_module
from kiln.launch.run_name import default_run_dir
from kiln.trainers.callbacks.run_dir import JsonlLogger, LastCheckpoint, RunDirectory, wandb_run_id
from kiln.trainers.checkpoints.files import is_url
from kiln.trainers.commands import stages


@dataclass
class WandbSettings:
    """Weights & Biases: offline by default (no network); `mode: online` to sync, `disabled` for none."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "kiln"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class CheckpointSettings:
    every_n_train_steps: int = 500


@dataclass
class SampleSettings:
    """Sample grids (families that generate): every N steps into DIR/samples/ and W&B."""

    every_n_train_steps: int = 500


class KilnCLI(LightningCLI):
    def __init__(self, args: list[str] | None, run: bool = True):
        super().__init__(
            Family,  # a model is a kiln family: the trainers call only its contract (kiln.modules.family)
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,  # RunDirectory writes config.yaml into the run dir
            seed_everything_default=0,
            trainer_defaults={"logger": False, "enable_checkpointing": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run directory (local path or URL); default runs/<family>-<config>/<id>.")
        parser.add_class_arguments(WandbSettings, "wandb")
        parser.add_class_arguments(CheckpointSettings, "checkpoint")
        parser.add_class_arguments(SampleSettings, "samples")
        parser.add_argument("--stages", type=dict[str, str] | None, default=None,
                            help="Stages this run builds on, name -> config: each is trained into the cache "
                                 "first if missing, and a value `stage:NAME` in this config becomes its "
                                 "checkpoint (trainers/commands/stages.py).")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="Intra-op CPU threads of each training process (torch.set_num_threads); "
                                 "default: torch's (OMP_NUM_THREADS, else the cores). Small models on few "
                                 "cores often train faster on one: each op is too small to split.")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        # Children that Lightning launches re-run this command: hand them the parent's run dir.
        cfg.run_dir = cfg.run_dir or os.environ.get("KILN_RUN_DIR") or default_run_dir(
            [str(p) for p in (cfg.get("config") or [])])
        os.environ["KILN_RUN_DIR"] = cfg.run_dir
        cfg.trainer.default_root_dir = cfg.run_dir
        _check_hardware(cfg.trainer)
        if cfg.get("stages"):
            checkpoints = {name: stages.ensure_stage(name, config) for name, config in cfg.stages.items()}
            for key, value in list(cfg.items()):
                cfg[key] = stages.resolve(value, checkpoints)
        if cfg.get("threads") is not None:
            if cfg.threads < 1:
                raise ValueError(f"threads must be at least 1, got {cfg.threads}")
            import torch

            torch.set_num_threads(cfg.threads)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        cfg = self.config[self.subcommand]
        run_dir = cfg.run_dir
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        loggers: list[Logger] = [JsonlLogger(run_dir)]
        if cfg.wandb.mode != "disabled":
            save_dir = run_dir if not is_url(run_dir) else os.path.join(".cache", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            wandb = WandbLogger(
                save_dir=save_dir, project=cfg.wandb.project, entity=cfg.wandb.entity,
                name=cfg.wandb.name or os.path.basename(run_dir.rstrip("/")), tags=cfg.wandb.tags,
                offline=cfg.wandb.mode == "offline", id=wandb_run_id(run_dir), resume="allow",
            )
            # Lightning always hands wandb.init `anonymous`, a setting W&B now only warns about.
            wandb._wandb_init.pop("anonymous", None)
            loggers.append(wandb)
        user_logger = trainer_cfg.get("logger")
        if isinstance(user_logger, Logger):
            loggers.append(user_logger)
        elif isinstance(user_logger, list):
            loggers += user_logger
        trainer_cfg["logger"] = loggers
        # Keep only this subcommand's section: it is what `kiln fit -c config.yaml` reads.
        config_yaml = self._parser(self.subcommand).dump(cfg, skip_none=False)
        callbacks = [
            RunDirectory(run_dir, config_yaml),
            LastCheckpoint(f"{run_dir}/checkpoints", cfg.checkpoint.every_n_train_steps),
            DataMetrics(),
            ParameterSharding(),
            Preemption(),
            RandomState(),
            SampleGrid(run_dir, cfg.samples.every_n_train_steps),
        ]
        if trainer_cfg.get("enable_progress_bar", True) is not False:
            callbacks.append(progress_bar())
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if trainer_cfg.get("enable_model_summary", True) is not False and not _has_summary(
                [trainer_cfg.get("callbacks"), *extra]):
            callbacks.append(ModelSummary())
            # Ours stands in for Lightning's default, which would otherwise announce that it stepped aside.
            trainer_cfg["enable_model_summary"] = False
        plugins = trainer_cfg.get("plugins") or []
        plugins = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        if in_slurm_job() and not under_torchrun():  # srun tasks; kiln's Preemption callback requeues
            plugins.append(SLURMEnvironment(auto_requeue=False))
        trainer_cfg["plugins"] = plugins
        # What the family declares for DDP (a GAN's phases leave the other network without gradients).
        trainer_cfg["strategy"] = for_module(trainer_cfg.get("strategy", "auto"), self.model,
                                             trainer_cfg.get("accelerator", "auto"), trainer_cfg.get("devices", "auto"),
                                             trainer_cfg.get("num_nodes", 1))
        return self._instantiate_trainer(trainer_cfg, [*extra, *callbacks])

    def _parse_ckpt_path(self) -> None:
        # Lightning would overwrite the model config with the checkpoint's hyper-parameters. In
        # kiln the config (the run dir's config.yaml) is the source of truth, and `before_fit`
        # checks that the checkpoint belongs to it.
        return

    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.get("ckpt_path") == "auto":
            # Resume this run directory's last checkpoint if there is one (a requeued job), else start.
            last = f"{cfg.run_dir.rstrip('/')}/checkpoints/last.ckpt"
            fs, path = fsspec.core.url_to_fs(last)
            cfg.ckpt_path = last if fs.isfile(path) else None
            self.config_init[self.subcommand].ckpt_path = cfg.ckpt_path
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc"):
            check_family(ckpt_path, self.model.spec().name)


def _has_summary(entries: list) -> bool:
    """A model summary among the user's callbacks (each entry: one callback, a list or None)."""
    from lightning.pytorch.callbacks import ModelSummary as LightningSummary

    flat = [c for entry in entries for c in (entry if isinstance(entry, list) else [entry])]
    return any(isinstance(c, LightningSummary) for c in flat)


def _check_hardware(trainer) -> None:
    """A config written for GPUs, run where there are none (or too few), says so in one line."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if have == 0:
            raise ValueError(f"trainer.accelerator is '{accelerator}' but this machine has no CUDA GPU "
                             "(use -c configs/trainer/cpu.yaml or --trainer.accelerator cpu)")
        devices = trainer.get("devices")
        if isinstance(devices, int) and devices > have:
            raise ValueError(f"trainer.devices is {devices} but this machine has {have} CUDA GPU(s)")


def main(args: list[str]) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    quiet()
    # From the console LightningCLI reads sys.argv itself (and warns if handed a copy).
    KilnCLI(None if args == sys.argv[1:] else args)


class _ConfigOnly(KilnCLI):
    """KilnCLI's parser and nothing else: no run directory, no hardware check, nothing built."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass


def read_config(args: list[str]) -> dict:
    """The config `kiln fit` would run, as plain data: every `-c` composed and every `--key value`
    applied by the same jsonargparse parser, each section checked against its class, nothing
    instantiated (`kiln plan` reads configs this way)."""
    with warnings.catch_warnings():  # handed its own args, LightningCLI warns that the command line has others
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ConfigOnly(args, run=False)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_check=True))
