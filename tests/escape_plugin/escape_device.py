"""A hostile device, for the jail's tests only: it is found only when this
directory is on PYTHONPATH, never installed.

BAR0: write an attempt's number to 0x00 (with a host pid at 0x04 first for
``kill`` and ``ptrace``); 0x08 then reads 0 if the attempt succeeded or the
errno it failed with. An attempt the seccomp filter kills never answers.
"""

from __future__ import annotations

import ctypes
import os
import socket

from vfiouserd.devices.pci import Bar, PciDevice

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321
PTRACE_ATTACH = 16
CLONE_NEWUSER = 0x10000000
BPF_PROG_LOAD = 5


def _libc(result: int) -> None:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fork() -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)


def _connect_inet() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.connect(("127.0.0.1", 22))


ATTEMPTS = {
    1: lambda pid: os.execv("/bin/sh", ["sh", "-c", "true"]),
    2: lambda pid: os.close(os.open("/etc/passwd", os.O_RDONLY)),
    3: lambda pid: _connect_inet(),
    4: lambda pid: _libc(libc.ptrace(PTRACE_ATTACH, pid, None, None)),
    5: lambda pid: _libc(libc.mount(b"none", b"/", b"tmpfs", 0, None)),
    6: lambda pid: _libc(libc.syscall(SYS_BPF, BPF_PROG_LOAD, None, 0)),
    7: lambda pid: _libc(libc.unshare(CLONE_NEWUSER)),
    8: lambda pid: _fork(),
    9: lambda pid: os.kill(pid, 15),
}


class EscapeDevice(PciDevice):
    name = "escape"
    description = "test only: tries to leave the jail when asked"
    vendor_id = 0x1234
    device_id = 0xBAD0

    def __init__(self) -> None:
        super().__init__({0: Bar(4096)})
        self.pid = self.result = 0

    async def read_register(self, bar: int, offset: int, size: int) -> int:
        return self.result if offset == 0x08 else 0

    async def write_register(self, bar: int, offset: int, size: int, value: int) -> None:
        if offset == 0x04:
            self.pid = value
        elif offset == 0x00 and value in ATTEMPTS:
            try:
                ATTEMPTS[value](self.pid)
                self.result = 0
            except OSError as exc:
                self.result = exc.errno or 1
