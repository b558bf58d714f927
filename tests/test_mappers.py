"""The per-family sample mappers: outputs, the reseeding protocol, shared geometry, field lookup."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from webdataset import autodecode

from kiln.datamodules.mappers import (ImageClass, ImageText, LabelMapImage, PairedImages, UnpairedImages, crop_box,
                                      images_to_float)

def noise(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def sample(key: str = "k0", **fields) -> dict:
    return {"__key__": key, "__url__": "file:///shards/s-000.tar", **fields}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode(raw: dict) -> dict:
    """What the pipeline's decode stage hands a mapper."""
    return autodecode.Decoder([autodecode.imagehandler("pil")])(raw)


def label_map_sample(ids: np.ndarray, image: Image.Image | None = None, mode: str = "L") -> dict:
    label = Image.fromarray(ids.astype(np.uint8), mode)
    if mode == "P":
        label.putpalette([c for i in range(256) for c in (i * 37 % 256, i * 91 % 256, i * 13 % 256)])
    image = image if image is not None else noise(size=ids.shape[0])
    return decode(sample(**{"label.png": png(label), "image.png": png(image)}))


AUGMENTED = {
    "text": (ImageText(16, crop_scale=(0.3, 1.0), flip=True, color_jitter=0.4, caption_dropout=0.5),
             lambda: sample(png=noise(), txt="a cat")),
    "class": (ImageClass(16, crop_scale=(0.3, 1.0), flip=True), lambda: sample(png=noise(), cls=3)),
    "paired": (PairedImages(16, crop_scale=(0.3, 1.0), flip=True),
               lambda: sample(**{"input.png": noise(1), "target.png": noise(2)})),
    "unpaired": (UnpairedImages(16, crop_scale=(0.3, 1.0), flip=True),
                 lambda: {"a": sample("a0", jpg=noise(1)), "b": sample("b0", png=noise(2))}),
    "label_map": (LabelMapImage(16, crop_scale=(0.3, 1.0), flip=True),
                  lambda: label_map_sample(np.random.default_rng(3).integers(0, 20, (32, 32)))),
}


def tensors(out: dict) -> list[torch.Tensor]:
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def same(x: dict, y: dict) -> bool:
    return all(torch.equal(a, b) for a, b in zip(tensors(x), tensors(y))) and \
        {k: v for k, v in x.items() if not isinstance(v, torch.Tensor)} == \
        {k: v for k, v in y.items() if not isinstance(v, torch.Tensor)}


def run(mapper, make, n: int) -> dict:
    mapper.rng.seed(n)
    return mapper(make())


@pytest.mark.parametrize("name", AUGMENTED)
def test_reseeding_reproduces_and_varies(name):
    mapper, make = AUGMENTED[name]
    assert same(run(mapper, make, 7), run(mapper, make, 7))
    # Workers receive pickled copies: a copy reseeded alike maps alike.
    assert same(run(pickle.loads(pickle.dumps(mapper)), make, 7), run(mapper, make, 7))
    assert not same(run(mapper, make, 7), run(mapper, make, 8))


@pytest.mark.parametrize("name", AUGMENTED)
def test_for_eval_has_no_randomness(name):
    mapper, make = AUGMENTED[name]
    evaluator = mapper.for_eval()
    outs = [run(evaluator, make, n) for n in range(5)]
    assert all(same(outs[0], o) for o in outs[1:])
    assert mapper.crop_scale == (0.3, 1.0) and mapper.flip  # the training mapper is untouched


def test_image_text_outputs_and_eval_keeps_captions():
    mapper = ImageText(24, crop_scale=(0.5, 1.0), flip=True, color_jitter=0.3, caption_dropout=1.0)
    out = mapper(sample(jpg=noise(), txt="a cat"))  # auto image key finds a jpg as well as a png
    assert out["image"].shape == (3, 24, 24) and out["image"].dtype == torch.uint8
    as_float = images_to_float({"image": out["image"][None]})["image"]
    assert -1 <= as_float.min() < 0 < as_float.max() <= 1
    assert out["caption"] == "" and out["key"] == "k0"
    evaluated = mapper.for_eval()(sample(jpg=noise(), txt="a cat"))
    assert evaluated["caption"] == "a cat"
    plain = np.asarray(noise().resize((24, 24), Image.Resampling.BICUBIC))
    torch.testing.assert_close(evaluated["image"], torch.from_numpy(plain).permute(2, 0, 1))


