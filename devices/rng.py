"""virtio-rng: fills the driver's buffers with random bytes (virtio 1.2 5.4)."""

from __future__ import annotations

import argparse
import os
from typing import Self

from vfiouserd.devices.virtio import DeviceId, Request, VirtioDevice


class VirtioRng(VirtioDevice):
    name = "rng"
    description = "virtio entropy device fed by getrandom() or an entropy file"
    device_id = DeviceId.ENTROPY
    vhost_user_type = "rng"
    syscalls = frozenset({"getrandom", "read"})
    # Bound the work one request can ask for; the driver simply asks again.
    max_bytes_per_request = 64 * 1024

    def __init__(self, source_fd: int | None = None) -> None:
        super().__init__()
        self.source_fd = source_fd

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--rng-file",
            metavar="PATH",
            help="read entropy from PATH (e.g. /dev/hwrng) instead of getrandom()",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        # Opened now: once jailed, the daemon can open no files.
        return cls(os.open(args.rng_file, os.O_RDONLY | os.O_CLOEXEC) if args.rng_file else None)

    def handle(self, queue: int, request: Request) -> int:
        written = 0
        for buffer in request.writable:
            room = min(len(buffer), self.max_bytes_per_request - written)
            if room <= 0:
                break
            chunk = os.getrandom(room) if self.source_fd is None else os.read(self.source_fd, room)
            buffer[: len(chunk)] = chunk
            written += len(chunk)
            if len(chunk) < room:
                break
        request.describe(type="entropy", bytes=written)
        return written

    def close(self) -> None:
        if self.source_fd is not None:
            os.close(self.source_fd)
