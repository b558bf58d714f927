"""Shards on a real S3 API (moto_server on loopback): `kiln data` writes them, `kiln fit` trains
from them on 2 ranks with 2 DataLoader workers each, and no credential lands in the run."""
from __future__ import annotations

import os
from pathlib import Path

import s3fs

from tests.conftest import kiln, read_metrics

OVERRIDE = """\
data:
  init_args:
    root: {root}
    build_size: 16
    batch_size: 16
    num_workers: 2
    batches_per_epoch: null
trainer: {{devices: 2, strategy: ddp, max_steps: 6, val_check_interval: 3, limit_val_batches: 2,
           log_every_n_steps: 1}}
"""


def test_kiln_data_writes_to_s3_and_fit_streams_from_it(s3_bucket, tmp_path):
    root = f"{s3_bucket}/emoji"
    r = kiln("data", "emoji", "--out", root, "--size", "16", "--limit", "64", "--shard-size", "8", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "64 items, 24 shards" in r.stdout
    s3 = s3fs.S3FileSystem()
    assert len(s3.glob(f"{root}/noto/noto-*.tar")) == 8 and s3.exists(f"{root}/manifest.json")

    override = tmp_path / "s3.yaml"
    override.write_text(OVERRIDE.format(root=root))
    run = tmp_path / "run"
    r = kiln("fit", "-c", "configs/clip/tiny.yaml", "-c", str(override), "--run_dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]

    rows = read_metrics(run)
    assert len([row for row in rows if "train/loss" in row]) == 6
    assert any("val/zero_shot/top1" in row for row in rows)  # held-out shards from S3 too
    data = [row for row in rows if "data/shards_read" in row]
    # 16 training shards of 8 over 2 ranks x 2 workers: 4 batches of 16 per rank per epoch,
    # so 6 steps read every shard once and start the second epoch.
    assert data[-1]["data/skipped"] == 0 and data[-1]["data/shards_read"] >= 16

    # Credentials come from the environment and stay there.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for path in Path(run).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
