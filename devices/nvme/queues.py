"""Submission and completion queues: their doorbells, the round that takes
commands from them in turn, and the posting of completions.

A doorbell write only records the new SQ tail or CQ head (a value out of
range, or a doorbell of no queue, is an asynchronous error event instead).
Once the driver set up shadow doorbells (Doorbell Buffer Config), an I/O
queue's tail and head are read from the shadow page instead, the register
only waking the controller; the controller writes each EventIdx so that the
driver rings the register for the next command only (``arm``). A shadow
value out of range is ignored. The admin queue keeps its registers, as
Linux's driver does.
Each round posts the completions that waited for room, completes AERs with
pending events, then takes up to BURST commands from each SQ in turn (the
admin SQ first) and runs each to its end. A completion is written with the
dword holding the phase tag last, the tag flipping at each wrap; a full CQ
keeps it waiting for the host's head doorbell. Queue memory the device
cannot reach raises ``QueueMemoryError``: the controller's fatal status.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vfiouserd._native import lib
from vfiouserd.devices.nvme.events import AsyncEvents
from vfiouserd.devices.nvme.formats import (
    AEI_INVALID_DOORBELL_REGISTER,
    AEI_INVALID_DOORBELL_VALUE,
    CQE_SIZE,
    PAGE,
    SQE_SIZE,
    SUCCESS,
    AsyncEventType,
    Command,
    Completion,
    LogPage,
    async_event,
    doorbell,
    doorbell_offset,
)
from vfiouserd.devices.pci import PciDevice
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError

log = get_logger("nvme")

MAX_IO_QUEUES = 64  # I/O queue pairs
MQES = 1023  # 0-based: 1024 entries per I/O queue
BURST = 16  # commands taken from one queue before the next one's turn

# (dw0, SQ head, SQ id, CID, status): a completion to post
Posting = tuple[int, int, int, int, int]


class QueueMemoryError(Exception):
    """A queue's own memory could not be reached: controller fatal status."""


@dataclass
class DoorbellBuffer:
    """Where the driver writes shadow doorbells, and reads EventIdx values:
    one page each, laid out as the doorbell registers."""

    shadow: int
    events: int

    @staticmethod
    def slot(qid: int, completion: bool) -> int:
        return 8 * qid + 4 * int(completion)


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
    waiting: deque[Posting] = field(default_factory=deque)  # completions waiting for room

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head


