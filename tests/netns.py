"""Two "nodes" on one machine: two network namespaces joined by a veth pair.
Needs root and `ip netns`; the fixture skips without them.

    from tests.netns import two_nodes  # noqa: F401  (makes the fixture visible)

    def test_x(two_nodes):
        procs = [two_nodes.popen(i, two_nodes.torchrun_argv(i, 2, 1, 29500, ["train.py"]))
                 for i in range(2)]
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from typing import Iterator

import pytest


@dataclass(frozen=True)
class Node:
    netns: str  # namespace name
    addr: str  # its address on the veth pair
    ifname: str  # its end of the veth pair


class TwoNodes:
    def __init__(self, nodes: list[Node]):
        self.nodes = nodes

    def popen(self, node_index: int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Runs argv inside the node's namespace, with gloo bound to its veth."""
        node = self.nodes[node_index]
        env = {**(os.environ if env is None else env), "GLOO_SOCKET_IFNAME": node.ifname}
        return subprocess.Popen(["ip", "netns", "exec", node.netns, *argv], env=env, **kw)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_node_namespaces() -> Iterator[TwoNodes]:
    """Creates kiln-n0-<pid> and kiln-n1-<pid> at 10.200.0.1/24 and 10.200.0.2/24; always removes
    them (which also removes the veth pair)."""
    pid = os.getpid()
    nodes = [Node(f"kiln-n{i}-{pid}", f"10.200.0.{i + 1}", f"veth{i}") for i in range(2)]
    made: list[str] = []
    try:
        for node in nodes:
            _ip("netns", "add", node.netns)
            made.append(node.netns)
        a, b = nodes
        _ip("link", "add", a.ifname, "netns", a.netns, "type", "veth",
            "peer", "name", b.ifname, "netns", b.netns)
        for node in nodes:
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
            _ip("-n", node.netns, "link", "set", node.ifname, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
        yield TwoNodes(nodes)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[TwoNodes]:
    if os.geteuid() != 0:
        pytest.skip("two-node tests need root to create network namespaces")
    setup = two_node_namespaces()
    try:
        nodes = setup.__enter__()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"`ip netns` unavailable: {getattr(e, 'stderr', None) or e}")
    try:
        yield nodes
    finally:
        setup.__exit__(None, None, None)
