"""Shared fixtures: a small emoji shard set built once per session, a private cache, and
process-wide state reset between tests (default dtype, process groups, environment variables)."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import pytest

from kiln.launch import host  # noqa: E402

# As `kiln` itself does (launch/host.py): idle OpenMP threads sleep instead of spinning, so the
# test process, its kiln subprocesses and their data workers can share 2 cores; freed activations
# stay in the process instead of being faulted in again every step.
host.configure()
# One intra-op thread in every test process and the kiln processes it starts (`--threads`'s default
# comes from here): the suite's models are tiny and its processes share 2 cores, so a second
# thread costs more in waking up than it saves (the four in-suite learning tests: 287 -> 240 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after the OpenMP settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_state():
    dtype = torch.get_default_dtype()
    # The environment too: Lightning's in-process DDP/FSDP setup exports MASTER_ADDR/MASTER_PORT,
    # which every later multi-process `kiln` run (and SLURM job) would inherit and all bind the
    # same port, colliding when test workers run side by side (`pytest -n 2`)
    with patch.dict(os.environ):
        yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test (tiny tensors: on busy shared cores more threads cost
    more than they save); modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """Run the `kiln` console script the way a user does.

    A run still going after `timeout` fails the test with where every one of its processes
    (ranks, data workers) was: each gets SIGABRT, and Python's fault handler prints its threads'
    stacks to stderr before the whole process group is killed (nothing of it outlives the test)."""
    command = [shutil.which("kiln") or "kiln", *args]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    env.setdefault("MASTER_PORT", _master_port())
    with subprocess.Popen(command, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in _group(p.pid):  # one at a time, so that their stacks don't interleave
                _signal(os.kill, pid, signal.SIGABRT)
                time.sleep(1)
            try:
                stdout, stderr = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                _signal(os.killpg, p.pid, signal.SIGKILL)
                stdout, stderr = p.communicate()
            _signal(os.killpg, p.pid, signal.SIGKILL)
            stacks = "\n".join(line for line in stderr.splitlines() if "(total: " not in line)  # not the extension lists
            pytest.fail(f"`kiln {' '.join(args)}` ran past {timeout:.0f} s; its processes' stacks:\n{stacks[-20000:]}")
    return subprocess.CompletedProcess(command, p.returncode, stdout, stderr)


_PORTS = itertools.count()


def _master_port() -> str:
    """A MASTER_PORT for a multi-process run of this test worker's own: 2,000 ports a worker, below
    Linux's ephemeral range (32768-60999). Left to itself Lightning binds port 0, closes it and
    starts the ranks, and rank 0's store binds it only later: a run of the other test worker that
    picked the same port in between (or is handed it as an ephemeral one) joins the wrong store and
    waits there until the timeout, as parallel distributed test suites have seen (pytorch/pytorch
    #195994). A run that needs no port ignores it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return str(20_000 + 2_000 * (int(worker) % 6) + next(_PORTS) % 2_000)


def _group(pgid: int) -> list[int]:
    """The processes of a process group, oldest first."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            pids.append((int(fields[19]), int(stat.parent.name)))  # (start time, pid)
    return [pid for _, pid in sorted(pids)]


def _signal(kill: Callable[[int, int], None], target: int, signum: int) -> None:
    """`os.kill` or `os.killpg`, for a process or group that may be gone already."""
    with contextlib.suppress(ProcessLookupError):
        kill(target, signum)


def read_metrics(run_dir: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


# The EMA callback every small multi-process run carries (decay low enough to move in 6 steps).
EMA_CALLBACK = "    - class_path: kiln.trainers.callbacks.ema.EMA\n      init_args: {decay: 0.9}\n"


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


def kill_callback(step: int) -> str:
    """A trainer callback entry that SIGKILLs the run at the start of step `step` + 1."""
    return f"    - class_path: tests.killer.KillAt\n      init_args: {{step: {step}}}\n"


def kiln_eval(ckpt: str, out: Path, *args: str, timeout: float = 3600) -> dict:
    """`kiln eval` of `ckpt` with `args`; the scores it wrote to `out`."""
    r = kiln("eval", "--ckpt", ckpt, "--out", str(out), *args, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(Path(out).read_text())


# The digits (scikit-learn's 8x8 handwritten digits: 1,497 for training, 300 held out) and the
# config blocks that train on them.
def write_digits(tmp_path_factory, **options) -> Path:
    """The digits shards in a fresh temporary folder; `options` go to `write_digits_shards`."""
    from kiln.datamodules.builders import write_digits_shards

    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(str(root), progress=False, **options)
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The digits at 8 px, 128 samples a shard, written once per session. A module whose tests
    depend on another shard layout defines its own `digits` with `write_digits`."""
    return write_digits(tmp_path_factory, shard_size=128)


def digits_data(digits: Path | str, *, image_size: int, batch_size: int, mapper: str = "ImageClass",
                val: bool = True, shuffle: bool = True, num_workers: int = 0) -> str:
    """A `data:` block: the WebDataModule on the digits shards at `digits`, read through
    kiln.datamodules.mappers.`mapper` at `image_size` (ImageClass: with the 10 classes), the held-out
    split as validation data unless `val` is false."""
    val_urls = f"    val_urls: {digits}/test/*.tar\n" if val else ""
    classes = ", num_classes: 10" if mapper == "ImageClass" else ""
    no_shuffle = "" if shuffle else "    shuffle: false\n"
    return f"""\
data:
  class_path: kiln.datamodules.webdataset.WebDataModule
  init_args:
    train_urls: {digits}/train/*.tar
{val_urls}\
    mapper: {{class_path: kiln.datamodules.mappers.{mapper}, init_args: {{image_size: {image_size}{classes}}}}}
    batch_size: {batch_size}
{no_shuffle}\
    num_workers: {num_workers}
"""


def tiny_on_digits(digits: Path | str, *, batch_size: int, steps: int) -> str:
    """Layered over a family's configs/<family>/tiny.yaml: the digits at 16 px as its data, `steps`
    steps, W&B off."""
    return digits_data(digits, image_size=16, batch_size=batch_size) + f"""\
wandb:
  mode: disabled
trainer:
  max_steps: {steps}
  enable_progress_bar: false
"""


def perturbed(module):
    """A diffusion family's module in eval mode with its network's weights nudged (seed 0): ADM's
    zero-initialised output layers make an untrained U-Net ignore its conditioning."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def learn_on_digits(model: str, digits: Path | str, *, image_size: int, batch_size: int, steps: int,
                    ema_decay: float, mapper: str = "ImageClass") -> str:
    """A whole config: `model` (its `model:` block) trained on the digits for `steps` steps on the
    CPU with an EMA of its weights at `ema_decay`; no validation, no sample grids during the run, W&B off."""
    return model + digits_data(digits, image_size=image_size, batch_size=batch_size, mapper=mapper) + f"""\
trainer:
  accelerator: cpu
  max_steps: {steps}
  limit_val_batches: 0
  enable_progress_bar: false
  callbacks:
    - class_path: kiln.trainers.callbacks.ema.EMA
      init_args: {{decay: {ema_decay}}}
wandb:
  mode: disabled
samples:
  every_n_train_steps: 100000
"""


def ema_and_checkpoints(every: int, kill_at: int | None = None) -> str:
    """The end of a `trainer:` block and what follows it: the trainer's callbacks (EMA_CALLBACK, and
    a KillAt at step `kill_at` when given), a checkpoint every `every` steps, no sample grids, W&B off."""
    kill = kill_callback(kill_at) if kill_at is not None else ""
    return f"""\
  callbacks:
{EMA_CALLBACK}{kill}checkpoint:
  every_n_train_steps: {every}
samples:
  every_n_train_steps: 100000
wandb:
  mode: disabled
"""
