"""`kiln slurm --submit` on a real one-node SLURM cluster (slurm-wlm + munge on localhost): a
2-task job runs to completion, and a job sent SIGUSR1 mid-run saves, requeues itself, comes back
under the same job id and run directory, and ends with the same weights as the uninterrupted job."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import torch

from conftest import REPO, kiln, read_metrics, small_clip_config
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

STEPS = 30


def _job_state(job: str) -> tuple[str, int]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "UNKNOWN"), int(restarts.group(1)) if restarts else 0


def _wait(job: str, until, timeout: float = 300) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job)
        if until(*state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {_job_state(job)} after {timeout} s")


def _submit(tmp_path: Path, config: Path, name: str, *extra: str) -> tuple[str, Path]:
    r = kiln("slurm", "-c", "configs/clip/tiny.yaml", "-c", str(config), "--nodes", "1", "--gpus-per-node", "0",
             "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:15:00", "--run-root",
             str(tmp_path / name), "--submit", *(["--", *extra] if extra else []),
             env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    return job, tmp_path / name / job


def _finished(state: str, restarts: int) -> bool:
    return state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def test_submitted_job_survives_usr1_with_requeue(slurm_cluster, emoji_shards, tmp_path):  # noqa: F811
    config = small_clip_config(tmp_path / "small.yaml", emoji_shards, steps=STEPS, every=1000)
    plain, plain_run = _submit(tmp_path, config, "plain")
    state, restarts = _wait(plain, _finished)
    log = (tmp_path / "plain" / f"slurm-{plain}.out").read_text()
    assert (state, restarts) == ("COMPLETED", 0), log[-3000:]
    script = (tmp_path / "plain" / "job.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script

    job, run = _submit(tmp_path, config, "preempted", "--wandb.mode", "offline")
    # Mid-run: once rank 0 has logged a few steps, SLURM delivers SIGUSR1 to both tasks.
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 4:
        assert time.monotonic() < deadline and not _finished(*_job_state(job)), "job never got going"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state, restarts = _wait(job, lambda s, n: n >= 1 and _finished(s, n))
    log = (tmp_path / "preempted" / f"slurm-{job}.out").read_text()
    assert (state, restarts) == ("COMPLETED", 1), log[-3000:]
    assert "restart 1" in log and "SIGUSR1 received: saving at step" in log

    saved_at = int(re.search(r"saving at step (\d+)", log).group(1))
    assert 0 < saved_at < STEPS  # it really stopped mid-run
    a = torch.load(plain_run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # Both attempts logged into one W&B run.
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb-id").read_text().strip()
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs


def test_torchrun_launcher_job_requeues_on_usr1(slurm_cluster, emoji_shards, tmp_path):  # noqa: F811
    """sbatch -> srun -> torchrun: SIGUSR1 reaches the batch shell (`--signal=B:USR1`), which
    passes it to the workers; they save, requeue, and the job finishes from the checkpoint."""
    config = small_clip_config(tmp_path / "small.yaml", emoji_shards, steps=STEPS, every=1000)
    r = kiln("slurm", "-c", "configs/clip/tiny.yaml", "-c", str(config), "--nodes", "1", "--gpus-per-node", "0",
             "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:15:00", "--launcher", "torchrun",
             "--port", "29777", "--run-root", str(tmp_path / "tr"), "--submit", env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    run = tmp_path / "tr" / job
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 4:
        assert time.monotonic() < deadline and not _finished(*_job_state(job)), "job never got going"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state, restarts = _wait(job, lambda s, n: n >= 1 and _finished(s, n))
    log = (tmp_path / "tr" / f"slurm-{job}.out").read_text()
    assert (state, restarts) == ("COMPLETED", 1), log[-3000:]
    assert "SIGUSR1 received: saving at step" in log
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
