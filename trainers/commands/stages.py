"""Stages a run needs first (`kiln fit`'s `stages`): a learn config names the configs of the
stages it builds on -- a tokenizer before Parti's transformer, CLIP and the prior before DALL-E
2's decoder -- and `kiln fit -c configs/<family>/learn.yaml` trains the missing ones into the
cache before it starts, so that every family's full check is one command.

    stages:
      base: configs/glide/learn.yaml          # name -> the stage's config
    model:
      init_args:
        base_ckpt: stage:base                 # becomes the stage's last checkpoint

Each stage trains once, with `kiln fit -c CONFIG` into `$KILN_CACHE/stages/<name>-<hash>/` (the
hash of the config's bytes, so an edited config trains again), and counts as there only once its
run has finished (a `done` file beside the checkpoint): an interrupted stage trains again from
scratch. Concurrent runs (several ranks, several jobs on one machine) take a file lock, so one
of them trains it and the others wait for it.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from kiln.datamodules.datasets import cache_dir

PREFIX = "stage:"


def stage_dir(name: str, config: str) -> Path:
    if not Path(config).is_file():
        raise FileNotFoundError(f"stage '{name}': config not found: {config}")
    digest = hashlib.blake2b(Path(config).read_bytes(), digest_size=6).hexdigest()
    return Path(cache_dir("stages")) / f"{name}-{digest}"


def ensure_stage(name: str, config: str) -> str:
    """The last checkpoint of stage `name` (trained from `config` first if it is not in the cache)."""
    run = stage_dir(name, config)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "done").exists():
            print(f"kiln fit: stage '{name}' is not trained yet: training it first ({config} -> {run})", flush=True)
            env = {k: v for k, v in os.environ.items() if k != "KILN_RUN_DIR"}  # the stage's own run directory
            r = subprocess.run([sys.executable, "-m", "kiln.trainers.cli", "fit", "-c", config, "--run_dir", str(run)],
                               env=env)
            if r.returncode != 0:
                raise RuntimeError(f"stage '{name}' ({config}) failed (exit {r.returncode}); its error is above")
            (run / "done").write_text(config + "\n")
    return str(run / "checkpoints" / "last.ckpt")


def resolve(value, checkpoints: dict[str, str]):
    """`value` with every string `stage:NAME` replaced by that stage's checkpoint."""
    if isinstance(value, str) and value.startswith(PREFIX):
        name = value[len(PREFIX):]
        if name not in checkpoints:
            raise ValueError(f"{value!r} names no stage of this config (stages: {', '.join(checkpoints) or 'none'})")
        return checkpoints[name]
    return value
