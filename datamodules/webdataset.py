"""The one WebDataset pipeline every family streams through.

Read top to bottom (open_clip's order): shard list -> seeded shard shuffle per epoch -> split by
rank (node x local rank) -> split by DataLoader worker -> open through fsspec -> tar to samples ->
sample shuffle -> the family's sample mapper, which decodes the fields it reads
(`kiln.datamodules.decoding`) -> batch. A family supplies only the mapper. Every URL, local or
remote (file://, s3://, gs://), is opened through fsspec, because webdataset's own opener has no
s3 scheme, and reads are retried with back-off.

Two choices make a mid-epoch resume exact, which no anchor does for tar shards:

* **Block shuffle.** A worker reads whole shards into a block of at least `shuffle_buffer`
  samples (raw bytes, as webdataset's shuffle buffer holds them), permutes the block with a
  seeded generator, and yields it. A worker's position is then three numbers -- pass, first
  shard of the block, samples of the block consumed -- and resuming re-reads only the block in
  progress: consumed shards are never read again.
* **Equal, fixed-length epochs.** Every rank yields the same number of batches per epoch
  (`batches_per_epoch`, or the manifest's sample count / (ranks x batch size)), so uneven shards
  never hang a multi-rank job. The policy is *equalise*: a worker that runs out of shards starts
  its next pass (fresh shuffle) and one with shards to spare stops at its quota, so with uneven
  shards an epoch sees a few samples twice and a few not at all. Workers are asked for batches
  round-robin, so a rank's batch i comes from worker i mod W; on resume the workers' roles are
  rotated to keep that order.

Each batch carries its worker's position; the DataModule records it when the batch reaches the
training step and stores the positions of all ranks in the Lightning checkpoint.

Bad data (unreadable or corrupt shards, undecodable images, samples missing a field) is skipped,
counted by reason (`data/skipped/<reason>` in the metrics) and warned about once per shard;
`strict=True` raises instead, naming the URL and the sample.
"""
from __future__ import annotations

import copy
import hashlib
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kiln.datamodules.decoding import FieldDecodeError, Sample
from kiln.datamodules.errors import DataError
from kiln.datamodules.mappers import BatchBlocks, as_collated, collate, images_to_float
from kiln.datamodules.shards import read_manifest
from kiln.datamodules.tars import tar_samples

REASONS = ("unreadable_shard", "corrupt_shard", "decode", "missing_field", "map")
INFO = "_kiln_data"  # the batch entry that carries a worker's position and skip counts
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

Sources = dict[str, list[str]]


