"""Shared fixtures: a small emoji shard set built once per session, a private cache, and
process-wide state reset between tests (default dtype, process groups)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

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
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
