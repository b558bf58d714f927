"""`kiln slurm --submit` on a real one-node SLURM cluster (slurm-wlm + munge on localhost): a
2-task job runs to completion, and a job sent SIGUSR1 mid-run saves, requeues itself, comes back
under the same job id and run directory, and ends with the same weights as the uninterrupted job.
The script quotes what it is given: paths and a job name with spaces run where they say, and a
newline can add no line to the script."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
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


def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def _header(script: str) -> list[str]:
    """The lines sbatch reads directives from: everything before the first line of script."""
    lines = script.splitlines()
    end = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    return lines[:end]


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_paths_with_spaces_and_a_newline_argument_reach_the_command_intact(tmp_path, launcher):
    """The script's own command line, run by bash with `srun` standing in for SLURM's (it records
    its arguments): a run root with a space (and a `#`) stays one argument, and an argument with a newline in it neither breaks the script nor adds a line to its header."""
    root = tmp_path / "run root #1"
    r = kiln("slurm", "-c", "configs/clip/tiny.yaml", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
             "--launcher", launcher, "--run-root", str(root), "--", "--wandb.name", "two\nlines",
             env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    script = (root / "job.sbatch").read_text()
    assert subprocess.run(["bash", "-n", root / "job.sbatch"], capture_output=True).returncode == 0
    header = _header(script)
    assert all(line.startswith("#") or not line.strip() for line in header) and sum(ln.startswith("#SBATCH") for ln in header) >= 8

    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "srun", f'printf "%s\\0" "$@" > {shlex.quote(str(tmp_path / "argv"))}')
    _stub(bin_dir, "scontrol", "echo localhost")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost"}
    ran = subprocess.run(["bash", root / "job.sbatch"], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv[argv.index("--run_dir") + 1] == f"{root}/77"
    assert argv[argv.index("--wandb.name") + 1] == "two\nlines"


def test_newline_in_job_name_is_refused(tmp_path):
    root = tmp_path / "root"
    r = kiln("slurm", "-c", "configs/clip/tiny.yaml", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
             "--run-root", str(root), "--job-name", "kiln\n#SBATCH --nodes=64", env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and not (root / "job.sbatch").exists()
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kiln slurm: error: --job-name"), r.stderr


def test_spaces_in_run_root_work_dir_and_job_name_submit_and_run(slurm_cluster, emoji_shards, tmp_path):  # noqa: F811
    """A real job whose run root, working directory and name all hold spaces (and a `#`, which
    sbatch reads as a comment unless quoted, and a `%`, which it reads in the log's name as a
    replacement symbol) runs to the end where it was asked to."""
    config = small_clip_config(tmp_path / "small.yaml", emoji_shards, steps=2, every=1000)
    work, root = tmp_path / "work dir", tmp_path / "run root #1 (%j)"
    work.mkdir()
    r = kiln("slurm", "-c", str(REPO / "configs/clip/tiny.yaml"), "-c", str(config), "--nodes", "1",
             "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "00:05:00",
             "--run-root", str(root), "--job-name", "kiln run #1", "--submit", cwd=work,
             env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobName=kiln run #1\n" in shown and f"WorkDir={work}\n" in shown, shown
    state, _ = _wait(job, _finished)
    log = root / f"slurm-{job}.out"
    assert log.exists() and state == "COMPLETED", log.read_text()[-3000:] if log.exists() else shown
    assert torch.load(root / job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
