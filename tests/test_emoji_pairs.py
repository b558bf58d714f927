"""`kiln data emoji-pairs` (issue #27): the same emoji drawn by Twemoji and by Noto as aligned
pairs, with a random held-out split and one of whole base designs (no skin-tone sibling of a
held-out design in training), read back through the paired mapper."""
from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from kiln.datamodules.emoji import write_emoji_pair_shards
from kiln.datamodules.mappers import PairedImages
from kiln.datamodules.shards import read_manifest
from kiln.datamodules.webdataset import WebDataModule
from tests.conftest import kiln


def _samples(root, split: str) -> list[dict]:
    out = defaultdict(dict)
    for shard in sorted((root / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                out[key][field] = tar.extractfile(member).read()
    return list(out.values())


def test_pairs_hold_out_whole_designs_and_read_back_aligned(tmp_path):
    root = tmp_path / "pairs"
    r = kiln("data", "emoji-pairs", "--out", str(root), "--size", "16", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_manifest(str(root))
    assert manifest["builder"] == "emoji-pairs" and (manifest["source"], manifest["target"]) == ("twemoji", "noto")

    splits = {name: _samples(root, name) for name in ("train", "val", "val-designs")}
    info = {name: [json.loads(s["json"]) for s in samples] for name, samples in splits.items()}
    total = sum(map(len, info.values()))
    assert total == manifest["count"] > 1000
    assert abs(len(info["val"]) - 0.1 * total) <= 1
    bases = {name: {i["base"] for i in items} for name, items in info.items()}
    assert not bases["val-designs"] & (bases["train"] | bases["val"])  # whole designs, every variant
    # The random split keeps some held-out emoji's skin-tone siblings in training: the easier test.
    assert len(bases["val"] & bases["train"]) > 10
    assert any(i["key"] != i["base"] for i in info["val-designs"])  # designs with variants are held out too

    # Input and target: one design in two styles, the same size, different drawings.
    sample = splits["val"][0]
    a, b = (np.asarray(Image.open(io.BytesIO(sample[f])).convert("RGB"), dtype=np.float32) for f in ("input.png", "target.png"))
    assert a.shape == b.shape == (16, 16, 3) and np.abs(a - b).mean() > 1

    data = WebDataModule(f"{root}/train/*.tar", PairedImages(image_size=16), val_urls=f"{root}/val-designs/*.tar",
                         batch_size=8, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch["input"].shape == batch["target"].shape == (8, 3, 16, 16)


def test_one_style_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a pair needs two styles, got 'noto' twice"):
        write_emoji_pair_shards(str(tmp_path / "x"), source="noto", target="noto")
    with pytest.raises(ValueError, match="held-out fractions must be in"):
        write_emoji_pair_shards(str(tmp_path / "x"), val_fraction=0.5, design_fraction=0.5)
    assert not (tmp_path / "x").exists()
