"""What the benchmark scripts share."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

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


def stop(process: subprocess.Popen[bytes], name: str, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``: a back
    end that hangs at exit must not hang the benchmark (it is reported)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"warning: {name} did not exit {timeout:g} s after SIGTERM: killed", file=sys.stderr)
        process.kill()
        process.wait()
