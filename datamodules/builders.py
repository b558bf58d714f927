"""`kiln data` builders besides emoji: Fashion-MNIST, scikit-learn's digits, a folder of
images and two aligned folders of image pairs, each written as WebDataset shards to any fsspec
URL through :func:`kiln.datamodules.shards.write_shards` (layout and manifest are described there).

Sample fields (webdataset names a tar member ``KEY.FIELD``: the key ends at the first dot):

    fashion-mnist  png, cls, txt "a photo of a <class>", json   splits train (60k), test (10k)
    digits         png, cls, txt "a handwritten digit <n>", json   splits train (1497), test (300)
    folder         jpg/png/webp/... (the file's bytes), [cls], [txt], json   split train [, val]
    pairs          input.<ext>, target.<ext>, [txt], json   split train [, val]

Fashion-MNIST (Xiao et al. 2017, Debian ``dataset-fashion-mnist``) and digits (UCI optdigits via
``sklearn.datasets.load_digits``) are stored as grayscale ("L") PNGs at their native 28 and
8 pixels unless ``size`` asks for a LANCZOS resize; the mappers convert to RGB when they load.
``json`` holds label, class, split and index.

``folder`` and ``pairs`` read a user's images. A folder whose images all sit in sub-folders is
labelled: the first path component is the class, ``cls`` its index in sorted order, and the
manifest lists the classes; otherwise every image under it is unlabelled. A same-stem ``.txt``
beside an image (beside the input, for pairs) becomes ``txt``. Images keep their bytes and
lowercased extension (``jpeg`` spelled ``jpg``) as the field unless ``size`` is given: then
the shorter side is scaled to ``size``, the centre cropped square and the result stored as an
RGB PNG (transparency over white). Pairs match by relative path without extension across the
two folders, and an image without a partner is an error naming it: dropping it would hide a
misaligned data set. Files and folders whose names start with a dot are skipped (``.DS_Store``,
macOS ``._`` copies). Samples go out in a seeded order, so that a shard is a random sample of
the set rather than one class; ``val_fraction`` holds out that share of it as split ``val``.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import random
import re
from collections.abc import Iterable, Iterator

import fsspec
import numpy as np
from PIL import Image, ImageOps

from kiln.datamodules.errors import DataError
from kiln.datamodules.shards import png_bytes, write_shards

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGITS_TEST = 300
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})


def _gray_png(pixels: np.ndarray, size: int) -> bytes:
    image = Image.fromarray(pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return png_bytes(image)


def _labelled(key: str, png: bytes, label: int, caption: str, info: dict) -> dict:
    return {"__key__": key, "png": png, "cls": str(label).encode("ascii"),
            "txt": caption.encode("utf-8"), "json": json.dumps(info).encode("utf-8")}


def _limited(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


# Fashion-MNIST ----------------------------------------------------------------------------------

def read_idx(path: str, limit: int | None = None) -> np.ndarray:
    """A gzipped IDX array of unsigned bytes (the MNIST file format), only its first `limit` rows read."""
    with gzip.open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:3] != b"\0\0\x08":
            raise DataError(f"{path}: not an IDX file of unsigned bytes")
        shape = np.frombuffer(f.read(4 * magic[3]), ">u4").astype(np.int64)
        shape[0] = _limited(int(shape[0]), limit)
        data = f.read(int(np.prod(shape)))
    if len(data) < np.prod(shape):
        raise DataError(f"{path}: truncated, {len(data)} of {int(np.prod(shape))} bytes")
    return np.frombuffer(data, np.uint8).reshape(shape)


def fashion_mnist_samples(split: str, size: int = 28, limit: int | None = None,
                          root: str = FASHION_MNIST) -> Iterator[dict]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(f"{root}/{prefix}-images-idx3-ubyte.gz", limit)
    labels = read_idx(f"{root}/{prefix}-labels-idx1-ubyte.gz", limit)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        name = FASHION_CLASSES[label]
        article = "an" if name[0] in "aeiou" else "a"
        yield _labelled(f"{split}-{index:05d}", _gray_png(pixels, size), int(label),
                        f"a photo of {article} {name}",
                        {"label": int(label), "class": name, "split": split, "index": index})


def write_fashion_mnist_shards(out: str, size: int = 28, shard_size: int = 256, limit: int | None = None,
                               progress: bool = True, root: str = FASHION_MNIST) -> dict:
    fs = fsspec.filesystem("file")
    if not fs.isdir(root):
        raise DataError(f"{root}: no such folder (Fashion-MNIST comes from the Debian package dataset-fashion-mnist)")
    sizes = {"train": 60_000, "test": 10_000}
    # Generators: a split's IDX files are read only when the writer reaches it.
    splits = {split: fashion_mnist_samples(split, size, limit, root) for split in sizes}
    return write_shards(out, "fashion-mnist", splits, shard_size,
                        meta={"size": size, "limit": limit, "classes": list(FASHION_CLASSES)},
                        total=sum(_limited(n, limit) for n in sizes.values()), progress=progress)


# digits -----------------------------------------------------------------------------------------

def digits_samples(size: int = 8, limit: int | None = None, seed: int = 0) -> dict[str, Iterator[dict]]:
    """Train and test samples of `load_digits`, `DIGITS_TEST` held out stratified by label."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 4-bit counts -> 8-bit grey
    train, test = train_test_split(np.arange(len(pixels)), test_size=DIGITS_TEST,
                                   stratify=digits.target, random_state=seed)

    def samples(split: str, indices: np.ndarray) -> Iterator[dict]:
        for index in indices[:limit]:
            label = int(digits.target[index])
            yield _labelled(f"{index:04d}", _gray_png(pixels[index], size), label, f"a handwritten digit {label}",
                            {"label": label, "class": str(label), "split": split, "index": int(index)})

    return {"train": samples("train", train), "test": samples("test", test)}


