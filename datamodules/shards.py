"""Writing WebDataset shards and their manifest to any fsspec URL.

Every `kiln data` builder writes through :func:`write_shards`, so all data sets share one
layout and one completeness rule::

    {out}/{split}/{split}-000000.tar   samples: __key__ plus one file per field
    {out}/manifest.json                written last: its presence means the build completed

The manifest lists, per split, each shard's relative URL, sample count, size in bytes and
sha256; readers use the counts to size epochs (`kiln.datamodules.webdataset`).
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from collections.abc import Iterable, Iterator, Mapping

import fsspec
import webdataset

MANIFEST = "manifest.json"


class _Hashing:
    """Write-through wrapper that digests a shard as it streams to (possibly remote) storage."""

    def __init__(self, stream):
        self.stream, self.sha256, self.bytes = stream, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.stream.write(data)


def png_bytes(image) -> bytes:
    """A PIL image as PNG file bytes, the usual image field of a shard sample."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _put_json(fs, path: str, obj: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    fs.mv(tmp, path)


def _write_shard(fs, root: str, url: str, samples: Iterator[dict], count: int) -> dict | None:
    """Up to `count` samples into `root/url`, under a temporary name until complete."""
    path = f"{root}/{url}"
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    written = 0
    try:
        with fs.open(tmp, "wb") as f:
            stream = _Hashing(f)
            # A fixed mtime makes the tar, and so its sha256, reproducible.
            with webdataset.TarWriter(stream, encoder=False, mtime=0) as writer:
                for _, sample in zip(range(count), samples):
                    writer.write(sample)
                    written += 1
        if written == 0:
            fs.rm(tmp)
            return None
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return {"url": url, "samples": written, "bytes": stream.bytes, "sha256": stream.sha256.hexdigest()}


def read_manifest(root: str) -> dict:
    """The manifest of a completed build at `root`, or {} if there is none."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        with fs.open(f"{path.rstrip('/')}/{MANIFEST}", "r", encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_shards(out: str, builder: str, splits: Mapping[str, Iterable[dict]], shard_size: int = 256,
                 meta: Mapping | None = None, total: int | None = None, progress: bool = True) -> dict:
    """Write each split's samples as shards under `out` (any fsspec URL) and return the manifest.

    A sample is a dict with `__key__` and one `bytes` value per field ("png", "txt", "cls", ...).
    Shards are written under temporary names and moved into place once complete, and the
    manifest goes last, so an interrupted build never looks finished; shards left by an earlier,
    larger build are removed. `total` (samples over all splits) sizes the progress bar.
    Not safe to run twice at once on one `out`.
    """
    from rich.progress import Progress

    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    manifest_path = f"{root}/{MANIFEST}"
    if fs.exists(manifest_path):
        fs.rm(manifest_path)
    # `count` is the samples over all splits unless `meta` says what a data set counts.
    counted = "count" not in (meta or {})
    manifest = {"builder": builder, "count": 0, **(meta or {}), "shards": {}}
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"{builder} shards", total=total)
        for split, samples in splits.items():
            fs.makedirs(f"{root}/{split}", exist_ok=True)
            shards = manifest["shards"][split] = []
            samples = iter(samples)
            while shard := _write_shard(fs, root, f"{split}/{split}-{len(shards):06d}.tar", samples, shard_size):
                shards.append(shard)
                manifest["count"] += shard["samples"] if counted else 0
                bar.advance(task, shard["samples"])
            listed = {f"{root}/{shard['url']}" for shard in shards}
            for stale in set(fs.glob(f"{root}/{split}/{split}-*.tar")) - listed:
                fs.rm(stale)  # readers may glob the folder
    _put_json(fs, manifest_path, manifest)
    return manifest


def builder_of(urls: str | list[str] | dict | None) -> str | None:
    """The builder (`kiln data <builder>`: "fashion-mnist", "digits", "emoji", ...) that wrote
    the first shard of `urls`, from the manifest beside it or one or two folders up (a build
    keeps each split or style in a folder of its own); None where no manifest says."""
    if isinstance(urls, dict):
        urls = next(iter(urls.values()), None)
    first = urls if isinstance(urls, str) or urls is None else (urls[0] if urls else None)
    if first is None:
        return None
    folder = posixpath.dirname(first.split("{")[0])
    for _ in range(3):
        if builder := read_manifest(folder).get("builder"):
            return builder
        folder = posixpath.dirname(folder.rstrip("/"))
    return None
