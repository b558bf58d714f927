"""`kiln fit --threads N` sets each training process's intra-op threads; below 1 is a one-line error."""
from __future__ import annotations

import os
from pathlib import Path

from conftest import kiln
from test_cli_errors import TINY, assert_one_line_error

PROBE = '''\
import lightning as L
import torch


class Probe(L.Callback):
    """Writes the training process's intra-op thread count when training starts."""

    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        with open(self.out, "w") as f:
            f.write(str(torch.get_num_threads()))
'''


def fit_threads(tmp_path: Path, emoji_shards: str, *args: str) -> int:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "threadprobe.py").write_text(PROBE)
    out = tmp_path / "threads.txt"
    r = kiln("fit", "-c", TINY, "--data.init_args.root", emoji_shards, "--trainer.max_steps", "1",
             "--trainer.callbacks+=threadprobe.Probe", "--trainer.callbacks.out", str(out), *args,
             "--run_dir", str(tmp_path / "run"), "--wandb.mode", "disabled",
             env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
                  "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    return int(out.read_text())


def test_threads_setting_reaches_the_training_process(tmp_path, emoji_shards):
    assert fit_threads(tmp_path / "default", emoji_shards) == 2  # torch's own default: OMP_NUM_THREADS
    assert fit_threads(tmp_path / "one", emoji_shards, "--threads", "1") == 1
    assert "threads: 1" in (tmp_path / "one" / "run" / "config.yaml").read_text()


def test_threads_below_one(tmp_path, emoji_shards):
    r = kiln("fit", "-c", TINY, "--data.init_args.root", emoji_shards, "--threads", "0",
             "--run_dir", str(tmp_path / "run"), "--wandb.mode", "disabled")
    assert_one_line_error(r, "threads must be at least 1, got 0")