def write_digits_shards(out: str, size: int = 8, shard_size: int = 256, limit: int | None = None,
                        progress: bool = True, seed: int = 0) -> dict:
    splits = digits_samples(size, limit, seed)
    total = _limited(1797 - DIGITS_TEST, limit) + _limited(DIGITS_TEST, limit)
    return write_shards(out, "digits", splits, shard_size, progress=progress, total=total,
                        meta={"size": size, "limit": limit, "seed": seed, "test": DIGITS_TEST,
                              "classes": [str(d) for d in range(10)]})


# a user's folders -------------------------------------------------------------------------------

def _key(stem: str) -> str:
    # webdataset splits a member name at its first dot, and a slash would make a folder.
    return re.sub(r"[./]", "_", stem)


@dataclasses.dataclass
class ImageFolder:
    """The images under a folder at any fsspec URL, by relative path without extension ("stem")."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    files: frozenset[str]  # relative paths of every visible file
    images: dict[str, str]  # stem -> relative path, sorted by stem

    @classmethod
    def open(cls, url: str) -> ImageFolder:
        url = url.rstrip("/")
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.isdir(root):
            raise DataError(f"{url}: {'not a' if fs.exists(root) else 'no such'} folder")
        rels = [path[len(root) + 1:] for path in fs.find(root)]
        files = frozenset(r for r in rels if not any(part.startswith(".") for part in r.split("/")))
        images, keys = {}, {}
        for rel in sorted(files):
            stem, dot, ext = rel.rpartition(".")
            if not dot or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            if (key := _key(stem)) in keys:
                raise DataError(f"{url}: {keys[key]} and {rel} would make one sample ({key}); rename one")
            images[stem] = keys[key] = rel
        if not images:
            raise DataError(f"{url}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
        return cls(url, fs, root, files, dict(sorted(images.items())))

    def image(self, stem: str, size: int | None) -> tuple[str, bytes]:
        """(field, bytes): the file as it is, or resized to a `size` square PNG."""
        rel = self.images[stem]
        data = self.fs.cat_file(f"{self.root}/{rel}")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode it all: a truncated file fails here, not in the middle of training
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise DataError(f"{self.url}/{rel}: cannot read image ({e})") from None
        if size is None:
            ext = rel.rpartition(".")[2].lower()
            return ("jpg" if ext == "jpeg" else ext), data
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        return "png", png_bytes(ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS))

    def caption(self, stem: str) -> bytes | None:
        rel = f"{stem}.txt"
        if rel not in self.files:
            return None
        data = self.fs.cat_file(f"{self.root}/{rel}").strip()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{self.url}/{rel}: caption is not UTF-8 text") from None
        return data


def _split(stems: Iterable[str], val_fraction: float, seed: int, limit: int | None) -> dict[str, list[str]]:
    """Stems in a seeded order, `val_fraction` of them (at least one) held out as "val"."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    stems = sorted(stems)
    stems = random.Random(seed).sample(stems, len(stems))
    n_val = max(1, round(len(stems) * val_fraction)) if val_fraction else 0
    if n_val >= len(stems):
        raise DataError(f"holding out {n_val} of {len(stems)} images for val leaves none to train on")
    splits = {"train": stems[n_val:], "val": stems[:n_val]}
    return {split: part[:limit] for split, part in splits.items() if part}


