"""Where a command's data is: the guest ranges its data pointer describes,
PRP entries (PSDT 00b) or a scatter gather list (PSDT 01b, I/O commands
only: the controller refuses other PSDTs), and the transfers to and from
them. ``segments`` is the one entry point for both.

PRPs (4 KiB memory pages, CC.MPS 0): PRP1 may start anywhere dword aligned
in its page. When the data needs one more page, PRP2 is that page; when it
needs more, PRP2 points to a PRP list (qword aligned), whose page-aligned
entries run to the end of the list's page, the last slot then pointing to
the next list page. A list page met twice (a list that loops) is a Data
Transfer Error.

SGLs (NVMe 1.4, 4.4): SGL1, where PRP1 and PRP2 are, is the first
descriptor. A Data Block descriptor is a guest range, its address and
length dword aligned (SGLS offers dword granularity); a Bit Bucket
descriptor discards that much of a read's data and has no effect in a
write's; a Segment or Last Segment descriptor, only as the last descriptor
of its segment, points to the next segment (qword aligned, a non-zero
multiple of 16 bytes), the one after a Last Segment descriptor holding no
pointer. A segment that ends without one ends the list. The list may be
longer than the data (SGLS bit 18): descriptors past the data are not read.
Keyed, transport, offset and vendor descriptors are not offered. The work
is bounded: more than ``MAX_SGL_DESCRIPTORS`` descriptors, or a segment met
twice (a chain that loops), is Invalid Number of SGL Descriptors.

Every access goes through the device's bounds-checked DMA: memory out of
reach raises ``GuestMemoryError``, which the command completes with a Data
Transfer Error. The whole list is checked before any data moves.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from vfiouserd.devices.nvme.formats import (
    PAGE,
    PSDT_SGL,
    SGL_DESCRIPTOR_SIZE,
    SGLS_BIT_BUCKET,
    SGLS_DWORD_GRANULAR,
    SGLS_LONGER_THAN_DATA,
    Command,
    Generic,
    SglDescriptor,
    SglType,
    generic,
)

# What Identify Controller's SGLS offers: no keyed, offset or MPTR SGLs.
SGLS = SGLS_DWORD_GRANULAR | SGLS_BIT_BUCKET | SGLS_LONGER_THAN_DATA
# MDTS (64 pages) in pieces of 256 bytes: far more than a driver needs.
MAX_SGL_DESCRIPTORS = 1024
CHUNK = PAGE // SGL_DESCRIPTOR_SIZE  # descriptors read from a segment at once
END = 1 << 64  # an address and a length past this are a Data SGL Length Invalid
SEGMENTS = (SglType.SEGMENT, SglType.LAST_SEGMENT)

# A guest range, or (None, size): data a bit bucket discards.
Range = tuple[int | None, int]


class Dma(Protocol):
    """Guest memory as a bus master reaches it (``PciDevice``'s DMA)."""

    async def dma_read(self, address: int, size: int) -> bytes: ...

    async def dma_write(self, address: int, data: bytes) -> None: ...


async def segments(dma: Dma, cmd: Command, length: int, *, to_guest: bool = False) -> list[Range]:
    """The guest ranges ``cmd``'s data pointer gives for ``length`` bytes
    (``to_guest``: the controller writes them, so bit buckets apply)."""
    if cmd.psdt == PSDT_SGL:
        return await _sgl(dma, cmd.sgl1, length, to_guest)
    return await _prps(dma, cmd, length)


async def _prps(dma: Dma, cmd: Command, length: int) -> list[Range]:
    prp1, prp2 = cmd.prp1, cmd.prp2
    if prp1 & 3:
        raise generic(Generic.INVALID_FIELD, f"PRP1 {prp1:#x} not dword aligned")
    first = min(length, PAGE - prp1 % PAGE)
    found: list[Range] = [(prp1, first)]
    remaining = length - first
    if remaining <= 0:
        return found
    if remaining <= PAGE:
        if prp2 % PAGE:
            raise generic(Generic.PRP_OFFSET_INVALID, f"PRP2 {prp2:#x}")
        return [*found, (prp2, remaining)]
    if prp2 & 7:
        raise generic(Generic.PRP_OFFSET_INVALID, f"PRP list {prp2:#x}")
    entries = -(-remaining // PAGE)
    address, seen = prp2, set()
    while entries:
        if address // PAGE in seen:
            raise generic(Generic.DATA_TRANSFER_ERROR, f"PRP list page {address:#x} again")
        seen.add(address // PAGE)
        slots = (PAGE - address % PAGE) // 8
        wanted = entries if entries <= slots else slots
        raw = await dma.dma_read(address, wanted * 8)
        values = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
        chained = entries > slots
        for value in values[:-1] if chained else values:
            if value % PAGE:
                raise generic(Generic.PRP_OFFSET_INVALID, f"PRP entry {value:#x}")
            found.append((value, min(PAGE, remaining)))
            remaining -= PAGE
            entries -= 1
        if chained:
            address = values[-1]
            if address % PAGE:
                raise generic(Generic.PRP_OFFSET_INVALID, f"PRP list pointer {address:#x}")
    return found


async def _sgl(dma: Dma, sgl1: SglDescriptor, length: int, to_guest: bool) -> list[Range]:
    found: list[Range] = []
    remaining = length
    pending = deque([sgl1])  # descriptors read and not yet looked at
    at, left = 0, 0  # the current segment: where its unread descriptors are, how many
    last = False  # the current segment is the last one
    seen: set[int] = set()
    examined = 0
    while remaining:
        if not pending:
            if not left:
                raise generic(Generic.DATA_SGL_LENGTH_INVALID, f"{remaining} bytes past the SGL")
            count = min(left, CHUNK)
            raw = await dma.dma_read(at, count * SGL_DESCRIPTOR_SIZE)
            pending.extend(SglDescriptor.decode(raw, i * SGL_DESCRIPTOR_SIZE) for i in range(count))
            at, left = at + count * SGL_DESCRIPTOR_SIZE, left - count
        descriptor = pending.popleft()
        examined += 1
        if examined > MAX_SGL_DESCRIPTORS:
            raise generic(Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS, f"over {MAX_SGL_DESCRIPTORS}")
        kind, address, size = descriptor.kind, descriptor.address, descriptor.length
        if kind not in (SglType.DATA_BLOCK, SglType.BIT_BUCKET, *SEGMENTS) or descriptor.subtype:
            raise generic(Generic.SGL_DESCRIPTOR_TYPE_INVALID, f"{descriptor}")
        if kind in SEGMENTS:
            if pending or left:
                raise generic(
                    Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                    f"{descriptor} not last in its segment",
                )
            if last:
                raise generic(
                    Generic.INVALID_SGL_SEGMENT_DESCRIPTOR, f"{descriptor} in the last segment"
                )
            if not size or size % SGL_DESCRIPTOR_SIZE or address % 8:
                raise generic(Generic.INVALID_SGL_SEGMENT_DESCRIPTOR, f"{descriptor}")
            if address + size > END:
                raise generic(Generic.DATA_SGL_LENGTH_INVALID, f"{descriptor}")
            if address in seen:
                raise generic(
                    Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS, f"segment {address:#x} again"
                )
            seen.add(address)
            at, left, last = address, size // SGL_DESCRIPTOR_SIZE, kind == SglType.LAST_SEGMENT
        elif kind == SglType.DATA_BLOCK:
            if (address | size) & 3:
                raise generic(Generic.SGL_DATA_BLOCK_GRANULARITY_INVALID, f"{descriptor}")
            if address + size > END:
                raise generic(Generic.DATA_SGL_LENGTH_INVALID, f"{descriptor}")
            if size:
                taken = min(size, remaining)
                found.append((address, taken))
                remaining -= taken
        elif to_guest and size:  # a bit bucket in a read
            taken = min(size, remaining)
            found.append((None, taken))
            remaining -= taken
    return found


async def to_guest(dma: Dma, cmd: Command, data: bytes) -> None:
    done = 0
    for address, size in await segments(dma, cmd, len(data), to_guest=True):
        if address is not None:
            await dma.dma_write(address, data[done : done + size])
        done += size


async def from_guest(dma: Dma, cmd: Command, length: int) -> bytes:
    parts = []
    for address, size in await segments(dma, cmd, length):
        assert address is not None  # bit buckets only in data to the guest
        parts.append(await dma.dma_read(address, size))
    return b"".join(parts)
