"""A WebDataset sample's fields, each decoded when a mapper first reads it.

`ShardPipeline` hands mappers a `Sample`: a read-only mapping over the raw tar members that
decodes a field on first access and keeps the result. A mapper pays only for the fields it reads
(ImageClass never decodes the caption), and a damaged field that nobody reads does not cost the
sample. The values are what webdataset's `Decoder([imagehandler("pil")])` gives -- images as RGB
PIL images, `cls` as int, `txt` as str, `json` parsed -- so any mapper written for webdataset reads
a `Sample` unchanged.

Images: JPEGs are decoded by libjpeg-turbo through simplejpeg, straight from the bytes. Pillow
decodes with the same library and the same settings (islow DCT, fancy upsampling), so the pixels
are identical (tests/test_decoding.py), but Pillow's per-image Python around the decoder costs
~100 us: a 64 px JPEG takes 135 us in Pillow against 38 us in simplejpeg on this machine. Other
formats, CMYK JPEGs and JPEGs simplejpeg refuses (12-bit, damaged) go through Pillow.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Iterator, Mapping

import numpy as np
import simplejpeg
from PIL import Image
from webdataset.autodecode import IMAGE_EXTENSIONS, Decoder, decoders

_IMAGES = frozenset(IMAGE_EXTENSIONS)  # the fields webdataset's image handler decodes
_JPEG = frozenset({"jpg", "jpeg", "jpe", "jfif"})
# Colour spaces whose conversion to RGB libjpeg-turbo does exactly as Pillow; Pillow converts CMYK
# (Adobe's inverted variant included) itself, with its own rounding.
_TURBO_COLOURS = frozenset({"YCbCr", "Gray"})
_BASIC = Decoder([])  # webdataset's handlers for everything but images: txt, cls, json, npy, ...


class FieldDecodeError(Exception):
    """A field's bytes could not be decoded; the pipeline counts it under "decode"."""


def extension(name: str) -> str:
    """The format a field's name gives ("jpg" for "jpg", "photo.jpg" and "x.JPG")."""
    return name.rpartition(".")[2].lower()


def jpeg_pixels(data: bytes, into: list[np.ndarray] | None = None) -> np.ndarray | None:
    """A JPEG's RGB pixels, (H, W, 3) uint8, from libjpeg-turbo; None where Pillow must decide.
    Decoded into the first of `into` of their shape if there is one (which is then taken off
    the list and returned), else into a new array."""
    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        if colour in _TURBO_COLOURS:
            for k, place in enumerate(into or ()):
                if place.shape == (height, width, 3):
                    simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=place)
                    return into.pop(k)
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:  # not a JPEG simplejpeg reads (or a damaged one)
        pass
    return None


def pillow_image(data: bytes) -> Image.Image:
    """An RGB PIL image decoded by Pillow (webdataset's "pil" handler converts every image to RGB too)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


_RAW, _JPEG_IMAGE, _IMAGE = "raw", "jpeg", "image"  # kinds of field besides a basic decoder


@functools.lru_cache(maxsize=4096)  # per name: every sample of a data set has the same few
def _decoder(name: str) -> object:
    """What decodes a field: _RAW (metadata such as `__key__`), _JPEG_IMAGE, _IMAGE, or a
    function of its bytes. txt, cls, json, npy, ...: the function `_BASIC.decode1` reaches for
    the extension as written, without its regular expression and handler chain (~1 us of a 2 us
    `cls`); None: through `_BASIC` (gz-compressed fields among them)."""
    if name.startswith("__"):
        return _RAW
    ext = extension(name)
    return _JPEG_IMAGE if ext in _JPEG else _IMAGE if ext in _IMAGES else decoders.get(name.rpartition(".")[2])


def _decode(kind: object, name: str, data: bytes) -> object:
    if kind is _JPEG_IMAGE or kind is _IMAGE:
        return pillow_image(data)
    if kind is None:
        return _BASIC.decode1(name, data)
    value = kind(data)
    return data if value is None else value


_NOT_YET = object()


class Sample(Mapping):
    """One sample: `__key__`, `__url__` as they are, every other field decoded on first read.
    `image(name)` gives a JPEG's pixels without making a PIL image (kiln's mappers take either).
    `into`: places for pixels in the batch's memory (`mappers.BatchBlocks.places`); a JPEG of
    a place's shape decodes into it."""

    __slots__ = ("raw", "decoded", "pixels", "into")

    def __init__(self, raw: dict, into: list[np.ndarray] | None = None):
        self.raw, self.decoded, self.pixels, self.into = raw, {}, {}, into

    def image(self, name: str) -> Image.Image | np.ndarray:
        """An image field as it decodes most cheaply: a JPEG libjpeg-turbo reads as its RGB
        pixels, (H, W, 3) uint8 (a PIL image costs ~25 us more for a 64 px one, made and read
        back), anything else as `sample[name]` gives it."""
        if name not in self.decoded:
            pixels = self._jpeg(name)
            if pixels is not None:
                return pixels
        return self[name]

    def _jpeg(self, name: str) -> np.ndarray | None:
        """The field's pixels if it is a JPEG libjpeg-turbo reads (decoded once), else None."""
        pixels = self.pixels.get(name, _NOT_YET)
        if pixels is _NOT_YET:
            data = self.raw.get(name)
            pixels = jpeg_pixels(data, self.into) if isinstance(data, bytes) and _decoder(name) is _JPEG_IMAGE else None
            self.pixels[name] = pixels
        return pixels

    def __getitem__(self, name: str) -> object:
        if name in self.decoded:
            return self.decoded[name]
        data = self.raw[name]  # a missing field raises KeyError, as a dict would
        if isinstance(data, bytes) and (kind := _decoder(name)) is not _RAW:
            try:
                pixels = self._jpeg(name) if kind is _JPEG_IMAGE else None
                data = Image.fromarray(pixels) if pixels is not None else _decode(kind, name, data)
            except Exception as exn:  # noqa: BLE001 - any decoder's failure means the same
                raise FieldDecodeError(f"field {name!r}: {type(exn).__name__}: {exn}") from exn
        self.decoded[name] = data
        return data

    def __contains__(self, name: object) -> bool:
        return name in self.raw

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Sample({self.raw.get('__key__')!r}, fields={list(self.raw)})"