def test_image_class_labels_collate_and_are_checked():
    mapper = ImageClass(16, num_classes=10)
    batch = default_collate([mapper(sample(f"k{i}", png=noise(i), cls=i)) for i in range(4)])
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 1, 2, 3] and batch["key"] == ["k0", "k1", "k2", "k3"]
    with pytest.raises(ValueError, match=r"'bad'.*label 10, outside \[0, 10\)"):
        mapper(sample("bad", png=noise(), cls=10))
    with pytest.raises(ValueError, match="label -1"):
        mapper(sample("bad", png=noise(), cls=-1))


def test_paired_images_share_crop_and_flip():
    mapper = PairedImages(16, crop_scale=(0.2, 1.0), flip=True)
    image = noise()
    outs = [run(mapper, lambda: sample(**{"input.png": image, "target.png": image.copy()}), n) for n in range(20)]
    for out in outs:
        assert out["input"].shape == out["target"].shape == (3, 16, 16)
        torch.testing.assert_close(out["input"], out["target"], rtol=0, atol=0)
    assert len({o["input"].sum().item() for o in outs}) > 10  # the geometry did vary


def test_unpaired_images_augment_each_domain_on_its_own():
    mapper = UnpairedImages(16, crop_scale=(0.2, 1.0), flip=True)
    pair = lambda: {"a": sample("a0", png=noise()), "b": sample("b0", **{"photo.jpg": noise()})}  # noqa: E731
    outs = [run(mapper, pair, n) for n in range(5)]
    assert all(o["a"].shape == o["b"].shape == (3, 16, 16) for o in outs)
    assert (outs[0]["key_a"], outs[0]["key_b"]) == ("a0", "b0")
    assert any(not torch.equal(o["a"], o["b"]) for o in outs)  # same image, independent crops
    with pytest.raises(KeyError, match="'b0'.*has no image field"):
        mapper({"a": sample("a0", png=noise()), "b": sample("b0", txt="no image")})


def test_pil_decoder_turns_label_maps_into_rgb():
    """The finding LabelMapImage is built on (webdataset's imagehandler("pil")): an "L" map
    arrives as grey RGB holding its ids, a "P" map as its palette colours."""
    ids = np.arange(64).reshape(8, 8) % 7
    grey, palette = label_map_sample(ids)["label.png"], label_map_sample(ids, mode="P")["label.png"]
    assert grey.mode == palette.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(grey)[..., 1], ids)
    assert not np.array_equal(np.asarray(palette)[..., 0], ids)


def test_label_map_is_resized_nearest():
    checker = (np.indices((32, 32)).sum(0) % 2) * 9  # ids 0 and 9: any blending lands between
    mapper = LabelMapImage(8, crop_scale=(0.3, 0.9), flip=True)
    for n in range(10):
        out = run(mapper, lambda: label_map_sample(checker), n)
        assert out["label_map"].shape == (8, 8) and out["label_map"].dtype == torch.int64
        assert set(out["label_map"].unique().tolist()) <= {0, 9}
        assert out["image"].shape == (3, 8, 8)


def test_label_map_and_image_share_crop_and_flip():
    # Ids and pixel values both encode the source position: ids x + 16 y, image R = 16 x + 8, G = 16 y + 8.
    y, x = np.indices((16, 16))
    image = Image.fromarray(np.stack([16 * x + 8, 16 * y + 8, 0 * x], -1).astype(np.uint8))
    mapper = LabelMapImage(8, crop_scale=(0.25, 1.0), flip=True, num_classes=256)
    mirrored = 0
    for n in range(30):
        out = run(mapper, lambda: label_map_sample(x + 16 * y, image), n)
        label_x, label_y = out["label_map"] % 16, out["label_map"] // 16
        pixels = out["image"].float()
        image_x, image_y = (pixels[0] - 8) / 16, (pixels[1] - 8) / 16
        assert (image_x - label_x).abs().max() <= 1 and (image_y - label_y).abs().max() <= 1
        mirrored += bool(label_x[0, 0] > label_x[0, -1])
    assert 0 < mirrored < 30


