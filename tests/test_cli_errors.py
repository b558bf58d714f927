"""Bad input gets one line on stderr naming the problem and a non-zero exit, never a traceback."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from conftest import kiln

TINY = "configs/clip/tiny.yaml"


def assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("kiln")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_config_key(emoji_shards):
    r = kiln("fit", "-c", TINY, "--model.init_args.no_such_knob", "3", "--data.init_args.root", emoji_shards)
    assert_one_line_error(r, "no_such_knob")


def test_unknown_key_inside_a_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    assert_one_line_error(kiln("fit", "-c", TINY, "-c", str(bad)), "max_stepz")


def test_missing_config_file():
    assert_one_line_error(kiln("fit", "-c", "configs/clip/nope.yaml"), "nope.yaml")


def test_unreadable_shard_path(tmp_path):
    r = kiln("fit", "-c", TINY, "--data", "kiln.datamodules.webdataset.WebDataModule",
             "--data.init_args.train_urls", str(tmp_path / "missing-{000..003}.tar"),
             "--data.init_args.mapper", "kiln.datamodules.mappers.ImageText",
             "--run_dir", str(tmp_path / "run"), "--wandb.mode", "disabled")
    assert_one_line_error(r, "missing-000.tar")


def _foreign_family_checkpoint(path: Path) -> Path:
    torch.save({"kiln": {"family": "stylegan", "config": "model: {}\n", "version": "0.1.0"},
                "state_dict": {"g.weight": torch.zeros(2)}}, path)
    return path


def test_checkpoint_from_another_family_for_fit(tmp_path, emoji_shards):
    ckpt = _foreign_family_checkpoint(tmp_path / "stylegan.ckpt")
    r = kiln("fit", "-c", TINY, "--ckpt_path", str(ckpt), "--data.init_args.root", emoji_shards,
             "--run_dir", str(tmp_path / "run"), "--wandb.mode", "disabled")
    assert_one_line_error(r, "'stylegan' checkpoint", "'clip'")


def test_checkpoint_from_another_family_for_eval(tmp_path):
    ckpt = _foreign_family_checkpoint(tmp_path / "stylegan.ckpt")
    r = kiln("eval", "--ckpt", str(ckpt), "--metrics", "zero_shot", "--out", str(tmp_path / "m.json"))
    assert_one_line_error(r, "stylegan")
    assert not (tmp_path / "m.json").exists()


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"kiln": {"family": "clip"}, "state_dict": {}, "x": _Payload()}, f)
    r = kiln("eval", "--ckpt", str(path), "--out", str(tmp_path / "m.json"))
    assert_one_line_error(r, "refusing to load")
    assert "unpickled code ran" not in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["eval", "--ckpt", "/no/such.ckpt", "--out", "m.json"], "checkpoint not found"),
    (["data", "nosuchbuilder", "--out", "x"], "nosuchbuilder"),
    (["data", "emoji"], "--out"),
])
def test_other_commands(args, needle):
    assert_one_line_error(kiln(*args), needle)


@pytest.mark.parametrize("args, needle", [
    (["--wandb.mode", "bogus"], "wandb.mode"),
    (["--trainer.max_steps", "many"], "trainer.max_steps"),
])
def test_bad_values(args, needle):
    assert_one_line_error(kiln("fit", "-c", TINY, *args), needle, "expected")


def test_gpu_config_on_a_machine_without_gpus(tmp_path):
    r = kiln("fit", "-c", TINY, "--trainer.accelerator", "gpu", "--run_dir", str(tmp_path / "run"))
    assert_one_line_error(r, "trainer.accelerator is 'gpu' but this machine has no CUDA GPU")


def test_global_batch_that_does_not_split_over_ranks(tmp_path, emoji_shards):
    r = kiln("fit", "-c", TINY, "--data.init_args.root", emoji_shards, "--data.init_args.global_batch_size", "15",
             "--trainer.accumulate_grad_batches", "2", "--run_dir", str(tmp_path / "run"), "--wandb.mode", "disabled")
    assert_one_line_error(r, "data.global_batch_size 15 does not split evenly over 1 rank(s) x 2 accumulation step(s)")


def test_batch_size_below_one(tmp_path, emoji_shards):
    # a batch that never fills used to read the shards forever instead of failing
    r = kiln("fit", "-c", TINY, "--data.init_args.root", emoji_shards, "--data.init_args.batch_size", "-3",
             "--run_dir", str(tmp_path / "run"), "--wandb.mode", "disabled", timeout=120)
    assert_one_line_error(r, "data batch size must be at least 1, got -3")


def test_plan_that_cannot_fit():
    r = kiln("plan", "-c", "configs/clip/vit-l-14.yaml", "--nodes", "1", "--gpus-per-node", "8")
    line = assert_one_line_error(r, "does not fit: ddp needs")
    assert "GiB per GPU, more than the 80 GiB given" in line
