"""Per-sample mappers: a decoded WebDataset sample (PIL images, text) -> a family's example; and
the image layout examples travel in (`to_tensor`, the pipeline's `collate`, `images_to_float`).

The pipeline's protocol: before each `mapper(sample)` it calls `mapper.rng.seed(n)`, n derived
from (seed, epoch, position), so a mapper draws all its randomness from `mapper.rng` and an
augmented sample is the same after a mid-epoch resume. `for_eval()` gives a copy without
augmentation or dropout. Transforms use PIL and torch only (no torchvision: its wheels fail to
load beside the CPU build of torch that kiln installs).
"""
from __future__ import annotations

import copy
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import default_collate, get_worker_info

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or (H, W, 3) uint8 pixels -> uint8 tensor (3, H, W), a view of the (H, W, 3)
    pixels (channels-last strides).

    Images travel as uint8 (NVlabs' StyleGAN loaders do the same): a quarter of the bytes
    between worker processes and to the device, and the float conversion runs on the device,
    in `images_to_float`, which `WebDataModule` applies after each batch's transfer. The pixels
    come out through `tobytes` into a bytearray (10.5 us for 64 px against 12 for
    `np.array(image)`, which goes through the array interface).

    Pixels arrive as the decoder's array and leave as a copy: the decoder's buffer is then free
    when the sample is, and the next image decodes into the same, cache-warm memory instead of
    fresh memory each time until the batch is collated. The copy costs ~1 us for 64 px and saves
    ~5 (in-process loop over 64 px JPEGs 51-52 -> 46-48 us a sample). Pixels the pipeline
    decoded straight into their place in the batch (`Placed`) are taken as they are."""
    if isinstance(image, np.ndarray):
        # numpy's transpose then `from_numpy` makes the same strided tensor as torch's permute,
        # in half the time (0.6 against 1.4 us)
        if type(image) is Placed and image.flags.c_contiguous:  # in its place in the batch already
            return torch.from_numpy(image.view(np.ndarray).transpose(2, 0, 1))
        return torch.from_numpy(np.array(image, order="C").transpose(2, 0, 1))
    image = image if image.mode == "RGB" else image.convert("RGB")
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def as_collated(batch: dict) -> dict:
    """The DataLoader's per-item hook for a pipeline that yields whole batches: they are
    collated already (`collate` below), so they pass as they are. The default,
    `default_convert`, walks every batch down to each caption and key string to convert numpy
    arrays the batch cannot hold: ~4 us a sample of the workers' time (bench/loader.py --profile)."""
    return batch


def images_to_float(batch: dict) -> dict:
    """Every uint8 image batch (B, C, H, W) in `batch` to contiguous float in [-1, 1], in place
    (the pipeline collates images channels-last: the conversion's copy also reorders them)."""
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim == 4:
            batch[name] = value.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    return batch


def collate(examples: list[dict], blocks: BatchBlocks | None = None) -> dict:
    """`default_collate` field by field, except in two ways.

    Images keep the layout they were decoded in: a (C, H, W) view of (H, W, C) pixels, what
    `to_tensor` gives, is stacked as (B, H, W, C) and handed on as its (B, C, H, W) view
    (channels-last strides). Transposing each image into planes cost the workers ~4 us a 64 px
    sample; `images_to_float` makes the float batch contiguous, on the device, in the same pass
    as the conversion.

    Every tensor of the batch (the stacked tensors, ints as int64, floats as float64, bools, as
    `default_collate` makes them) is a view of one block of memory, shared memory in a
    DataLoader worker. The batch then crosses to the main process as that one block (pickling
    meets the one storage once): one file descriptor a batch instead of one a tensor, each of
    which costs the main process a connection to the worker and its authentication handshake,
    and the worker a shared-memory copy of every tensor not made in shared memory (the labels).
    That was ~10% of the loader's throughput (bench/loader.py). Other fields (strings, nested
    values) go through `default_collate`.

    With `blocks` the batch goes into the block made for it ahead (`BatchBlocks`), and a value
    already in its place there -- pixels decoded straight into it -- is not copied."""
    columns = {name: [example[name] for example in examples] for name in examples[0]}
    out, views, size = {}, {}, 0
    for name, values in columns.items():
        layout = _layout(values)
        if layout is None:
            out[name] = default_collate(values)
        else:
            size = -(-size // _ALIGN) * _ALIGN
            views[name] = (size, *layout)
            size += layout[0].itemsize * math.prod(layout[1])
            out[name] = None  # filled below, in field order
    if not views:
        return out
    block = blocks.take(views, size) if blocks is not None else _new_block(size)
    placed = _placed(block, views, columns)
    for name, (offset, dtype, shape, stride) in views.items():
        view, values = _view(block, offset, dtype, shape, stride), columns[name]
        out[name] = view
        if name not in placed:
            (torch.stack(values, out=view) if isinstance(values[0], torch.Tensor)
             else view.copy_(torch.tensor(values, dtype=dtype)))
        else:
            for i in (i for i, here in enumerate(placed[name]) if not here):
                view[i].copy_(values[i])
    return out


def _new_block(size: int) -> torch.UntypedStorage:
    size = max(size, 1)
    return torch.UntypedStorage._new_shared(size) if get_worker_info() is not None else torch.UntypedStorage(size)


def _placed(block: torch.UntypedStorage, views: dict, columns: dict) -> dict[str, list[bool]]:
    """For each tensor field with a value inside `block`: which examples' values are in their
    place. A value inside the block but elsewhere (a mapper that returned one field's pixels
    under another name) is copied out first, so that filling the places cannot overwrite it."""
    start, placed = block.data_ptr(), {}
    end = start + block.nbytes()
    for name, (offset, dtype, shape, stride) in views.items():
        values = columns[name]
        if not isinstance(values[0], torch.Tensor) or not any(start <= v.data_ptr() < end for v in values):
            continue
        step = stride[0] * dtype.itemsize
        here = [v.data_ptr() == start + offset + i * step and v.stride() == stride[1:] for i, v in enumerate(values)]
        for i, v in enumerate(values):
            if not here[i] and start <= v.data_ptr() < end:
                values[i] = v.clone()
        placed[name] = here
    return placed


class Placed(np.ndarray):
    """(H, W, C) pixels in their example's place in the block its batch will be collated into
    (`BatchBlocks.places`): `to_tensor` takes them as they are and `collate` finds them in place."""


class BatchBlocks:
    """The blocks a pipeline's batches are collated into, each made as its batch starts, laid out
    as the batch before it, so that an example's JPEG decodes straight into its place in the
    batch (`Sample(raw, into=blocks.places(i))`): no copy of the pixels into a tensor of their
    own and then into the batch. A batch of another layout (the last, short one; images that
    change size) gets a block of its own and is copied as before.

    Pixels placed here are the batch's memory: a mapper that keeps them past its call (a cache)
    must copy them."""

    def __init__(self):
        self.layout: tuple | None = None  # (views, size) of the last batch
        self.block: torch.UntypedStorage | None = None  # made for the next batch from `layout`
        self.pixels: list[np.ndarray] = []  # per image field: its (B, H, W, C) view of `block`

    def places(self, i: int) -> list[np.ndarray]:
        """Example i's places for pixels, one per image field of the last batch, in field order."""
        if self.layout is None:
            return []
        if self.block is None:
            views, size = self.layout
            self.block = _new_block(size)
            self.pixels = [_view(self.block, offset, dtype, shape, stride).permute(0, 2, 3, 1).numpy().view(Placed)
                           for offset, dtype, shape, stride in views.values() if _channels_last(dtype, shape, stride)]
        return [pixels[i] for pixels in self.pixels if i < len(pixels)]

    def take(self, views: dict, size: int) -> torch.UntypedStorage:
        """The block for a batch of this layout: the one made ahead if it fits, else a new one."""
        fits = self.block is not None and self.layout == (views, size)
        block = self.block if fits else _new_block(size)
        self.layout, self.block, self.pixels = (views, size), None, []
        return block


def _channels_last(dtype: torch.dtype, shape: tuple, stride: tuple) -> bool:
    return dtype == torch.uint8 and len(shape) == 4 and stride[1] == 1


_ALIGN = 64  # bytes: each tensor of a batch's block starts on a cache line


def _layout(values: list) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...]] | None:
    """(dtype, shape, strides) of a field's batch tensor, or None for `default_collate` (values
    of other types, tensors off the CPU, or of mixed shapes or dtypes, whose error it then names)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.is_sparse or first.device.type != "cpu" or any(v.shape != first.shape or v.dtype != first.dtype for v in values):
            return None
        shape = (len(values), *first.shape)
        if first.ndim == 3 and first.shape[0] > 1 and first.stride(0) == 1:  # (C, H, W) view of (H, W, C)
            c, h, w = first.shape
            return first.dtype, shape, (h * w * c, 1, w * c, c)
        return first.dtype, shape, torch.empty(shape, device="meta").stride()
    dtype = _NUMBERS.get(type(first))
    if dtype is not None and all(type(v) is type(first) for v in values):
        return dtype, (len(values),), (1,)
    return None


_NUMBERS = {int: torch.int64, float: torch.float64, bool: torch.bool}  # default_collate's dtypes


def _view(block: torch.UntypedStorage, offset: int, dtype: torch.dtype, shape, stride) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(block, offset // dtype.itemsize, shape, stride)


def crop_box(size: tuple[int, int], scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """A square box covering `scale` of the area of a (w, h) image, at a random place."""
    w, h = size
    side = int(round(min(w, h) * rng.uniform(*scale) ** 0.5))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return x, y, x + side, y + side


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> Image.Image:
    """A square crop covering `scale` of the area at a random place, resized to `size`."""
    return image.resize((size, size), Image.Resampling.BICUBIC, box=crop_box(image.size, scale, rng))


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')!r} from {sample.get('__url__')}"


class SampleRandom(random.Random):
    """`random.Random` whose `seed` takes effect at the first draw after it: the draws are
    Random(n)'s. The pipeline reseeds a mapper's rng before every sample, and seeding fills the
    Mersenne Twister's whole state (~5 us); a sample the mapper draws nothing for (no
    augmentation) then costs nothing."""

    _pending: tuple | None = None

    def seed(self, a=None, version=2) -> None:
        self._pending, self.gauss_next = (a, version), None

    def _settle(self) -> None:
        if self._pending is not None:
            (a, version), self._pending = self._pending, None
            super().seed(a, version)

    def random(self) -> float:
        self._settle()
        return super().random()

    def getrandbits(self, k: int) -> int:
        self._settle()
        return super().getrandbits(k)

    def getstate(self):
        self._settle()
        return super().getstate()

    def setstate(self, state) -> None:
        self._pending = None
        super().setstate(state)


def _pil(image: Image.Image | np.ndarray) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


def _size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def sample_image(sample: dict, name: str) -> Image.Image | np.ndarray:
    """An image field as it decodes most cheaply: from the pipeline's `Sample`, a JPEG comes as
    its (H, W, 3) pixels, without a PIL image (`_geometry` makes one only to resize or crop)."""
    return sample.image(name) if hasattr(sample, "image") else sample[name]


def field_name(sample: dict, key: str | None, taken: tuple[str, ...] = ()) -> str:
    """The name of a sample's field.

    `key` matches a field named exactly `key` or `key.<ext>` (webdataset names member
    `KEY.input.png` field "input.png"); None means the first image field not in `taken`.
    A missing field raises a one-line KeyError, which the pipeline counts as a skipped sample.
    """
    if key in sample:
        return key
    for name in sample:  # names only: reading a value decodes it
        if name.startswith("__") or name in taken:
            continue
        stem, _, ext = name.rpartition(".")
        if (key is None and ext.lower() in IMAGE_EXTENSIONS) or (key is not None and key == stem):
            return name
    wanted = f"'{key}'" if key is not None else f"image field ({', '.join(IMAGE_EXTENSIONS)})"
    raise KeyError(f"{_where(sample)} has no {wanted}")


_LAYOUTS: dict[tuple, tuple[str, ...]] = {}  # (a sample's field names, the keys) -> what they resolve to


def field_names(sample: dict, *keys: str | None) -> tuple[str, ...]:
    """`field_name` of each key in turn, each skipping the fields found before it (so an image
    key of None passes over a label map found first). Remembered per layout -- the sample's
    field names in order -- since the samples of a data set share one: the lookups then cost
    one dict access, not a scan of the names per key (~1.5 us a sample)."""
    layout = (tuple(sample), keys)
    names = _LAYOUTS.get(layout)
    if names is None:
        found: list[str] = []
        for key in keys:
            found.append(field_name(sample, key, tuple(found)))
        names = tuple(found)
        if len(_LAYOUTS) >= 1024:  # a new layout per sample (a field named per sample): start over
            _LAYOUTS.clear()
        _LAYOUTS[layout] = names
    return names


class _Mapper:
    """What every mapper shares: the per-sample `rng`, `for_eval`, and one crop and flip per sample."""

    # Attribute values that switch each augmentation off; subclasses add their own.
    _no_augmentation: dict = {"crop_scale": None, "flip": False}

    def __init__(self, image_size: int, crop_scale: tuple[float, float] | None, flip: bool):
        self.image_size, self.crop_scale, self.flip = image_size, crop_scale, flip
        # The pipeline reseeds this before every sample; the fixed start only makes a mapper
        # used outside the pipeline reproducible.
        self.rng = SampleRandom(0)

    def for_eval(self):
        """The same mapping without augmentation or dropout: held-out data is judged as it is."""
        twin = copy.copy(self)
        twin.__dict__.update(self._no_augmentation)
        twin.rng = SampleRandom(0)
        return twin

    def _geometry(self, sample: dict, *images: Image.Image | np.ndarray,
                  nearest: tuple[bool, ...] = ()) -> list[Image.Image | np.ndarray]:
        """One crop and flip, drawn from `rng`, applied alike to all of a sample's images (PIL
        images or pixel arrays; an array stays one unless it is resized); `nearest[i]` resizes
        image i with NEAREST (class ids must never be interpolated)."""
        size = _size(images[0])
        if (self.crop_scale is None and not self.flip and size == (self.image_size,) * 2
                and all(_size(image) == size for image in images[1:])):
            return list(images)  # nothing to draw or do: the common case of a data set at its size
        if any(_size(image) != size for image in images):
            raise ValueError(f"{_where(sample)}: images of sizes {[_size(im) for im in images]} cannot share one crop")
        box = crop_box(size, self.crop_scale, self.rng) if self.crop_scale is not None else (0, 0, *size)
        mirror = self.flip and self.rng.random() < 0.5
        out = []
        for i, image in enumerate(images):
            resample = Image.Resampling.NEAREST if i < len(nearest) and nearest[i] else Image.Resampling.BICUBIC
            if box != (0, 0, *size) or size != (self.image_size, self.image_size):  # else whole, at its size: no copy
                image = _pil(image).resize((self.image_size, self.image_size), resample, box=box)
            if mirror:
                image = image[:, ::-1] if isinstance(image, np.ndarray) else image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(image)
        return out


class ImageText(_Mapper):
    """Image + caption pairs (CLIP, text-to-image). Outputs `image`, `caption`, `key`.

    Args:
        image_size: output side in pixels.
        image_key: the image field; None takes the first image field (png, jpg, ...).
        caption_key: the caption field.
        crop_scale: random-resized-crop area range for training; None resizes the whole image.
        flip: mirror left-right with probability 1/2.
        color_jitter: brightness, contrast and saturation each scaled by a factor drawn from
            [1 - color_jitter, 1 + color_jitter] (SimCLR-style); 0 disables it.
        caption_dropout: probability of replacing the caption by "" (classifier-free guidance).
        text_length: read the caption's cached text-encoder embeddings (`kiln data text-embeddings`:
            `text.npy`, `textenc.txt`) and pad them to this many tokens: outputs `text_tokens`
            (text_length, width), `text_mask` and `text_encoder` (the fingerprint) too.
    """

    _no_augmentation = {**_Mapper._no_augmentation, "color_jitter": 0.0, "caption_dropout": 0.0}

    def __init__(
        self,
        image_size: int = 64,
        image_key: str | None = None,
        caption_key: str = "txt",
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
        color_jitter: float = 0.0,
        caption_dropout: float = 0.0,
        text_length: int | None = None,
    ):
        super().__init__(image_size, crop_scale, flip)
        self.image_key, self.caption_key = image_key, caption_key
        self.color_jitter, self.caption_dropout = color_jitter, caption_dropout
        self.text_length = text_length

    def __call__(self, sample: dict) -> dict:
        image_name, caption_name = field_names(sample, self.image_key, self.caption_key)
        image, caption = sample_image(sample, image_name), sample[caption_name]
        (image,) = self._geometry(sample, image)
        if self.color_jitter:
            image = _pil(image)
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(1 + self.rng.uniform(-self.color_jitter, self.color_jitter))
        if self.caption_dropout and self.rng.random() < self.caption_dropout:
            caption = ""
        out = {"image": to_tensor(image), "caption": caption, "key": sample["__key__"]}
        return out | (self._text(sample) if self.text_length else {})

    def _text(self, sample: dict) -> dict:
        if "text.npy" not in sample or "textenc.txt" not in sample:
            raise KeyError(f"{_where(sample)} has no cached text embeddings (text.npy, textenc.txt): "
                            "build them with `kiln data text-embeddings`, or drop text_length")
        tokens = torch.from_numpy(np.asarray(sample["text.npy"], dtype=np.float32))[: self.text_length]
        padded = torch.zeros(self.text_length, tokens.shape[1])
        padded[: len(tokens)] = tokens
        mask = torch.arange(self.text_length) < len(tokens)
        return {"text_tokens": padded, "text_mask": mask, "text_encoder": sample["textenc.txt"]}


class ImageClass(_Mapper):
    """Image + class label (BigGAN, class-conditional diffusion, judges). Outputs `image`,
    `label` (int, collated to a LongTensor), `key`.

    Args:
        image_size / crop_scale / flip: as for `ImageText`.
        image_key: the image field; None takes the first image field.
        label_key: the field holding the class index (webdataset decodes "cls" to an int).
        num_classes: if given, a label outside [0, num_classes) is an error naming the sample.
    """

    def __init__(
        self,
        image_size: int = 64,
        image_key: str | None = None,
        label_key: str = "cls",
        num_classes: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
    ):
        super().__init__(image_size, crop_scale, flip)
        self.image_key, self.label_key, self.num_classes = image_key, label_key, num_classes

    def __call__(self, sample: dict) -> dict:
        image_name, label_name = field_names(sample, self.image_key, self.label_key)
        image, label = sample_image(sample, image_name), int(sample[label_name])
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"{_where(sample)} has label {label}, outside [0, {self.num_classes})")
        (image,) = self._geometry(sample, image)
        return {"image": to_tensor(image), "label": label, "key": sample["__key__"]}


class PairedImages(_Mapper):
    """Aligned input -> target pairs (Pix2Pix), both given the same crop and flip. Outputs
    `input`, `target`, `key`.

    Args:
        image_size / crop_scale / flip: as for `ImageText`.
        input_key / target_key: the two image fields (e.g. "input" finds "input.png").
    """

    def __init__(
        self,
        image_size: int = 256,
        input_key: str = "input",
        target_key: str = "target",
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
    ):
        super().__init__(image_size, crop_scale, flip)
        self.input_key, self.target_key = input_key, target_key

    def __call__(self, sample: dict) -> dict:
        source_name, target_name = field_names(sample, self.input_key, self.target_key)
        source, target = sample_image(sample, source_name), sample_image(sample, target_name)
        source, target = self._geometry(sample, source, target)
        return {"input": to_tensor(source), "target": to_tensor(target), "key": sample["__key__"]}


class UnpairedImages(_Mapper):
    """One image from each of two domains (CycleGAN, U-GAT-IT). The pipeline hands this mapper
    `{"a": sample_a, "b": sample_b}`, drawn independently from the two domains' shards; each is
    augmented on its own. A single sample (one source, e.g. held-out true pairs) gives both sides
    from its own two fields, a true pair with one crop and flip. Outputs `a`, `b`, `key_a`, `key_b`.

    Args:
        image_size / crop_scale / flip: as for `ImageText`.
        image_key: the image field in both domains; None takes the first image field.
        a_key / b_key: domain a's and b's own fields instead (e.g. "input" and "target" when both
            domains are read from pair shards).
    """

    def __init__(
        self,
        image_size: int = 256,
        image_key: str | None = None,
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
        a_key: str | None = None,
        b_key: str | None = None,
    ):
        super().__init__(image_size, crop_scale, flip)
        self.image_key, self.a_key, self.b_key = image_key, a_key, b_key

    def __call__(self, pair: dict) -> dict:
        keys = {"a": self.a_key or self.image_key, "b": self.b_key or self.image_key}
        if "__key__" in pair:  # one sample holding both sides
            a, b = field_names(pair, keys["a"], keys["b"])
            images = self._geometry(pair, sample_image(pair, a), sample_image(pair, b))
            return {"a": to_tensor(images[0]), "b": to_tensor(images[1]), "key_a": pair["__key__"], "key_b": pair["__key__"]}
        out = {}
        for domain in ("a", "b"):
            sample = pair[domain]
            (name,) = field_names(sample, keys[domain])
            (image,) = self._geometry(sample, sample_image(sample, name))
            out[domain], out[f"key_{domain}"] = to_tensor(image), sample["__key__"]
        return out


def _class_ids(label: Image.Image, sample: dict) -> Image.Image:
    """A label map as a single-channel image of class ids.

    The pipeline decodes with webdataset's imagehandler("pil"), which converts every image to
    RGB (webdataset 1.0.2): an "L" map arrives as R = G = B = id, but a "P" map arrives as its
    palette colours and the ids are gone. So grey RGB is read back as ids and coloured RGB is
    refused; "L" and "P" images (from another decoder) are ids as they stand.
    """
    if label.mode in ("L", "P"):
        return label
    rgb = np.asarray(label.convert("RGB"))
    if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 0] == rgb[..., 2])).all():
        raise ValueError(
            f"{_where(sample)}: the label map is in colour (mode {label.mode}); the 'pil' decoder turns a "
            "palette ('P') PNG into its colours, so store label maps as greyscale ('L') PNGs of class ids"
        )
    return Image.fromarray(np.ascontiguousarray(rgb[..., 0]), mode="L")


class LabelMapImage(_Mapper):
    """Semantic label map + image (SPADE), both given the same crop and flip; the map is
    resized NEAREST so class ids are never blended. Outputs `label_map` (LongTensor H x W),
    `image`, `key`.

    Args:
        image_size / crop_scale / flip: as for `ImageText`.
        label_key: the field holding a single-channel PNG of class ids (stored as mode "L").
        image_key: the image field; None takes the first image field other than the label map.
        num_classes: if given, an id >= num_classes is an error naming the sample and the id.
    """

    def __init__(
        self,
        image_size: int = 256,
        label_key: str = "label",
        image_key: str | None = None,
        num_classes: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
    ):
        super().__init__(image_size, crop_scale, flip)
        self.label_key, self.image_key, self.num_classes = label_key, image_key, num_classes

    def __call__(self, sample: dict) -> dict:
        label_name, image_name = field_names(sample, self.label_key, self.image_key)
        label, image = sample[label_name], sample_image(sample, image_name)
        label = _class_ids(label, sample)
        if self.num_classes is not None:
            # Checked on the whole map, so that a bad sample fails whatever the crop.
            top = int(np.asarray(label).max())
            if top >= self.num_classes:
                raise ValueError(f"{_where(sample)} has class id {top} in its label map, num_classes is {self.num_classes}")
        label, image = self._geometry(sample, label, image, nearest=(True,))
        label_map = torch.from_numpy(np.array(label, dtype=np.int64))
        return {"label_map": label_map, "image": to_tensor(image), "key": sample["__key__"]}
