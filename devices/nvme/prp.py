"""Where a command's data is: the guest ranges its PRP entries describe
(4 KiB memory pages, CC.MPS 0), and the transfers to and from them.

PRP1 may start anywhere dword aligned in its page. When the data needs one
more page, PRP2 is that page; when it needs more, PRP2 points to a PRP list
(qword aligned), whose page-aligned entries run to the end of the list's
page, the last slot then pointing to the next list page. A list page met
twice (a list that loops) is a Data Transfer Error. Every access goes
through the device's bounds-checked DMA: memory out of reach raises
``GuestMemoryError``, which the command completes with a Data Transfer
Error.
"""

from __future__ import annotations

from typing import Protocol

from vfiouserd.devices.nvme.formats import PAGE, Command, Generic, generic


class Dma(Protocol):
    """Guest memory as a bus master reaches it (``PciDevice``'s DMA)."""

    async def dma_read(self, address: int, size: int) -> bytes: ...

    async def dma_write(self, address: int, data: bytes) -> None: ...


async def segments(dma: Dma, cmd: Command, length: int) -> list[tuple[int, int]]:
    """The guest ranges ``cmd``'s PRP entries give for ``length`` bytes."""
    prp1, prp2 = cmd.prp1, cmd.prp2
    if prp1 & 3:
        raise generic(Generic.INVALID_FIELD, f"PRP1 {prp1:#x} not dword aligned")
    first = min(length, PAGE - prp1 % PAGE)
    found = [(prp1, first)]
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


async def to_guest(dma: Dma, cmd: Command, data: bytes) -> None:
    done = 0
    for address, size in await segments(dma, cmd, len(data)):
        await dma.dma_write(address, data[done : done + size])
        done += size


async def from_guest(dma: Dma, cmd: Command, length: int) -> bytes:
    parts = [await dma.dma_read(a, n) for a, n in await segments(dma, cmd, length)]
    return b"".join(parts)