def test_label_map_class_ids_are_checked_and_palettes_refused():
    ids = np.arange(64).reshape(8, 8) % 8
    assert LabelMapImage(8, num_classes=8)(label_map_sample(ids))["label_map"].max() == 7
    with pytest.raises(ValueError, match="'k0'.*class id 7 .*num_classes is 7"):
        LabelMapImage(8, num_classes=7)(label_map_sample(ids))
    with pytest.raises(ValueError, match="greyscale"):
        LabelMapImage(8)(label_map_sample(ids, mode="P"))
    # A "P" image handed over undecoded-to-RGB (another decoder) is read as its indices.
    direct = Image.fromarray(ids.astype(np.uint8), "P")
    direct.putpalette([255, 0, 0] * 256)
    out = LabelMapImage(8)(sample(label=direct, png=noise(size=8)))
    np.testing.assert_array_equal(out["label_map"].numpy(), ids)


def test_field_lookup_by_stem_and_auto_image_key():
    s = sample(**{"label.png": Image.new("L", (32, 32)), "photo.webp": noise(5), "txt": "x"})
    out = LabelMapImage(8)(s)  # the auto image key skips the label map
    torch.testing.assert_close(out["image"], ImageText(8, image_key="photo")(s)["image"])
    assert ImageText(8, image_key="photo.webp")(s)["caption"] == "x"  # the full name works too
    torch.testing.assert_close(ImageText(8)(sample(**{"photo.webp": noise(5), "txt": "x"}))["image"], out["image"])


@pytest.mark.parametrize("as_pixels", [False, True], ids=["pil", "pixels"])
def test_a_crop_the_size_of_the_output_at_the_corner_is_still_a_crop(as_pixels):
    # A 48 px crop of a 64 px image drawn at (0, 0) once came back as the whole 64 px image (and
    # broke the batch's stacking), mistaken for an image already at its size.
    image = noise(size=64)
    mapper = ImageClass(48, crop_scale=(0.5625, 0.5625))  # side 48, anywhere in 17 x 17 places
    s = sample(png=np.asarray(image) if as_pixels else image, cls=1)
    corner = 0
    for seed in range(3000):
        mapper.rng.seed(seed)
        corner += crop_box((64, 64), mapper.crop_scale, mapper.rng)[:2] == (0, 0)
        mapper.rng.seed(seed)
        assert mapper(s)["image"].shape == (3, 48, 48), seed
    assert corner  # the corner was drawn


def test_images_of_different_sizes_cannot_share_a_crop():
    with pytest.raises(ValueError, match="'k0'.*cannot share one crop"):
        PairedImages(8)(sample(input=noise(size=8), target=noise(size=16)))


@pytest.mark.parametrize("mapper, fields, missing", [
    (ImageText(8), {"png": noise()}, "'txt'"),
    (ImageText(8), {"txt": "x", "json": {}}, "image field"),
    (ImageClass(8), {"png": noise()}, "'cls'"),
    (PairedImages(8), {"input.png": noise()}, "'target'"),
    (LabelMapImage(8), {"png": noise()}, "'label'"),
])
def test_missing_field_is_a_one_line_key_error(mapper, fields, missing):
    with pytest.raises(KeyError) as err:
        mapper(sample("k9", **fields))
    message = err.value.args[0]
    assert "'k9'" in message and "s-000.tar" in message and missing in message and "\n" not in message


def test_sample_random_draws_what_random_draws_after_the_same_seed():
    import random

    from kiln.datamodules.mappers import SampleRandom

    def draws(rng):
        items = list(range(10))
        rng.shuffle(items)
        return [rng.random(), rng.randint(0, 99), rng.uniform(-1, 1), rng.gauss(0, 1), rng.gauss(0, 1), rng.choice("abc"),
                rng.sample(range(50), 3), items, rng.getrandbits(70)]

    ours = SampleRandom(0)
    for seed in (5, 2**64 - 1, 123456789):
        ours.gauss(0, 1)  # a pending gauss value must not leak past a reseed
        ours.seed(seed)
        assert draws(ours) == draws(random.Random(seed))
    ours.seed(7)
    state = ours.getstate()
    assert state == random.Random(7).getstate()
    first = draws(ours)
    ours.seed(99)
    ours.setstate(state)  # a restored state wins over a pending seed
    assert draws(ours) == first
