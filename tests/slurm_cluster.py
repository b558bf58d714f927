"""A real one-node SLURM cluster on localhost (slurm-wlm + munge from apt),
started once and reused: `ensure_cluster` is idempotent, and the daemons outlive the tests.

Tests use the `slurm_cluster` fixture (import it, or list this module in `pytest_plugins`); it
skips unless running as root with the Debian packages installed (`.ci/install`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest

# Fixed, so a cluster started by one session (or a crashed one) is found and reused by the next.
ROOT = Path("/var/tmp/kiln-slurm")
BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")

# Tuned for fast tests, not for a real site: jobs are killed 2 s after SIGTERM, finished jobs stay
# visible to `scontrol show job` for 5 min, the scheduler looks at pending jobs every second, and a
# requeued job is held (Reason=BeginTime) for cred_expire + 1 = 6 s instead of 121 s; to skip even
# that: `scontrol update jobid=ID StartTime=now`.
CONF = """\
ClusterName=kiln
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=2
CompleteWait=0
MinJobAge=300
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _run(*cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, check=check, capture_output=True, text=True, timeout=30)


def node_state(env: dict) -> str | None:
    """The node's state as `sinfo` reports it ("idle", "allocated", "down*", ...); None if the
    controller does not answer."""
    try:
        result = _run("sinfo", "-h", "-o", "%T", env=env, check=False)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _munge_up() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                      capture_output=True).returncode == 0


def _start_munge() -> None:
    if _munge_up():
        return
    if not Path("/etc/munge/munge.key").exists():
        _run("runuser", "-u", "munge", "--", "/usr/sbin/mungekey")
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")


def _stop(pid_file: Path) -> None:
    """Stops one of our daemons by its pid file (never by name: other clusters may be running)."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 15)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)


def ensure_cluster(workdir: Path = ROOT, timeout: float = 60) -> dict:
    """Starts munged, slurmctld and slurmd with a slurm.conf in `workdir` (state, spool, logs and
    pid files live there too), unless they already answer with that same configuration. Returns
    the environment variables a client (sbatch, srun, scontrol) needs."""
    workdir = Path(workdir)
    conf_path = workdir / "slurm.conf"
    conf = CONF.format(root=workdir)
    env = {"SLURM_CONF": str(conf_path)}
    client_env = {**os.environ, **env}

    current = conf_path.read_text() if conf_path.exists() else None
    if current == conf and node_state(client_env) is not None:
        _resume_if_down(client_env)
        return env

    # A different configuration (or daemons that do not answer): restart ours from clean state.
    _stop(workdir / "slurmd.pid")
    _stop(workdir / "slurmctld.pid")
    for sub in ("state", "spool"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
        (workdir / sub).mkdir(parents=True)
    conf_path.write_text(conf)

    _start_munge()
    _run("/usr/sbin/slurmctld", "-f", str(conf_path), env=client_env)
    # The machine's host name is not "localhost": -N names the node slurm.conf describes.
    _run("/usr/sbin/slurmd", "-f", str(conf_path), "-N", "localhost", env=client_env)

    deadline = time.monotonic() + timeout
    while (state := node_state(client_env)) != "idle":
        if time.monotonic() > deadline:
            logs = "".join(p.read_text()[-2000:] for p in workdir.glob("*.log"))
            raise RuntimeError(f"SLURM node not idle after {timeout} s (state {state!r}):\n{logs}")
        time.sleep(0.2)
    return env


def _resume_if_down(env: dict) -> None:
    """A node left down or drained (e.g. slurmd restarted under a running job) takes no jobs."""
    state = node_state(env) or ""
    if state.startswith(("down", "drain")):
        _run("scontrol", "update", "nodename=localhost", "state=resume", env=env, check=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict]:
    """The one-node cluster's client environment ({"SLURM_CONF": ...}); also set in os.environ
    for the session, so sbatch/srun/scontrol run by the tests find it."""
    if os.geteuid() != 0:
        pytest.skip("SLURM cluster needs root (slurmd runs jobs as their submitting user)")
    missing = [b for b in BINARIES if not Path(b).exists()]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing; run .ci/install)")
    env = ensure_cluster(ROOT)
    with patch.dict(os.environ, env):  # restored afterwards
        yield env
