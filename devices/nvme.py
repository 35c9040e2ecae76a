"""An NVMe controller (PCIe, NVMe base specification 1.4) on raw image files.

BAR0 holds the controller registers and the doorbells (stride 4 bytes,
CAP.DSTRD 0); the MSI-X table and PBA live in BAR4, one vector per
completion queue. Each ``--namespace FILE[,ro]`` is a namespace (NSID 1, 2,
... in order) of 512-byte logical blocks.

Doorbell writes only record the new tail or head: the queues are served by
one task of the device's own (``run_in_background``), started by a doorbell
and ending once no queue has work, so the session keeps answering the VMM.
It takes commands from the submission queues in turn (admin first, a burst
from each), runs each to its end, posts its completion and raises the
completion queue's vector. A completion for a full completion queue waits
for the driver's head doorbell. A controller reset, a shutdown or a failure
to reach queue memory (CSTS.CFS) stops it; work that was waiting for the
VMM then is dropped, as the spec drops commands outstanding at a reset.

Offered: Identify (controller, namespace, active namespace list, namespace
descriptors; zeros for the command-set specific CNS the driver probes),
Create/Delete I/O SQ/CQ, Get/Set Features, Get Log Page (error, SMART,
firmware slot, changed namespaces), Asynchronous Event Request (events:
temperature over the threshold the host set, invalid doorbell writes),
Abort (never aborts), Keep Alive; Read, Write, Flush, Write Zeroes,
Dataset Management (deallocate punches holes), with PRPs. Not offered: SGLs
(Identify SGLS = 0), shadow doorbells (Doorbell Buffer Config, OACS bit 8),
NVM subsystem reset, metadata and protection information, namespace
management, firmware download.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

import trio

import vfiouserd.protocol.nvme as nvme
from vfiouserd import faults, stats
from vfiouserd.devices.blk import (
    BlkError,
    image_size,
    open_image,
    parse_size,
    punch_hole,
    zero_range,
)
from vfiouserd.devices.pci import Bar, PciDevice
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError
from vfiouserd.protocol.nvme import (
    AdminOpcode,
    AsyncEventType,
    Cns,
    Command,
    Feature,
    Generic,
    IoOpcode,
    LogPage,
    Media,
    Reg,
    Sct,
    Specific,
)
from vfiouserd.state import BOOL, INT_MAP, U16, U32, U64, Field, Schema, StateError, records
from vfiouserd.trace import tracer

log = get_logger("nvme")

LBA_LOG2 = 9
LBA = 1 << LBA_LOG2
MAX_IO_QUEUES = 64  # I/O queue pairs
MQES = 1023  # 0-based: 1024 entries per I/O queue
MDTS = 6  # 2**6 pages: 256 KiB per command
MAX_TRANSFER = nvme.PAGE << MDTS
BURST = 16  # commands taken from one queue before the next one's turn
AERL = 3  # 0-based: four outstanding Asynchronous Event Requests
ELPE = 0  # 0-based: one error log entry (always empty)
TEMPERATURE = 313  # kelvin, what the composite sensor reads
WCTEMP, CCTEMP = 0x157, 0x175
VERSION = 0x00010400  # NVMe 1.4
ONCS = 1 << 2 | 1 << 3  # Dataset Management, Write Zeroes
VWC = 0x07  # a volatile write cache; Flush takes the broadcast NSID
OAES = 1 << 8  # namespace attribute notices (so Linux keeps an AER outstanding)
TIMEOUT_500MS = 20  # CAP.TO: 10 s


class NvmeError(Exception):
    """A command fails with this status (see protocol.nvme.status)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def generic(sc: int, reason: str) -> NvmeError:
    return NvmeError(nvme.status(Sct.GENERIC, sc), reason)


def specific(sc: int, reason: str) -> NvmeError:
    return NvmeError(nvme.status(Sct.COMMAND_SPECIFIC, sc), reason)


class QueueMemoryError(Exception):
    """A queue's own memory could not be reached: controller fatal status."""


HELD = -1  # an Asynchronous Event Request completes later


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


@dataclass
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0


@dataclass
class CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int
    interrupts: bool
    head: int = 0
    tail: int = 0
    phase: bool = True
    # (dw0, sq head, sq id, cid, status): completions waiting for room
    waiting: deque[tuple[int, int, int, int, int]] = field(default_factory=deque)

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head


def default_features() -> dict[int, int]:
    return {
        Feature.ARBITRATION: 0,
        Feature.POWER_MANAGEMENT: 0,
        Feature.TEMPERATURE_THRESHOLD: WCTEMP,  # over, composite (key: fid | sel << 8)
        Feature.TEMPERATURE_THRESHOLD | 0x10 << 8: 0,  # under, composite
        Feature.ERROR_RECOVERY: 0,
        Feature.VOLATILE_WRITE_CACHE: 1,
        Feature.INTERRUPT_COALESCING: 0,
        Feature.WRITE_ATOMICITY: 0,
        Feature.ASYNC_EVENT_CONFIG: 0,
    }


