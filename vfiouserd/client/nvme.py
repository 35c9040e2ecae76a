"""A small NVMe driver over the project's vfio-user client, for tests: what
Linux's nvme driver does to a controller, step by step, in guest RAM the
test owns (``GuestRam``), so a test can also do what no driver should.

Completions are found by polling the completion queue's phase tags (an
MSI-X eventfd per vector is installed too, for tests that count them).
Doorbells go as posted REGION_WRITEs, as QEMU sends them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

import vfiouserd.devices.nvme.formats as nvme
from vfiouserd._native import lib
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient, eventfd
from vfiouserd.devices.nvme.formats import (
    AdminOpcode,
    Command,
    Completion,
    IoOpcode,
    Reg,
    SglDescriptor,
    SglType,
)
from vfiouserd.protocol import vfio_user as vfu

fence = lib.vfu_fence_full

BAR = 0
PAGE = nvme.PAGE


class NvmeTimeout(Exception):
    """No completion came."""


@dataclass
class DriverQueue:
    """A submission queue and the completion queue it completes to."""

    qid: int
    size: int
    sq_base: int
    cq_base: int
    cqid: int
    cq_size: int = 0  # 0: the SQ's size
    sq_tail: int = 0
    cq_head: int = 0
    phase: bool = True
    next_cid: int = 0
    done: dict[int, Completion] = field(default_factory=dict)


class NvmeDriver:
    def __init__(self, client: VfioUserClient, ram: GuestRam, vectors: int = 4) -> None:
        self.client = client
        self.ram = ram
        self.vectors = vectors
        self.irq_fds: list[int] = []
        self.queues: dict[int, DriverQueue] = {}
        self.shadow: tuple[int, int] | None = None  # shadow doorbell and EventIdx pages
        self.doorbells_rung = self.doorbells_skipped = 0

    # -- registers -----------------------------------------------------------------------

    async def read32(self, offset: int) -> int:
        return int(struct.unpack("<I", await self.client.region_read(BAR, offset, 4))[0])

    async def write32(self, offset: int, value: int, *, posted: bool = False) -> None:
        await self.client.region_write(BAR, offset, struct.pack("<I", value), no_reply=posted)

    async def cap(self) -> int:
        return await self.read32(Reg.CAP) | await self.read32(Reg.CAP + 4) << 32

    async def csts(self) -> int:
        return await self.read32(Reg.CSTS)

    async def wait_csts(self, mask: int, value: int, timeout: float = 5) -> None:
        with trio.fail_after(timeout):
            while await self.csts() & mask != value:
                await trio.sleep(0.001)

    def alloc_pages(self, count: int = 1) -> int:
        address = self.ram.alloc(count * PAGE, PAGE)
        self.ram.write(address, bytes(count * PAGE))
        return address

    # -- bring-up ------------------------------------------------------------------------

    async def setup_pci(self) -> None:
        """Memory space and bus mastering on; an eventfd per MSI-X vector."""
        await self.client.config_write(0x04, 2, 0x6)
        if not self.irq_fds:
            self.irq_fds = [eventfd() for _ in range(self.vectors)]
        await self.client.set_irqs(
            vfu.PciIrq.MSIX,
            vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER,
            0,
            self.vectors,
            fds=self.irq_fds,
        )

    async def enable(self, admin_entries: int = 32) -> None:
        """Linux's sequence: disable, program the admin queues, CC with EN
        0 then 1, wait for RDY."""
        await self.disable()
        sq, cq = self.alloc_pages(2), self.alloc_pages(1)
        self.queues[0] = DriverQueue(0, admin_entries, sq, cq, 0)
        self.shadow = None  # a reset ended them
        await self.write32(Reg.AQA, (admin_entries - 1) | (admin_entries - 1) << 16)
        await self.write32(Reg.ASQ, sq & 0xFFFFFFFF)
        await self.write32(Reg.ASQ + 4, sq >> 32)
        await self.write32(Reg.ACQ, cq & 0xFFFFFFFF)
        await self.write32(Reg.ACQ + 4, cq >> 32)
        await self.write32(Reg.CC, 0x00460000)
        await self.write32(Reg.CC, 0x00460001)
        await self.wait_csts(nvme.CSTS_RDY, nvme.CSTS_RDY)

    async def disable(self) -> None:
        await self.write32(Reg.CC, 0)
        await self.wait_csts(nvme.CSTS_RDY, 0)
        self.queues.clear()

    async def shutdown(self) -> None:
        await self.write32(Reg.CC, 0x00460001 | 1 << 14)
        shst = nvme.SHST_COMPLETE << nvme.CSTS_SHST_SHIFT
        await self.wait_csts(3 << nvme.CSTS_SHST_SHIFT, shst)

    # -- commands --------------------------------------------------------------------------

    async def submit(self, qid: int, cmd: Command, *, ring: bool = True) -> int:
        """Put ``cmd`` in the SQ with a fresh CID (returned); ring the doorbell."""
        queue = self.queues[qid]
        cid = queue.next_cid
        queue.next_cid = (cid + 1) % 0xFFFF
        cmd = cmd._replace(cid=cid)
        self.ram.write(queue.sq_base + queue.sq_tail * nvme.SQE_SIZE, cmd.encode())
        queue.sq_tail = (queue.sq_tail + 1) % queue.size
        if ring:
            await self.ring_sq(qid)
        return cid

    async def ring_sq(self, qid: int) -> None:
        queue = self.queues[qid]
        await self._ring(qid, False, queue.sq_tail)

    async def _ring(self, qid: int, completion: bool, value: int) -> None:
        """A doorbell, as Linux rings it: with shadow doorbells (I/O queues),
        the value goes to the shadow page, and to the register only when the
        controller's EventIdx asks for it."""
        offset = nvme.doorbell_offset(qid, completion)
        if self.shadow is not None and qid:
            slot = 8 * qid + 4 * int(completion)
            old = struct.unpack("<I", self.ram.read(self.shadow[0] + slot, 4))[0]
            self.ram.write(self.shadow[0] + slot, struct.pack("<I", value))
            fence()  # our value before the controller's EventIdx
            event = struct.unpack("<I", self.ram.read(self.shadow[1] + slot, 4))[0]
            if not (value - event - 1) & 0xFFFF < (value - old) & 0xFFFF:
                self.doorbells_skipped += 1
                return
        self.doorbells_rung += 1
        await self.write32(offset, value, posted=True)

    async def doorbell_buffer_config(self) -> Completion:
        """Set up shadow doorbells (a page each, zeroed, as Linux's)."""
        shadow, events = self.alloc_pages(), self.alloc_pages()
        self.ram.write(shadow, bytes(PAGE))
        self.ram.write(events, bytes(PAGE))
        done = await self.admin(
            nvme.command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow, prp2=events)
        )
        if done.status == 0:
            self.shadow = (shadow, events)
        return done

    def _collect(self, queue: DriverQueue) -> list[Completion]:
        found: list[Completion] = []
        while True:
            address = queue.cq_base + queue.cq_head * nvme.CQE_SIZE
            entry = Completion.decode(self.ram.read(address, nvme.CQE_SIZE))
            if entry.phase != queue.phase:
                return found
            found.append(entry)
            queue.cq_head = (queue.cq_head + 1) % (queue.cq_size or queue.size)
            if queue.cq_head == 0:
                queue.phase = not queue.phase

    async def wait(self, qid: int, cid: int, timeout: float = 5) -> Completion:
        queue = self.queues[qid]
        with trio.fail_after(timeout):
            while cid not in queue.done:
                found = self._collect(queue)
                if found:
                    for entry in found:
                        queue.done[entry.cid] = entry
                    await self._ring(queue.cqid, True, queue.cq_head)
                else:
                    await trio.sleep(0.0005)
        return queue.done.pop(cid)

    async def call(self, qid: int, cmd: Command, timeout: float = 5) -> Completion:
        return await self.wait(qid, await self.submit(qid, cmd), timeout)

    async def nothing_completes(self, qid: int, seconds: float = 0.2) -> bool:
        await trio.sleep(seconds)
        return not self._collect(self.queues[qid]) if qid in self.queues else True

    async def admin(self, cmd: Command) -> Completion:
        return await self.call(0, cmd)

    async def admin_data(self, cmd: Command, size: int = 4096) -> tuple[Completion, bytes]:
        """An admin command that returns data: PRP1 (and PRP2) on fresh pages."""
        pages = -(-size // PAGE)
        buffer = self.alloc_pages(pages)
        prp2 = buffer + PAGE if pages == 2 else 0
        if pages > 2:
            prp2 = self.prp_list([buffer + PAGE * i for i in range(1, pages)])
        done = await self.admin(cmd._replace(prp1=buffer, prp2=prp2))
        return done, self.ram.read(buffer, size)

    async def identify(self, cns: int, nsid: int = 0, cdw11: int = 0) -> tuple[int, bytes]:
        done, data = await self.admin_data(
            nvme.command(AdminOpcode.IDENTIFY, nsid=nsid, cdw=(cns, cdw11))
        )
        return done.status, data

    async def log_page(
        self, lid: int, size: int, *, offset: int = 0, nsid: int = nvme.BROADCAST_NSID
    ) -> tuple[Completion, bytes]:
        """Get Log Page: ``size`` bytes (a multiple of 4) from ``offset``."""
        dwords = size // 4 - 1
        cdw = (lid | (dwords & 0xFFFF) << 16, dwords >> 16, offset & 0xFFFFFFFF, offset >> 32)
        return await self.admin_data(
            nvme.command(AdminOpcode.GET_LOG_PAGE, nsid=nsid, cdw=cdw), size
        )

    async def set_feature(self, fid: int, value: int) -> Completion:
        return await self.admin(nvme.command(AdminOpcode.SET_FEATURES, cdw=(fid, value)))

    async def get_feature(self, fid: int, cdw11: int = 0, select: int = 0) -> Completion:
        return await self.admin(
            nvme.command(AdminOpcode.GET_FEATURES, cdw=(fid | select << 8, cdw11))
        )

    async def create_cq(
        self, qid: int, entries: int, *, vector: int | None = None, base: int | None = None
    ) -> Completion:
        base = self.alloc_pages(-(-entries * nvme.CQE_SIZE // PAGE)) if base is None else base
        vector = qid if vector is None else vector
        done = await self.admin(
            nvme.command(
                AdminOpcode.CREATE_IO_CQ,
                prp1=base,
                cdw=((entries - 1) << 16 | qid, vector << 16 | 0b11),
            )
        )
        if done.status == 0:
            self.queues[qid] = DriverQueue(qid, entries, 0, base, qid)
        return done

    async def create_sq(
        self, qid: int, entries: int, cqid: int | None = None, *, base: int | None = None
    ) -> Completion:
        base = self.alloc_pages(-(-entries * nvme.SQE_SIZE // PAGE)) if base is None else base
        cqid = qid if cqid is None else cqid
        done = await self.admin(
            nvme.command(
                AdminOpcode.CREATE_IO_SQ, prp1=base, cdw=((entries - 1) << 16 | qid, cqid << 16 | 1)
            )
        )
        if done.status == 0:
            cq = self.queues[cqid]
            self.queues[qid] = DriverQueue(qid, entries, base, cq.cq_base, cqid, cq.size)
            if qid != cqid:
                raise NotImplementedError("this driver pairs each SQ with its own CQ")
        return done

    async def create_io_queues(self, count: int, entries: int = 64) -> None:
        done = await self.set_feature(nvme.Feature.NUMBER_OF_QUEUES, (count - 1) * 0x10001)
        assert done.status == 0, done
        for qid in range(1, count + 1):
            assert (await self.create_cq(qid, entries)).status == 0
            assert (await self.create_sq(qid, entries)).status == 0

    async def delete_sq(self, qid: int) -> Completion:
        return await self.admin(nvme.command(AdminOpcode.DELETE_IO_SQ, cdw=(qid,)))

    async def delete_cq(self, qid: int) -> Completion:
        return await self.admin(nvme.command(AdminOpcode.DELETE_IO_CQ, cdw=(qid,)))

    # -- data ---------------------------------------------------------------------------------

    def prp_list(self, pages: list[int]) -> int:
        """A PRP list (chained across list pages as needed) for ``pages``."""
        per_page = PAGE // 8
        lists = self.alloc_pages(max(1, -(-len(pages) // (per_page - 1))))
        at, entries = lists, list(pages)
        while entries:
            if len(entries) <= per_page:
                chunk, entries = entries, []
                self.ram.write(at, struct.pack(f"<{len(chunk)}Q", *chunk))
            else:
                chunk, entries = entries[: per_page - 1], entries[per_page - 1 :]
                self.ram.write(at, struct.pack(f"<{per_page}Q", *chunk, at + PAGE))
                at += PAGE
        return lists

    def data_buffer(self, size: int) -> tuple[int, int, int]:
        """(buffer, PRP1, PRP2) for ``size`` bytes in fresh pages."""
        pages = -(-size // PAGE)
        buffer = self.alloc_pages(pages)
        if pages == 1:
            return buffer, buffer, 0
        if pages == 2:
            return buffer, buffer, buffer + PAGE
        return buffer, buffer, self.prp_list([buffer + PAGE * i for i in range(1, pages)])

    async def rw(
        self, qid: int, opcode: int, nsid: int, slba: int, data_or_size: bytes | int
    ) -> tuple[Completion, bytes]:
        size = data_or_size if isinstance(data_or_size, int) else len(data_or_size)
        buffer, prp1, prp2 = self.data_buffer(size)
        if not isinstance(data_or_size, int):
            self.ram.write(buffer, data_or_size)
        nlb = size // 512
        cmd = nvme.command(
            opcode,
            nsid=nsid,
            prp1=prp1,
            prp2=prp2,
            cdw=(slba & 0xFFFFFFFF, slba >> 32, nlb - 1),
        )
        done = await self.call(qid, cmd)
        return done, self.ram.read(buffer, size)

    async def write(self, qid: int, nsid: int, slba: int, data: bytes) -> Completion:
        return (await self.rw(qid, IoOpcode.WRITE, nsid, slba, data))[0]

    async def read(self, qid: int, nsid: int, slba: int, size: int) -> tuple[Completion, bytes]:
        return await self.rw(qid, IoOpcode.READ, nsid, slba, size)

    # -- SGLs ----------------------------------------------------------------------------------

    def sgl(
        self,
        descriptors: list[SglDescriptor],
        per_segment: int = PAGE // nvme.SGL_DESCRIPTOR_SIZE,
        *,
        last_segment: bool = True,
    ) -> SglDescriptor:
        """SGL1 for ``descriptors``, laid out as Linux does: the descriptor
        itself when there is one; else segments of at most ``per_segment``
        descriptors in fresh pages, each but the last ending in a descriptor
        of the next, the last one reached by a Last Segment descriptor (a
        Segment descriptor if not ``last_segment``)."""
        if len(descriptors) == 1:
            return descriptors[0]
        groups, rest = [], list(descriptors)
        while len(rest) > per_segment:
            groups.append(rest[: per_segment - 1])
            rest = rest[per_segment - 1 :]
        groups.append(rest)
        pointer: SglDescriptor | None = None
        for index in reversed(range(len(groups))):
            entries = groups[index] + ([pointer] if pointer else [])
            size = len(entries) * nvme.SGL_DESCRIPTOR_SIZE
            base = self.alloc_pages(-(-size // PAGE))
            self.ram.write(base, b"".join(d.encode() for d in entries))
            final = index == len(groups) - 1 and last_segment
            pointer = SglDescriptor(base, size, SglType.LAST_SEGMENT if final else SglType.SEGMENT)
        assert pointer is not None
        return pointer

    def data_blocks(self, data_or_size: bytes | int, pieces: list[int]) -> list[SglDescriptor]:
        """Data Block descriptors of fresh memory for ``data`` (written
        there) or ``size`` bytes, cut in pieces of these lengths (the rest
        in one more), each 8 bytes into its own pages: none adjoins another."""
        size = data_or_size if isinstance(data_or_size, int) else len(data_or_size)
        lengths = [*pieces, size - sum(pieces)] if sum(pieces) < size else list(pieces)
        found, done = [], 0
        for length in lengths:
            address = self.alloc_pages(-(-(length + 8) // PAGE)) + 8
            if not isinstance(data_or_size, int):
                self.ram.write(address, data_or_size[done : done + length])
            found.append(SglDescriptor(address, length, SglType.DATA_BLOCK))
            done += length
        return found

    def gather(self, descriptors: list[SglDescriptor]) -> bytes:
        """What the Data Block descriptors' memory holds, in their order."""
        blocks = [d for d in descriptors if d.kind == SglType.DATA_BLOCK]
        return b"".join(self.ram.read(d.address, d.length) for d in blocks)

    async def rw_sgl(
        self, qid: int, opcode: int, nsid: int, slba: int, blocks: int, sgl1: SglDescriptor
    ) -> Completion:
        """Read or Write ``blocks`` blocks, the data where ``sgl1`` says (PSDT 01b)."""
        prp1, prp2 = sgl1.sgl1()
        cdw = (slba & 0xFFFFFFFF, slba >> 32, blocks - 1)
        flags = nvme.PSDT_SGL << 6
        return await self.call(
            qid, nvme.command(opcode, nsid=nsid, prp1=prp1, prp2=prp2, flags=flags, cdw=cdw)
        )

    async def write_sgl(
        self, qid: int, nsid: int, slba: int, data: bytes, pieces: list[int], **layout: Any
    ) -> Completion:
        """Write ``data`` from pieces of these lengths (``sgl``'s layout)."""
        sgl1 = self.sgl(self.data_blocks(data, pieces), **layout)
        return await self.rw_sgl(qid, IoOpcode.WRITE, nsid, slba, len(data) // 512, sgl1)

    async def read_sgl(
        self, qid: int, nsid: int, slba: int, size: int, pieces: list[int], **layout: Any
    ) -> tuple[Completion, bytes]:
        """Read ``size`` bytes into pieces of these lengths (``sgl``'s layout)."""
        blocks = self.data_blocks(size, pieces)
        done = await self.rw_sgl(
            qid, IoOpcode.READ, nsid, slba, size // 512, self.sgl(blocks, **layout)
        )
        return done, self.gather(blocks)

    async def flush(self, qid: int, nsid: int) -> Completion:
        return await self.call(qid, nvme.command(IoOpcode.FLUSH, nsid=nsid))

    async def write_zeroes(
        self, qid: int, nsid: int, slba: int, blocks: int, deallocate: bool = False
    ) -> Completion:
        cdw12 = (blocks - 1) | (1 << 25 if deallocate else 0)
        cmd = nvme.command(
            IoOpcode.WRITE_ZEROES, nsid=nsid, cdw=(slba & 0xFFFFFFFF, slba >> 32, cdw12)
        )
        return await self.call(qid, cmd)

    async def deallocate(self, qid: int, nsid: int, ranges: list[tuple[int, int]]) -> Completion:
        """Dataset Management with AD: (slba, blocks) each."""
        buffer = self.alloc_pages(1)
        raw = b"".join(nvme.DSM_RANGE.pack(0, blocks, slba) for slba, blocks in ranges)
        self.ram.write(buffer, raw)
        cmd = nvme.command(
            IoOpcode.DATASET_MANAGEMENT,
            nsid=nsid,
            prp1=buffer,
            cdw=(len(ranges) - 1, nvme.DSM_ATTR_DEALLOCATE),
        )
        return await self.call(qid, cmd)

    def interrupts(self, vector: int) -> int:
        """How many times ``vector`` fired since last asked."""
        try:
            return os.eventfd_read(self.irq_fds[vector])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in self.irq_fds:
            os.close(fd)
        self.irq_fds = []
