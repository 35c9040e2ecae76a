"""The native I/O loop (fastpath.c beside this file) over the controller's
I/O queues: which queues it may serve and why not, its parameters built
from the Python queues, the doorbells it takes while it runs, and the
queues' state taken back when it stops.

It serves an I/O SQ whose CQ is its own, both in memory the daemon maps,
while interrupts are MSI-X eventfds (or off for that CQ) and nothing asks
Python to see each command (tracing, fault rules, dirty logging). The
controller's queue task runs it when a Python round found nothing to do,
and it returns when a command needs Python (the round runs it) or when
Python pauses it: a doorbell of a queue it does not serve, an admin
command, a reset, a change of memory, interrupts or bus mastering.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from vfiouserd import faults, stats
from vfiouserd._native import ffi, lib
from vfiouserd.devices.nvme.formats import PAGE
from vfiouserd.devices.nvme.io import BLOCKS_READ, BLOCKS_WRITTEN, READS, WRITES, NvmCommands
from vfiouserd.devices.nvme.queues import (
    DoorbellBuffer,
    Queues,
    SubmissionQueue,
    head_in_range,
)
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemory, GuestMemoryError, MemoryRegion
from vfiouserd.trace import tracer

log = get_logger("nvme")

SQE_SIZE, CQE_SIZE = 64, 16


class Function(Protocol):
    """What the loop needs of the PCI function."""

    memory: GuestMemory
    stopped: bool

    @property
    def bus_master(self) -> bool: ...

    def msix_eventfd(self, vector: int) -> int | None: ...


class NativeLoop:
    def __init__(self, function: Function, queues: Queues, nvm: NvmCommands) -> None:
        self.function = function
        self.queues = queues
        self.nvm = nvm
        # One loop (and worker thread) per queue, so that queues on several
        # vCPUs are served on as many CPUs.
        self._loops: list[Any] = []  # the running loops' parameters
        self._exports: list[Any] = []  # what they point into, kept alive while they run
        self._members: dict[int, Member] = {}  # by SQ id
        self._cq_members: dict[int, Member] = {}  # by CQ id
        self._workers: list[Worker] = []  # one per loop, kept for the next runs
        self._reasons: dict[int, str | None] = {}
        self.broken = False  # poll() failed on our own eventfds: Python serves from now on
        self.enabled = True  # --no-fast-path: False
        queues.native_doorbell = self.doorbell

    @property
    def running(self) -> bool:
        return bool(self._loops)

    # -- which queues ----------------------------------------------------------------------

    def python_because(self) -> str | None:
        """Why Python serves every I/O queue now, or None."""
        function = self.function
        checks = (
            (not self.enabled, "fast path off"),
            (self.broken, "native loop broken"),
            (function.stopped, "stopped"),
            (not function.bus_master, "bus mastering off"),
            (function.memory.dirty is not None, "dirty logging"),
            (tracer.wants("request") or tracer.wants("irq"), "traced"),
            (faults.rules.steering, "fault rules"),
        )
        return next((reason for failing, reason in checks if failing), None)

    def queue_because(self, sq: SubmissionQueue) -> str | None:
        """Why Python serves this I/O queue, or None."""
        cq = self.queues.cqs[sq.cqid]
        buffer = self.queues.buffer
        shadows = [] if buffer is None else [buffer.shadow, buffer.events]
        checks: tuple[tuple[Callable[[], bool], str], ...] = (
            (lambda: sq.qid == 0, "admin queue"),
            (lambda: sum(s.cqid == cq.qid for s in self.queues.sqs.values()) > 1, "CQ shared"),
            (lambda: bool(cq.waiting), "completions wait for room"),
            (
                lambda: cq.interrupts and self.function.msix_eventfd(cq.vector) is None,
                "interrupt not an MSI-X eventfd",
            ),
            (
                lambda: (
                    self._region(sq.base, sq.size * SQE_SIZE, False) is None
                    or self._region(cq.base, cq.size * CQE_SIZE, True) is None
                    or any(self._region(page, PAGE, True) is None for page in shadows)
                ),
                "queue memory not mapped",
            ),
        )
        return next((reason for failing, reason in checks if failing()), None)

    def _region(self, address: int, length: int, writable: bool) -> MemoryRegion | None:
        """The one mapped region all of the range is in, or None."""
        try:
            found = self.function.memory.ranges(address, length, writable=writable)
        except GuestMemoryError:
            return None
        if len(found) != 1 or found[0][0].mapping is None:
            return None
        return found[0][0]

    def _eligible(self) -> list[SubmissionQueue]:
        common = self.python_because()
        members = []
        for sq in self.queues.sqs.values():
            reason = common or self.queue_because(sq)
            if sq.qid and reason != self._reasons.get(sq.qid, "not started"):
                log.debug("queue.path", queue=sq.qid, path=reason or "native")
            self._reasons[sq.qid] = reason
            stats.of_queue(sq.qid).python_because = functools.partial(_same, reason)
            if reason is None:
                members.append(sq)
        return members

    # -- running -----------------------------------------------------------------------------

    async def serve(self, write_cache: bool) -> int | None:
        """Run the loops until they are paused or a command needs Python;
        what they returned (VFU_FAST_*: the first one that did not just
        stop), or None if they may serve no queue now."""
        members = self._eligible()
        if not members:
            return None
        loops = self._parameters(members, write_cache)
        outcomes: list[int] = []

        async def run_one(loop: Any, worker: Worker) -> None:
            def run() -> int:
                with worker.lock:
                    if loop.stop:  # paused before it started
                        return int(lib.VFU_FAST_STOPPED)
                    return int(lib.vfu_nvme_serve(loop))

            outcomes.append(
                await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=worker.limiter)
            )
            self.pause()  # one ended: Python looks at every queue

        try:
            async with trio.open_nursery() as nursery:
                for loop, worker in zip(loops, self._workers, strict=False):
                    nursery.start_soon(run_one, loop, worker)
        finally:
            self.pause()  # done or cancelled: the state back in the Python queues
        outcome = next((o for o in outcomes if o != lib.VFU_FAST_STOPPED), lib.VFU_FAST_STOPPED)
        if outcome == lib.VFU_FAST_BROKEN_FD:
            self.broken = True
            log.error("native.broken", reason="poll failed on the loop's eventfds")
        return int(outcome)

    def _parameters(self, members: list[SubmissionQueue], write_cache: bool) -> list[Any]:
        while len(self._workers) < len(members):
            self._workers.append(Worker())
        regions = [r for r in self.function.memory.regions if r.mapping is not None]
        table = ffi.new("struct vfu_region[]", max(len(regions), 1))
        exports: list[Any] = [table]
        bases: dict[int, Any] = {}
        for entry, region in zip(table, regions, strict=False):
            exports.append(ffi.from_buffer(region.slice(0, region.size), require_writable=False))
            entry.gpa, entry.size = region.guest_address, region.size
            entry.hva = bases[region.guest_address] = ffi.cast("uint8_t *", exports[-1])
            entry.writable = int(region.writable)

        def host(address: int, length: int, writable: bool, kind: str = "uint8_t *") -> Any:
            region = self._region(address, length, writable)
            assert region is not None  # queue_because checked it
            return ffi.cast(kind, bases[region.guest_address] + (address - region.guest_address))

        namespaces = ffi.new("struct vfu_nvme_namespace[]", len(self.nvm.namespaces))
        for entry, namespace in zip(namespaces, self.nvm.namespaces.values(), strict=True):
            entry.fd, entry.read_only, entry.blocks = (
                namespace.fd,
                int(namespace.read_only),
                namespace.blocks,
            )
        exports.append(namespaces)
        buffer = self.queues.buffer
        loops = []
        self._members, self._cq_members = {}, {}
        for sq, worker in zip(members, self._workers, strict=False):
            cq = self.queues.cqs[sq.cqid]
            q = ffi.new("struct vfu_nvme_queue *")
            q.sq = host(sq.base, sq.size * SQE_SIZE, False)
            q.cq = host(cq.base, cq.size * CQE_SIZE, True)
            q.sq_size, q.cq_size, q.sqid = sq.size, cq.size, sq.qid
            q.sq_head, q.sq_tail, q.cq_head, q.cq_tail = sq.head, sq.tail, cq.head, cq.tail
            q.phase = int(cq.phase)
            fd = self.function.msix_eventfd(cq.vector) if cq.interrupts else None
            q.irq_fd = -1 if fd is None else fd
            if buffer is not None:
                for name, base, completion in (
                    ("shadow_sq", buffer.shadow, False),
                    ("shadow_cq", buffer.shadow, True),
                    ("event_sq", buffer.events, False),
                    ("event_cq", buffer.events, True),
                ):
                    address = base + DoorbellBuffer.slot(sq.qid, completion)
                    setattr(q, name, host(address, 4, True, "uint32_t *"))
            worker.reset()
            loop = ffi.new("struct vfu_nvme_loop *")
            loop.queues, loop.nqueues = q, 1
            loop.regions, loop.nregions = table, len(regions)
            loop.namespaces, loop.nnamespaces = namespaces, len(self.nvm.namespaces)
            loop.write_cache = int(write_cache)
            loop.doorbell_fd, loop.stop_fd = worker.doorbell_fd, worker.stop_fd
            loop.faults_at_start = lib.vfu_guard_hits()
            exports += [q, loop]
            loops.append(loop)
            member = Member(q, worker)
            self._members[sq.qid] = self._cq_members[cq.qid] = member
            stats.of_queue(sq.qid).live = functools.partial(_same, q)
        self._loops, self._exports = loops, exports
        return loops

    def doorbell(self, qid: int, completion: bool, value: int) -> bool:
        """A doorbell register write (its value in range) while the loop
        runs: True if it was one of the loop's queues."""
        member = (self._cq_members if completion else self._members).get(qid)
        if member is None:
            return False
        q = member.queue
        if self.queues.shadowed(qid):
            pass  # the value is in the shadow page: only a wake-up
        elif completion:
            if not head_in_range(q.cq_head, q.cq_tail, q.cq_size, value):
                self.queues.invalid_head(qid, value)
                return True
            q.cq_head = value
        else:
            q.sq_tail = value
        os.eventfd_write(member.worker.doorbell_fd, 1)
        return True

    def pause(self) -> None:
        """Stop the loops (each finishes the command in hand) and take the
        queues' state back."""
        loops = self._loops
        if not loops:
            return
        self._loops = []
        for loop in loops:
            loop.stop = 1
            os.eventfd_write(loop.stop_fd, 1)
        for worker in self._workers[: len(loops)]:
            with worker.lock:  # held by the worker while its loop runs
                pass
        health = self.nvm.health
        for sqid, member in self._members.items():
            q = member.queue
            sq = self.queues.sqs.get(sqid)
            cq = None if sq is None else self.queues.cqs.get(sq.cqid)
            if sq is not None and cq is not None:  # (a reset pauses before it clears them)
                sq.head, sq.tail = q.sq_head, q.sq_tail
                cq.head, cq.tail, cq.phase = q.cq_head, q.cq_tail, bool(q.phase)
            queue_stats = stats.of_queue(sqid)
            queue_stats.fold(q)
            queue_stats.live = lambda: None
            health[BLOCKS_READ] += q.blocks_read
            health[BLOCKS_WRITTEN] += q.blocks_written
            health[READS] += q.reads
            health[WRITES] += q.writes
            self.nvm.sgl_commands += q.sgl_commands
        self._members, self._cq_members = {}, {}
        self._exports = []

    def live_sgl_commands(self) -> int:
        """SGL commands the running loops served (not folded yet)."""
        return sum(int(member.queue.sgl_commands) for member in self._members.values())

    def close(self) -> None:
        self.pause()
        for worker in self._workers:
            worker.close()
        self._workers = []


def _same(value: Any) -> Any:
    return value


@dataclass
class Member:
    """A queue a loop serves, and the worker running that loop."""

    queue: Any
    worker: Worker


class Worker:
    """A loop's thread and eventfds, kept from one run to the next."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held while the loop runs
        self.limiter = trio.CapacityLimiter(1)  # its own thread: never queued behind others
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.doorbell_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def reset(self) -> None:
        """Forget wake-ups meant for the last run."""
        for fd in (self.stop_fd, self.doorbell_fd):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    def close(self) -> None:
        os.close(self.stop_fd)
        os.close(self.doorbell_fd)