class NvmeController(PciDevice):
    name = "nvme"
    description = "NVMe controller on raw image files (--namespace FILE[,ro], repeatable)"
    vendor_id = 0x1234
    device_id = 0x4E56
    subsystem_vendor_id = 0x1234
    subsystem_id = 0x4E56
    class_code = 0x010802  # mass storage, non-volatile memory, NVMe
    msix_vectors = MAX_IO_QUEUES + 1
    msix_bar = 4
    register_width = 4
    has_sectors = True  # the fault rules' ioerr and corrupt apply (512-byte sectors)
    # As virtio-blk's (preadv/pwritev, fallocate for holes and zeros, fdatasync).
    syscalls = frozenset({"preadv2", "pwritev2", "preadv", "pwritev", "fallocate", "fdatasync"})
    state = Schema(
        1,
        Field("registers", INT_MAP),
        Field(
            "submission_queues",
            records(qid=U16, base=U64, size=U32, cqid=U16, head=U32, tail=U32),
        ),
        Field(
            "completion_queues",
            records(
                qid=U16,
                base=U64,
                size=U32,
                vector=U16,
                interrupts=BOOL,
                head=U32,
                tail=U32,
                phase=BOOL,
            ),
        ),
        Field(
            "waiting_completions",
            records(cqid=U16, dw0=U32, sq_head=U16, sq_id=U16, cid=U16, status=U16),
        ),
        Field("features", INT_MAP),
        Field("queues_granted", U32),
        Field("async_requests", records(cid=U16)),
        Field("async_events", records(dw0=U32)),
        Field("async_masked", U32),
        Field("critical_warning", U32),
        Field("health", INT_MAP),
        Field("namespaces", records(nsid=U32, blocks=U64, read_only=BOOL)),
    )

    def __init__(self, namespaces: list[tuple[int, bool, str]], *, serial: str = "") -> None:
        """``namespaces``: (image fd, read-only, label) each, NSID 1 first."""
        if not 1 <= len(namespaces) <= 1024:
            raise ValueError("an NVMe controller needs 1 to 1024 namespaces")
        super().__init__({0: Bar(0x4000, is_64bit=True), 4: Bar(4096)})
        self.namespaces = {
            nsid: Namespace(nsid, fd, read_only, image_size(fd) // LBA, label)
            for nsid, (fd, read_only, label) in enumerate(namespaces, 1)
        }
        digest = hashlib.sha256("\0".join(n[2] for n in namespaces).encode()).hexdigest()
        self.serial = (serial or f"VFU{digest[:17]}")[:20]
        self.subnqn = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.UUID(digest[:32])}"
        self._generation = 0  # bumped at every reset: work in flight is dropped
        self._busy = False  # the queue task runs
        self._held = False  # handover: no progress until release
        # SMART counters: blocks read, written; read, write commands; power
        # cycles; media errors
        self.health: dict[int, int] = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0}
        self.device_reset()

    # -- plugin wiring ---------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--namespace",
            action="append",
            required=True,
            metavar="FILE[,ro]",
            help="a namespace on this raw image file (repeat for NSID 2, 3, ...); ',ro' "
            "makes it write protected",
        )
        parser.add_argument(
            "--size",
            type=parse_size,
            metavar="BYTES",
            help="create missing images sparse with this size (e.g. 1G)",
        )
        parser.add_argument(
            "--serial", default="", help="serial number (20 characters; default from the paths)"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        opened: list[tuple[int, bool, str]] = []
        try:
            for text in args.namespace:
                path, *flags = text.split(",")
                if any(f != "ro" for f in flags) or not path:
                    raise ValueError(f"--namespace {text!r}: give FILE or FILE,ro")
                read_only = "ro" in flags
                fd = open_image(path, args.size, read_only)
                opened.append((fd, read_only, os.path.realpath(path)))
            return cls(opened, serial=args.serial)
        except BaseException:
            for fd, _, _ in opened:
                os.close(fd)
            raise

    def close(self) -> None:
        for namespace in self.namespaces.values():
            os.close(namespace.fd)
        super().close()

    def statistics(self) -> dict[str, Any]:
        return {
            "namespaces": {
                n.nsid: {"blocks": n.blocks, "read_only": n.read_only}
                for n in self.namespaces.values()
            },
            "enabled": bool(self.csts & nvme.CSTS_RDY),
            "io_queues": len(self.sqs) - (1 if 0 in self.sqs else 0),
        }

    # -- reset -----------------------------------------------------------------------------

    def device_reset(self) -> None:
        """Power-on values (a function-level or VMM reset)."""
        self.cc = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self._controller_reset()
        self.csts = 0

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0: queues, outstanding commands and events go; AQA,
        ASQ and ACQ stay."""
        self._generation += 1
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.features = default_features()
        self.queues_granted = (MAX_IO_QUEUES - 1) | (MAX_IO_QUEUES - 1) << 16
        self.async_requests: list[int] = []
        self.async_events: list[int] = []
        self.async_masked = 0  # event types reported and not yet read in their log
        self.critical_warning = 0
        self.csts = 0
        self.lower_interrupt()

    @property
    def wce(self) -> bool:
        return bool(self.features[Feature.VOLATILE_WRITE_CACHE] & 1)

    # -- registers ---------------------------------------------------------------------------

    def _register(self, offset: int) -> int:
        cap = nvme.cap(mqes=MQES, timeout_500ms=TIMEOUT_500MS)
        values = {
            Reg.CAP: cap & 0xFFFFFFFF,
            Reg.CAP + 4: cap >> 32,
            Reg.VS: VERSION,
            Reg.INTMS: self.intms,
            Reg.INTMC: self.intms,
            Reg.CC: self.cc,
            Reg.CSTS: self.csts,
            Reg.AQA: self.aqa,
            Reg.ASQ: self.asq & 0xFFFFFFFF,
            Reg.ASQ + 4: self.asq >> 32,
            Reg.ACQ: self.acq & 0xFFFFFFFF,
            Reg.ACQ + 4: self.acq >> 32,
        }
        return values.get(offset, 0)

    async def read_register(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or offset >= Reg.DOORBELLS:  # doorbells are write-only
            return 0
        aligned = offset & ~3
        return self._register(aligned) >> 8 * (offset - aligned)

    async def write_register(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0:
            return
        if offset >= Reg.DOORBELLS:
            if size == 4:
                self._doorbell(offset, value)
            else:
                log.warning("doorbell.width", offset=offset, size=size)
            return
        aligned = offset & ~3
        if size < 4:  # merge a narrow write into the register
            shift = 8 * (offset - aligned)
            mask = ((1 << 8 * size) - 1) << shift
            value = self._register(aligned) & ~mask | (value << shift) & mask
        if aligned == Reg.CC:
            self._write_cc(value)
        elif aligned == Reg.INTMS:
            self.intms |= value
        elif aligned == Reg.INTMC:
            self.intms &= ~value
        elif aligned == Reg.AQA:
            self.aqa = value & 0x0FFF0FFF
        elif aligned in (Reg.ASQ, Reg.ASQ + 4):
            self.asq = _half(self.asq, aligned - Reg.ASQ, value)
        elif aligned in (Reg.ACQ, Reg.ACQ + 4):
            self.acq = _half(self.acq, aligned - Reg.ACQ, value)
        # NSSR (no subsystem reset offered), read-only and reserved ones: ignored

    def _write_cc(self, value: int) -> None:
        old, new = nvme.CC.decode(self.cc), nvme.CC.decode(value)
        self.cc = value
        if old.en and not new.en:
            self._controller_reset()
            log.info("controller.disabled")
            return
        if new.en and not old.en:
            self._enable(new)
        if new.en and new.shn and not old.shn:
            self._shutdown()
        elif new.en and not new.shn and old.shn:
            self._set_shst(nvme.SHST_NORMAL)

    def _enable(self, cc: nvme.CC) -> None:
        asqs, acqs = (self.aqa & 0xFFF) + 1, (self.aqa >> 16 & 0xFFF) + 1
        problem = None
        if asqs < 2 or acqs < 2:
            problem = f"admin queue sizes {asqs}/{acqs}"
        elif not self.asq or not self.acq or (self.asq | self.acq) % nvme.PAGE:
            problem = f"admin queue addresses {self.asq:#x}/{self.acq:#x}"
        elif cc.mps or cc.css or cc.ams:
            problem = f"CC {self.cc:#x}: MPS, CSS or AMS not offered"
        elif cc.iosqes != nvme.SQES_LOG2 or cc.iocqes != nvme.CQES_LOG2:
            problem = f"CC {self.cc:#x}: I/O queue entry sizes"
        if problem is not None:
            self._fatal(problem)
            return
        self.cqs[0] = CompletionQueue(0, self.acq, acqs, vector=0, interrupts=True)
        self.sqs[0] = SubmissionQueue(0, self.asq, asqs, cqid=0)
        self.csts = nvme.CSTS_RDY
        log.info("controller.enabled", admin_sq=asqs, admin_cq=acqs)

    def _fatal(self, reason: str) -> None:
        """Controller Fatal Status: the driver resets the controller."""
        self.csts |= nvme.CSTS_CFS
        self._generation += 1
        log.error("controller.fatal", reason=reason)

    def _set_shst(self, shst: int) -> None:
        self.csts = self.csts & ~(3 << nvme.CSTS_SHST_SHIFT) | shst << nvme.CSTS_SHST_SHIFT

    def _shutdown(self) -> None:
        self._set_shst(nvme.SHST_OCCURRING)
        generation = self._generation

        async def flush_all() -> None:
            for namespace in self.namespaces.values():
                await self._sync(namespace)
            if generation == self._generation:
                self._set_shst(nvme.SHST_COMPLETE)
                log.info("controller.shutdown")

        if self._tasks is None:
            self._set_shst(nvme.SHST_COMPLETE)
        else:
            self.run_in_background(flush_all)

    def _doorbell(self, offset: int, value: int) -> None:
        target = nvme.doorbell(offset)
        if not self.csts & nvme.CSTS_RDY or self.csts & nvme.CSTS_CFS:
            return
        if target is None:
            self._invalid_doorbell(nvme.AEI_INVALID_DOORBELL_REGISTER, offset, value)
            return
        qid, completion = target
        queue: SubmissionQueue | CompletionQueue | None = (
            self.cqs.get(qid) if completion else self.sqs.get(qid)
        )
        if queue is None:
            self._invalid_doorbell(nvme.AEI_INVALID_DOORBELL_REGISTER, offset, value)
            return
        if value >= queue.size:
            self._invalid_doorbell(nvme.AEI_INVALID_DOORBELL_VALUE, offset, value)
            return
        if isinstance(queue, CompletionQueue):
            posted = (queue.tail - queue.head) % queue.size
            if (value - queue.head) % queue.size > posted:  # past what was posted
                self._invalid_doorbell(nvme.AEI_INVALID_DOORBELL_VALUE, offset, value)
                return
            queue.head = value
            if not any(q.head != q.tail for q in self.cqs.values() if q.interrupts):
                self.lower_interrupt()  # INTx: nothing left to handle
            if queue.waiting:
                self._wake()
        else:
            queue.tail = value
            self._wake()

    def _invalid_doorbell(self, info: int, offset: int, value: int) -> None:
        log.warning("doorbell.invalid", offset=offset, value=value, info=info)
        self._event(nvme.async_event(AsyncEventType.ERROR, info, LogPage.ERROR))

    # -- the queue task ---------------------------------------------------------------------

    def _can_run(self) -> bool:
        return (
            self.csts & (nvme.CSTS_RDY | nvme.CSTS_CFS | 3 << nvme.CSTS_SHST_SHIFT) == nvme.CSTS_RDY
            and not self.stopped
            and not self._held
        )

    def _wake(self) -> None:
        if self._busy or self._tasks is None or not self._can_run():
            return
        self._busy = True
        self.run_in_background(self._serve)

    async def _serve(self) -> None:
        generation = self._generation
        try:
            while self._can_run() and generation == self._generation:
                if not await self._round(generation):
                    break
                await trio.lowlevel.checkpoint()  # the session's commands go on
        except QueueMemoryError as exc:
            if generation == self._generation:
                self._fatal(str(exc))
        finally:
            self._busy = False
        if generation != self._generation:
            self._wake()  # reset and enabled again meanwhile

    def _current(self, generation: int) -> bool:
        return generation == self._generation and self._can_run()

    async def _round(self, generation: int) -> bool:
        """Serve what every queue has; False if nothing was there."""
        progressed = False
        for cq in list(self.cqs.values()):
            while cq.waiting and not cq.full and self._current(generation):
                await self._post(cq, cq.waiting.popleft())
                progressed = True
        if self.async_requests and self.async_events:
            progressed = await self._deliver_events(generation) or progressed
        for sq in list(self.sqs.values()):
            if not self._current(generation) or self.sqs.get(sq.qid) is not sq:
                break
            cq = self.cqs[sq.cqid]
            if sq.head == sq.tail or cq.waiting:
                continue
            count = min(BURST, (sq.tail - sq.head) % sq.size, sq.size - sq.head)
            try:
                raw = await self.dma_read(sq.base + sq.head * nvme.SQE_SIZE, count * nvme.SQE_SIZE)
            except GuestMemoryError as exc:
                raise QueueMemoryError(f"SQ {sq.qid} entry {sq.head}: {exc}") from None
            for index in range(count):
                if not self._current(generation) or self.sqs.get(sq.qid) is not sq:
                    return True
                sq.head = (sq.head + 1) % sq.size
                await self._execute(sq, Command.decode(raw, index * nvme.SQE_SIZE), generation)
            progressed = True
        return progressed

    async def _execute(self, sq: SubmissionQueue, cmd: Command, generation: int) -> None:
        started = time.monotonic_ns()
        admin = sq.qid == 0
        dw0 = 0
        try:
            if cmd.fuse or cmd.flags & 0x3C:
                raise generic(Generic.INVALID_FIELD, f"flags {cmd.flags:#x} (fused, reserved)")
            if cmd.psdt:
                raise generic(Generic.INVALID_FIELD, "SGLs are not offered")
            if admin:
                dw0 = await self._admin(cmd)
            else:
                dw0 = await self._io(sq.qid, cmd)
            result = nvme.SUCCESS
        except NvmeError as exc:
            result = exc.status
            level = log.debug if admin else log.warning
            level(
                "command.failed",
                queue=sq.qid,
                cid=cmd.cid,
                opcode=nvme.opcode_name(admin, cmd.opcode),
                status=nvme.status_name(result),
                reason=str(exc),
            )
        except GuestMemoryError as exc:
            result = nvme.status(Sct.GENERIC, Generic.DATA_TRANSFER_ERROR)
            log.warning("command.dma_failed", queue=sq.qid, cid=cmd.cid, reason=str(exc))
        if dw0 == HELD or generation != self._generation:
            return
        latency = time.monotonic_ns() - started
        queue_stats = stats.of_queue(sq.qid)
        moved = (cmd.nlb * LBA) if not admin and cmd.opcode in (1, 2) and not result else 0
        queue_stats.count(1, moved, latency)
        if result:
            queue_stats.errors += 1
        if tracer.wants("request"):
            io = {} if admin else {"slba": cmd.slba, "nlb": cmd.nlb}
            tracer.emit(
                "request",
                "complete",
                queue=sq.qid,
                cid=cmd.cid,
                opcode=nvme.opcode_name(admin, cmd.opcode),
                nsid=cmd.nsid,
                **io,
                status=nvme.status_name(result),
                latency_ns=latency,
            )
        await self._complete(sq, cmd.cid, result, dw0)

    async def _complete(self, sq: SubmissionQueue, cid: int, result: int, dw0: int) -> None:
        cq = self.cqs[sq.cqid]
        entry = (dw0, sq.head, sq.qid, cid, result)
        if cq.waiting or cq.full:
            cq.waiting.append(entry)
        else:
            await self._post(cq, entry)

    async def _post(self, cq: CompletionQueue, entry: tuple[int, int, int, int, int]) -> None:
        dw0, sq_head, sq_id, cid, result = entry
        raw = nvme.Completion(dw0, 0, sq_head, sq_id, cid, result, cq.phase).encode()
        address = cq.base + cq.tail * nvme.CQE_SIZE
        try:
            # The dword with the phase tag goes last: the driver polls it.
            await self.dma_write(address, raw[:12])
            await self.dma_write(address + 12, raw[12:])
        except GuestMemoryError as exc:
            raise QueueMemoryError(f"CQ {cq.qid} entry {cq.tail}: {exc}") from None
        cq.tail = (cq.tail + 1) % cq.size
        if cq.tail == 0:
            cq.phase = not cq.phase
        if cq.interrupts:
            self.interrupt(cq.vector)

    # -- asynchronous events --------------------------------------------------------------------

    def _event(self, dw0: int) -> None:
        if len(self.async_events) < 16 and dw0 not in self.async_events:
            self.async_events.append(dw0)
        self._wake()

    async def _deliver_events(self, generation: int) -> bool:
        delivered = False
        for event in list(self.async_events):
            kind = event & 7
            if not self.async_requests or self.async_masked & 1 << kind:
                continue
            self.async_events.remove(event)
            self.async_masked |= 1 << kind
            cid = self.async_requests.pop(0)
            await self._complete(self.sqs[0], cid, nvme.SUCCESS, event)
            delivered = True
            if not self._current(generation):
                break
        return delivered

    # -- admin commands ---------------------------------------------------------------------------

    async def _admin(self, cmd: Command) -> int:
        handlers: dict[int, Callable[[Command], Awaitable[int]]] = {
            AdminOpcode.IDENTIFY: self._identify,
            AdminOpcode.CREATE_IO_CQ: self._create_cq,
            AdminOpcode.CREATE_IO_SQ: self._create_sq,
            AdminOpcode.DELETE_IO_SQ: self._delete_sq,
            AdminOpcode.DELETE_IO_CQ: self._delete_cq,
            AdminOpcode.GET_LOG_PAGE: self._get_log_page,
            AdminOpcode.SET_FEATURES: self._set_features,
            AdminOpcode.GET_FEATURES: self._get_features,
            AdminOpcode.ASYNC_EVENT_REQUEST: self._async_event_request,
            AdminOpcode.ABORT: self._abort,
            AdminOpcode.KEEP_ALIVE: self._keep_alive,
        }
        handler = handlers.get(cmd.opcode)
        if handler is None:
            raise generic(Generic.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}")
        return await handler(cmd)

    async def _identify(self, cmd: Command) -> int:
        cns, nsid = cmd.cdw10 & 0xFF, cmd.nsid
        if cns == Cns.CONTROLLER:
            data = nvme.identify_controller(
                nvme.ControllerIdentity(
                    vendor_id=self.vendor_id,
                    subsystem_vendor_id=self.subsystem_vendor_id,
                    serial=self.serial,
                    model="vfiouserd NVMe",
                    firmware="1.0",
                    version=VERSION,
                    mdts=MDTS,
                    cntlid=1,
                    oaes=OAES,
                    aerl=AERL,
                    acl=3,
                    elpe=ELPE,
                    oncs=ONCS,
                    vwc=VWC,
                    namespaces=len(self.namespaces),
                    subnqn=self.subnqn,
                    wctemp=WCTEMP,
                    cctemp=CCTEMP,
                )
            )
        elif cns == Cns.NAMESPACE:
            if nsid == nvme.BROADCAST_NSID:  # what all namespaces share
                data = nvme.identify_namespace(0, LBA_LOG2, write_protected=False)
            else:
                namespace = self._namespace(nsid)
                data = nvme.identify_namespace(
                    namespace.blocks, LBA_LOG2, write_protected=namespace.read_only
                )
        elif cns == Cns.ACTIVE_NAMESPACES:
            if nsid >= 0xFFFFFFFE:
                raise generic(Generic.INVALID_NAMESPACE, f"active list after {nsid:#x}")
            data = nvme.active_namespaces(list(self.namespaces), nsid)
        elif cns == Cns.NS_DESCRIPTORS:
            data = nvme.namespace_descriptors(self._namespace(nsid).uuid)
        elif cns in (Cns.CSI_CONTROLLER, Cns.CSI_NAMESPACE) and cmd.cdw11 >> 24 == 0:
            if cns == Cns.CSI_NAMESPACE:
                self._namespace(nsid)
            data = bytes(nvme.IDENTIFY_SIZE)  # NVM command set: no limits to tell
        else:
            raise generic(Generic.INVALID_FIELD, f"CNS {cns:#x}")
        await self._to_guest(cmd, data)
        return 0

    def _namespace(self, nsid: int) -> Namespace:
        namespace = self.namespaces.get(nsid)
        if namespace is None:
            raise generic(Generic.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        return namespace

    def _new_queue_checks(self, cmd: Command, existing: dict[int, Any], granted: int) -> int:
        qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        if qid == 0 or qid > granted + 1 or qid in existing:
            raise specific(Specific.INVALID_QUEUE_IDENTIFIER, f"queue id {qid}")
        if qsize < 2 or qsize > MQES + 1:
            raise specific(Specific.INVALID_QUEUE_SIZE, f"{qsize} entries")
        if not cmd.cdw11 & 1:
            raise generic(Generic.INVALID_FIELD, "queues must be physically contiguous")
        if cmd.prp1 % nvme.PAGE:
            raise generic(Generic.PRP_OFFSET_INVALID, f"queue base {cmd.prp1:#x}")
        return qsize

    async def _create_cq(self, cmd: Command) -> int:
        qsize = self._new_queue_checks(cmd, self.cqs, self.queues_granted >> 16)
        interrupts, vector = bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
        if vector >= self.msix_vectors:
            raise specific(Specific.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
        qid = cmd.cdw10 & 0xFFFF
        self.cqs[qid] = CompletionQueue(qid, cmd.prp1, qsize, vector, interrupts)
        log.debug("queue.created", cq=qid, size=qsize, vector=vector, interrupts=interrupts)
        return 0

    async def _create_sq(self, cmd: Command) -> int:
        qsize = self._new_queue_checks(cmd, self.sqs, self.queues_granted & 0xFFFF)
        cqid = cmd.cdw11 >> 16
        if cqid == 0 or cqid not in self.cqs:
            raise specific(Specific.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
        qid = cmd.cdw10 & 0xFFFF
        self.sqs[qid] = SubmissionQueue(qid, cmd.prp1, qsize, cqid)
        log.debug("queue.created", sq=qid, size=qsize, cq=cqid)
        return 0

    async def _delete_sq(self, cmd: Command) -> int:
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.sqs:
            raise specific(Specific.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
        # Commands are run to their end one at a time: none is outstanding.
        del self.sqs[qid]
        log.debug("queue.deleted", sq=qid)
        return 0

    async def _delete_cq(self, cmd: Command) -> int:
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.cqs:
            raise specific(Specific.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
        if any(sq.cqid == qid for sq in self.sqs.values()):
            raise specific(Specific.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
        del self.cqs[qid]
        log.debug("queue.deleted", cq=qid)
        return 0

    async def _get_log_page(self, cmd: Command) -> int:
        lid, rae = cmd.cdw10 & 0xFF, bool(cmd.cdw10 & 1 << 15)
        length = (((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1) * 4
        offset = cmd.cdw12 | cmd.cdw13 << 32
        if length > MAX_TRANSFER or offset % 4:
            raise generic(Generic.INVALID_FIELD, f"log of {length} bytes at {offset}")
        if lid == LogPage.ERROR:
            page = bytes(64 * (ELPE + 1))
        elif lid == LogPage.SMART:
            page = nvme.smart_log(self._health())
        elif lid == LogPage.FIRMWARE_SLOT:
            page = nvme.firmware_slot_log("1.0")
        elif lid == LogPage.CHANGED_NAMESPACES:
            page = bytes(4096)
        else:
            raise specific(Specific.INVALID_LOG_PAGE, f"log page {lid:#x}")
        if offset > len(page):
            raise generic(Generic.INVALID_FIELD, f"offset {offset} beyond the log")
        await self._to_guest(cmd, page[offset : offset + length].ljust(length, b"\0"))
        if not rae:  # read: events of its type may be reported again
            kinds: dict[int, int] = {
                LogPage.ERROR: 0,
                LogPage.SMART: 1,
                LogPage.CHANGED_NAMESPACES: 2,
            }
            kind = kinds.get(lid)
            if kind is not None:
                self.async_masked &= ~(1 << kind)
                if lid == LogPage.SMART and not self._over_temperature():
                    self.critical_warning &= ~2
        return 0

    def _health(self) -> nvme.Health:
        h = self.health
        return nvme.Health(
            temperature=TEMPERATURE,
            critical_warning=self.critical_warning,
            data_units_read=(h[0] + 999) // 1000,
            data_units_written=(h[1] + 999) // 1000,
            read_commands=h[2],
            write_commands=h[3],
            power_cycles=h[4],
            power_on_hours=0,
            unsafe_shutdowns=0,
            media_errors=h[5],
            error_entries=0,
        )

    def _over_temperature(self) -> bool:
        over = self.features[Feature.TEMPERATURE_THRESHOLD]
        under = self.features[Feature.TEMPERATURE_THRESHOLD | 0x10 << 8]
        return over <= TEMPERATURE or under > TEMPERATURE

    def _feature_key(self, cmd: Command, fid: int) -> int:
        if fid == Feature.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = cmd.cdw11 >> 16 & 0xF, cmd.cdw11 >> 20 & 3
            if tmpsel not in (0, 0xF) or thsel > 1:
                raise generic(Generic.INVALID_FIELD, f"threshold sensor {tmpsel} type {thsel}")
            return fid | thsel << 12
        return fid

    async def _set_features(self, cmd: Command) -> int:
        fid, value = cmd.cdw10 & 0xFF, cmd.cdw11
        if cmd.cdw10 & 1 << 31:
            raise specific(Specific.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}")
        if fid == Feature.NUMBER_OF_QUEUES:
            if value & 0xFFFF == 0xFFFF or value >> 16 == 0xFFFF:
                raise generic(Generic.INVALID_FIELD, f"{value:#x} queues")
            if len(self.sqs) > 1 or len(self.cqs) > 1:
                raise generic(Generic.COMMAND_SEQUENCE_ERROR, "I/O queues exist")
            nsq = min(value & 0xFFFF, MAX_IO_QUEUES - 1)
            ncq = min(value >> 16, MAX_IO_QUEUES - 1)
            self.queues_granted = nsq | ncq << 16
            return self.queues_granted
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            if value & 0xFFFF >= self.msix_vectors:
                raise generic(Generic.INVALID_FIELD, f"vector {value & 0xFFFF}")
            self.features[fid | (value & 0xFFFF) << 16] = value & 0x1FFFF
            return 0
        if fid == Feature.POWER_MANAGEMENT and value & 0x1F:
            raise generic(Generic.INVALID_FIELD, f"power state {value & 0x1F}")
        key = self._feature_key(cmd, fid)
        if key not in self.features:
            raise generic(Generic.INVALID_FIELD, f"feature {fid:#x}")
        self.features[key] = value & 0xFFFF if fid == Feature.TEMPERATURE_THRESHOLD else value
        if fid == Feature.TEMPERATURE_THRESHOLD and self._over_temperature():
            self.critical_warning |= 2
            if self.features[Feature.ASYNC_EVENT_CONFIG] & 2:
                self._event(
                    nvme.async_event(
                        AsyncEventType.SMART, nvme.AEI_TEMPERATURE_THRESHOLD, LogPage.SMART
                    )
                )
        if fid == Feature.VOLATILE_WRITE_CACHE:
            log.info("write_cache.set", enabled=self.wce)
        return 0

    async def _get_features(self, cmd: Command) -> int:
        fid, select = cmd.cdw10 & 0xFF, cmd.cdw10 >> 8 & 7
        if fid == Feature.NUMBER_OF_QUEUES:
            key = None
        elif fid == Feature.INTERRUPT_VECTOR_CONFIG:
            vector = cmd.cdw11 & 0xFFFF
            if vector >= self.msix_vectors:
                raise generic(Generic.INVALID_FIELD, f"vector {vector}")
            key = fid | vector << 16
        else:
            key = self._feature_key(cmd, fid)
            if key not in self.features:
                raise generic(Generic.INVALID_FIELD, f"feature {fid:#x}")
        if select == 3:  # supported capabilities: changeable, not saveable
            return 1 << 2
        if select > 3:
            raise generic(Generic.INVALID_FIELD, f"select {select}")
        if fid == Feature.NUMBER_OF_QUEUES:
            default = (MAX_IO_QUEUES - 1) | (MAX_IO_QUEUES - 1) << 16
            return default if select else self.queues_granted
        if key is not None and fid == Feature.INTERRUPT_VECTOR_CONFIG:
            return self.features.get(key, key >> 16) if not select else key >> 16
        assert key is not None
        return int(default_features()[key] if select else self.features[key])

    async def _async_event_request(self, cmd: Command) -> int:
        if len(self.async_requests) > AERL:
            raise specific(Specific.ASYNC_EVENT_LIMIT_EXCEEDED, "too many AERs")
        self.async_requests.append(cmd.cid)
        return HELD

    async def _abort(self, cmd: Command) -> int:
        return 1  # not aborted: commands are run to their end as they come

    async def _keep_alive(self, cmd: Command) -> int:
        return 0

    # -- data transfer (PRPs) -----------------------------------------------------------------

    async def _segments(self, cmd: Command, length: int) -> list[tuple[int, int]]:
        """The guest ranges ``cmd``'s PRP entries give for ``length`` bytes."""
        page = nvme.PAGE
        prp1, prp2 = cmd.prp1, cmd.prp2
        if prp1 & 3:
            raise generic(Generic.INVALID_FIELD, f"PRP1 {prp1:#x} not dword aligned")
        first = min(length, page - prp1 % page)
        segments = [(prp1, first)]
        remaining = length - first
        if remaining <= 0:
            return segments
        if remaining <= page:
            if prp2 % page:
                raise generic(Generic.PRP_OFFSET_INVALID, f"PRP2 {prp2:#x}")
            return [*segments, (prp2, remaining)]
        if prp2 & 7:
            raise generic(Generic.PRP_OFFSET_INVALID, f"PRP list {prp2:#x}")
        entries = -(-remaining // page)
        address, seen = prp2, set()
        while entries:
            if address // page in seen:
                raise generic(Generic.DATA_TRANSFER_ERROR, f"PRP list page {address:#x} again")
            seen.add(address // page)
            slots = (page - address % page) // 8
            wanted = entries if entries <= slots else slots
            raw = await self.dma_read(address, wanted * 8)
            values = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]
            chained = entries > slots
            for value in values[:-1] if chained else values:
                if value % page:
                    raise generic(Generic.PRP_OFFSET_INVALID, f"PRP entry {value:#x}")
                segments.append((value, min(page, remaining)))
                remaining -= page
                entries -= 1
            if chained:
                address = values[-1]
                if address % page:
                    raise generic(Generic.PRP_OFFSET_INVALID, f"PRP list pointer {address:#x}")
        return segments

    async def _to_guest(self, cmd: Command, data: bytes) -> None:
        done = 0
        for address, size in await self._segments(cmd, len(data)):
            await self.dma_write(address, data[done : done + size])
            done += size

    async def _from_guest(self, cmd: Command, length: int) -> bytes:
        parts = [await self.dma_read(a, n) for a, n in await self._segments(cmd, length)]
        return b"".join(parts)

    # -- I/O commands ---------------------------------------------------------------------------

    async def _io(self, qid: int, cmd: Command) -> int:
        opcode = cmd.opcode
        if opcode not in (IoOpcode.FLUSH, IoOpcode.WRITE, IoOpcode.READ) and opcode not in (
            IoOpcode.WRITE_ZEROES,
            IoOpcode.DATASET_MANAGEMENT,
        ):
            raise generic(Generic.INVALID_OPCODE, f"I/O opcode {opcode:#x}")
        if opcode == IoOpcode.FLUSH and cmd.nsid == nvme.BROADCAST_NSID:
            for namespace in self.namespaces.values():
                await self._sync(namespace)
            return 0
        namespace = self._namespace(cmd.nsid)
        if opcode == IoOpcode.FLUSH:
            await self._sync(namespace)
        elif opcode == IoOpcode.DATASET_MANAGEMENT:
            await self._dataset_management(namespace, cmd)
        else:
            slba, nlb = cmd.slba, cmd.nlb
            if slba + nlb > namespace.blocks:
                raise generic(Generic.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb}")
            if opcode != IoOpcode.READ and namespace.read_only:
                raise generic(Generic.NAMESPACE_WRITE_PROTECTED, f"namespace {namespace.nsid}")
            if opcode == IoOpcode.WRITE_ZEROES:
                self._blk(punch_hole if cmd.cdw12 & 1 << 25 else zero_range, namespace, slba, nlb)
            elif nlb * LBA > MAX_TRANSFER:
                raise generic(Generic.INVALID_FIELD, f"{nlb} blocks exceed MDTS")
            elif opcode == IoOpcode.READ:
                await self._read(qid, namespace, cmd)
            else:
                await self._write(qid, namespace, cmd)
            if opcode != IoOpcode.READ and (cmd.cdw12 & 1 << 30 or not self.wce):
                await self._sync(namespace)  # FUA, or the cache is off
        return 0

    async def _faults(self, qid: int, kind: str, slba: int, nlb: int) -> None:
        span = (slba, slba + nlb)
        if faults.rules.sector_fault("ioerr", qid, kind, span) is not None:
            self.health[5] += 1
            media = Media.UNRECOVERED_READ_ERROR if kind == "read" else Media.WRITE_FAULT
            raise NvmeError(nvme.status(Sct.MEDIA, media), "injected fault")
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
            self.health[5] += 1
            raise NvmeError(
                nvme.status(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR), exc.strerror or "read"
            ) from None
        buffer[got:] = bytes(length - got)  # the image shrank: zeros
        if faults.rules.has_rules:
            hit = faults.rules.sector_fault("corrupt", qid, "read", (cmd.slba, cmd.slba + cmd.nlb))
            if hit is not None:
                start, end = (hit[0] - cmd.slba) * LBA, (hit[1] - cmd.slba) * LBA
                buffer[start:end] = bytes(b ^ 0xFF for b in buffer[start:end])
        await self._to_guest(cmd, bytes(buffer))
        self.health[0] += cmd.nlb
        self.health[2] += 1

    async def _write(self, qid: int, namespace: Namespace, cmd: Command) -> None:
        if faults.rules.has_rules:
            await self._faults(qid, "write", cmd.slba, cmd.nlb)
        data = await self._from_guest(cmd, cmd.nlb * LBA)
        offset, view = cmd.slba * LBA, memoryview(data)
        try:
            while view:
                done = os.pwritev(namespace.fd, [view], offset)
                if done <= 0:
                    raise OSError(0, "no progress")
                view, offset = view[done:], offset + done
        except OSError as exc:
            self.health[5] += 1
            raise NvmeError(
                nvme.status(Sct.MEDIA, Media.WRITE_FAULT), exc.strerror or "write"
            ) from None
        self.health[1] += cmd.nlb
        self.health[3] += 1

    def _blk(self, call: Any, namespace: Namespace, slba: int, nlb: int) -> None:
        """punch_hole or zero_range (devices/blk.py) over these blocks."""
        try:
            call(namespace.fd, slba * LBA, nlb * LBA)
        except BlkError as exc:
            raise generic(Generic.INTERNAL_ERROR, str(exc)) from None

    async def _dataset_management(self, namespace: Namespace, cmd: Command) -> None:
        count = (cmd.cdw10 & 0xFF) + 1
        raw = await self._from_guest(cmd, count * nvme.DSM_RANGE.size)
        ranges = [nvme.DSM_RANGE.unpack_from(raw, i * nvme.DSM_RANGE.size) for i in range(count)]
        for _, blocks, slba in ranges:  # all checked before any is done
            if slba + blocks > namespace.blocks:
                raise generic(Generic.LBA_OUT_OF_RANGE, f"range {slba}+{blocks}")
        if not cmd.cdw11 & nvme.DSM_ATTR_DEALLOCATE:
            return  # only hints (integral read/write)
        if namespace.read_only:
            raise generic(Generic.NAMESPACE_WRITE_PROTECTED, f"namespace {namespace.nsid}")
        for _, blocks, slba in ranges:
            if blocks:
                self._blk(punch_hole, namespace, slba, blocks)
        if not self.wce:
            await self._sync(namespace)

    async def _sync(self, namespace: Namespace) -> None:
        if namespace.read_only:
            return
        try:  # on a thread: the session goes on answering meanwhile
            await trio.to_thread.run_sync(os.fdatasync, namespace.fd)
        except OSError as exc:
            raise NvmeError(
                nvme.status(Sct.MEDIA, Media.WRITE_FAULT), f"fdatasync: {exc.strerror}"
            ) from None

    # -- the VMM connection, migration, handover ------------------------------------------

    def attach(self, nursery: Any) -> None:
        super().attach(nursery)
        self._wake()

    def resume(self) -> None:
        super().resume()
        self._wake()

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False
        self._wake()

    # -- state ----------------------------------------------------------------------------

    def save_device_state(self) -> dict[str, Any]:
        return {
            "registers": {
                Reg.CC: self.cc,
                Reg.CSTS: self.csts,
                Reg.AQA: self.aqa,
                Reg.ASQ: self.asq,
                Reg.ACQ: self.acq,
                Reg.INTMS: self.intms,
            },
            "submission_queues": [
                {
                    "qid": q.qid,
                    "base": q.base,
                    "size": q.size,
                    "cqid": q.cqid,
                    "head": q.head,
                    "tail": q.tail,
                }
                for q in self.sqs.values()
            ],
            "completion_queues": [
                {
                    "qid": q.qid,
                    "base": q.base,
                    "size": q.size,
                    "vector": q.vector,
                    "interrupts": q.interrupts,
                    "head": q.head,
                    "tail": q.tail,
                    "phase": q.phase,
                }
                for q in self.cqs.values()
            ],
            "waiting_completions": [
                {
                    "cqid": q.qid,
                    "dw0": e[0],
                    "sq_head": e[1],
                    "sq_id": e[2],
                    "cid": e[3],
                    "status": e[4],
                }
                for q in self.cqs.values()
                for e in q.waiting
            ],
            "features": dict(self.features),
            "queues_granted": self.queues_granted,
            "async_requests": [{"cid": cid} for cid in self.async_requests],
            "async_events": [{"dw0": dw0} for dw0 in self.async_events],
            "async_masked": self.async_masked,
            "critical_warning": self.critical_warning,
            "health": dict(self.health),
            "namespaces": [
                {"nsid": n.nsid, "blocks": n.blocks, "read_only": n.read_only}
                for n in self.namespaces.values()
            ],
        }

    def check_device_state(self, values: dict[str, Any]) -> None:
        ours = [(n.nsid, n.blocks, n.read_only) for n in self.namespaces.values()]
        theirs = [(n["nsid"], n["blocks"], n["read_only"]) for n in values["namespaces"]]
        if ours != theirs:
            raise StateError(
                f"namespaces (nsid, blocks, read-only) {theirs}, this device has {ours}"
            )
        registers = values["registers"]
        if set(registers) != {Reg.CC, Reg.CSTS, Reg.AQA, Reg.ASQ, Reg.ACQ, Reg.INTMS}:
            raise StateError("controller registers missing or unknown")
        cqs = {q["qid"]: q for q in values["completion_queues"]}
        for q in [*values["completion_queues"], *values["submission_queues"]]:
            if not 2 <= q["size"] <= max(MQES + 1, 4096) or not q["head"] < q["size"] > q["tail"]:
                raise StateError(f"queue {q['qid']}: size {q['size']}, head/tail out of range")
        for q in values["submission_queues"]:
            if q["cqid"] not in cqs:
                raise StateError(f"SQ {q['qid']} completes to missing CQ {q['cqid']}")
        for q in values["completion_queues"]:
            if q["vector"] >= self.msix_vectors:
                raise StateError(f"CQ {q['qid']} vector {q['vector']}")
        for entry in values["waiting_completions"]:
            if entry["cqid"] not in cqs:
                raise StateError(f"a completion waits for missing CQ {entry['cqid']}")
        if set(values["health"]) != set(range(6)) or not set(values["features"]) >= set(
            default_features()
        ):
            raise StateError("health counters or features missing")

    def load_device_state(self, values: dict[str, Any]) -> None:
        self._generation += 1
        registers = values["registers"]
        self.cc, self.csts, self.aqa = registers[Reg.CC], registers[Reg.CSTS], registers[Reg.AQA]
        self.asq, self.acq, self.intms = (
            registers[Reg.ASQ],
            registers[Reg.ACQ],
            registers[Reg.INTMS],
        )
        self.cqs = {
            q["qid"]: CompletionQueue(
                q["qid"],
                q["base"],
                q["size"],
                q["vector"],
                q["interrupts"],
                q["head"],
                q["tail"],
                q["phase"],
            )
            for q in values["completion_queues"]
        }
        for e in values["waiting_completions"]:
            self.cqs[e["cqid"]].waiting.append(
                (e["dw0"], e["sq_head"], e["sq_id"], e["cid"], e["status"])
            )
        self.sqs = {
            q["qid"]: SubmissionQueue(
                q["qid"], q["base"], q["size"], q["cqid"], q["head"], q["tail"]
            )
            for q in values["submission_queues"]
        }
        self.features = dict(values["features"])
        self.queues_granted = values["queues_granted"]
        self.async_requests = [r["cid"] for r in values["async_requests"]]
        self.async_events = [e["dw0"] for e in values["async_events"]]
        self.async_masked = values["async_masked"]
        self.critical_warning = values["critical_warning"]
        self.health = dict(values["health"])
        self._wake()


def _half(value: int, which: int, half: int) -> int:
    """``value`` with its low (which=0) or high (4) dword replaced."""
    if which:
        return value & 0xFFFFFFFF | half << 32
    return value & ~0xFFFFFFFF | half
