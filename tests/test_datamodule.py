"""The WebDataset pipeline over local paths and file:// URLs: expansion, rank split, batches."""
from __future__ import annotations

import shutil

import pytest
import torch

from kiln.datamodules.errors import DataError
from kiln.datamodules.mappers import ImageText, images_to_float
from kiln.datamodules.webdataset import ShardPipeline, expand_urls


def keys_of(pipeline: ShardPipeline) -> list[str]:
    return [k for batch in pipeline for k in batch["key"]]


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_urls_globs_and_braces(emoji_shards, scheme):
    globbed = expand_urls(f"{scheme}{emoji_shards}/noto/noto-*.tar")
    braced = expand_urls(f"{scheme}{emoji_shards}/noto/noto-{{000000..000019}}.tar")
    assert len(globbed) == len(braced) == 20 and [u.split("/")[-1] for u in globbed] == [u.split("/")[-1] for u in braced]
    with pytest.raises(DataError, match="no shards match"):
        expand_urls(f"{scheme}{emoji_shards}/nothing-*.tar")


def test_batches_and_rank_split(emoji_shards):
    urls = expand_urls(f"file://{emoji_shards}/twemoji/twemoji-*.tar")
    mapper = ImageText(image_size=24)
    whole = ShardPipeline(urls, mapper, batch_size=16, shuffle=False)
    batch = next(iter(whole))
    # Images travel as uint8; the DataModule makes them float in [-1, 1] on the device.
    assert batch["image"].shape == (16, 3, 24, 24) and batch["image"].dtype == torch.uint8
    image = images_to_float(batch)["image"]
    assert image.dtype == torch.float32 and -1.0 <= image.min() and image.max() <= 1.0 and len(batch["caption"]) == 16
    all_keys = keys_of(whole)
    assert len(all_keys) == len(set(all_keys)) == 320
    ranks = [keys_of(ShardPipeline(urls, mapper, 16, rank=r, world_size=2, shuffle=True, seed=3)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(all_keys)


def test_shuffle_changes_with_epoch_and_is_seeded(emoji_shards):
    urls = expand_urls(f"{emoji_shards}/noto/noto-*.tar")
    p = ShardPipeline(urls, ImageText(16), 16, shuffle=True, seed=0)
    first = keys_of(p)
    assert keys_of(ShardPipeline(urls, ImageText(16), 16, shuffle=True, seed=0)) == first
    p.set_epoch(1)
    second = keys_of(p)
    assert second != first and sorted(second) == sorted(first)


def test_mapper_names_a_missing_field():
    with pytest.raises(KeyError, match="has no 'txt'"):
        ImageText(16)({"__key__": "k", "png": None})


def test_fixed_length_epochs_repeat_the_shards_across_workers(emoji_shards):
    from torch.utils.data import DataLoader

    urls = expand_urls(f"{emoji_shards}/noto/noto-*.tar")  # 320 samples = 20 batches of 16 per pass
    pipeline = ShardPipeline(urls, ImageText(16), 16, shuffle=True, batches_per_epoch=50)
    keys = [k for batch in DataLoader(pipeline, batch_size=None, num_workers=2) for k in batch["key"]]
    assert len(keys) == 50 * 16
    assert len(set(keys)) == 320  # every sample seen, several times over


def test_held_out_data_is_judged_without_augmentation(emoji_shards):
    from kiln.datamodules.webdataset import WebDataModule

    mapper = ImageText(16, crop_scale=(0.5, 1.0), color_jitter=0.4, caption_dropout=0.5)
    dm = WebDataModule(f"{emoji_shards}/noto/*.tar", mapper, val_urls=f"{emoji_shards}/openmoji/*.tar",
                       batch_size=32, num_workers=0)
    first, second = (next(iter(dm.val_dataloader())) for _ in range(2))
    torch.testing.assert_close(first["image"], second["image"])
    assert "" not in first["caption"]


def test_the_next_shard_is_fetched_while_the_current_one_is_read(tmp_path):
    from kiln.datamodules.shards import write_shards
    from kiln.datamodules.webdataset import _Faults, _ReadAhead

    samples = [{"__key__": f"s{i}", "txt": f"caption {i}".encode()} for i in range(6)]
    write_shards(str(tmp_path), "t", {"train": samples}, shard_size=2, progress=False)
    shards = [str(tmp_path / "train" / f"train-{i:06d}.tar") for i in range(3)]
    reader = _ReadAhead(_Faults(strict=True), retries=0)
    try:
        assert [s["__key__"] for s in reader.read(shards, 0)] == ["s0", "s1"]
        reader.next[1].result()  # shard 1's bytes are in hand, so removing its file changes nothing
        shutil.move(shards[1], tmp_path / "moved.tar")
        assert [s["__key__"] for s in reader.read(shards, 1)] == ["s2", "s3"]
        assert [s["__key__"] for s in reader.read(shards, 2)] == ["s4", "s5"] and reader.next is None
    finally:
        reader.close()
