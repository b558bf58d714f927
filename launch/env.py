"""The one place kiln reads cluster variables (SLURM, torchrun). Everything else asks here.

Lightning picks the matching ClusterEnvironment itself (SLURMEnvironment under srun,
TorchElasticEnvironment under torchrun, a local launcher under plain python); kiln only needs
to know which job it is part of and whether it is rank 0 before Lightning has started.
"""
from __future__ import annotations

import os


def job_id() -> str | None:
    """The id every process of this job agrees on: SLURM's job id (kept across requeues) or
    torchrun's rendezvous run id; None under plain python."""
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return value
    return None


def global_rank() -> int:
    """This process's rank before the process group exists (0 under plain python, and in the
    parent of Lightning's own subprocess launcher)."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def restart_count() -> int:
    """How often SLURM requeued this job (0 on its first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


def in_slurm_job() -> bool:
    """Running as a task of a SLURM batch job (not an interactive allocation)."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ and \
        os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requeue() -> None:
    """Put this SLURM job back in the queue: it is stopped now and started again later, with the
    same job id (and so the same run directory)."""
    import subprocess

    job = os.environ["SLURM_JOB_ID"]
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
