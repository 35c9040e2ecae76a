"""Guest-side virtio-blk and virtio-rng request helpers for the project's
front ends. Layout knobs (how a request is cut into descriptors) let tests
exercise what real drivers may legally do."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import trio

from vfiouserd.client.guest import Buffer, DriverRing, GuestRam
from vfiouserd.devices.blk import BlkStatus, RequestType

SEGMENT = struct.Struct("<QII")


def _cut(address: int, size: int, pieces: int) -> list[Buffer]:
    """Split [address, address+size) into ``pieces`` descriptors (some may be empty-free)."""
    pieces = max(1, min(pieces, size)) if size else 1
    step = -(-size // pieces) if size else 0
    out = []
    offset = 0
    while offset < size:
        n = min(step, size - offset)
        out.append((address + offset, n))
        offset += n
    return out


@dataclass
class BlkResult:
    status: int
    data: bytes
    written: int


class QueuePort(Protocol):
    """A started queue as a driver sees it, whatever the transport."""

    ring: DriverRing

    async def kick_async(self) -> None: ...

    async def wait_call(self) -> None: ...


class RequestQueue:
    """Submit requests on one queue and wait for their completions."""

    def __init__(self, ram: GuestRam, queue: QueuePort, arena: int = 4 << 20) -> None:
        self.ram = ram
        self.queue = queue
        self.arena = ram.alloc(arena, 4096)
        self.arena_size = arena
        self.cursor = 0

    def scratch(self, size: int) -> int:
        """Reusable guest buffers: a ring-shaped arena (requests are short-lived)."""
        if size > self.arena_size:
            raise MemoryError(f"{size} bytes exceed the request arena")
        if self.cursor + size > self.arena_size:
            self.cursor = 0
        address = self.arena + self.cursor
        self.cursor += (size + 63) & ~63
        return address

    async def run(
        self, readable: list[Buffer], writable: list[Buffer], *, indirect: bool = False
    ) -> int:
        """Submit one chain, kick if the device wants it, wait for completion."""
        token = object()
        self.queue.ring.add(readable, writable, token, indirect=indirect)
        if self.queue.ring.needs_kick():
            await self.queue.kick_async()
        with trio.fail_after(10):
            while True:
                for done in self.queue.ring.collect():
                    if done.token is token:
                        return done.written
                await self.queue.wait_call()


class BlkClient(RequestQueue):
    async def request(
        self,
        kind: int,
        sector: int = 0,
        out: bytes = b"",
        in_size: int = 0,
        *,
        header_pieces: int = 1,
        data_pieces: int = 1,
        status_separate: bool = True,
        indirect: bool = False,
    ) -> BlkResult:
        header = self.scratch(16)
        self.ram.write(header, struct.pack("<IIQ", kind, 0, sector))
        readable = _cut(header, 16, header_pieces)
        if out:
            data = self.scratch(len(out))
            self.ram.write(data, out)
            readable += _cut(data, len(out), data_pieces)
        status = self.scratch(1 + in_size)
        self.ram.write(status, b"\xee" * (1 + in_size))
        if in_size and not status_separate:
            # data and status byte in one buffer, cut as asked
            writable = _cut(status, in_size + 1, data_pieces)
            status_at = status + in_size
            data_at = status
        else:
            data_at = status + 1
            writable = (_cut(data_at, in_size, data_pieces) if in_size else []) + [(status, 1)]
            status_at = status
        written = await self.run(readable, writable, indirect=indirect)
        return BlkResult(self.ram.read(status_at, 1)[0], self.ram.read(data_at, in_size), written)

    async def read(self, sector: int, size: int, **layout: object) -> bytes:
        result = await self.request(RequestType.IN, sector, in_size=size, **layout)  # type: ignore[arg-type]
        if result.status != BlkStatus.OK:
            raise OSError(f"read failed with status {result.status}")
        return result.data

    async def write(self, sector: int, data: bytes, **layout: object) -> None:
        result = await self.request(RequestType.OUT, sector, out=data, **layout)  # type: ignore[arg-type]
        if result.status != BlkStatus.OK:
            raise OSError(f"write failed with status {result.status}")

    async def segments(self, kind: int, segments: list[tuple[int, int, int]]) -> int:
        payload = b"".join(SEGMENT.pack(*s) for s in segments)
        return (await self.request(kind, 0, out=payload)).status


class RngClient(RequestQueue):
    async def read(self, size: int, pieces: int = 1) -> bytes:
        buffer = self.scratch(size)
        written = await self.run([], _cut(buffer, size, pieces))
        return self.ram.read(buffer, written)
