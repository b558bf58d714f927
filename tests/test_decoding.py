"""kiln's field decoding (datamodules/decoding.py) and batch layout against webdataset's decoder
and torch's default_collate: the same values, fields decoded only when read."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from webdataset import autodecode

from kiln.datamodules.decoding import FieldDecodeError, Sample
from kiln.datamodules.mappers import ImageClass, ImageText, Placed, images_to_float, to_tensor
from kiln.datamodules.shards import write_shards
from kiln.datamodules.webdataset import ShardPipeline, collate


def photo(size: int = 40, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: chroma subsampling and DCT rounding both matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    rgb = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], -1) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, format: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format, **kw)
    return buf.getvalue()


JPEGS = {
    "rgb 4:2:0": lambda: encode(photo(), "JPEG", quality=90),
    "rgb 4:4:4": lambda: encode(photo(), "JPEG", quality=75, subsampling=0),
    "rgb 4:2:2, odd size": lambda: encode(photo(37), "JPEG", quality=80, subsampling=1),
    "progressive": lambda: encode(photo(48), "JPEG", quality=85, progressive=True),
    "grey": lambda: encode(photo().convert("L"), "JPEG", quality=90),
    "cmyk (Pillow decodes it)": lambda: encode(photo().convert("CMYK"), "JPEG", quality=90),
}


@pytest.mark.parametrize("kind", JPEGS)
def test_jpegs_decode_to_the_pixels_webdataset_gives(kind):
    data = JPEGS[kind]()
    ours = Sample({"__key__": "k", "jpg": data})["jpg"]
    theirs = autodecode.Decoder([autodecode.imagehandler("pil")])({"jpg": data})["jpg"]
    assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_every_field_decodes_as_webdataset_decodes_it():
    raw = {"__key__": "k0", "__url__": "s.tar", "png": encode(photo().convert("L"), "PNG"), "cls": b"7",
           "txt": "a photo".encode(), "json": json.dumps({"a": [1, 2]}).encode(), "input.jpeg": JPEGS["rgb 4:4:4"]()}
    theirs = autodecode.Decoder([autodecode.imagehandler("pil")])(dict(raw))
    ours = Sample(raw)
    assert list(ours) == list(raw) and len(ours) == len(raw) and "txt" in ours and "npy" not in ours
    for name, value in theirs.items():
        if isinstance(value, Image.Image):
            assert ours[name].mode == value.mode
            np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(value))
        else:
            assert ours[name] == value, name
    assert ours["png"] is ours["png"]  # decoded once


def test_fields_decode_only_when_read():
    raw = {"__key__": "k0", "__url__": "s.tar", "jpg": JPEGS["grey"](), "cls": b"3", "json": b"{not json"}
    sample = Sample(raw)
    assert ImageClass(image_size=40)(sample)["label"] == 3
    # The broken json was never read, and the JPEG went to the batch without a PIL image.
    assert set(sample.decoded) == {"cls", "__key__"} and set(sample.pixels) == {"jpg"}
    with pytest.raises(FieldDecodeError, match="field 'json': JSONDecodeError"):
        sample["json"]
    with pytest.raises(KeyError):
        sample["txt"]


def test_a_broken_field_costs_its_sample_only_when_the_mapper_reads_it(tmp_path):
    good = encode(photo(16), "JPEG", quality=90)
    samples = [{"__key__": f"s{i}", "jpg": b"\xff\xd8 broken" if i == 2 else good, "cls": b"1",
                "json": b"{broken" if i == 4 else b"{}"} for i in range(6)]
    write_shards(str(tmp_path), "d", {"train": samples}, shard_size=6, progress=False)
    pipeline = ShardPipeline(str(tmp_path / "train" / "train-000000.tar"), ImageClass(16), batch_size=1,
                             shuffle=False, drop_last=False)
    keys, skipped = [], {}
    with pytest.warns(UserWarning, match="decode in .* sample s2: FieldDecodeError: field 'jpg'"):
        for batch in pipeline:
            keys += batch["key"]
            for reason, n in batch["_kiln_data"]["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
    assert keys == ["s0", "s1", "s3", "s4", "s5"] and skipped == {"decode": 1}


def test_batches_hold_the_same_images_as_default_collate_channels_last():
    examples = [ImageClass(image_size=40)(Sample({"__key__": f"k{i}", "jpg": encode(photo(seed=i), "JPEG"), "cls": b"1"}))
                for i in range(5)]
    ours, theirs = collate(examples), default_collate(examples)
    assert ours["image"].shape == theirs["image"].shape == (5, 3, 40, 40)
    assert ours["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours["image"], theirs["image"]) and torch.equal(ours["label"], theirs["label"])
    assert ours["key"] == theirs["key"]
    as_float = images_to_float(dict(ours))["image"]
    assert as_float.is_contiguous() and torch.equal(as_float, images_to_float(dict(theirs))["image"])


class _Scores:
    """A mapper with every kind of field collation meets: an image, an int, a float, a token
    tensor, a bool and a string."""

    def __call__(self, sample):
        label = int(sample["cls"])
        return {"image": to_tensor(sample.image("jpg")), "label": label, "score": label / 4, "tokens": torch.arange(3) + label,
                "odd": label % 2 == 1, "key": sample["__key__"]}


def test_a_worker_hands_over_each_batch_as_one_block_of_shared_memory(tmp_path):
    """Through DataLoader workers every tensor of a batch arrives as a view of one block (one
    file descriptor a batch, not one a tensor), in a plain dict equal to the batch made in-process
    and to default_collate's values and dtypes."""
    samples = [{"__key__": f"s{i}", "jpg": encode(photo(16, seed=i), "JPEG", quality=90), "cls": str(i).encode()} for i in range(12)]
    write_shards(str(tmp_path), "d", {"train": samples}, shard_size=3, progress=False)
    urls = str(tmp_path / "train" / "train-{000000..000003}.tar")

    def batches(workers):
        pipeline = ShardPipeline(urls, _Scores(), batch_size=3, shuffle=False, drop_last=False)
        return list(DataLoader(pipeline, batch_size=None, num_workers=workers))

    here, there = batches(0), batches(2)
    assert sorted(b["key"][0] for b in there) == sorted(b["key"][0] for b in here) and len(here) == 4
    for theirs in there:
        ours = next(b for b in here if b["key"] == theirs["key"])
        assert type(theirs) is dict and list(theirs) == list(ours)
        tensors = [name for name, value in theirs.items() if isinstance(value, torch.Tensor)]
        assert tensors == ["image", "label", "score", "tokens", "odd"]
        assert len({theirs[name].untyped_storage().data_ptr() for name in tensors}) == 1
        assert theirs["image"].is_contiguous(memory_format=torch.channels_last)
        expected = default_collate([_Scores()(Sample(raw)) for raw in read_samples(theirs["key"], samples)])
        for name in tensors:
            assert theirs[name].dtype == expected[name].dtype and torch.equal(theirs[name], expected[name]), name
            assert torch.equal(ours[name], theirs[name]), name


