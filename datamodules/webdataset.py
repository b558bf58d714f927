"""The one WebDataset pipeline every family streams through.

Read top to bottom (open_clip's order): shard list -> seeded shard shuffle per epoch -> split by
rank -> split by DataLoader worker -> open through fsspec -> tar to samples -> sample shuffle ->
decode -> the family's sample mapper -> batch. A family supplies only the mapper. Every URL,
local or remote (file://, s3://, gs://), is opened through fsspec, because webdataset's own
opener has no s3 scheme.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import fsspec
import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from kiln.datamodules.errors import DataError


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


def _open_shards(data: Iterator[dict], handler: Callable) -> Iterator[dict]:
    for sample in data:
        try:
            sample["stream"] = fsspec.open(sample["url"], "rb").open()
        except Exception as exn:  # noqa: BLE001 - the handler decides whether to skip or raise
            exn.args = (*exn.args, sample["url"])
            if handler(exn):
                continue
            raise
        try:
            yield sample
        finally:
            # The tar reader has consumed the shard by the time the next one is asked for.
            sample["stream"].close()


class ShardPipeline(IterableDataset):
    """An epoch of batches for one rank: an IterableDataset the DataLoader splits across workers."""

    def __init__(
        self,
        urls: list[str],
        mapper: Callable[[dict], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        decode: str = "pil",
        handler: Callable = wds.reraise_exception,
        drop_last: bool = True,
        batches_per_epoch: int | None = None,
    ):
        self.urls, self.mapper, self.batch_size = urls, mapper, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.decode, self.handler, self.drop_last = decode, handler, drop_last
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, pass_: int = 0) -> list[str]:
        """This rank's shards for one pass over the data (before the worker split)."""
        urls = list(self.urls)
        if self.shuffle:
            # Same seed on every rank, so the ranks partition one permutation.
            random.Random(hash((self.seed, self.epoch, pass_))).shuffle(urls)
        return urls[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict]:
        if self.batches_per_epoch is None:
            yield from self._one_pass(0)
            return
        # A fixed-length epoch made of as many passes as it takes: small data sets then pay
        # Lightning's per-epoch costs (worker start-up, epoch-end hooks) rarely.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        pass_ = 0
        while quota > 0:
            produced = 0
            for batch in self._one_pass(pass_):
                yield batch
                produced += 1
                quota -= 1
                if quota == 0:
                    return
            if produced == 0:
                raise DataError(f"no complete batch of {self.batch_size} in a pass over {len(self.urls)} shard(s)")
            pass_ += 1

    def _one_pass(self, pass_: int) -> Iterator[dict]:
        shards = [dict(url=u) for u in self.shards(pass_)]
        stages: list = [
            lambda: iter(shards),
            wds.split_by_worker,
            lambda src: _open_shards(src, self.handler),
            lambda src: tar_file_expander(src, handler=self.handler),
            group_by_keys,
        ]
        if self.shuffle:
            worker = wds.utils.pytorch_worker_info()[2]
            rng = random.Random(hash((self.seed, self.epoch, pass_, self.rank, worker)))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng))
        stages += [
            wds.decode(self.decode, handler=self.handler),
            wds.map(self.mapper, handler=self.handler),
            wds.batched(self.batch_size, collation_fn=default_collate, partial=not self.drop_last),
        ]
        return iter(wds.DataPipeline(*stages))


class _EpochLoader(DataLoader):
    """Tells the pipeline its epoch each time an epoch's iteration starts (workers copy it then)."""

    def __init__(self, dataset: ShardPipeline, epoch: Callable[[], int], **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch = epoch

    def __iter__(self):
        self.dataset.set_epoch(self.epoch())
        return super().__iter__()


class WebDataModule(L.LightningDataModule):
    """Shards from any fsspec URL through `ShardPipeline`; `mapper` turns a decoded sample into
    the family's training example.

    Args:
        train_urls: shard URLs, brace patterns or globs for training.
        val_urls: the held-out shards; each rank reads all of them.
        mapper: per-sample mapping (a `kiln.datamodules.mappers` class).
        batch_size: per-rank batch size.
        batches_per_epoch: a fixed epoch length in batches, repeating the shards with fresh
            shuffles as needed; None makes an epoch one pass over this rank's shards.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        mapper: Callable[[dict], dict],
        val_urls: str | list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ):
        super().__init__()
        self.batches_per_epoch = batches_per_epoch
        self.train_urls, self.val_urls, self.mapper = train_urls, val_urls, mapper
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, urls, shuffle: bool, split: bool, drop_last: bool, mapper: Callable) -> DataLoader:
        urls = expand_urls(urls)
        rank, world = self._rank() if split else (0, 1)
        pipeline = ShardPipeline(
            urls, mapper, self.batch_size, rank, world, shuffle, self.shuffle_buffer, self.seed,
            drop_last=drop_last, batches_per_epoch=self.batches_per_epoch if split else None,
        )
        current_epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        workers = min(self.num_workers, max(1, len(urls) // world)) if self.num_workers else 0
        return _EpochLoader(pipeline, current_epoch, num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, self.shuffle, split=True, drop_last=True, mapper=self.mapper)

    def val_dataloader(self) -> DataLoader:
        if self.val_urls is None:
            return []
        # Every rank scores the whole held-out set, in order, so its metrics need no gather.
        # ... and sees it without the training augmentation.
        mapper = self.mapper.for_eval() if hasattr(self.mapper, "for_eval") else self.mapper
        return self._loader(self.val_urls, shuffle=False, split=False, drop_last=False, mapper=mapper)