class Queues:
    """The admin and I/O queues of one controller."""

    def __init__(self, device: PciDevice, events: AsyncEvents, wake: Callable[[], None]) -> None:
        """``device`` reaches queue memory and raises the CQs' interrupts;
        ``wake`` starts the queue task when a doorbell brings work."""
        self.device = device
        self.events = events
        self._wake = wake
        # The native loop takes the doorbells of the queues it serves (True
        # when it took this one): native.py sets it.
        self.native_doorbell: Callable[[int, bool, int], bool] = lambda qid, cq, value: False
        self.clear()

    def clear(self) -> None:
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.buffer: DoorbellBuffer | None = None

    def mapped(self, address: int, length: int) -> bool:
        """Whether the range is all in memory the daemon maps (not reached
        through the VMM)."""
        try:
            found = self.device.memory.ranges(address, length, writable=False)
        except GuestMemoryError:
            return False
        return all(region.mapping is not None for region, _, _ in found)

    def shadowed(self, qid: int) -> bool:
        return self.buffer is not None and qid != 0

    def open_admin(self, asq: int, asqs: int, acq: int, acqs: int) -> None:
        self.cqs[0] = CompletionQueue(0, acq, acqs, vector=0, interrupts=True)
        self.sqs[0] = SubmissionQueue(0, asq, asqs, cqid=0)

    @property
    def io_queues(self) -> int:
        return len(self.sqs) - (1 if 0 in self.sqs else 0)

    # -- doorbells -------------------------------------------------------------------------

    def doorbell(self, offset: int, value: int) -> None:
        """A write of ``value`` to the doorbell at BAR0 ``offset``."""
        target = doorbell(offset)
        if target is None:
            self._invalid(AEI_INVALID_DOORBELL_REGISTER, offset, value)
            return
        qid, completion = target
        queue: SubmissionQueue | CompletionQueue | None = (
            self.cqs.get(qid) if completion else self.sqs.get(qid)
        )
        if queue is None:
            self._invalid(AEI_INVALID_DOORBELL_REGISTER, offset, value)
            return
        if value >= queue.size:
            self._invalid(AEI_INVALID_DOORBELL_VALUE, offset, value)
            return
        if self.native_doorbell(qid, completion, value):
            return
        if self.shadowed(qid):  # the value is in the shadow page too: a wake-up
            self._wake()
            return
        if isinstance(queue, CompletionQueue):
            if not head_in_range(queue.head, queue.tail, queue.size, value):
                self._invalid(AEI_INVALID_DOORBELL_VALUE, offset, value)
                return
            queue.head = value
            if not any(q.head != q.tail for q in self.cqs.values() if q.interrupts):
                self.device.lower_interrupt()  # INTx: nothing left to handle
            if queue.waiting:
                self._wake()
        else:
            queue.tail = value
            self._wake()

    def invalid_head(self, qid: int, value: int) -> None:
        """A CQ head past what was posted (the native loop's check)."""
        self._invalid(AEI_INVALID_DOORBELL_VALUE, doorbell_offset(qid, True), value)

    def _invalid(self, info: int, offset: int, value: int) -> None:
        log.warning("doorbell.invalid", offset=offset, value=value, info=info)
        self.events.report(async_event(AsyncEventType.ERROR, info, LogPage.ERROR))

    # -- serving ---------------------------------------------------------------------------

    async def round(
        self,
        execute: Callable[[SubmissionQueue, Command], Awaitable[None]],
        current: Callable[[], bool],
    ) -> bool:
        """Serve what every queue has, while ``current()`` (no reset, no
        stop meanwhile); False if nothing was there."""
        progressed = False
        await self._read_shadows()
        for cq in list(self.cqs.values()):
            while cq.waiting and not cq.full and current():
                await self._post(cq, cq.waiting.popleft())
                progressed = True
        if self.events.requests and self.events.pending:
            progressed = await self._deliver_events(current) or progressed
        for sq in list(self.sqs.values()):
            if not current() or self.sqs.get(sq.qid) is not sq:
                break
            cq = self.cqs[sq.cqid]
            if sq.head == sq.tail or cq.waiting:
                continue
            count = min(BURST, (sq.tail - sq.head) % sq.size, sq.size - sq.head)
            try:
                raw = await self.device.dma_read(sq.base + sq.head * SQE_SIZE, count * SQE_SIZE)
            except GuestMemoryError as exc:
                raise QueueMemoryError(f"SQ {sq.qid} entry {sq.head}: {exc}") from None
            for index in range(count):
                if not current() or self.sqs.get(sq.qid) is not sq:
                    return True
                sq.head = (sq.head + 1) % sq.size
                await execute(sq, Command.decode(raw, index * SQE_SIZE))
            progressed = True
        return progressed

    # -- shadow doorbells --------------------------------------------------------------

    async def _shadow(self, buffer: DoorbellBuffer, qid: int, completion: bool) -> int:
        address = buffer.shadow + DoorbellBuffer.slot(qid, completion)
        try:
            return int.from_bytes(await self.device.dma_read(address, 4), "little")
        except GuestMemoryError as exc:
            raise QueueMemoryError(f"shadow doorbell of queue {qid}: {exc}") from None

    async def _read_shadows(self) -> None:
        """The I/O queues' tails and heads as the driver last wrote them
        (a reset meanwhile, and the values go with the queues they were
        read for)."""
        buffer = self.buffer
        if buffer is None:
            return
        for sq in list(self.sqs.values()):
            if sq.qid:
                tail = await self._shadow(buffer, sq.qid, False)
                if tail < sq.size:
                    sq.tail = tail
        for cq in list(self.cqs.values()):
            if cq.qid:
                head = await self._shadow(buffer, cq.qid, True)
                if head < cq.size and head_in_range(cq.head, cq.tail, cq.size, head):
                    cq.head = head

    async def arm(self) -> bool:
        """With shadow doorbells, before the controller waits: EventIdx set
        so that the driver rings the register for its next command (and for
        the head that frees a full CQ); True if work came meanwhile."""
        if self.buffer is None:
            return False
        buffer = self.buffer
        try:
            for sq in list(self.sqs.values()):
                if sq.qid:
                    address = buffer.events + DoorbellBuffer.slot(sq.qid, False)
                    await self.device.dma_write(address, sq.head.to_bytes(4, "little"))
            for cq in list(self.cqs.values()):
                if cq.qid and (cq.full or cq.waiting):
                    address = buffer.events + DoorbellBuffer.slot(cq.qid, True)
                    await self.device.dma_write(address, cq.head.to_bytes(4, "little"))
        except GuestMemoryError as exc:
            raise QueueMemoryError(f"EventIdx buffer: {exc}") from None
        lib.vfu_fence_full()  # our EventIdx before the driver's next values
        await self._read_shadows()
        return any(
            sq.head != sq.tail and not self.cqs[sq.cqid].waiting for sq in self.sqs.values()
        ) or any(cq.waiting and not cq.full for cq in self.cqs.values())

    async def _deliver_events(self, current: Callable[[], bool]) -> bool:
        delivered = False
        for cid, event in self.events.deliverable():
            await self.complete(self.sqs[0], cid, SUCCESS, event)
            delivered = True
            if not current():
                break
        return delivered

    async def complete(self, sq: SubmissionQueue, cid: int, status: int, dw0: int) -> None:
        """Post the completion of ``sq``'s command ``cid`` (or queue it
        while its CQ is full)."""
        cq = self.cqs[sq.cqid]
        entry = (dw0, sq.head, sq.qid, cid, status)
        if cq.waiting or cq.full:
            cq.waiting.append(entry)
        else:
            await self._post(cq, entry)

    async def _post(self, cq: CompletionQueue, entry: Posting) -> None:
        dw0, sq_head, sq_id, cid, status = entry
        raw = Completion(dw0, 0, sq_head, sq_id, cid, status, cq.phase).encode()
        address = cq.base + cq.tail * CQE_SIZE
        try:
            # The dword with the phase tag goes last: the driver polls it.
            await self.device.dma_write(address, raw[:12])
            await self.device.dma_write(address + 12, raw[12:])
        except GuestMemoryError as exc:
            raise QueueMemoryError(f"CQ {cq.qid} entry {cq.tail}: {exc}") from None
        cq.tail = (cq.tail + 1) % cq.size
        if cq.tail == 0:
            cq.phase = not cq.phase
        if cq.interrupts:
            self.device.interrupt(cq.vector)

    # -- state -------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        buffer = self.buffer
        return {
            "doorbell_buffer": (
                [] if buffer is None else [{"shadow": buffer.shadow, "events": buffer.events}]
            ),
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
        }

    @staticmethod
    def check(values: dict[str, Any], vectors: int) -> str | None:
        """What is wrong with saved queues, if anything."""
        if len(values["doorbell_buffer"]) > 1 or any(
            (b["shadow"] | b["events"]) % PAGE for b in values["doorbell_buffer"]
        ):
            return "doorbell buffer: more than one, or not page aligned"
        cqs = {q["qid"]: q for q in values["completion_queues"]}
        for q in [*values["completion_queues"], *values["submission_queues"]]:
            if not 2 <= q["size"] <= max(MQES + 1, 4096) or not q["head"] < q["size"] > q["tail"]:
                return f"queue {q['qid']}: size {q['size']}, head/tail out of range"
        for q in values["submission_queues"]:
            if q["cqid"] not in cqs:
                return f"SQ {q['qid']} completes to missing CQ {q['cqid']}"
        for q in values["completion_queues"]:
            if q["vector"] >= vectors:
                return f"CQ {q['qid']} vector {q['vector']}"
        for entry in values["waiting_completions"]:
            if entry["cqid"] not in cqs:
                return f"a completion waits for missing CQ {entry['cqid']}"
        return None

    def load(self, values: dict[str, Any]) -> None:
        buffers = values["doorbell_buffer"]
        self.buffer = (
            DoorbellBuffer(buffers[0]["shadow"], buffers[0]["events"]) if buffers else None
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


def head_in_range(head: int, tail: int, size: int, value: int) -> bool:
    """A new CQ head within what was posted (from the old head to the tail)."""
    return (value - head) % size <= (tail - head) % size
