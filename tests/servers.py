"""Real servers for tests: an S3 API (moto_server on loopback) and a TCP proxy that cuts
connections, to prove that reads survive a flaky object store."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`moto_server` on 127.0.0.1: a real HTTP S3 API, in memory."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.process = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class FlakyProxy:
    """Forwards 127.0.0.1:port to `target_port`, cutting a seeded random half of the connections
    once they have sent `cut_after` bytes back to the client (mid-response for large objects).
    moto answers one request per connection, so a retried request may get through next time."""

    def __init__(self, target_port: int, cut_after: int, cut_fraction: float = 0.5, seed: int = 0):
        self.target_port, self.cut_after, self.cut_fraction = target_port, cut_after, cut_fraction
        self.rng, self.connections, self.cuts = random.Random(seed), 0, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += 1
            budget = self.cut_after if self.rng.random() < self.cut_fraction else None
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, budget), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        try:
            while data := src.recv(65536):
                if budget is not None and len(data) >= budget:
                    dst.sendall(data[:budget])
                    self.cuts += 1
                    break
                dst.sendall(data)
                if budget is not None:
                    budget -= len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                # shutdown, not just close: it also wakes the other direction's blocked recv.
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def stop(self) -> None:
        self.listener.close()