def _write(out: str, builder: str, samples, parts: dict[str, list[str]], shard_size: int,
           progress: bool, meta: dict) -> dict:
    splits = {split: samples(split, stems) for split, stems in parts.items()}
    return write_shards(out, builder, splits, shard_size, meta=meta, progress=progress,
                        total=sum(len(stems) for stems in parts.values()))


def write_folder_shards(out: str, source: str, size: int | None = None, shard_size: int = 256,
                        limit: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                        progress: bool = True) -> dict:
    folder = ImageFolder.open(source)
    labelled = all("/" in stem for stem in folder.images)
    classes = sorted({stem.split("/")[0] for stem in folder.images}) if labelled else []

    def samples(split: str, stems: list[str]) -> Iterator[dict]:
        for stem in stems:
            field, data = folder.image(stem, size)
            sample = {"__key__": _key(stem), field: data}
            info = {"path": folder.images[stem], "split": split}
            if labelled:
                name = stem.split("/")[0]
                sample["cls"] = str(classes.index(name)).encode("ascii")
                info |= {"label": classes.index(name), "class": name}
            if (caption := folder.caption(stem)) is not None:
                sample["txt"] = caption
            yield sample | {"json": json.dumps(info).encode("utf-8")}

    parts = _split(folder.images, val_fraction, seed, limit)
    meta = {"source": folder.url, "size": size, "limit": limit, "val_fraction": val_fraction, "seed": seed,
            "classes": classes}
    return _write(out, "folder", samples, parts, shard_size, progress, meta)


def write_pairs_shards(out: str, input_dir: str, target_dir: str, size: int | None = None, shard_size: int = 256,
                       limit: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                       progress: bool = True) -> dict:
    inputs, targets = ImageFolder.open(input_dir), ImageFolder.open(target_dir)
    if unmatched := sorted(inputs.images.keys() ^ targets.images.keys()):
        has, lacks = (inputs, targets) if unmatched[0] in inputs.images else (targets, inputs)
        more = f" ({len(unmatched) - 1} more images lack a partner)" if len(unmatched) > 1 else ""
        raise DataError(f"{has.url}/{has.images[unmatched[0]]} has no partner in {lacks.url}{more}")

    def samples(split: str, stems: list[str]) -> Iterator[dict]:
        for stem in stems:
            (a, a_data), (b, b_data) = inputs.image(stem, size), targets.image(stem, size)
            sample = {"__key__": _key(stem), f"input.{a}": a_data, f"target.{b}": b_data}
            if (caption := inputs.caption(stem)) is not None:
                sample["txt"] = caption
            info = {"input": inputs.images[stem], "target": targets.images[stem], "split": split}
            yield sample | {"json": json.dumps(info).encode("utf-8")}

    parts = _split(inputs.images, val_fraction, seed, limit)
    meta = {"input": inputs.url, "target": targets.url, "size": size, "limit": limit,
            "val_fraction": val_fraction, "seed": seed}
    return _write(out, "pairs", samples, parts, shard_size, progress, meta)
