"""The NVMe controller as a PCI function: its identity, the BAR0 registers
(CAP, VS, INTMS/INTMC, CC, CSTS, AQA, ASQ, ACQ, then the doorbells, stride 4
bytes: CAP.DSTRD 0), enable, disable, shutdown and the resets, the task that
serves the queues, and the state a migration or a restart carries. The MSI-X
table and PBA live in BAR4, one vector per completion queue.

Doorbell writes only record the new tail or head: the queues are served by
one task of the device's own (``run_in_background``), started by a doorbell
and ending once no queue has work, so the session keeps answering the VMM.
A controller reset, a shutdown or a failure to reach queue memory (CSTS.CFS)
stops it; work that was waiting for the VMM then is dropped, as the spec
drops commands outstanding at a reset. No NVM subsystem reset is offered.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import uuid
from typing import Any, Self

import trio

from vfiouserd import faults, stats
from vfiouserd._native import lib
from vfiouserd.devices.blk import image_size, open_image, parse_size
from vfiouserd.devices.nvme.admin import CCTEMP, WCTEMP, AdminCommands, default_features
from vfiouserd.devices.nvme.errors import ELPE, ErrorLog
from vfiouserd.devices.nvme.events import AERL, HELD, AsyncEvents
from vfiouserd.devices.nvme.formats import (
    CC,
    CQES_LOG2,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    OACS_DOORBELL_BUFFER_CONFIG,
    PAGE,
    PSDT_SGL,
    SHST_COMPLETE,
    SHST_NORMAL,
    SHST_OCCURRING,
    SQES_LOG2,
    SUCCESS,
    Command,
    ControllerIdentity,
    Generic,
    IoOpcode,
    NvmeError,
    Reg,
    Sct,
    cap,
    generic,
    identify_controller,
    opcode_name,
    status,
    status_name,
)
from vfiouserd.devices.nvme.io import LBA, MDTS, ONCS, VWC, Namespace, NvmCommands
from vfiouserd.devices.nvme.native import NativeLoop
from vfiouserd.devices.nvme.prp import SGLS
from vfiouserd.devices.nvme.queues import (
    MAX_IO_QUEUES,
    MQES,
    QueueMemoryError,
    Queues,
    SubmissionQueue,
)
from vfiouserd.devices.pci import Bar, IrqKind, PciDevice
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError
from vfiouserd.state import BOOL, INT_MAP, U16, U32, U64, Field, Schema, StateError, records
from vfiouserd.trace import tracer

log = get_logger("nvme")

VERSION = 0x00010400  # NVMe 1.4
OAES = 1 << 8  # namespace attribute notices (so Linux keeps an AER outstanding)
TIMEOUT_500MS = 20  # CAP.TO: 10 s
REGISTERS = (Reg.CC, Reg.CSTS, Reg.AQA, Reg.ASQ, Reg.ACQ, Reg.INTMS)  # those the state holds


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
        3,
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
        # Layout 2: the error log; older blobs load with none.
        Field("error_count", U64, since=2, default=0),
        Field(
            "error_log",
            records(count=U64, sqid=U16, cid=U16, status=U16, location=U16, lba=U64, nsid=U32),
            since=2,
            default=[],
        ),
        # Layout 3: shadow doorbells' buffers (none in older blobs).
        Field("doorbell_buffer", records(shadow=U64, events=U64), since=3, default=[]),
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
        self.events = AsyncEvents(self._wake)
        self.queues = Queues(self, self.events, self._wake)
        self.errors = ErrorLog(self.queues)  # kept across resets, unlike the rest
        self.nvm = NvmCommands(self, self.namespaces)
        self.native = NativeLoop(self, self.queues, self.nvm)
        # The native loop is out of guest memory before it is unmapped, and
        # leaves it when someone starts tracing or steering commands.
        self.memory.listeners.append(self.native.pause)
        self._unsubscribe = [
            tracer.on_change(self._look_again),
            faults.rules.on_change(self._look_again),
        ]
        self.admin = AdminCommands(
            self,
            queues=self.queues,
            events=self.events,
            errors=self.errors,
            nvm=self.nvm,
            identity=identify_controller(self.identity()),
            vectors=self.msix_vectors,
        )
        self.device_reset()

    def identity(self) -> ControllerIdentity:
        """What Identify Controller tells the host."""
        return ControllerIdentity(
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
            sgls=SGLS,
            oacs=OACS_DOORBELL_BUFFER_CONFIG,
        )

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
        parser.add_argument(
            "--no-fast-path",
            action="store_true",
            help="serve every command in Python, not in the native loop (to compare, to debug)",
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
            made = cls(opened, serial=args.serial)
            made.native.enabled = not args.no_fast_path
            return made
        except BaseException:
            for fd, _, _ in opened:
                os.close(fd)
            raise

    def close(self) -> None:
        self.native.close()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        for namespace in self.namespaces.values():
            os.close(namespace.fd)
        super().close()

    def statistics(self) -> dict[str, Any]:
        return {
            "namespaces": {
                n.nsid: {"blocks": n.blocks, "read_only": n.read_only}
                for n in self.namespaces.values()
            },
            "enabled": bool(self.csts & CSTS_RDY),
            "io_queues": self.queues.io_queues,
            "sgl_commands": self.nvm.sgl_commands + self.native.live_sgl_commands(),
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
        self.native.pause()
        self._generation += 1
        self.queues.clear()
        self.admin.reset()
        self.events.clear()
        self.csts = 0
        self.lower_interrupt()

    # -- registers ---------------------------------------------------------------------------

    def _register(self, offset: int) -> int:
        capabilities = cap(mqes=MQES, timeout_500ms=TIMEOUT_500MS)
        values = {
            Reg.CAP: capabilities & 0xFFFFFFFF,
            Reg.CAP + 4: capabilities >> 32,
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
            if size != 4:
                log.warning("doorbell.width", offset=offset, size=size)
            elif self.csts & (CSTS_RDY | CSTS_CFS) == CSTS_RDY:
                self.queues.doorbell(offset, value)
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

    # -- enable, disable, shutdown ---------------------------------------------------------

    def _write_cc(self, value: int) -> None:
        old, new = CC.decode(self.cc), CC.decode(value)
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
            self._set_shst(SHST_NORMAL)

    def _enable(self, cc: CC) -> None:
        asqs, acqs = (self.aqa & 0xFFF) + 1, (self.aqa >> 16 & 0xFFF) + 1
        problem = None
        if asqs < 2 or acqs < 2:
            problem = f"admin queue sizes {asqs}/{acqs}"
        elif not self.asq or not self.acq or (self.asq | self.acq) % PAGE:
            problem = f"admin queue addresses {self.asq:#x}/{self.acq:#x}"
        elif cc.mps or cc.css or cc.ams:
            problem = f"CC {self.cc:#x}: MPS, CSS or AMS not offered"
        elif cc.iosqes != SQES_LOG2 or cc.iocqes != CQES_LOG2:
            problem = f"CC {self.cc:#x}: I/O queue entry sizes"
        if problem is not None:
            self._fatal(problem)
            return
        self.queues.open_admin(self.asq, asqs, self.acq, acqs)
        self.csts = CSTS_RDY
        log.info("controller.enabled", admin_sq=asqs, admin_cq=acqs)

    def _fatal(self, reason: str) -> None:
        """Controller Fatal Status: the driver resets the controller."""
        self.native.pause()
        self.csts |= CSTS_CFS
        self._generation += 1
        log.error("controller.fatal", reason=reason)

    def _set_shst(self, shst: int) -> None:
        self.csts = self.csts & ~(3 << CSTS_SHST_SHIFT) | shst << CSTS_SHST_SHIFT

    def _shutdown(self) -> None:
        self.native.pause()
        self._set_shst(SHST_OCCURRING)
        generation = self._generation

        async def flush_all() -> None:
            await self.nvm.flush_all()
            if generation == self._generation:
                self._set_shst(SHST_COMPLETE)
                log.info("controller.shutdown")

        if self._tasks is None:
            self._set_shst(SHST_COMPLETE)
        else:
            self.run_in_background(flush_all)

    # -- the queue task ---------------------------------------------------------------------

    def _can_run(self) -> bool:
        return (
            self.csts & (CSTS_RDY | CSTS_CFS | 3 << CSTS_SHST_SHIFT) == CSTS_RDY
            and not self.stopped
            and not self._held
        )

    def _wake(self) -> None:
        if self._busy:
            self.native.pause()  # the queue task looks at every queue again
            return
        if self._tasks is None or not self._can_run():
            return
        self._busy = True
        self.run_in_background(self._serve)

    async def _serve(self) -> None:
        generation = self._generation

        def current() -> bool:
            return generation == self._generation and self._can_run()

        async def execute(sq: SubmissionQueue, cmd: Command) -> None:
            await self._execute(sq, cmd, generation)

        try:
            while current():
                if await self.queues.round(execute, current) or await self.queues.arm():
                    await trio.lowlevel.checkpoint()  # the session's commands go on
                    continue
                # Nothing for Python: the native loop waits for (and serves)
                # what the I/O queues get next, if it may.
                # While the loop serves, this task is no device work a pause
                # (an unmap, a migration step) waits for: the pause stops it.
                self.turns.work_done()
                try:
                    outcome = await self.native.serve(self.admin.write_cache)
                finally:
                    self.turns.work_started()
                if outcome is None:
                    break
                if outcome == lib.VFU_FAST_FAULT:
                    raise QueueMemoryError("the VMM truncated memory it shared")
                await trio.lowlevel.checkpoint()
        except QueueMemoryError as exc:
            if generation == self._generation:
                self._fatal(str(exc))
        finally:
            self._busy = False
        if generation != self._generation:
            self._wake()  # reset and enabled again meanwhile

    async def _execute(self, sq: SubmissionQueue, cmd: Command, generation: int) -> None:
        """Run one command to its end and complete it (unless it is held, or
        a reset came meanwhile)."""
        started = time.monotonic_ns()
        admin = sq.qid == 0
        dw0 = 0
        try:
            if cmd.fuse or cmd.flags & 0x3C:
                raise generic(Generic.INVALID_FIELD, f"flags {cmd.flags:#x} (fused, reserved)")
            if cmd.psdt and (admin or cmd.psdt != PSDT_SGL):
                # Admin commands take PRPs; an SGL in MPTR is not offered; 11b is reserved.
                raise generic(Generic.INVALID_FIELD, f"PSDT {cmd.psdt}")
            if admin:
                dw0 = await self.admin.execute(cmd)
            else:
                dw0 = await self.nvm.execute(sq.qid, cmd, write_cache=self.admin.write_cache)
            result = SUCCESS
        except NvmeError as exc:
            result = exc.status
            self.errors.record(sq, cmd, result)
            level = log.debug if admin else log.warning
            level(
                "command.failed",
                queue=sq.qid,
                cid=cmd.cid,
                opcode=opcode_name(admin, cmd.opcode),
                status=status_name(result),
                reason=str(exc),
            )
        except GuestMemoryError as exc:
            result = status(Sct.GENERIC, Generic.DATA_TRANSFER_ERROR)
            self.errors.record(sq, cmd, result)
            log.warning("command.dma_failed", queue=sq.qid, cid=cmd.cid, reason=str(exc))
        if dw0 == HELD or generation != self._generation:
            return
        latency = time.monotonic_ns() - started
        queue_stats = stats.of_queue(sq.qid)
        transfers = (IoOpcode.WRITE, IoOpcode.READ)
        moved = (cmd.nlb * LBA) if not admin and cmd.opcode in transfers and not result else 0
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
                opcode=opcode_name(admin, cmd.opcode),
                nsid=cmd.nsid,
                **io,
                status=status_name(result),
                latency_ns=latency,
            )
        await self.queues.complete(sq, cmd.cid, result, dw0)

    # -- the VMM connection, migration, handover ------------------------------------------

    def msix_eventfd(self, vector: int) -> int | None:
        """The eventfd the native loop may signal for ``vector``: MSI-X's,
        while bus mastering is on (else Python's ``interrupt`` decides)."""
        if self.irqs.active() is not IrqKind.MSIX or not self.bus_master:
            return None
        return self.irqs.eventfd(IrqKind.MSIX, vector)

    def interrupts_changing(self) -> None:
        self.native.pause()  # out of the loop before an eventfd it writes is closed

    def command_changed(self, old: int, new: int) -> None:
        if (old ^ new) & 0x4:  # bus mastering: the loop must stop, or may start
            self._look_again()

    def _look_again(self) -> None:
        """Whether the native loop may serve changed: it stops, and the
        queue task decides again (at the next doorbell if it is idle)."""
        self._wake()

    def quiesce(self) -> None:
        self.native.pause()
        super().quiesce()

    def attach(self, nursery: Any) -> None:
        super().attach(nursery)
        self._wake()

    def resume(self) -> None:
        super().resume()
        self._wake()

    def hold(self) -> None:
        self._held = True
        self.native.pause()

    def release(self) -> None:
        self._held = False
        self._wake()

    # -- state ----------------------------------------------------------------------------

    def save_device_state(self) -> dict[str, Any]:
        self.native.pause()  # its queue indexes and counters into the Python queues
        return {
            "registers": {
                Reg.CC: self.cc,
                Reg.CSTS: self.csts,
                Reg.AQA: self.aqa,
                Reg.ASQ: self.asq,
                Reg.ACQ: self.acq,
                Reg.INTMS: self.intms,
            },
            **self.queues.save(),
            **self.admin.save(),
            **self.events.save(),
            **self.errors.save(),
            "health": dict(self.nvm.health),
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
        if set(values["registers"]) != set(REGISTERS):
            raise StateError("controller registers missing or unknown")
        problem = Queues.check(values, self.msix_vectors) or ErrorLog.check(values)
        if problem is not None:
            raise StateError(problem)
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
        self.queues.load(values)
        self.admin.load(values)
        self.events.load(values)
        self.errors.load(values)
        self.nvm.health = dict(values["health"])
        self._wake()


def _half(value: int, which: int, half: int) -> int:
    """``value`` with its low (which=0) or high (4) dword replaced."""
    if which:
        return value & 0xFFFFFFFF | half << 32
    return value & ~0xFFFFFFFF | half
