"""What the benchmark scripts share."""

from __future__ import annotations

import importlib
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import trio
from cffi import FFI

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"


def compile_driver(module: str, source: str, declarations: str) -> ModuleType:
    """A C half of a benchmark (``source``, next to this file) compiled with
    cffi in API mode into .cache/bench, and imported as ``module``."""
    builder = FFI()
    builder.cdef(declarations)
    code = (Path(__file__).parent / source).read_text()
    builder.set_source(module, code, extra_compile_args=["-O2"])
    CACHE.mkdir(parents=True, exist_ok=True)
    builder.compile(tmpdir=str(CACHE), verbose=False)
    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    return importlib.import_module(module)


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