def read_samples(keys, samples):
    return [{"__url__": "", **next(s for s in samples if s["__key__"] == key)} for key in keys]


@pytest.mark.parametrize("mapper", [ImageClass(image_size=40, flip=True), ImageClass(image_size=24, crop_scale=(0.5, 1), flip=True),
                                    ImageText(image_size=40, flip=True, color_jitter=0.3)], ids=["flip", "crop", "jitter"])
def test_mappers_give_the_same_example_from_pixels_as_from_pil_images(mapper):
    """The pipeline hands mappers JPEGs as pixel arrays (`Sample.image`); tests and other callers
    hand them PIL images: one example either way, augmentation included."""
    for seed in range(6):
        raw = {"__key__": "k", "__url__": "s.tar", "jpg": encode(photo(seed=seed), "JPEG"), "cls": b"2", "txt": b"a cat"}
        outs = []
        for sample in (Sample(raw), autodecode.Decoder([autodecode.imagehandler("pil")])(dict(raw))):
            mapper.rng.seed(seed)
            outs.append(mapper(sample))
        assert torch.equal(outs[0]["image"], outs[1]["image"]), seed


class _Swapped:
    """Returns each of two JPEG fields' pixels under the other's name: the pixels decoded into
    one field's place in the batch belong in the other's."""

    def __call__(self, sample):
        a, b = sample.image("a.jpg"), sample.image("b.jpg")
        return {"a": to_tensor(b), "b": to_tensor(a), "key": sample["__key__"]}


class _Recording(ImageClass):
    """ImageClass that notes whether each sample's pixels arrived in their place in the batch."""

    placed: list

    def __call__(self, sample):
        self.placed.append(type(sample.image("jpg")) is Placed)
        return super().__call__(sample)


class _OddFlipped:
    """Flips the odd samples' pixels: a batch of placed and copied images."""

    def __call__(self, sample):
        pixels = sample.image("jpg")
        return {"image": to_tensor(pixels[:, ::-1] if int(sample["cls"]) % 2 else pixels), "key": sample["__key__"]}


@pytest.mark.parametrize("mapper", [_Recording(image_size=16, image_key="jpg"), _OddFlipped(), _Swapped()],
                         ids=["in place", "some flipped", "fields swapped"])
def test_jpegs_decoded_into_the_batch_give_the_batches_of_a_separate_decode(tmp_path, mapper):
    """From its second batch on the pipeline decodes each JPEG straight into the example's place
    in the batch's memory (`BatchBlocks`); the batches are those of decoding each sample on its own
    and `default_collate`, also where the mapper flips the pixels or moves them to another field."""
    samples = [{"__key__": f"s{i}", "jpg": encode(photo(16, seed=i), "JPEG", quality=90), "cls": str(i).encode(),
                "a.jpg": encode(photo(16, seed=100 + i), "JPEG"), "b.jpg": encode(photo(16, seed=200 + i), "JPEG")}
               for i in range(11)]
    write_shards(str(tmp_path), "d", {"train": samples}, shard_size=4, progress=False)
    mapper.placed = []
    pipeline = ShardPipeline(str(tmp_path / "train" / "train-{000000..000002}.tar"), mapper, batch_size=3, shuffle=False,
                             drop_last=False)
    batches, placed = list(pipeline), mapper.placed
    assert [len(b["key"]) for b in batches] == [3, 3, 3, 2]
    for batch in batches:
        expected = default_collate([mapper(Sample(raw)) for raw in read_samples(batch["key"], samples)])
        for name, value in expected.items():
            assert torch.equal(batch[name], value) if isinstance(value, torch.Tensor) else batch[name] == value, name
    if isinstance(mapper, ImageClass):  # placed from the second batch on, the short last one included
        assert placed[:11] == [False] * 3 + [True] * 8, placed