class DataWarning(UserWarning):
    pass


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns ("shard-{000..009}.tar") and globs ("dir/*.tar") to a sorted list of shard
    URLs, failing before training starts, naming the URL, if a shard cannot be found."""
    out: list[str] = []
    for pattern in [urls] if isinstance(urls, str) else urls:
        for url in wds.shardlists.expand_urls(pattern):
            fs, path = fsspec.core.url_to_fs(url)
            if any(ch in url for ch in "*?["):
                matches = sorted(fs.glob(path))
                if not matches:
                    raise DataError(f"no shards match {url}")
                out += [fs.unstrip_protocol(m) if "://" in url else m for m in matches]
            elif fs.exists(path):  # a glob's matches exist already: only literal URLs need a look
                out.append(url)
            else:
                raise DataError(f"shard not found: {url}")
    if not out:
        raise DataError(f"no shard URLs in {urls!r}")
    return out


def _as_sources(urls: str | list[str] | dict) -> dict:
    return {name: expand_urls(u) for name, u in urls.items()} if isinstance(urls, dict) else {"": expand_urls(urls)}


def manifest_counts(urls: list[str]) -> list[int] | None:
    """Sample counts of `urls` from the manifest.json `kiln data` writes beside its shards (in the
    shard's folder or the one above), or None if a shard is not listed."""
    counts: dict[str, int] = {}
    seen: set[str] = set()
    fs, _ = fsspec.core.url_to_fs(urls[0])
    paths = [fs._strip_protocol(u) for u in urls]
    for path in paths:
        for root in (path.rsplit("/", 1)[0], path.rsplit("/", 2)[0]):
            if root in seen:
                continue
            seen.add(root)
            shards = read_manifest(fs.unstrip_protocol(root)).get("shards", [])
            for entry in [e for v in shards.values() for e in v] if isinstance(shards, dict) else shards:
                counts[f"{root}/{entry['url']}"] = entry["samples"]
    return [counts[p] for p in paths] if all(p in counts for p in paths) else None


def _seed(*parts) -> int:
    """A seed from mixed parts, stable across processes (str hashing is randomised per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class _SampleSeeds:
    """A worker's per-sample seeds: `_seed` of its block's place (pass, first shard) plus the
    sample's offset in it, so a sample's seed follows from its position alone (a resumed run
    seeds it alike) and the hash runs once a block, not once a sample (~2.5 us)."""

    def __init__(self, *worker_parts):
        self.parts, self.block, self.start = worker_parts, None, 0

    def base(self, pass_: int, shard: int) -> int:
        if (pass_, shard) != self.block:
            self.block, self.start = (pass_, shard), _seed(*self.parts, pass_, shard)
        return self.start

    def __call__(self, position: tuple[int, int, int]) -> int:
        pass_, shard, offset = position
        return self.base(pass_, shard) + offset


def _after(block: list, i: int, pass_: int, shard: int, end: int) -> tuple[int, int, int]:
    """The position after sample i of the block read from shards [shard, end)."""
    return (pass_, shard, i + 1) if i + 1 < len(block) else (pass_, end, 0)


def fetch(url: str, retries: int = 5, backoff: float = 0.2, chunk: int = 1 << 23) -> bytes:
    """The whole object at `url`, through fsspec. A read that fails (a dropped connection, a
    5xx, a timeout) is retried with exponential back-off, resuming at the byte it reached."""
    chunks: list[bytes] = []
    offset = 0
    for attempt in range(retries + 1):
        try:
            with fsspec.open(url, "rb") as f:
                if offset:
                    f.seek(offset)
                while data := f.read(chunk):
                    chunks.append(data)
                    offset += len(data)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except _PERMANENT:
            raise
        except Exception:  # noqa: BLE001 - any other failure of a remote read may be transient
            if attempt == retries:
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


class _Faults:
    """Skips bad data, counting each by reason and warning once per shard; strict mode raises."""

    def __init__(self, strict: bool):
        self.strict, self.counts, self.warned = strict, Counter(), set()
        self.shards_read = 0

    def skip(self, reason: str, url: str, key: str | None, exn: BaseException) -> None:
        where = url if key is None else f"{url} sample {key}"
        message = f"{reason.replace('_', ' ')} in {where}: {type(exn).__name__}: {exn}"
        if self.strict:
            raise DataError(message) from exn
        self.counts[reason] += 1
        if url not in self.warned:
            self.warned.add(url)
            warnings.warn(f"skipping {message} (further problems in this shard are counted, not shown)", DataWarning)

    def take(self) -> tuple[dict[str, int], int]:
        """Skips by reason and shards read since the last call."""
        counts, reads, self.counts, self.shards_read = dict(self.counts), self.shards_read, Counter(), 0
        return counts, reads


def read_shard(url: str, faults: _Faults, retries: int = 5, fetched: Future | None = None) -> list[dict]:
    """All samples of one shard, undecoded (its bytes from `fetched` if it has been fetched
    ahead). A shard that ends early or is corrupt yields the samples before the damage."""
    faults.shards_read += 1
    try:
        samples, damage = tar_samples(fetched.result() if fetched is not None else fetch(url, retries), url)
    except Exception as exn:  # noqa: BLE001 - counted by reason, or raised in strict mode
        faults.skip("unreadable_shard", url, None, exn)
        return []
    if damage is not None:
        faults.skip("corrupt_shard", url, None, damage)
    return samples


class _ReadAhead:
    """Reads a worker's shards in order, fetching the next shard's bytes in a background thread
    while the current one is parsed, shuffled and decoded (litdata prefetches its chunks the same
    way): from object storage the transfer then overlaps the decoding. Holds one shard's bytes
    beyond the one being read."""

    def __init__(self, faults: _Faults, retries: int):
        self.faults, self.retries = faults, retries
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-read-ahead")
        self.next: tuple[str, Future] | None = None

    def read(self, shards: list[str], i: int) -> list[dict]:
        url, ahead = shards[i], self.next
        fetched = ahead[1] if ahead is not None and ahead[0] == url else None
        self.next = None
        if i + 1 < len(shards):
            self.next = shards[i + 1], self.pool.submit(fetch, shards[i + 1], self.retries)
        return read_shard(url, self.faults, self.retries, fetched)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class ShardPipeline(IterableDataset):
    """Batches for one rank, split across the DataLoader's workers.

    Args:
        sources: shard URLs per source. One source ("": urls) gives samples as they are; two
            or more (e.g. {"a": ..., "b": ...}, unpaired domains) are streamed independently
            and zipped into {name: sample}, so their pairing is random.
        mapper: sample (a `decoding.Sample`: fields decoded as read) -> example dict. If it has
            an `rng`, it is reseeded per sample from its position, so augmentation is
            reproducible and survives a resume.
        batches_per_epoch: this rank's batches per epoch (fixed-length, see the module
            docstring); None reads each shard once (evaluation) and keeps a partial last batch
            unless drop_last.
        resampled: draw each worker's shards with replacement (very large corpora).
    """

    def __init__(
        self,
        sources: Sources,
        mapper: Callable[[dict], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        resampled: bool = False,
        strict: bool = False,
        retries: int = 5,
        drop_last: bool = True,
        split: str = "train",
    ):
        if batch_size < 1:  # a batch that never fills would read the shards forever
            raise ValueError(f"data batch size must be at least 1, got {batch_size}")
        if not isinstance(sources, dict):
            sources = _as_sources(sources)
        self.sources, self.mapper, self.batch_size = sources, mapper, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.batches_per_epoch, self.resampled = batches_per_epoch, resampled
        self.strict, self.retries, self.drop_last, self.split = strict, retries, drop_last, split
        self.epoch = 0
        self.resume: dict | None = None  # set by the DataModule before an epoch's iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, name: str, pass_: int, worker: int = 0, workers: int = 1) -> list[str]:
        """One worker's shards for one pass."""
        urls = self.sources[name]
        if self.resampled:
            rng = random.Random(_seed(self.seed, self.epoch, name, pass_, self.rank, worker))
            return rng.choices(urls, k=max(1, len(urls) // (self.world_size * workers)))
        urls = list(urls)
        if self.shuffle:
            # The same permutation on every rank, so the ranks partition it.
            random.Random(_seed(self.seed, self.epoch, name, pass_)).shuffle(urls)
        return urls[self.rank :: self.world_size][worker::workers]

    def _blocks(self, name: str, worker: int, workers: int, start: tuple[int, int, int],
                faults: _Faults) -> Iterator[tuple[list[dict], list[int], int, int, int, int]]:
        """One source's shuffle blocks from `start`: (raw samples, their order, the first to
        yield, pass, first shard, end shard); endless in fixed-length epochs, one pass otherwise."""
        pass_, shard, offset = start
        reader = _ReadAhead(faults, self.retries)
        try:
            while True:
                shards = self.shards(name, pass_, worker, workers)
                whole_pass, yielded = shard == offset == 0, False
                while shard < len(shards):
                    block, end = [], shard
                    while end < len(shards) and (end == shard or (self.shuffle and len(block) < self.shuffle_buffer)):
                        block += reader.read(shards, end)
                        end += 1
                    order = list(range(len(block)))
                    if self.shuffle:
                        random.Random(_seed(self.seed, self.epoch, name, pass_, self.rank, worker, shard)).shuffle(order)
                    if offset < len(block):
                        yielded = True
                        yield block, order, offset, pass_, shard, end
                    shard, offset = end, 0
                if self.batches_per_epoch is None:
                    return
                if whole_pass and not yielded:
                    raise DataError(f"no readable sample in a pass over {len(shards)} shard(s) of {name or 'the data'}")
                pass_, shard = pass_ + 1, 0
        finally:
            reader.close()

    def _stream(self, name: str, worker: int, workers: int, start: tuple[int, int, int],
                faults: _Faults) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        """(raw sample, position after it) for one source, from `start`."""
        for block, order, first, pass_, shard, end in self._blocks(name, worker, workers, start, faults):
            for i in range(first, len(block)):
                yield block[order[i]], _after(block, i, pass_, shard, end)

    def _map(self, sample: Sample | dict, raw: dict, faults: _Faults) -> dict | None:
        try:
            return self.mapper(sample)
        except Exception as exn:  # noqa: BLE001 - counted and skipped, or raised in strict mode
            reason = "decode" if isinstance(exn, FieldDecodeError) else "missing_field" if isinstance(exn, KeyError) else "map"
            faults.skip(reason, raw["__url__"], raw["__key__"], exn)
            return None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info else (0, 1)
        resume = self.resume or {"consumed": 0, "workers": {}}
        # Rotate roles so that, after a resume, worker `slot` plays the one whose turn is next.
        worker = (slot + resume["consumed"]) % workers
        state = resume["workers"].get(worker, {"produced": 0, "positions": {}})
        produced, positions = state["produced"], dict(state["positions"])
        quota = None
        if self.batches_per_epoch is not None:
            quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
            if produced >= quota:
                return
        faults = _Faults(self.strict)
        seeds = _SampleSeeds(self.seed, self.epoch, self.rank, worker)
        rng = getattr(self.mapper, "rng", None)  # reseeded before each sample from the position after it
        starts = {name: tuple(positions.get(name, (0, 0, 0))) for name in self.sources}
        batch, blocks = [], BatchBlocks()  # blocks: each batch's memory, made as it starts (mappers.py)
        if list(self.sources) == [""]:
            # One source, the common case, in one loop over its blocks: the mapper gets a
            # `Sample`, and positions are made only for seeds and at the ends of batches.
            for block, order, first, pass_, shard, end in self._blocks("", worker, workers, starts[""], faults):
                base, last = seeds.base(pass_, shard), len(block) - 1
                for i in range(first, len(block)):
                    raw = block[order[i]]
                    if rng is not None:
                        rng.seed(base + i + 1 if i < last else seeds((pass_, end, 0)))
                    example = self._map(Sample(raw, blocks.places(len(batch))), raw, faults)
                    if example is not None:
                        batch.append(example)
                    if len(batch) == self.batch_size:
                        produced += 1
                        positions = {"": _after(block, i, pass_, shard, end)}
                        yield self._collate(batch, worker, produced, positions, faults, blocks)
                        batch = []
                        if produced == quota:
                            return
                positions = {"": (pass_, end, 0)}  # the block is done
        else:
            streams = {name: self._stream(name, worker, workers, starts[name], faults) for name in self.sources}
            for items in zip(*streams.values()):
                (raw, position), sample = items[0], {name: Sample(r) for name, (r, _) in zip(streams, items)}
                if rng is not None:  # the first source names the sample and seeds it
                    rng.seed(seeds(position))
                example = self._map(sample, raw, faults)
                if example is not None:
                    batch.append(example)
                positions = {name: p for name, (_, p) in zip(streams, items)}
                if len(batch) == self.batch_size:
                    produced += 1
                    yield self._collate(batch, worker, produced, positions, faults, blocks)
                    batch = []
                    if produced == quota:
                        return
        if batch and not self.drop_last:
            yield self._collate(batch, worker, produced + 1, positions, faults, blocks)

    def _collate(self, batch: list, worker: int, produced: int, positions: dict, faults: _Faults, blocks: BatchBlocks) -> dict:
        out = collate(batch, blocks)
        skipped, reads = faults.take()
        out[INFO] = {"split": self.split, "worker": worker, "produced": produced, "positions": positions,
                     "skipped": skipped, "shards_read": reads}
        return out


class _EpochLoader(DataLoader):
    """Hands the pipeline its epoch and resume point each time an epoch's iteration starts
    (workers copy the dataset then)."""

    def __init__(self, dataset: ShardPipeline, start: Callable[[], tuple[int, dict | None]], **kwargs):
        # The pipeline seeds itself (`seed`, epoch, rank, worker, position). Its own generator keeps
        # each new iterator's base-seed draw off the global one that training draws from: a
        # mid-epoch resume creates one more iterator than the uninterrupted run did.
        generator = torch.Generator().manual_seed(dataset.seed)
        super().__init__(dataset, batch_size=None, generator=generator, collate_fn=as_collated, **kwargs)
        self.start = start

    def __iter__(self):
        self.dataset.epoch, self.dataset.resume = self.start()
        return super().__iter__()


class WebDataModule(L.LightningDataModule):
    """Shards from any fsspec URL through `ShardPipeline`; `mapper` turns a decoded sample into
    the family's training example. The data position is saved in checkpoints, so a resumed fit
    continues mid-epoch with exactly the samples not yet seen.

    Args:
        train_urls: shard URLs, brace patterns or globs for training; a dict of them
            ({"a": ..., "b": ...}) streams unpaired sources side by side.
        val_urls: the held-out shards (same form); each rank reads all of them.
        mapper: per-sample mapping (a `kiln.datamodules.mappers` class).
        batch_size: per-rank batch size.
        global_batch_size: samples per optimizer step over all ranks instead: each rank then takes
            global / (ranks x accumulate_grad_batches), which must come out whole.
        batches_per_epoch: batches per rank per epoch; None derives it from the manifests
            beside the shards as samples / (ranks x batch_size).
        shuffle_buffer: samples per shuffled block (whole shards, read into memory).
        resampled: draw shards with replacement (a corpus too large for epochs to matter).
        strict: fail on the first bad sample or shard instead of skipping and counting it.
        retries: attempts after a failed read, with exponential back-off from 0.2 s.
    """

    def __init__(
        self,
        train_urls: str | list[str] | dict[str, str | list[str]],
        mapper: Callable[[dict], dict],
        val_urls: str | list[str] | dict[str, str | list[str]] | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        resampled: bool = False,
        strict: bool = False,
        retries: int = 5,
        global_batch_size: int | None = None,
    ):
        super().__init__()
        self.global_batch_size = global_batch_size
        self.train_urls, self.val_urls, self.mapper = train_urls, val_urls, mapper
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.batches_per_epoch, self.resampled = batches_per_epoch, resampled
        self.strict, self.retries = strict, retries
        self.skipped: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self.shards_read = 0  # by the training loader over the whole fit, this rank
        self._progress: dict | None = None  # this rank's position in the current training epoch
        self._resume: dict | None = None  # a checkpoint's position, applied when the next epoch starts
        self._next_epoch: int | None = None

    def setup(self, stage: str) -> None:
        if self.global_batch_size is None:
            return
        _, world = self._rank()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.global_batch_size % (world * accumulate):
            raise DataError(f"data.global_batch_size {self.global_batch_size} does not split evenly over {world} "
                            f"rank(s) x {accumulate} accumulation step(s)")
        self.batch_size = self.global_batch_size // (world * accumulate)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch_length(self, sources: Sources, world: int) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        totals = []
        for urls in sources.values():
            if (counts := manifest_counts(urls)) is None:
                raise DataError(f"cannot size an epoch: no manifest.json beside {urls[0]} lists it; "
                                "set data.batches_per_epoch (or write the shards with `kiln data`)")
            totals.append(sum(counts))
        if (length := min(totals) // (world * self.batch_size)) == 0:
            raise DataError(f"{min(totals)} samples make no batch of {self.batch_size} on each of {world} rank(s)")
        return length

    def train_dataloader(self) -> DataLoader:
        sources = _as_sources(self.train_urls)
        rank, world = self._rank()
        fewest = min(len(urls) for urls in sources.values())
        if fewest < world and not self.resampled:
            raise DataError(f"{fewest} shard(s) cannot feed {world} ranks: write more, smaller shards or set data.resampled")
        workers = self.num_workers if self.resampled else min(self.num_workers, fewest // world)
        pipeline = ShardPipeline(
            sources, self.mapper, self.batch_size, rank, world, self.shuffle, self.shuffle_buffer, self.seed,
            batches_per_epoch=self._epoch_length(sources, world), resampled=self.resampled,
            strict=self.strict, retries=self.retries,
        )
        self._epoch_batches = pipeline.batches_per_epoch
        self._fingerprint = _seed(sorted(sources.items()), self.batch_size, pipeline.batches_per_epoch, workers,
                                  self.shuffle, self.shuffle_buffer, self.seed, self.resampled, world)
        return _EpochLoader(pipeline, self._start_epoch, num_workers=workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_urls is None:
            return []
        # Every rank scores the whole held-out set, in order and without the training
        # augmentation, so its metrics need no gather.
        mapper = self.mapper.for_eval() if hasattr(self.mapper, "for_eval") else self.mapper
        sources = _as_sources(self.val_urls)
        pipeline = ShardPipeline(sources, mapper, self.batch_size, shuffle=False, seed=self.seed, strict=self.strict,
                                 retries=self.retries, drop_last=False, split="val")
        workers = min(self.num_workers, min(len(u) for u in sources.values()))
        return _EpochLoader(pipeline, lambda: (0, None), num_workers=workers)

    # -- the data position -------------------------------------------------------------------

    def _start_epoch(self) -> tuple[int, dict | None]:
        # The data keeps its own epoch count: Lightning counts an epoch cut short by max_steps
        # or max_time as finished, while the data goes on to finish it after a resume.
        if self._next_epoch is None:
            self._next_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        epoch, resume, self._resume = self._next_epoch, self._resume, None
        if resume is not None and resume["fingerprint"] != self._fingerprint:
            warnings.warn("the data or its settings changed since the checkpoint: the data starts a new epoch",
                          DataWarning)
            epoch, resume = resume["epoch"] + 1, None
        elif resume is not None and resume["consumed"] >= self._epoch_batches:
            epoch, resume = resume["epoch"] + 1, None  # saved at the very end of an epoch
        elif resume is not None:
            epoch = resume["epoch"]
        self._next_epoch = epoch + 1
        self._progress = copy.deepcopy(resume) or {"epoch": epoch, "fingerprint": self._fingerprint,
                                                   "consumed": 0, "workers": {}}
        return epoch, resume

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return images_to_float(batch) if isinstance(batch, dict) else batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        info = batch.pop(INFO, None) if isinstance(batch, dict) else None
        if info is None:
            return batch
        self.skipped[info["split"]].update(info["skipped"])
        if info["split"] == "train" and self._progress is not None:
            self.shards_read += info["shards_read"]
            # The batch is about to be trained on: from here on it counts as consumed.
            self._progress["consumed"] += 1
            self._progress["workers"][info["worker"]] = {"produced": info["produced"], "positions": info["positions"]}
        return batch

    def state_dict(self) -> dict:
        if self._progress is None:
            return {}
        mine = {"position": self._progress, "skipped": {split: dict(c) for split, c in self.skipped.items()},
                "shards_read": self.shards_read}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Only rank 0 writes the checkpoint: it carries every rank's position.
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        rank, world = self._rank()
        if len(state["ranks"]) != world:
            warnings.warn(f"the checkpoint's data position is for {len(state['ranks'])} rank(s), not {world}: "
                          "the epoch's data starts again from its beginning", DataWarning)
            return
        mine = state["ranks"][rank]
        self._resume = mine["position"]
        self.skipped = {split: Counter(counts) for split, counts in mine["skipped"].items()}
        self.shards_read = mine["shards_read"]


class DataMetrics(L.Callback):
    """Logs the data's health, summed over ranks: `data/skipped` (and per reason) and
    `data/shards_read` for training, `data/val_skipped` for the held-out data."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def _log(self, trainer, pl_module, split: str) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, WebDataModule):
            return
        # One fixed set of names on every rank, so the reduction always matches up.
        counts = torch.tensor([dm.skipped[split][r] for r in REASONS] + [dm.shards_read], dtype=torch.float64,
                              device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if split == "val":
            pl_module.log("data/val_skipped", counts[:-1].sum(), sync_dist=False, rank_zero_only=True)
            return
        values = {f"data/skipped/{r}": c for r, c in zip(REASONS, counts)}
        values |= {"data/skipped": counts[:-1].sum(), "data/shards_read": counts[-1]}
        pl_module.log_dict(values, sync_dist=False, rank_zero_only=True, on_step=True, on_epoch=False)
