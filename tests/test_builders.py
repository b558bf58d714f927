"""`kiln data` builders: Fashion-MNIST, digits, a folder of images, folder pairs."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import kiln
from kiln.datamodules import builders
from kiln.datamodules.errors import DataError
from kiln.datamodules.shards import read_manifest


def read(out: Path | str, manifest: dict, split: str, decode: bool = True) -> list[dict]:
    urls = [f"{out}/{shard['url']}" for shard in manifest["shards"][split]]
    dataset = wds.WebDataset(urls, shardshuffle=False)
    return list(dataset.decode("pil") if decode else dataset)


def raw_idx(name: str, offset: int) -> np.ndarray:
    """An IDX file's payload read without the builder's header parsing."""
    with gzip.open(f"{builders.FASHION_MNIST}/{name}.gz") as f:
        return np.frombuffer(f.read()[offset:], np.uint8)


def save(path: Path, colour, size=(12, 9), fmt=None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path.read_bytes()


def test_fashion_mnist_counts_labels_captions_and_manifest(tmp_path):
    manifest = builders.write_fashion_mnist_shards(str(tmp_path), shard_size=16, limit=40, progress=False)
    assert manifest == read_manifest(str(tmp_path))
    assert manifest["count"] == 80 and manifest["size"] == 28
    assert manifest["classes"][0] == "t-shirt/top" and manifest["classes"][9] == "ankle boot"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        shards = manifest["shards"][split]
        assert [s["url"] for s in shards] == [f"{split}/{split}-{i:06d}.tar" for i in range(3)]
        assert [s["samples"] for s in shards] == [16, 16, 8]
        for shard in shards:
            data = (tmp_path / shard["url"]).read_bytes()
            assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        labels = raw_idx(f"{prefix}-labels-idx1-ubyte", 8)[:40]
        pixels = raw_idx(f"{prefix}-images-idx3-ubyte", 16)[:40 * 784].reshape(40, 28, 28)
        samples = read(tmp_path, manifest, split)
        assert [s["cls"] for s in samples] == labels.tolist()
        assert len(set(labels.tolist())) > 5
        for i, (sample, label) in enumerate(zip(samples, labels)):
            name = builders.FASHION_CLASSES[label]
            assert sample["txt"] in (f"a photo of a {name}", f"a photo of an {name}")
            assert sample["json"] == {"label": int(label), "class": name, "split": split, "index": i}
            assert (np.asarray(sample["png"].convert("L")) == pixels[i]).all()
    assert not list(tmp_path.rglob("*.tmp"))


def test_fashion_mnist_resizes_and_stays_grayscale():
    sample = next(builders.fashion_mnist_samples("test", size=40, limit=1))
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.size == (40, 40) and image.mode == "L"


def test_digits_split_and_pixel_range(tmp_path):
    from sklearn.datasets import load_digits

    manifest = builders.write_digits_shards(f"file://{tmp_path}", progress=False)
    assert manifest["count"] == 1797 and (tmp_path / "manifest.json").exists()
    samples = {split: read(tmp_path, manifest, split) for split in ("train", "test")}
    assert len(samples["train"]) == 1797 - builders.DIGITS_TEST and len(samples["test"]) == builders.DIGITS_TEST
    keys = [s["__key__"] for split in samples.values() for s in split]
    assert sorted(keys) == [f"{i:04d}" for i in range(1797)]
    # Stratified: every digit holds about a tenth of the test set.
    assert all(28 <= [s["cls"] for s in samples["test"]].count(d) <= 32 for d in range(10))
    digits = load_digits()
    for sample in samples["test"][:50]:
        pixels = np.asarray(sample["png"].convert("L"))
        index = int(sample["__key__"])
        assert pixels.shape == (8, 8) and pixels.min() == 0 and pixels.max() > 200
        assert (pixels == np.round(digits.images[index] * 255 / 16)).all()
        assert sample["cls"] == digits.target[index] and sample["txt"] == f"a handwritten digit {sample['cls']}"


def test_folder_with_class_subfolders(tmp_path):
    src = tmp_path / "src"
    originals = {"cat_a": save(src / "cat" / "a.jpg", "red"), "dog_b": save(src / "dog" / "b.png", "blue"),
                 "dog_c_d": save(src / "dog" / "c.d.PNG", "green", fmt="png")}
    save(src / "dog" / "._b.jpg", "white")  # macOS metadata copy: hidden, skipped
    (src / "dog" / "notes.md").write_text("not an image")
    out = tmp_path / "out"
    manifest = builders.write_folder_shards(str(out), str(src), progress=False)
    assert manifest["classes"] == ["cat", "dog"] and manifest["count"] == 3
    samples = {s["__key__"]: s for s in read(out, manifest, "train", decode=False)}
    assert set(samples) == set(originals)
    assert samples["cat_a"]["jpg"] == originals["cat_a"]  # the file's own bytes
    assert samples["dog_b"]["png"] == originals["dog_b"] and "png" in samples["dog_c_d"]
    assert [samples[k]["cls"] for k in ("cat_a", "dog_b", "dog_c_d")] == [b"0", b"1", b"1"]
    assert json.loads(samples["dog_c_d"]["json"]) == {"path": "dog/c.d.PNG", "split": "train", "label": 1,
                                                      "class": "dog"}
    decoded = {s["__key__"]: s for s in read(out, manifest, "train")}
    assert decoded["dog_b"]["png"].getpixel((0, 0)) == (0, 0, 255)


def test_flat_folder_with_captions_resize_and_val_split(tmp_path):
    src = tmp_path / "src"
    for i in range(10):
        save(src / f"im{i}.png", (20 * i, 0, 0), size=(30, 20))
        if i % 2 == 0:
            (src / f"im{i}.txt").write_text(f"picture {i}\n")
    out = tmp_path / "out"
    manifest = builders.write_folder_shards(str(out), str(src), size=16, val_fraction=0.3, progress=False)
    assert manifest["classes"] == [] and manifest["count"] == 10
    splits = {split: read(out, manifest, split) for split in ("train", "val")}
    assert (len(splits["train"]), len(splits["val"])) == (7, 3)
    samples = splits["train"] + splits["val"]
    assert sorted(s["__key__"] for s in samples) == sorted(f"im{i}" for i in range(10))
    for s in samples:
        i = int(s["__key__"][2:])
        assert s["png"].size == (16, 16) and s["png"].getpixel((8, 8)) == (20 * i, 0, 0)
        assert "cls" not in s
        assert s.get("txt") == (f"picture {i}" if i % 2 == 0 else None)
    again = builders.write_folder_shards("memory://folder-again", str(src), size=16, val_fraction=0.3,
                                         progress=False)
    assert again["shards"] == manifest["shards"]  # seeded: the same split and order anywhere


def test_pairs_are_aligned_by_stem(tmp_path):
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "sub/c": (0, 0, 255)}
    for stem, colour in colours.items():
        save(tmp_path / "in" / f"{stem}.png", colour)
        save(tmp_path / "tg" / f"{stem}.jpg", tuple(255 - c for c in colour))
    (tmp_path / "in" / "a.txt").write_text("first")
    manifest = builders.write_pairs_shards(str(tmp_path / "out"), str(tmp_path / "in"), str(tmp_path / "tg"),
                                           shard_size=2, progress=False)
    samples = read(tmp_path / "out", manifest, "train")
    assert len(samples) == 3 and len(manifest["shards"]["train"]) == 2
    for s in samples:
        colour = colours[s["__key__"].replace("_", "/")]
        assert s["input.png"].getpixel((5, 5)) == colour
        assert np.allclose(s["target.jpg"].getpixel((5, 5)), [255 - c for c in colour], atol=3)
        assert s.get("txt") == ("first" if s["__key__"] == "a" else None)
    (tmp_path / "tg" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"in/b\.png has no partner in .*tg"):
        builders.write_pairs_shards(str(tmp_path / "out2"), str(tmp_path / "in"), str(tmp_path / "tg"),
                                    progress=False)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="nope: no such folder"):
        builders.write_folder_shards(str(tmp_path / "out"), str(tmp_path / "nope"), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty: no images"):
        builders.write_folder_shards(str(tmp_path / "out"), str(tmp_path / "empty"), progress=False)
    src = tmp_path / "src"
    save(src / "good.png", "red")
    (src / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"src/bad\.jpg: cannot read image"):
        builders.write_folder_shards(str(tmp_path / "out"), str(src), progress=False)
    (src / "bad.jpg").unlink()
    save(src / "good.jpg", "red")
    with pytest.raises(DataError, match=r"good\.jpg and good\.png would make one sample"):
        builders.write_folder_shards(str(tmp_path / "out"), str(src), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_fashion_mnist_to_file_url(tmp_path):
    url = f"file://{tmp_path}/fm"
    r = kiln("data", "fashion-mnist", "--out", url, "--limit", "10", "--shard-size", "4", "--size", "32",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"kiln data fashion-mnist: 20 items, 6 shards -> {url}"
    manifest = read_manifest(url)
    assert manifest["size"] == 32
    assert read(tmp_path / "fm", manifest, "test")[0]["png"].size == (32, 32)


def test_cli_reports_a_missing_folder_in_one_line(tmp_path):
    r = kiln("data", "folder", "--out", str(tmp_path / "out"), "--source", str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"kiln data: error: {tmp_path}/missing: no such folder"
