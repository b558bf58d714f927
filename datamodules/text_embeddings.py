"""Captions' frozen text-encoder embeddings cached in the shards (Imagen's big runs: the encoder,
T5-XXL's 4.8B parameters, then need not run at every step).

`kiln data text-embeddings --source SHARDS --out URL --text-encoder minilm|t5 [--text-encoder-path P]
[--max-length N]` reads captioned shards (a folder holding a kiln build, or shard URLs) and writes
every sample again with two more fields:

    text.npy       the caption's token embeddings, float16, (real tokens, width): padding is not stored
    textenc.txt    the encoder's fingerprint (`FrozenTextEncoder.fingerprint`), which the training stage
                   compares with its own encoder's: embeddings of another encoder are refused

Training reads them through `kiln.datamodules.mappers.ImageText(text_length=N)`, which pads them
back to the stage's `max_length` (`text_tokens`, `text_mask`); the stage still holds its encoder,
for the empty caption of guidance and for sampling.
"""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from kiln.datamodules.edges import _batches, _read, _splits
from kiln.datamodules.errors import DataError
from kiln.datamodules.shards import write_shards
from kiln.modules.pretrained.text_encoders import FrozenTextEncoder

VERSION = 1
CAPTION_FIELD = "txt"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _embedded(samples: Iterable[dict], encoder: FrozenTextEncoder, batch_size: int) -> Iterator[dict]:
    for batch in _batches(samples, batch_size):
        missing = [s["__key__"] for s in batch if CAPTION_FIELD not in s]
        if missing:
            raise DataError(f"sample {missing[0]} in {batch[0]['__url__']} has no caption ({CAPTION_FIELD})")
        tokens, mask, _ = encoder([s[CAPTION_FIELD].decode("utf-8").strip() for s in batch])
        for sample, t, m in zip(batch, tokens.cpu(), mask.cpu()):
            kept = {k: v for k, v in sample.items() if not k.startswith("__")}
            yield {"__key__": sample["__key__"], **kept, "text.npy": _npy(t[m].numpy().astype(np.float16)),
                   "textenc.txt": encoder.fingerprint.encode()}


def write_text_embedding_shards(out: str, source: str, text_encoder: dict, shard_size: int = 256,
                                limit: int | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """Every sample of `source` with its caption's embeddings by `FrozenTextEncoder(**text_encoder)`,
    written as shards under `out`; returns the manifest."""
    if source is None:
        raise ValueError("text-embeddings needs --source: the captioned shards (a kiln build folder or shard URLs)")
    encoder = FrozenTextEncoder(**text_encoder)  # first: a bad encoder fails before any shard is read
    source, urls, counts = _splits(source, 0)
    splits = {}
    for split, shard_urls in urls.items():
        samples = itertools.islice(_read(shard_urls), limit)
        first = next(samples, None)
        if first is None:
            raise DataError(f"no samples in split {split!r} of {source}")
        splits[split] = _embedded(itertools.chain([first], samples), encoder, batch_size)
    total = None if counts is None else sum(min(n, limit or n) for n in counts.values())
    meta = {"version": VERSION, "source": source, "text_encoder": encoder.fingerprint, "width": encoder.dim,
            "max_length": encoder.max_length, "limit": limit}
    return write_shards(out, "text-embeddings", splits, shard_size, meta=meta, total=total, progress=progress)
