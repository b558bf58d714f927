"""End to end on CPU, as a user runs it: `kiln fit` writes a complete run directory, `kiln eval`
judges its checkpoint, and a 2-process DDP run reproduces the 1-process loss curve."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import kiln, read_metrics

TINY = "configs/clip/tiny.yaml"


def _small(emoji_shards: str, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "-c", TINY, "--data.init_args.root", emoji_shards, "--data.init_args.build_size", "32",
            "--run_dir", str(run_dir), "--trainer.log_every_n_steps", "1", *extra]


def test_fit_then_eval(emoji_shards, tmp_path):
    run = tmp_path / "run"
    r = kiln(*_small(emoji_shards, run, "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
                     "--data.init_args.batch_size", "32"))
    assert r.returncode == 0, r.stderr[-3000:]

    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "samples").is_dir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 6 and config["run_dir"] == str(run)
    rows = read_metrics(run)
    train = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in train] == list(range(6))
    assert any("val/retrieval/top1" in row for row in rows)
    # W&B ran offline into the run directory and recorded the run.
    [wandb_run] = list((run / "wandb").glob("offline-run-*"))
    assert list(wandb_run.glob("run-*.wandb"))[0].stat().st_size > 0

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["kiln"]["family"] == "clip" and ckpt["global_step"] == 6

    out = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--metrics", "zero_shot,retrieval",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["heldout/pairs"] == 320  # the held-out OpenMoji shards, each emoji once
    for key in ("retrieval/top1", "retrieval/image_to_text_top1", "zero_shot/top1", "retrieval/top1_untrained"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["extractor"].startswith("clip")

    # The resolved config reruns as is (here: two more steps from the checkpoint).
    r = kiln("fit", "-c", str(run / "config.yaml"), "--trainer.max_steps", "8", "--ckpt_path",
             str(run / "checkpoints" / "last.ckpt"), "--run_dir", str(tmp_path / "resumed"), "--wandb.mode", "disabled")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8
    assert len([row for row in read_metrics(tmp_path / "resumed") if "train/loss" in row]) == 2


def test_ddp_two_processes_match_one_process(emoji_shards, tmp_path):
    """The global batch is the same (2 x 16 vs 1 x 32): with the all-gather right, so is the loss.

    Shards hold 16 samples each and are read in order, so rank r's step-t batch is shard 2t + r,
    and the two ranks together see exactly the single process's step-t batch.
    """
    no_crop = tmp_path / "no-crop.yaml"
    no_crop.write_text("data:\n  init_args:\n    mapper:\n      class_path: kiln.datamodules.mappers.ImageText\n"
                       "      init_args: {image_size: 16, crop_scale: null, color_jitter: 0.0}\n")
    common = ["-c", str(no_crop), "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
              "--data.init_args.shuffle", "false", "--data.init_args.num_workers", "0", "--wandb.mode", "disabled"]
    one = kiln(*_small(emoji_shards, tmp_path / "one", *common, "--data.init_args.batch_size", "32"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = kiln(*_small(emoji_shards, tmp_path / "two", *common, "--data.init_args.batch_size", "16",
                       "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    curve = lambda d: [row["train/loss"] for row in read_metrics(d) if "train/loss" in row]  # noqa: E731
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(a) == len(b) == 5
    assert a[0] > a[-1]  # it trains
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
