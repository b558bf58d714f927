"""`kiln launch`: torchrun with the settings multi-node CPU and GPU jobs need, then `kiln <command>`.

    kiln launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT [--node-addr ADDR] -- fit -c ...

Every node runs the same line (its own --node-addr). The node whose address is the rendezvous
host hosts the c10d store; each node advertises its own address and binds gloo to the interface
that carries it. A node that waits longer than --join-timeout for the others stops with one line
naming the endpoint, instead of hanging.
"""
from __future__ import annotations

import os
import sys

from kiln.launch.torchrun import interface_of
from kiln.trainers.commands.args import CommandParser


def parse(argv: list[str]):
    parser = CommandParser(prog="kiln launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", default="127.0.0.1:29400", help="HOST:PORT of the first node")
    parser.add_argument("--rdzv-id", default=os.environ.get("SLURM_JOB_ID", "kiln"), help="job id all nodes share")
    parser.add_argument("--node-addr", help="this node's address (default: the rendezvous host on one node)")
    parser.add_argument("--join-timeout", type=int, default=600, help="seconds to wait for every node")
    parser.add_argument("command", nargs="+", help="the kiln command, e.g. fit -c CONFIG")
    args = parser.parse_args(argv)
    if ":" not in args.rdzv_endpoint:
        raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {args.rdzv_endpoint!r}")
    return args


def main(argv: list[str]) -> None:
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import main as torchrun

    args = parse(argv)
    host = args.rdzv_endpoint.rsplit(":", 1)[0]
    addr = args.node_addr or host
    ifname = interface_of(addr)
    if ifname is None:
        raise ValueError(f"no network interface here has the address {addr} (--node-addr)")
    os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torchrun_args = [
        f"--nnodes={args.nnodes}", f"--nproc_per_node={args.nproc_per_node}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint={args.rdzv_endpoint}", f"--rdzv_id={args.rdzv_id}", f"--local_addr={addr}",
        f"--rdzv_conf=is_host={int(addr == host)},join_timeout={args.join_timeout}", "--max_restarts=0",
        "-m", "kiln.trainers.cli", *args.command,
    ]
    try:
        torchrun(torchrun_args)
    except RendezvousTimeoutError:
        raise TimeoutError(f"the rendezvous at {args.rdzv_endpoint} did not gather {args.nnodes} nodes within "
                           f"{args.join_timeout} s (--join-timeout): start every node, or check the endpoint") from None
    except SystemExit as e:  # a worker failed; torchrun printed which one
        if e.code:
            raise RuntimeError(f"a worker failed (exit {e.code}); its error is above") from None


if __name__ == "__main__":
    main(sys.argv[1:])
