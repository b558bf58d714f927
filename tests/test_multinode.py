"""Two nodes on one machine: two network namespaces joined by a veth pair, one `kiln launch`
(torchrun, c10d rendezvous) in each. The 2-node run must equal the 1-node 2-process run; a node
whose peer never comes stops with one line instead of hanging."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import torch

from conftest import REPO, kiln, small_clip_config
from tests.netns import two_nodes  # noqa: F401  (fixture)

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_node(two_nodes, emoji_shards, tmp_path):  # noqa: F811
    config = small_clip_config(tmp_path / "small.yaml", emoji_shards, steps=STEPS, every=1000)
    fit = ["fit", "-c", "configs/clip/tiny.yaml", "-c", "configs/trainer/ddp.yaml", "-c", str(config)]
    # One intra-op thread per process on both sides (torch's float sums split by thread count).
    threads = {"OMP_NUM_THREADS": "1"}
    one = kiln(*fit, "--run_dir", str(tmp_path / "one-node"), env=threads)
    assert one.returncode == 0, one.stderr[-3000:]

    endpoint = f"{two_nodes.nodes[0].addr}:{_free_port()}"
    run = tmp_path / "two-nodes"
    procs = [
        two_nodes.popen(i, [shutil.which("kiln"), "launch", "--nnodes", "2", "--nproc-per-node", "1",
                            "--rdzv-endpoint", endpoint, "--node-addr", node.addr, "--join-timeout", "120", "--",
                            *fit, "--trainer.num_nodes", "2", "--trainer.devices", "1", "--run_dir", str(run)],
                        env={**os.environ, **threads}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, node in enumerate(two_nodes.nodes)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)

    a = torch.load(tmp_path / "one-node" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    # Same ranks, same samples, same two-way all-reduce: the same weights, bit for bit.
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_missing_peer_times_out_with_one_line(tmp_path):
    start, port = time.monotonic(), _free_port()
    r = kiln("launch", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--join-timeout", "5",
             "--", "fit", "-c", "configs/clip/tiny.yaml", timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"kiln launch: error: the rendezvous at 127.0.0.1:{port} did not gather 2 nodes "
        "within 5 s (--join-timeout): start every node, or check the endpoint")
    assert time.monotonic() - start < 60
