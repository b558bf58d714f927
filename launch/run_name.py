"""Where a run goes when no --run_dir is given: shared by `kiln fit` and `kiln slurm`."""
from __future__ import annotations

import os
import time

from kiln.launch.env import job_id


def default_run_dir(config_paths: list[str]) -> str:
    """runs/<family>-<config>/<id>: the id is the cluster's job id when there is one, so every
    rank of a torchrun or SLURM job agrees on it, else a timestamp."""
    name = "run"
    if config_paths:
        p = os.path.abspath(str(config_paths[0]))
        name = f"{os.path.basename(os.path.dirname(p))}-{os.path.splitext(os.path.basename(p))[0]}"
    run_id = job_id() or time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", name, run_id)
