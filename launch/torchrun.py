"""What `kiln launch` (trainers/commands/launch.py) needs to know about this node's network."""
from __future__ import annotations

import socket


def interface_of(addr: str) -> str | None:
    """The network interface that holds `addr` (gloo must bind to it, not to the loopback)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == addr for a in addrs):
            return name
    return None
