"""`kiln slurm -c CONFIG --nodes N --gpus-per-node G [--submit]`: a batch script from slurm/.

    srun tasks (default)  sbatch -> srun, one task per GPU; Lightning reads SLURM's variables
    --launcher torchrun   sbatch -> srun, one torchrun per node -> one process per GPU

Both ask for `--signal=USR1@<s>` and `--requeue`, and run `kiln fit ... --run_dir
<root>/$SLURM_JOB_ID --ckpt_path auto`: a requeued job keeps its job id, so it comes back to
its own run directory and resumes from the checkpoint saved on the signal.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from kiln.launch.run_name import default_run_dir
from kiln.launch.slurm import render, sbatch_word, template
from kiln.trainers.commands.args import CommandParser


def parse(argv: list[str]):
    parser = CommandParser(prog="kiln slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="config YAML (repeatable)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU processes)")
    parser.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU)")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00", help="time limit per job (HH:MM:SS)")
    parser.add_argument("--partition")
    parser.add_argument("--signal-s", type=int, default=120, help="seconds of warning before the time limit")
    parser.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    parser.add_argument("--port", type=int, default=29500, help="torchrun rendezvous port")
    parser.add_argument("--join-timeout", type=int, default=600, help="seconds to wait for every node to join")
    parser.add_argument("--run-root", help="run directories go to RUN_ROOT/<job id> (default runs/<family>-<config>)")
    parser.add_argument("--job-name")
    parser.add_argument("--out", help="where to write the script (default RUN_ROOT/job.sbatch)")
    parser.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    parser.add_argument("extra", nargs="*", help="more `kiln fit` arguments, after --")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {args.nodes}")
    args.tasks_per_node = args.tasks_per_node or args.gpus_per_node
    if args.tasks_per_node < 1:
        raise ValueError("--gpus-per-node 0 runs CPU processes: give --tasks-per-node")
    for config in args.config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config not found: {config}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    run_root = args.run_root or os.path.dirname(default_run_dir(args.config))
    values = {
        "command": "kiln slurm " + shlex.join(argv),
        "job_name": args.job_name or os.path.basename(run_root),
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "cpus_per_node": args.cpus_per_task * args.tasks_per_node,
        "gpu_line": f"#SBATCH --gpus-per-node={args.gpus_per_node}\n" if args.gpus_per_node else "",
        "accelerator_arg": "--trainer.accelerator cpu " if not args.gpus_per_node else "",
        "time": args.time,
        "signal_s": args.signal_s,
        "partition_line": f"#SBATCH --partition={sbatch_word(args.partition, '--partition')}" if args.partition else "",
        "workdir": os.getcwd(),
        "run_root": run_root,
        "kiln": shlex.join([shutil.which("kiln")] if shutil.which("kiln") else [sys.executable, "-m", "kiln.trainers.cli"]),
        "python": sys.executable,
        "config_args": " ".join(f"-c {shlex.quote(c)}" for c in args.config),
        "extra": shlex.join(args.extra),
        "port": args.port,
        "join_timeout": args.join_timeout,
    }
    script = render(template(args.launcher), values)
    out = Path(args.out or f"{run_root}/job.sbatch")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(run_root).mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    print(f"kiln slurm: wrote {out}")
    if args.submit:
        if not shutil.which("sbatch"):
            raise FileNotFoundError("sbatch not found: --submit needs a SLURM client on this machine")
        r = subprocess.run(["sbatch", "--parsable", str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch refused {out}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        job = r.stdout.strip().split(";")[0]
        print(f"kiln slurm: submitted job {job}; run directory {run_root}/{job}, log {run_root}/slurm-{job}.out")
