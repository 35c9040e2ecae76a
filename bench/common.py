"""What the benchmark scripts share."""

from __future__ import annotations

import socket

import trio


async def connect(path: str) -> trio.socket.SocketType:
    """A UNIX stream connection to ``path``, once something listens there."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with trio.fail_after(20):
        while True:
            try:
                await sock.connect(path)
                return sock
            except OSError:
                await trio.sleep(0.02)
