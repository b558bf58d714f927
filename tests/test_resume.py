"""Exact mid-epoch resume: a fit stopped after N steps and resumed to 2N trains on exactly the
samples of one uninterrupted 2N-step run, re-reading no shard it had finished."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from kiln.datamodules.mappers import ImageText, UnpairedImages
from kiln.datamodules.webdataset import WebDataModule
from tests.conftest import REPO, kiln
from tests.key_recorder import KeyRecorder, read_keys

# 19 shards of 16 samples (uneven over 2 ranks x 2 workers); blocks of 3 shards; 9 batches of 8
# per rank per epoch, so a 7-step stop falls mid-epoch and the 14-step run crosses into the next.
BLOCK_SHARDS, STEPS = 3, 7
CONFIG = """\
model:
  class_path: tests.key_recorder.KeyRecorder
  init_args: {{out: {out}}}
data:
  class_path: kiln.datamodules.webdataset.WebDataModule
  init_args:
    train_urls: {shards}/twemoji/twemoji-{{000000..000018}}.tar
    batch_size: 8
    num_workers: 2
    shuffle_buffer: 48
    batches_per_epoch: 9
    mapper: {{class_path: kiln.datamodules.mappers.ImageText, init_args: {{image_size: 8}}}}
trainer: {{accelerator: cpu, devices: {devices}, strategy: {strategy}, enable_progress_bar: false}}
wandb: {{mode: disabled}}
"""


def _fit(tmp: Path, name: str, shards: str, devices: int, steps: int, resume_from: str | None = None) -> Path:
    run = tmp / name
    run.mkdir(exist_ok=True)
    config = tmp / f"{name}.yaml"
    config.write_text(CONFIG.format(out=run, shards=shards, devices=devices, strategy="ddp" if devices > 1 else "auto"))
    args = ["fit", "-c", str(config), "--trainer.max_steps", str(steps), "--run_dir", str(run)]
    r = kiln(*args, *(["--ckpt_path", resume_from] if resume_from else []), env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def _shards_read(run: Path) -> int:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # The resumed fit wrote into the same run directory: its last.ckpt replaced the first one's.
    assert ckpt["global_step"] == 2 * STEPS and not list((run / "checkpoints").glob("last-v*"))
    return sum(rank["shards_read"] for rank in ckpt["WebDataModule"]["ranks"])


@pytest.mark.parametrize("devices", [1, 2])
def test_resume_sees_exactly_the_unseen_samples(emoji_shards, tmp_path, devices):
    whole = _fit(tmp_path, "whole", emoji_shards, devices, 2 * STEPS)
    part = _fit(tmp_path, "part", emoji_shards, devices, STEPS)
    assert len(read_keys(str(part))) == STEPS * 8 * devices
    _fit(tmp_path, "part", emoji_shards, devices, 2 * STEPS, resume_from=str(part / "checkpoints" / "last.ckpt"))

    seen, resumed = read_keys(str(whole)), read_keys(str(part))
    assert len(seen) == 2 * STEPS * 8 * devices
    assert resumed == seen  # the same multiset of sample keys
    # Resuming re-reads at most the block each worker was in, never the shards before it.
    assert _shards_read(part) <= _shards_read(whole) + devices * 2 * BLOCK_SHARDS


def _in_process(out: Path, shards: str, steps: int, ckpt: str | None = None, unpaired: bool = False, **data) -> None:
    out.mkdir(exist_ok=True)
    if unpaired:
        urls, mapper = {"a": f"{shards}/noto/*.tar", "b": f"{shards}/openmoji/*.tar"}, UnpairedImages(8, flip=True)
    else:
        urls, mapper = f"{shards}/noto/*.tar", ImageText(8)
    dm = WebDataModule(urls, mapper, batch_size=8, num_workers=2, shuffle_buffer=48, **data)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(KeyRecorder(str(out)), dm, ckpt_path=ckpt)
    trainer.save_checkpoint(out / "last.ckpt")


@pytest.mark.parametrize("data", [dict(resampled=True, batches_per_epoch=5), dict(batches_per_epoch=None),
                                  dict(unpaired=True, batches_per_epoch=9)],
                         ids=["resampled", "epoch-from-manifest", "unpaired"])
def test_resume_is_exact_in_every_mode(emoji_shards, tmp_path, data):
    _in_process(tmp_path / "whole", emoji_shards, 2 * STEPS, **data)
    _in_process(tmp_path / "part", emoji_shards, STEPS, **data)
    _in_process(tmp_path / "part", emoji_shards, 2 * STEPS, ckpt=str(tmp_path / "part" / "last.ckpt"), **data)
    seen = read_keys(str(tmp_path / "whole"))
    assert read_keys(str(tmp_path / "part")) == seen and len(seen) == 2 * STEPS * 8
    if data.get("unpaired"):
        pairs = [key.split("|") for key in seen]
        # Two independent streams: a random pairing, rarely an emoji with itself.
        assert sum(a == b for a, b in pairs) < len(pairs) // 10 and len({a for a, _ in pairs}) > 50


def test_changed_data_restarts_the_epoch_with_a_warning(emoji_shards, tmp_path):
    _in_process(tmp_path / "part", emoji_shards, 3, batches_per_epoch=9)
    with pytest.warns(UserWarning, match="changed since the checkpoint"):
        _in_process(tmp_path / "part", emoji_shards, 5, ckpt=str(tmp_path / "part" / "last.ckpt"), batches_per_epoch=10)
    assert len(read_keys(str(tmp_path / "part"))) == 5 * 8
