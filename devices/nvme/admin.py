"""Admin commands: Identify (controller, namespace, active namespace list,
namespace descriptors; zeros for the command-set specific CNS a driver
probes), Create/Delete I/O SQ and CQ, Get/Set Features, Get Log Page (error,
SMART, firmware slot, changed namespaces), Asynchronous Event Request, Abort
(never aborts), Keep Alive, Doorbell Buffer Config (shadow doorbells). Any
other opcode is an Invalid Command Opcode: no namespace management,
firmware download, Format NVM or security commands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vfiouserd.devices.nvme import prp
from vfiouserd.devices.nvme.errors import ErrorLog
from vfiouserd.devices.nvme.events import AsyncEvents
from vfiouserd.devices.nvme.formats import (
    AEI_TEMPERATURE_THRESHOLD,
    BROADCAST_NSID,
    IDENTIFY_SIZE,
    PAGE,
    AdminOpcode,
    AsyncEventType,
    Cns,
    Command,
    Feature,
    Generic,
    Health,
    LogPage,
    Specific,
    active_namespaces,
    async_event,
    firmware_slot_log,
    generic,
    identify_namespace,
    namespace_descriptors,
    smart_log,
    specific,
)
from vfiouserd.devices.nvme.io import (
    BLOCKS_READ,
    BLOCKS_WRITTEN,
    LBA_LOG2,
    MAX_TRANSFER,
    MEDIA_ERRORS,
    POWER_CYCLES,
    READS,
    WRITES,
    NvmCommands,
)
from vfiouserd.devices.nvme.queues import (
    MAX_IO_QUEUES,
    MQES,
    CompletionQueue,
    DoorbellBuffer,
    Queues,
    SubmissionQueue,
)
from vfiouserd.log import get_logger

log = get_logger("nvme")

TEMPERATURE = 313  # kelvin, what the composite sensor reads
WCTEMP, CCTEMP = 0x157, 0x175
ALL_QUEUES = (MAX_IO_QUEUES - 1) | (MAX_IO_QUEUES - 1) << 16  # Number of Queues, 0-based
UNDER = 0x10 << 8  # the under-temperature threshold's key in the features


def default_features() -> dict[int, int]:
    return {
        Feature.ARBITRATION: 0,
        Feature.POWER_MANAGEMENT: 0,
        Feature.TEMPERATURE_THRESHOLD: WCTEMP,  # over, composite (key: fid | sel << 8)
        Feature.TEMPERATURE_THRESHOLD | UNDER: 0,  # under, composite
        Feature.ERROR_RECOVERY: 0,
        Feature.VOLATILE_WRITE_CACHE: 1,
        Feature.INTERRUPT_COALESCING: 0,
        Feature.WRITE_ATOMICITY: 0,
        Feature.ASYNC_EVENT_CONFIG: 0,
    }


class AdminCommands:
    """The admin queue's commands, and the features and health they set
    and read."""

    def __init__(
        self,
        dma: prp.Dma,
        *,
        queues: Queues,
        events: AsyncEvents,
        errors: ErrorLog,
        nvm: NvmCommands,
        identity: bytes,
        vectors: int,
    ) -> None:
        """``identity``: the Identify Controller page; ``vectors``: how many
        MSI-X vectors the function has (a CQ's vector is one of them)."""
        self.dma = dma
        self.queues = queues
        self.events = events
        self.errors = errors
        self.nvm = nvm
        self.identity = identity
        self.vectors = vectors
        self.reset()

    def reset(self) -> None:
        """A controller reset: features back to their defaults."""
        self.features = default_features()
        self.queues_granted = ALL_QUEUES
        self.critical_warning = 0

    @property
    def write_cache(self) -> bool:
        return bool(self.features[Feature.VOLATILE_WRITE_CACHE] & 1)

    async def execute(self, cmd: Command) -> int:
        """Run ``cmd``; its completion's DW0 (``events.HELD`` for none yet)."""
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
            AdminOpcode.DOORBELL_BUFFER_CONFIG: self._doorbell_buffer_config,
        }
        handler = handlers.get(cmd.opcode)
        if handler is None:
            raise generic(Generic.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}")
        return await handler(cmd)

    # -- Identify --------------------------------------------------------------------------

    async def _identify(self, cmd: Command) -> int:
        cns, nsid = cmd.cdw10 & 0xFF, cmd.nsid
        if cns == Cns.CONTROLLER:
            data = self.identity
        elif cns == Cns.NAMESPACE:
            if nsid == BROADCAST_NSID:  # what all namespaces share
                data = identify_namespace(0, LBA_LOG2, write_protected=False)
            else:
                namespace = self.nvm.namespace(nsid)
                data = identify_namespace(
                    namespace.blocks, LBA_LOG2, write_protected=namespace.read_only
                )
        elif cns == Cns.ACTIVE_NAMESPACES:
            if nsid >= 0xFFFFFFFE:
                raise generic(Generic.INVALID_NAMESPACE, f"active list after {nsid:#x}")
            data = active_namespaces(list(self.nvm.namespaces), nsid)
        elif cns == Cns.NS_DESCRIPTORS:
            data = namespace_descriptors(self.nvm.namespace(nsid).uuid)
        elif cns in (Cns.CSI_CONTROLLER, Cns.CSI_NAMESPACE) and cmd.cdw11 >> 24 == 0:
            if cns == Cns.CSI_NAMESPACE:
                self.nvm.namespace(nsid)
            data = bytes(IDENTIFY_SIZE)  # NVM command set: no limits to tell
        else:
            raise generic(Generic.INVALID_FIELD, f"CNS {cns:#x}")
        await prp.to_guest(self.dma, cmd, data)
        return 0

    # -- queues ------------------------------------------------------------------------------

    def _new_queue_checks(self, cmd: Command, existing: dict[int, Any], granted: int) -> int:
        qid, qsize = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        if qid == 0 or qid > granted + 1 or qid in existing:
            raise specific(Specific.INVALID_QUEUE_IDENTIFIER, f"queue id {qid}")
        if qsize < 2 or qsize > MQES + 1:
            raise specific(Specific.INVALID_QUEUE_SIZE, f"{qsize} entries")
        if not cmd.cdw11 & 1:
            raise generic(Generic.INVALID_FIELD, "queues must be physically contiguous")
        if cmd.prp1 % PAGE:
            raise generic(Generic.PRP_OFFSET_INVALID, f"queue base {cmd.prp1:#x}")
        return qsize

    async def _create_cq(self, cmd: Command) -> int:
        qsize = self._new_queue_checks(cmd, self.queues.cqs, self.queues_granted >> 16)
        interrupts, vector = bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
        if vector >= self.vectors:
            raise specific(Specific.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
        qid = cmd.cdw10 & 0xFFFF
        self.queues.cqs[qid] = CompletionQueue(qid, cmd.prp1, qsize, vector, interrupts)
        log.debug("queue.created", cq=qid, size=qsize, vector=vector, interrupts=interrupts)
        return 0

    async def _create_sq(self, cmd: Command) -> int:
        qsize = self._new_queue_checks(cmd, self.queues.sqs, self.queues_granted & 0xFFFF)
        cqid = cmd.cdw11 >> 16
        if cqid == 0 or cqid not in self.queues.cqs:
            raise specific(Specific.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
        qid = cmd.cdw10 & 0xFFFF
        self.queues.sqs[qid] = SubmissionQueue(qid, cmd.prp1, qsize, cqid)
        log.debug("queue.created", sq=qid, size=qsize, cq=cqid)
        return 0

    async def _delete_sq(self, cmd: Command) -> int:
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.queues.sqs:
            raise specific(Specific.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
        # Commands are run to their end one at a time: none is outstanding.
        del self.queues.sqs[qid]
        log.debug("queue.deleted", sq=qid)
        return 0

    async def _delete_cq(self, cmd: Command) -> int:
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in self.queues.cqs:
            raise specific(Specific.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
        if any(sq.cqid == qid for sq in self.queues.sqs.values()):
            raise specific(Specific.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
        del self.queues.cqs[qid]
        log.debug("queue.deleted", cq=qid)
        return 0

    # -- logs ----------------------------------------------------------------------------------

    async def _get_log_page(self, cmd: Command) -> int:
        lid, rae = cmd.cdw10 & 0xFF, bool(cmd.cdw10 & 1 << 15)
        length = (((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1) * 4
        offset = cmd.cdw12 | cmd.cdw13 << 32
        if length > MAX_TRANSFER or offset % 4:
            raise generic(Generic.INVALID_FIELD, f"log of {length} bytes at {offset}")
        if lid == LogPage.ERROR:
            page = self.errors.page()
        elif lid == LogPage.SMART:
            page = smart_log(self._health())
        elif lid == LogPage.FIRMWARE_SLOT:
            page = firmware_slot_log("1.0")
        elif lid == LogPage.CHANGED_NAMESPACES:
            page = bytes(4096)
        else:
            raise specific(Specific.INVALID_LOG_PAGE, f"log page {lid:#x}")
        if offset > len(page):
            raise generic(Generic.INVALID_FIELD, f"offset {offset} beyond the log")
        await prp.to_guest(self.dma, cmd, page[offset : offset + length].ljust(length, b"\0"))
        if not rae:  # read: events of its type may be reported again
            kinds: dict[int, int] = {
                LogPage.ERROR: AsyncEventType.ERROR,
                LogPage.SMART: AsyncEventType.SMART,
                LogPage.CHANGED_NAMESPACES: AsyncEventType.NOTICE,
            }
            kind = kinds.get(lid)
            if kind is not None:
                self.events.log_read(kind)
                if lid == LogPage.SMART and not self._over_temperature():
                    self.critical_warning &= ~2
        return 0

    def _health(self) -> Health:
        h = self.nvm.health
        return Health(
            temperature=TEMPERATURE,
            critical_warning=self.critical_warning,
            data_units_read=(h[BLOCKS_READ] + 999) // 1000,
            data_units_written=(h[BLOCKS_WRITTEN] + 999) // 1000,
            read_commands=h[READS],
            write_commands=h[WRITES],
            power_cycles=h[POWER_CYCLES],
            power_on_hours=0,
            unsafe_shutdowns=0,
            media_errors=h[MEDIA_ERRORS],
            error_entries=self.errors.count,
        )

    # -- features ------------------------------------------------------------------------------

    def _over_temperature(self) -> bool:
        over = self.features[Feature.TEMPERATURE_THRESHOLD]
        under = self.features[Feature.TEMPERATURE_THRESHOLD | UNDER]
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
            if len(self.queues.sqs) > 1 or len(self.queues.cqs) > 1:
                raise generic(Generic.COMMAND_SEQUENCE_ERROR, "I/O queues exist")
            nsq = min(value & 0xFFFF, MAX_IO_QUEUES - 1)
            ncq = min(value >> 16, MAX_IO_QUEUES - 1)
            self.queues_granted = nsq | ncq << 16
            return self.queues_granted
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            if value & 0xFFFF >= self.vectors:
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
                self.events.report(
                    async_event(AsyncEventType.SMART, AEI_TEMPERATURE_THRESHOLD, LogPage.SMART)
                )
        if fid == Feature.VOLATILE_WRITE_CACHE:
            log.info("write_cache.set", enabled=self.write_cache)
        return 0

    async def _get_features(self, cmd: Command) -> int:
        fid, select = cmd.cdw10 & 0xFF, cmd.cdw10 >> 8 & 7
        if fid == Feature.NUMBER_OF_QUEUES:
            key = None
        elif fid == Feature.INTERRUPT_VECTOR_CONFIG:
            vector = cmd.cdw11 & 0xFFFF
            if vector >= self.vectors:
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
            return ALL_QUEUES if select else self.queues_granted
        if key is not None and fid == Feature.INTERRUPT_VECTOR_CONFIG:
            return self.features.get(key, key >> 16) if not select else key >> 16
        assert key is not None
        return int(default_features()[key] if select else self.features[key])

    # -- the rest ------------------------------------------------------------------------------

    async def _async_event_request(self, cmd: Command) -> int:
        return self.events.hold(cmd.cid)

    async def _abort(self, cmd: Command) -> int:
        return 1  # not aborted: commands are run to their end as they come

    async def _keep_alive(self, cmd: Command) -> int:
        return 0

    async def _doorbell_buffer_config(self, cmd: Command) -> int:
        """Shadow doorbells: PRP1 the shadow doorbell page, PRP2 the
        EventIdx page (queues.py uses them for the I/O queues)."""
        shadow, events = cmd.prp1, cmd.prp2
        if shadow % PAGE or events % PAGE or shadow == events:
            raise generic(Generic.INVALID_FIELD, f"buffers {shadow:#x}, {events:#x}")
        for page in (shadow, events):  # reachable now, else a Data Transfer Error
            await self.dma.dma_read(page, PAGE)
        if not all(self.queues.mapped(page, PAGE) for page in (shadow, events)):
            # Reached through the VMM, every look at a shadow value would be a
            # round trip: more than the register write it saves. Linux's
            # driver then rings the registers.
            raise generic(Generic.INVALID_FIELD, "shadow doorbells outside mapped memory")
        self.queues.buffer = DoorbellBuffer(shadow, events)
        log.info("doorbell_buffer.set", shadow=shadow, events=events)
        return 0

    # -- state ---------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {
            "features": dict(self.features),
            "queues_granted": self.queues_granted,
            "critical_warning": self.critical_warning,
        }

    def load(self, values: dict[str, Any]) -> None:
        self.features = dict(values["features"])
        self.queues_granted = values["queues_granted"]
        self.critical_warning = values["critical_warning"]
