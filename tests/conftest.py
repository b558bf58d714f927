"""Shared fixtures: a small emoji shard set built once per session, a private cache, and
process-wide state reset between tests (default dtype, process groups)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from unittest.mock import patch

import pytest

# As `kiln` itself does (trainers/cli.py): idle OpenMP threads sleep instead of spinning, so the
# test process, its kiln subprocesses and their data workers can share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - after the OpenMP setting

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never touch the user's ~/.cache/kiln or W&B settings."""
    cache = tmp_path_factory.mktemp("kiln-cache")
    env = {"KILN_CACHE": str(cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    with patch.dict(os.environ, env):  # restored afterwards
        yield cache


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory) -> str:
    """The first 320 emoji in all three styles at 32 px, 16 samples per shard."""
    from kiln.datamodules.emoji import write_emoji_shards

    root = tmp_path_factory.mktemp("emoji") / "shards"
    write_emoji_shards(str(root), size=32, shard_size=16, limit=320, progress=False)
    return str(root)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback; AWS_* point every client (s3fs, boto3, subprocesses) at it."""
    from tests.servers import MotoServer

    server = MotoServer()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "kiln-test-secret-4d1f",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint}
    with patch.dict(os.environ, env):  # restored afterwards
        yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket per test: s3://<name>."""
    import s3fs

    name = "kiln-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


def kiln(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `kiln` console script the way a user does."""
    return subprocess.run(
        [shutil.which("kiln") or "kiln", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def read_metrics(run_dir: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


# The EMA callback every small multi-process run carries (decay low enough to move in 6 steps).
EMA_CALLBACK = "    - class_path: kiln.trainers.ema.EMA\n      init_args: {decay: 0.9}\n"


def small_clip_config(path: Path, emoji_shards: str, steps: int, every: int, clip: float = 0.05) -> Path:
    """A CLIP small enough for multi-process tests (65k parameters, 2 ranks x 16 samples a step),
    layered over configs/clip/tiny.yaml; gradient clipping on, so strategies must clip alike, and
    an EMA of the weights, so strategies must average alike."""
    path.write_text(f"""\
model:
  init_args:
    embed_dim: 32
    vision: {{image_size: 16, patch_size: 4, width: 32, layers: 2, heads: 2}}
    text: {{context_length: 64, width: 32, layers: 2, heads: 2, length_buckets: 1}}
    warmup_steps: 2
data:
  init_args:
    root: {emoji_shards}
    build_size: 32
    batch_size: 16  # one whole shard per rank and step, in order: 1 rank x 32 sees the same batches
    shuffle: false
    num_workers: 1
    mapper:
      class_path: kiln.datamodules.mappers.ImageText
      init_args: {{image_size: 16, crop_scale: null, color_jitter: 0.0}}  # no per-sample draws
trainer:
  accelerator: cpu
  devices: 2
  max_steps: {steps}
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  gradient_clip_val: {clip}
  callbacks:
{EMA_CALLBACK}checkpoint:
  every_n_train_steps: {every}
wandb:
  mode: disabled
""")
    return path
