"""Namespaces and the NVM command set's I/O commands on them: Read, Write,
Flush, Write Zeroes and Dataset Management (deallocate punches holes), their
data where PRPs or an SGL say (``prp``); the SMART counters they keep.

Each namespace is a raw image file of 512-byte logical blocks. A volatile
write cache as virtio-blk has one: writes reach the image's page cache, and
Flush, FUA or the cache turned off (Set Features) sync the image. The fault
rules' ``ioerr``, ``corrupt`` and ``delay`` apply (queue = SQ id, sectors =
LBAs).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import trio

from vfiouserd import faults
from vfiouserd.devices.blk import BlkError, punch_hole, zero_range
from vfiouserd.devices.nvme import prp
from vfiouserd.devices.nvme.formats import (
    BROADCAST_NSID,
    DSM_ATTR_DEALLOCATE,
    DSM_RANGE,
    PAGE,
    PSDT_SGL,
    Command,
    Generic,
    IoOpcode,
    Media,
    NvmeError,
    Sct,
    generic,
    status,
)

LBA_LOG2 = 9
LBA = 1 << LBA_LOG2
MDTS = 6  # 2**6 pages: 256 KiB per command
MAX_TRANSFER = PAGE << MDTS
ONCS = 1 << 2 | 1 << 3  # Dataset Management, Write Zeroes
VWC = 0x07  # a volatile write cache; Flush takes the broadcast NSID
DATA_OPCODES = (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.DATASET_MANAGEMENT)

# SMART counters (``NvmCommands.health``' keys)
BLOCKS_READ, BLOCKS_WRITTEN, READS, WRITES, POWER_CYCLES, MEDIA_ERRORS = range(6)


@dataclass
class Namespace:
    nsid: int
    fd: int
    read_only: bool
    blocks: int
    label: str

    @property
    def uuid(self) -> bytes:
        return uuid.UUID(bytes=hashlib.md5(f"{self.label}:{self.nsid}".encode()).digest()).bytes


class NvmCommands:
    """The I/O commands of every I/O queue, on the controller's namespaces."""

    def __init__(self, dma: prp.Dma, namespaces: dict[int, Namespace]) -> None:
        self.dma = dma
        self.namespaces = namespaces
        self.health: dict[int, int] = {
            BLOCKS_READ: 0,
            BLOCKS_WRITTEN: 0,
            READS: 0,
            WRITES: 0,
            POWER_CYCLES: 1,
            MEDIA_ERRORS: 0,
        }
        self.sgl_commands = 0  # commands whose data moved through an SGL (statistics)

    def namespace(self, nsid: int) -> Namespace:
        namespace = self.namespaces.get(nsid)
        if namespace is None:
            raise generic(Generic.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        return namespace

    async def execute(self, qid: int, cmd: Command, *, write_cache: bool) -> int:
        """Run ``cmd`` from I/O queue ``qid``; its completion's DW0."""
        opcode = cmd.opcode
        if opcode not in (IoOpcode.FLUSH, IoOpcode.WRITE, IoOpcode.READ) and opcode not in (
            IoOpcode.WRITE_ZEROES,
            IoOpcode.DATASET_MANAGEMENT,
        ):
            raise generic(Generic.INVALID_OPCODE, f"I/O opcode {opcode:#x}")
        if opcode == IoOpcode.FLUSH and cmd.nsid == BROADCAST_NSID:
            await self.flush_all()
            return 0
        namespace = self.namespace(cmd.nsid)
        if opcode == IoOpcode.FLUSH:
            await self.sync(namespace)
        elif opcode == IoOpcode.DATASET_MANAGEMENT:
            await self._dataset_management(namespace, cmd, write_cache)
        else:
            slba, nlb = cmd.slba, cmd.nlb
            if slba + nlb > namespace.blocks:
                raise generic(Generic.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb}")
            if opcode != IoOpcode.READ and namespace.read_only:
                raise generic(Generic.NAMESPACE_WRITE_PROTECTED, f"namespace {namespace.nsid}")
            if opcode == IoOpcode.WRITE_ZEROES:
                _blk(punch_hole if cmd.cdw12 & 1 << 25 else zero_range, namespace, slba, nlb)
            elif nlb * LBA > MAX_TRANSFER:
                raise generic(Generic.INVALID_FIELD, f"{nlb} blocks exceed MDTS")
            elif opcode == IoOpcode.READ:
                await self._read(qid, namespace, cmd)
            else:
                await self._write(qid, namespace, cmd)
            if opcode != IoOpcode.READ and (cmd.cdw12 & 1 << 30 or not write_cache):
                await self.sync(namespace)  # FUA, or the cache is off
        if cmd.psdt == PSDT_SGL and opcode in DATA_OPCODES:
            self.sgl_commands += 1
        return 0

    async def _faults(self, qid: int, kind: str, slba: int, nlb: int) -> None:
        span = (slba, slba + nlb)
        if faults.rules.sector_fault("ioerr", qid, kind, span) is not None:
            self.health[MEDIA_ERRORS] += 1
            media = Media.UNRECOVERED_READ_ERROR if kind == "read" else Media.WRITE_FAULT
            raise NvmeError(status(Sct.MEDIA, media), "injected fault")
        delay = faults.rules.request_delay(qid, kind, span)
        if delay:
            await trio.sleep(delay)

    async def _read(self, qid: int, namespace: Namespace, cmd: Command) -> None:
        length = cmd.nlb * LBA
        if faults.rules.has_rules:
            await self._faults(qid, "read", cmd.slba, cmd.nlb)
        buffer = bytearray(length)
        try:
            got = os.preadv(namespace.fd, [buffer], cmd.slba * LBA)
        except OSError as exc:
            self.health[MEDIA_ERRORS] += 1
            raise NvmeError(
                status(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR), exc.strerror or "read"
            ) from None
        buffer[got:] = bytes(length - got)  # the image shrank: zeros
        if faults.rules.has_rules:
            hit = faults.rules.sector_fault("corrupt", qid, "read", (cmd.slba, cmd.slba + cmd.nlb))
            if hit is not None:
                start, end = (hit[0] - cmd.slba) * LBA, (hit[1] - cmd.slba) * LBA
                buffer[start:end] = bytes(b ^ 0xFF for b in buffer[start:end])
        await prp.to_guest(self.dma, cmd, bytes(buffer))
        self.health[BLOCKS_READ] += cmd.nlb
        self.health[READS] += 1

    async def _write(self, qid: int, namespace: Namespace, cmd: Command) -> None:
        if faults.rules.has_rules:
            await self._faults(qid, "write", cmd.slba, cmd.nlb)
        data = await prp.from_guest(self.dma, cmd, cmd.nlb * LBA)
        offset, view = cmd.slba * LBA, memoryview(data)
        try:
            while view:
                done = os.pwritev(namespace.fd, [view], offset)
                if done <= 0:
                    raise OSError(0, "no progress")
                view, offset = view[done:], offset + done
        except OSError as exc:
            self.health[MEDIA_ERRORS] += 1
            raise NvmeError(status(Sct.MEDIA, Media.WRITE_FAULT), exc.strerror or "write") from None
        self.health[BLOCKS_WRITTEN] += cmd.nlb
        self.health[WRITES] += 1

    async def _dataset_management(
        self, namespace: Namespace, cmd: Command, write_cache: bool
    ) -> None:
        count = (cmd.cdw10 & 0xFF) + 1
        raw = await prp.from_guest(self.dma, cmd, count * DSM_RANGE.size)
        ranges = [DSM_RANGE.unpack_from(raw, i * DSM_RANGE.size) for i in range(count)]
        for _, blocks, slba in ranges:  # all checked before any is done
            if slba + blocks > namespace.blocks:
                raise generic(Generic.LBA_OUT_OF_RANGE, f"range {slba}+{blocks}")
        if not cmd.cdw11 & DSM_ATTR_DEALLOCATE:
            return  # only hints (integral read/write)
        if namespace.read_only:
            raise generic(Generic.NAMESPACE_WRITE_PROTECTED, f"namespace {namespace.nsid}")
        for _, blocks, slba in ranges:
            if blocks:
                _blk(punch_hole, namespace, slba, blocks)
        if not write_cache:
            await self.sync(namespace)

    async def sync(self, namespace: Namespace) -> None:
        if namespace.read_only:
            return
        try:  # on a thread: the session goes on answering meanwhile
            await trio.to_thread.run_sync(os.fdatasync, namespace.fd)
        except OSError as exc:
            raise NvmeError(
                status(Sct.MEDIA, Media.WRITE_FAULT), f"fdatasync: {exc.strerror}"
            ) from None

    async def flush_all(self) -> None:
        for namespace in self.namespaces.values():
            await self.sync(namespace)


def _blk(call: Callable[[int, int, int], None], namespace: Namespace, slba: int, nlb: int) -> None:
    """punch_hole or zero_range (devices/blk.py) over these blocks."""
    try:
        call(namespace.fd, slba * LBA, nlb * LBA)
    except BlkError as exc:
        raise generic(Generic.INTERNAL_ERROR, str(exc)) from None
