"""Bad data is skipped and counted by reason, or fails fast in strict mode; reads from a flaky
object store are retried."""
from __future__ import annotations

import io
import os
import warnings

import lightning as L
import pytest
from PIL import Image

from kiln.datamodules.errors import DataError
from kiln.datamodules.mappers import ImageText
from kiln.datamodules.shards import write_shards
from kiln.datamodules.webdataset import DataMetrics, ShardPipeline, WebDataModule, expand_urls
from kiln.trainers.callbacks.run_dir import JsonlLogger
from tests.conftest import read_metrics
from tests.key_recorder import KeyRecorder


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


def _samples(shard: int, n: int = 8):
    for i in range(n):
        yield {"__key__": f"s{shard}-{i}", "png": _png(i * 20), "txt": f"grey {i}".encode()}


@pytest.fixture
def damaged(tmp_path) -> tuple[list[str], int]:
    """Five shards of 8: one sample that is not a PNG, one without a caption, a truncated
    shard, a shard deleted after listing, and a clean one. Returns the URLs and the samples
    that are intact."""
    splits = {f"s{k}": _samples(k) for k in range(5)}
    broken = list(_samples(0))
    broken[3]["png"] = b"\x89PNG but not really"
    del broken[5]["txt"]
    splits["s0"] = broken
    write_shards(str(tmp_path), "test", splits, shard_size=8, progress=False)
    urls = [str(tmp_path / f"s{k}" / f"s{k}-000000.tar") for k in range(5)]
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2 + 100])  # cut mid-member
    os.remove(urls[2])
    return urls, 6 + 8 + 8  # shard 0 loses two samples, shards 3 and 4 are whole


def _run(urls, strict=False):
    pipeline = ShardPipeline({"": urls}, ImageText(8), batch_size=2, shuffle=False, strict=strict, drop_last=False)
    keys, skipped = [], {}
    for batch in pipeline:
        keys += batch["key"]
        for reason, n in batch["_kiln_data"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return keys, skipped


def test_bad_samples_and_shards_are_skipped_counted_and_warned_once(damaged):
    urls, intact = damaged
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys, skipped = _run(urls)
    assert skipped == {"decode": 1, "missing_field": 1, "corrupt_shard": 1, "unreadable_shard": 1}
    assert {"s0-3", "s0-5"}.isdisjoint(keys) and len(keys) == len(set(keys))
    assert intact < len(keys) < intact + 8  # the truncated shard gave the samples before the cut
    messages = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(messages) == 3  # once per damaged shard, although shard 0 has two bad samples
    assert any("decode in" in m and "sample s0-3" in m for m in messages)


def test_strict_mode_fails_fast_naming_the_url_and_key(damaged):
    urls, _ = damaged
    with pytest.raises(DataError, match=r"decode in .*s0-000000\.tar sample s0-3"):
        _run(urls, strict=True)


def test_skips_reach_the_metrics(damaged, tmp_path):
    urls, _ = damaged
    urls = [u for u in urls if os.path.exists(u)]  # a missing shard is caught at listing here
    dm = WebDataModule(urls, ImageText(8), batch_size=2, num_workers=0, batches_per_epoch=6, shuffle=False)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=JsonlLogger(str(tmp_path)), log_every_n_steps=1,
                        callbacks=[DataMetrics()], enable_checkpointing=False, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(KeyRecorder(str(tmp_path)), dm)
    last = [row for row in read_metrics(tmp_path) if "data/skipped" in row][-1]
    assert last["data/skipped"] == 3 and last["data/skipped/decode"] == 1 and last["data/shards_read"] == 3


def test_reads_survive_a_proxy_that_cuts_connections(s3_server, s3_bucket, emoji_shards, monkeypatch):
    import s3fs

    from tests.servers import FlakyProxy

    s3 = s3fs.S3FileSystem()
    s3.put(f"{emoji_shards}/noto/", f"{s3_bucket}/noto/", recursive=True)
    shard_bytes = os.path.getsize(f"{emoji_shards}/noto/noto-000000.tar")
    # Every other connection dies half-way through a shard.
    proxy = FlakyProxy(s3_server.port, cut_after=shard_bytes // 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        urls = expand_urls(f"{s3_bucket}/noto/noto-*.tar")
        keys, skipped = _run(urls)
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    print(f"the proxy cut {proxy.cuts} of {proxy.connections} connections")
    assert proxy.cuts >= len(urls) // 3
    assert skipped == {} and len(keys) == len(set(keys)) == 320
