"""The device side of a virtqueue: split and packed rings (virtio 1.2 2.7/2.8).

One implementation serves every device and both protocols. A ``Virtqueue``
holds what the transport configured (size, ring addresses, indexes, kick/call/
err fds, negotiated ring features); once started it translates the ring
areas through ``GuestMemory`` and pops descriptor chains as ``Request``
objects, pushes completions and decides, honouring EVENT_IDX, whether the
driver must be notified.

Anything a driver can get wrong (an index past the ring, a chain that loops
or outgrows the queue, a buffer outside shared memory, a malformed indirect
table) raises ``RingError``: the queue stops, the error fd is signalled, and
the daemon carries on.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from vfiouserd import faults, stats
from vfiouserd._native import ffi, lib
from vfiouserd.devices.virtio import Feature, NativeHandler, Request, VirtioDevice, bit
from vfiouserd.eventfds import is_eventfd_like
from vfiouserd.inflight import (
    InflightError,
    PackedInflight,
    PackedResubmit,
    SplitInflight,
    StoredDescriptor,
)
from vfiouserd.log import get_logger
from vfiouserd.memory import (
    Area,
    GuestMemory,
    GuestMemoryError,
    RemoteAccessError,
    memory_faults,
)
from vfiouserd.trace import tracer
from vfiouserd.turns import Turns, WalkAbandoned

if sys.byteorder != "little":  # ring fields are read through native-order casts
    raise ImportError("vfiouserd's virtqueues assume a little-endian host")

log = get_logger("virtqueue")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
AVAIL_F_NO_INTERRUPT = 1
PACKED_EVENT_ENABLE = 0
PACKED_EVENT_DISABLE = 1
PACKED_EVENT_DESC = 2
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 1024  # descriptors in one indirect table (QEMU's limit too)
DESCRIPTOR = struct.Struct("<QIHH")  # split: addr, len, flags, next
PACKED_DESCRIPTOR = struct.Struct("<QIHH")  # packed: addr, len, id, flags
PACKED_USED = struct.Struct("<IH")  # len, id of a used packed descriptor
FLAGS = struct.Struct("<H")
POLL_INTERVAL = 0.001  # seconds, when the front end asked for polling (no kick fd)
_ONE = (1).to_bytes(8, "little")


class RingError(Exception):
    """The driver broke the ring protocol; this queue cannot go on."""


class MemoryMoved(RingError):
    """A chain met a layout the VMM was changing meanwhile: taken back, tried again."""


class RingUnmapped(RingError):
    """The ring areas are not (or no longer) in shared memory. Not fatal by
    itself: the queue waits for the next memory layout change."""


@dataclass(frozen=True)
class HeldBuffer:
    """A buffer the driver gave a host-fed queue, waiting for the host:
    where it lies in guest memory, not a view of it (see ``Request.chain``)."""

    head: int
    ndescs: int
    inflight_entry: int
    chain: list[tuple[int, int, bool]]
    position: int  # the ring's base() before it was taken: how to give it back


class AddressSpace(enum.Enum):
    GUEST = "guest-physical"  # virtio-pci: the driver writes guest-physical addresses
    USER = "front-end virtual"  # vhost-user: ring addresses are the VMM's addresses


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event on free-running 16-bit indexes."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def packed_need_event(
    off_wrap: int, counter: int, position: int, wrap: bool, size: int, old: int
) -> bool:
    """EVENT_IDX for packed rings: was the other side's event (``off_wrap``:
    offset plus wrap bit) passed while our free-running ``counter`` went
    from ``old`` to its value? ``position``/``wrap`` are where ``counter``
    points in the ring now."""
    event = counter - position + (off_wrap & 0x7FFF)
    if bool(off_wrap >> 15) != wrap:
        event -= size
    return need_event(event & 0xFFFF, counter, old)


def _load(layout: struct.Struct, area: Area, offset: int) -> tuple[Any, ...]:
    if type(area) is memoryview:
        return layout.unpack_from(area, offset)
    return area.unpack(layout, offset)


def _store(layout: struct.Struct, area: Area, offset: int, *values: Any) -> None:
    if type(area) is memoryview:
        layout.pack_into(area, offset, *values)
    else:
        area.pack(layout, offset, *values)


def _eventfd_signal(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass  # counter saturated: the peer has plenty of wake-ups pending
    except OSError as exc:
        log.warning("eventfd.write_failed", fd=fd, error=os.strerror(exc.errno or 0))


def _mark_written(memory: GuestMemory, ranges: list[tuple[int, int]], written: int) -> None:
    """Log the first ``written`` bytes of a request's writable buffers."""
    for address, length in ranges:
        if written <= 0:
            break
        memory.mark_dirty(address, min(length, written))
        written -= length


def _on_worker_thread() -> bool:
    """A ring walk over memory without fds runs on a worker thread, where
    the event loop's state is reached through ``trio.from_thread``."""
    return not trio.lowlevel.in_trio_run()


def _kick_drain(fd: int) -> str | None:
    """Take a kick; None, or why ``fd`` cannot serve as a kick fd (the VMM
    may send any fd: a pipe's write end, a pipe at end of file)."""
    try:
        data = os.read(fd, 8)
    except BlockingIOError:
        return None
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return None if data else "is at end of file"


class _Chains:
    """Descriptor-chain walking common to both layouts."""

    def __init__(self, memory: GuestMemory, size: int, indirect: bool) -> None:
        self.memory = memory
        self.size = size
        self.indirect = indirect
        self.keep_chains = False  # set on rings whose buffers wait for the host

    def buffers(self, request: Request, address: int, length: int, flags: int) -> None:
        writable = bool(flags & DESC_F_WRITE)
        if not writable and request.writable:
            raise RingError("device-readable descriptor after a device-writable one")
        try:
            views = self.memory.guest_buffers(
                address, length, writable=writable, writeback=request.writeback
            )
        except GuestMemoryError as exc:
            raise RingError(f"descriptor buffer {address:#x}+{length:#x}: {exc}") from exc
        (request.writable if writable else request.readable).extend(views)
        if request.chain is not None:
            request.chain.append((address, length, writable))
        if writable and self.memory.dirty is not None:
            if request.dirty_ranges is None:
                request.dirty_ranges = []
            request.dirty_ranges.append((address, length))

    def _writeback(self) -> list[tuple[int, memoryview]] | None:
        return [] if self.memory.has_unmapped else None

    def _new_request(self, head: int = 0) -> Request:
        request = Request([], [], head=head, writeback=self._writeback())
        if self.keep_chains or tracer.wants("request"):
            request.chain = []
        return request

    def rebuild(self, held: HeldBuffer) -> Request:
        """A held buffer's request, its views made now (on the current memory)."""
        request = Request([], [], head=held.head, ndescs=held.ndescs, writeback=self._writeback())
        request.inflight_entry = held.inflight_entry
        for address, length, writable in held.chain:
            self.buffers(request, address, length, DESC_F_WRITE if writable else 0)
        return request

    def indirect_table(self, address: int, length: int, flags: int) -> Area:
        if not self.indirect:
            raise RingError("indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
        if flags & DESC_F_NEXT:
            raise RingError("indirect descriptor with the NEXT flag")
        if length == 0 or length % DESCRIPTOR.size:
            raise RingError(f"indirect table length {length} is not a multiple of 16")
        if length > MAX_INDIRECT * DESCRIPTOR.size:
            raise RingError(
                f"indirect table of {length // 16} descriptors (at most {MAX_INDIRECT})"
            )
        try:
            return self.memory.guest_view(address, length)
        except GuestMemoryError as exc:
            raise RingError(f"indirect table: {exc}") from exc


class SplitRing(_Chains):
    """Split virtqueue: descriptor table, available ring, used ring."""

    packed = False

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        indirect: bool,
        event_idx: bool,
        last_avail_idx: int,
    ) -> None:
        super().__init__(memory, size, indirect)
        if size & (size - 1):
            raise RingError(f"split queue size {size} is not a power of 2")
        if desc % 16 or avail % 2 or used % 4:
            raise RingError("split ring areas are misaligned")
        try:
            self.desc = memory.guest_view(desc, 16 * size)
            # avail: flags, idx, ring[size], used_event
            self.avail = memory.guest_view(avail, 6 + 2 * size).cast("H")
            used_view = memory.guest_view(used, 6 + 8 * size)
        except GuestMemoryError as exc:
            raise RingUnmapped(f"ring area: {exc}") from exc
        # used: flags, idx, {id, len}[size], avail_event
        self.used_address = used  # guest-physical, for the dirty log
        self.used16 = used_view.cast("H")
        self.used32 = used_view[4 : 4 + 8 * size].cast("I")
        # All three areas in memory the daemon maps (the native loop's
        # condition; its buffers may still lie elsewhere: it leaves those to
        # Python, request by request).
        self.mapped = all(isinstance(v, memoryview) for v in (self.desc, self.avail, used_view))
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = self.used16[1]  # the driver-visible value is authoritative
        self.inflight: SplitInflight | None = None
        self.resubmit: deque[int] = deque()  # heads a killed back end left in flight

    def track(self, inflight: SplitInflight, recover: bool) -> None:
        """Record what is in flight in ``inflight``; with ``recover``, first
        take back what a previous back end left there."""
        self.inflight = inflight
        if not recover:
            return
        try:
            self.resubmit = deque(inflight.recover(self.used_idx))
        except InflightError as exc:
            raise RingError(f"inflight region: {exc}") from exc
        # Everything taken from the ring is either used or in flight.
        self.last_avail_idx = (self.used_idx + len(self.resubmit)) & 0xFFFF

    def has_available(self) -> bool:
        return bool(self.resubmit) or self.avail[1] != self.last_avail_idx

    def pop(self) -> Request | None:
        if self.resubmit:
            head = self.resubmit.popleft()
            request = self._walk(head)
            if self.inflight is not None:
                self.inflight.fetched(head)
            return request
        avail_idx = self.avail[1]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise RingError(
                f"available index {avail_idx} is {pending} ahead of {self.last_avail_idx}"
            )
        lib.vfu_fence_acquire()  # read the ring entry only after the index
        head = self.avail[2 + self.last_avail_idx % self.size]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.inflight is not None:
            if head >= self.size:
                raise RingError(f"head descriptor {head} is outside a queue of {self.size}")
            self.inflight.fetched(head)
        return self._walk(head)

    def _walk(self, head: int) -> Request:
        if head >= self.size:
            raise RingError(f"head descriptor {head} is outside a queue of {self.size}")
        request = self._new_request(head)
        table, table_size, index, seen = self.desc, self.size, head, 0
        while True:
            seen += 1
            if seen > table_size:
                raise RingError("descriptor chain loops or is longer than its table")
            address, length, flags, next_index = _load(DESCRIPTOR, table, index * 16)
            if flags & DESC_F_INDIRECT:
                if table is not self.desc:
                    raise RingError("indirect descriptor inside an indirect table")
                table = self.indirect_table(address, length, flags)
                table_size, index, seen = length // 16, 0, 0
                continue
            self.buffers(request, address, length, flags)
            if not flags & DESC_F_NEXT:
                return request
            if next_index >= table_size:
                raise RingError(f"next descriptor {next_index} is outside its table")
            index = next_index

    def push(self, request: Request, written: int) -> None:
        self.push_batch([(request, written)])

    def push_batch(self, batch: list[tuple[Request, int]]) -> None:
        """Used elements for ``batch``, published by one used-index store:
        the driver sees all of them or none (a frame spread over several
        receive buffers must arrive whole)."""
        used = self.used_idx
        for request, written in batch:
            slot = used % self.size
            self.used32[2 * slot] = request.head
            self.used32[2 * slot + 1] = written
            if self.inflight is not None:
                self.inflight.completing(request.head)  # chained: the last batch
            if self.memory.dirty is not None:
                self.memory.mark_dirty(self.used_address + 4 + 8 * slot, 8)
            used = (used + 1) & 0xFFFF
        lib.vfu_fence_release()  # the elements before the index that publishes them
        self.used_idx = used
        self.used16[1] = self.used_idx
        if self.inflight is not None:
            for request, _ in batch:
                self.inflight.completed(request.head, self.used_idx)
        if self.memory.dirty is not None:
            self.memory.mark_dirty(self.used_address + 2, 2)

    def used_mark(self) -> int:
        return self.used_idx

    def should_notify(self, mark: int) -> bool:
        if self.used_idx == mark:
            return False
        lib.vfu_fence_full()  # our used-index store before the driver's flags/event
        if self.event_idx:
            return need_event(self.avail[2 + self.size], self.used_idx, mark)
        return not self.avail[0] & AVAIL_F_NO_INTERRUPT

    def arm(self) -> bool:
        """Ask for a kick on the next buffer; True if one is already there."""
        if self.event_idx:
            self.used16[2 + 4 * self.size] = self.last_avail_idx
            self.memory.mark_dirty(self.used_address + 4 + 8 * self.size, 2)
            lib.vfu_fence_full()  # publish avail_event before re-reading avail idx
        return self.has_available()

    def base(self) -> int:
        return self.last_avail_idx

    def base_at(self, position: int) -> int:
        """The base once the pops since ``position`` (a ``base()``) are given back."""
        return position & 0xFFFF

    def rewind(self, base: int) -> None:
        """Take back a pop whose chain could not be walked (see Virtqueue.process)."""
        self.last_avail_idx = base


class PackedRing(_Chains):
    """Packed virtqueue: one descriptor ring plus two event-suppression areas."""

    packed = True

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc: int,
        driver: int,
        device: int,
        *,
        indirect: bool,
        event_idx: bool,
        base: int,
    ) -> None:
        super().__init__(memory, size, indirect)
        if desc % 16 or driver % 4 or device % 4:
            raise RingError("packed ring areas are misaligned")
        try:
            self.desc = memory.guest_view(desc, 16 * size)
            self.driver_event = memory.guest_view(driver, 4).cast("H")  # off_wrap, flags
            self.device_event = memory.guest_view(device, 4).cast("H")
        except GuestMemoryError as exc:
            raise RingUnmapped(f"ring area: {exc}") from exc
        self.desc_address = desc  # guest-physical, for the dirty log
        self.event_idx = event_idx
        self.last_avail_idx = base & 0x7FFF
        self.avail_wrap = bool(base >> 15 & 1)
        self.used_idx = base >> 16 & 0x7FFF
        self.used_wrap = bool(base >> 31 & 1)
        if self.last_avail_idx >= size or self.used_idx >= size:
            raise RingError(f"ring base {base:#x} is outside a queue of {size}")
        self.used_counter = 0  # free-running count of used slots, for EVENT_IDX
        self.device_event[1] = PACKED_EVENT_ENABLE
        memory.mark_dirty(device, 4)
        self.inflight: PackedInflight | None = None
        self.resubmit: deque[PackedResubmit] = deque()

    def slot_published(self, index: int, wrap: bool) -> bool:
        """Whether the device marked ring slot ``index`` used (for ``wrap``):
        its flags are no longer those of an available descriptor."""
        if not 0 <= index < self.size:
            raise RingError(f"ring slot {index} outside a queue of {self.size}")
        flags = _load(PACKED_DESCRIPTOR, self.desc, index * 16)[3]
        available = (bool(flags & PACKED_DESC_F_AVAIL), bool(flags & PACKED_DESC_F_USED))
        return available != (wrap, not wrap)

    def track(self, inflight: PackedInflight, recover: bool) -> None:
        self.inflight = inflight
        if not recover:
            return
        try:
            used_idx, used_wrap, resubmit = inflight.recover(
                self.used_idx, self.used_wrap, self.slot_published
            )
        except InflightError as exc:
            raise RingError(f"inflight region: {exc}") from exc
        if used_idx >= self.size:
            raise RingError(f"inflight region: used index {used_idx} outside the queue")
        self.used_idx, self.used_wrap = used_idx, used_wrap
        self.resubmit = deque(resubmit)
        # Everything taken from the ring is either used or in flight.
        position = used_idx + sum(len(r.descriptors) for r in resubmit)
        self.avail_wrap = used_wrap ^ bool(position // self.size % 2)
        self.last_avail_idx = position % self.size

    def _is_available(self, flags: int) -> bool:
        return (
            bool(flags & PACKED_DESC_F_AVAIL) == self.avail_wrap
            and bool(flags & PACKED_DESC_F_USED) != self.avail_wrap
        )

    def has_available(self) -> bool:
        if self.resubmit:
            return True
        flags = _load(PACKED_DESCRIPTOR, self.desc, self.last_avail_idx * 16)[3]
        return self._is_available(flags)

    def _pop_resubmitted(self) -> Request:
        resubmit = self.resubmit.popleft()
        request = self._new_request()
        for stored in resubmit.descriptors:
            if stored.flags & DESC_F_INDIRECT:
                if len(resubmit.descriptors) != 1:
                    raise RingError("indirect descriptor inside a chain")
                table = self.indirect_table(stored.address, stored.length, stored.flags)
                self._walk_indirect(request, table)
            else:
                self.buffers(request, stored.address, stored.length, stored.flags)
        request.head = resubmit.descriptors[-1].buffer_id
        request.ndescs = len(resubmit.descriptors)
        request.inflight_entry = resubmit.entry
        if self.inflight is None:  # the front end took the region away meanwhile
            raise InflightError("requests to resubmit without an inflight region")
        self.inflight.resubmitted(resubmit.entry)
        return request

    def pop(self) -> Request | None:
        if self.resubmit:
            return self._pop_resubmitted()
        if not self.has_available():
            return None
        lib.vfu_fence_acquire()  # the descriptor body only after its flags
        request = self._new_request()
        index, count = self.last_avail_idx, 0
        chain: list[StoredDescriptor] = []
        while True:
            count += 1
            if count > self.size:
                raise RingError("descriptor chain is longer than the queue")
            address, length, buffer_id, flags = _load(PACKED_DESCRIPTOR, self.desc, index * 16)
            if self.inflight is not None:
                chain.append(StoredDescriptor(address, length, buffer_id, flags))
            index += 1
            if index == self.size:
                index = 0
            if flags & DESC_F_INDIRECT:
                if count != 1:
                    raise RingError("indirect descriptor inside a chain")
                self._walk_indirect(request, self.indirect_table(address, length, flags))
            else:
                self.buffers(request, address, length, flags)
            if not flags & DESC_F_NEXT:
                break
        request.head = buffer_id  # the buffer ID travels in the last descriptor
        request.ndescs = count
        if self.inflight is not None:
            request.inflight_entry = self.inflight.fetched(chain)
        self.last_avail_idx += count
        if self.last_avail_idx >= self.size:
            self.last_avail_idx -= self.size
            self.avail_wrap = not self.avail_wrap
        return request

    def _walk_indirect(self, request: Request, table: Area) -> None:
        for offset in range(0, len(table), 16):
            address, length, _, flags = _load(PACKED_DESCRIPTOR, table, offset)
            if flags & (DESC_F_INDIRECT | DESC_F_NEXT):
                raise RingError("indirect table entry with INDIRECT or NEXT flag")
            self.buffers(request, address, length, flags)

    def push(self, request: Request, written: int) -> None:
        self.push_batch([(request, written)])

    def push_batch(self, batch: list[tuple[Request, int]]) -> None:
        """Used descriptors for ``batch``; the first one's flags are written
        last, so the driver, which reads them in order, sees all or none."""
        published: list[tuple[int, int]] = []  # (offset, flags)
        used_idx, used_wrap = self.used_idx, self.used_wrap
        for request, written in batch:
            offset = used_idx * 16
            _store(PACKED_USED, self.desc, offset + 8, written, request.head)
            flags = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED if used_wrap else 0
            if request.writable:
                flags |= DESC_F_WRITE
            used_idx += request.ndescs
            if used_idx >= self.size:
                used_idx -= self.size
                used_wrap = not used_wrap
            if self.inflight is not None:
                self.inflight.completing(request.inflight_entry, used_idx, used_wrap)
            published.append((offset, flags))
            self.used_counter = (self.used_counter + request.ndescs) & 0xFFFF
        lib.vfu_fence_release()  # ids and lengths before the flags that publish them
        for offset, flags in published[1:]:
            _store(FLAGS, self.desc, offset + 14, flags)
        if len(published) > 1:
            lib.vfu_fence_release()  # the rest before the first
        offset, flags = published[0]
        _store(FLAGS, self.desc, offset + 14, flags)
        if self.inflight is not None:
            for request, _ in batch:
                self.inflight.completed(request.inflight_entry)
        for offset, _ in published:
            self.memory.mark_dirty(self.desc_address + offset, 16)
        self.used_idx, self.used_wrap = used_idx, used_wrap

    def used_mark(self) -> int:
        return self.used_counter

    def should_notify(self, mark: int) -> bool:
        if self.used_counter == mark:
            return False
        lib.vfu_fence_full()
        off_wrap, flags = self.driver_event[0], self.driver_event[1]
        if flags == PACKED_EVENT_DISABLE:
            return False
        if flags != PACKED_EVENT_DESC or not self.event_idx:
            return True
        return packed_need_event(
            off_wrap, self.used_counter, self.used_idx, self.used_wrap, self.size, mark
        )

    def arm(self) -> bool:
        # The device event area stays ENABLE: the driver kicks on every batch.
        lib.vfu_fence_full()
        return self.has_available()

    def base(self) -> int:
        return (
            self.last_avail_idx | self.avail_wrap << 15 | self.used_idx << 16 | self.used_wrap << 31
        )

    def base_at(self, position: int) -> int:
        """The base once the pops since ``position`` (a ``base()``) are given
        back: the avail side from then, the used side from now."""
        return position & 0xFFFF | self.base() & 0xFFFF_0000

    def rewind(self, base: int) -> None:
        """Take back a pop whose chain could not be walked (see Virtqueue.process)."""
        self.last_avail_idx, self.avail_wrap = base & 0x7FFF, bool(base >> 15 & 1)


Handler = Callable[[Request], int]
# A host-fed queue's filler: bytes written into the request, None to keep it.
Filler = Callable[[Request], int | None]


class Virtqueue:
    """One queue's configuration and life cycle (stopped/started, enabled)."""

    def __init__(self, index: int, memory: GuestMemory, address_space: AddressSpace) -> None:
        self.index = index
        self.memory = memory
        self.address_space = address_space
        self.turns: Turns | None = None  # shared with the session's commands
        # Changed by whatever makes a walk under way stale: reset, stop,
        # disabling, new ring parameters (see Turns).
        self.epoch = 0
        # The native fast path (fastpath.c): the device's C handler, the
        # running loop's parameters, held by its worker thread while it runs.
        self.native: NativeHandler | None = None
        self._native_queue: Any = None
        self._native_exports: list[Any] = []
        self._native_lock = threading.Lock()
        self._native_stop_fd: int | None = None
        self._native_host_fd: int | None = None  # a host-fed loop's wake-up (data_ready)
        self._native_request: Any = None
        self._native_limiter: trio.CapacityLimiter | None = None
        self._enabled = False
        self._kick_is_eventfd = False
        self._kick_fd: int | None = None
        self._kick_generation = 0  # which kick fd a waiter woke for
        self._python_reason: str | None = "not started"
        # Completions a delay rule holds back: (due, request, bytes written),
        # the request's views of guest memory dropped already.
        self.deferred: list[tuple[float, Request, int]] = []
        self.reset()
        # The device's lifetime counters of this queue (see vfiouserd.stats).
        self.stats = stats.of_queue(index)
        self.stats.in_flight = lambda: len(self.held) + len(self.deferred)
        self.stats.live = lambda: self._native_queue
        self.stats.python_because = self.python_because
        _live_queues.add(self)

    @property
    def kick_fd(self) -> int | None:
        return self._kick_fd

    @kick_fd.setter
    def kick_fd(self, fd: int | None) -> None:
        self._kick_fd = fd
        self._kick_generation += 1

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, enabled: bool) -> None:
        if not enabled:
            self._pause_native()
            self.epoch += 1
        self._enabled = enabled

    def reset(self) -> None:
        self._pause_native()
        self.deferred = []  # the driver starts over: nothing is due to it
        self.epoch += 1
        self._native_off = False  # set when the fast path cannot wait on the kick fd
        self.size = 0
        self.desc_address = self.avail_address = self.used_address = 0
        self.addresses_set = False
        self.log_address = 0
        self.flags = 0
        self.base = 0  # SET_VRING_BASE value, layout-specific
        self.features = 0
        self.kick_fd = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        # A transport that does not notify through eventfds (virtio-pci:
        # MSI-X vectors, INTx) sets these instead.
        self.notifier: Callable[[], None] | None = None
        # ... and, where an interrupt is just an eventfd to signal (an MSI-X
        # vector's, as it stands now), this: the native loop signals it.
        self.native_call: Callable[[], int | None] | None = None
        self.error_notifier: Callable[[], None] | None = None
        # Virtio-pci: no DMA while the driver has bus mastering switched off.
        self.dma_allowed: Callable[[], bool] = lambda: True
        self.enabled = False
        self.started = False
        self.broken = False
        self.requests = 0  # served since the ring started, for logs and tests
        self.ring: SplitRing | PackedRing | None = None
        # A host-fed queue (receive, events): the device fills the driver's
        # buffers when the host has something; they wait here, oldest first.
        # Everything taken from such a ring waits until filled, so the held
        # buffers are always the newest pops and a stop gives them back.
        self.fill: Filler | None = None
        # A fill may span several waiting buffers (VirtioDevice.merged_queues),
        # up to this many bytes of them.
        self.merged = False
        self.merge_bytes = 0
        self.has_data: Callable[[], bool] = lambda: False
        self.held: deque[HeldBuffer] = deque()
        # vhost-user INFLIGHT_SHMFD: where this queue records what is in
        # flight; recovery from it runs once per ring start.
        self.inflight: SplitInflight | PackedInflight | None = None
        self._recover = False
        self._generation = -1
        self._scope: trio.CancelScope | None = None
        self._wait_scope: trio.CancelScope | None = None
        self._woken = False

    # -- configuration -------------------------------------------------------

    @property
    def packed(self) -> bool:
        return bool(self.features & bit(Feature.RING_PACKED))

    def _gpa(self, address: int, length: int) -> int:
        if self.address_space is AddressSpace.USER:
            return self.memory.user_to_guest(address, length)
        return address

    def attach(self) -> SplitRing | PackedRing:
        """Translate the ring areas; RingError if the driver's setup is bad."""
        if not self.addresses_set or self.size == 0:
            raise RingError("ring started before its size and addresses were set")
        if self.size > MAX_QUEUE_SIZE:
            raise RingError(f"queue size {self.size} exceeds {MAX_QUEUE_SIZE}")
        indirect = bool(self.features & bit(Feature.RING_INDIRECT_DESC))
        event_idx = bool(self.features & bit(Feature.RING_EVENT_IDX))
        # The layout this ring is built on: building it over memory reached
        # through the VMM takes round trips, during which the layout may
        # change again (then the next walk must attach anew).
        generation = self.memory.generation
        # Keep the indexes a running ring has reached when re-attaching.
        previous = self.ring
        base = previous.base() if previous is not None else self.base
        ring: SplitRing | PackedRing
        try:
            if self.packed:
                ring = PackedRing(
                    self.memory,
                    self.size,
                    self._gpa(self.desc_address, 16 * self.size),
                    self._gpa(self.avail_address, 4),
                    self._gpa(self.used_address, 4),
                    indirect=indirect,
                    event_idx=event_idx,
                    base=base,
                )
            else:
                ring = SplitRing(
                    self.memory,
                    self.size,
                    self._gpa(self.desc_address, 16 * self.size),
                    self._gpa(self.avail_address, 6 + 2 * self.size),
                    self._gpa(self.used_address, 6 + 8 * self.size),
                    indirect=indirect,
                    event_idx=event_idx,
                    last_avail_idx=base,
                )
        except RemoteAccessError as exc:  # the VMM failed us: not worth waiting for
            raise RingError(f"ring area: {exc}") from exc
        except GuestMemoryError as exc:
            raise RingUnmapped(f"ring area: {exc}") from exc
        ring.keep_chains = self.fill is not None
        self.ring = ring
        if self.inflight is not None:
            self._track_inflight(previous)
        self._generation = generation
        return ring

    def _track_inflight(self, previous: SplitRing | PackedRing | None) -> None:
        ring, tracker = self.ring, self.inflight
        if isinstance(ring, PackedRing) != isinstance(tracker, PackedInflight):
            log.warning("inflight.layout_mismatch", queue=self.index, packed=self.packed)
            return
        if tracker.queue_size != self.size:  # type: ignore[union-attr]
            log.warning(
                "inflight.size_mismatch",
                queue=self.index,
                region=tracker.queue_size,  # type: ignore[union-attr]
                ring=self.size,
            )
            return
        if previous is not None and not self._recover:
            ring.resubmit = previous.resubmit  # type: ignore[union-attr]
        sent = ring.base()  # type: ignore[union-attr]
        ring.track(tracker, self._recover)  # type: ignore[union-attr, arg-type]
        if self._recover and ring.base() != sent:  # type: ignore[union-attr]
            # The front end's idea of the base was stale (QEMU cannot ask a
            # killed back end); the region knows better.
            log.info("inflight.base_corrected", queue=self.index, sent=sent, base=ring.base())  # type: ignore[union-attr]
        if self._recover and ring.resubmit:  # type: ignore[union-attr]
            log.warning("inflight.resubmit", queue=self.index, requests=len(ring.resubmit))  # type: ignore[union-attr]
        self._recover = False

    def invalidate(self) -> None:
        """Re-translate the ring before the next batch (features or addresses changed)."""
        self._pause_native()
        self.epoch += 1
        self._generation = -1

    def current_base(self) -> int:
        """Where the ring stands, held buffers given back (a stop, a
        migration or a handover hands them to whoever serves the ring next)."""
        self._pause_native()  # its indexes are the ring's
        if self.ring is None:
            return self.base
        if self.held:
            return self.ring.base_at(self.held[0].position)
        return self.ring.base()

    # -- running ---------------------------------------------------------------

    def _on_loop(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the event loop, also when called from the worker
        thread that walks rings on unmapped memory (device state and the
        VMM's eventfds belong to the loop)."""
        if _on_worker_thread():
            trio.from_thread.run_sync(action)
        else:
            action()

    def fail(self, reason: str) -> None:
        self.broken = True
        log.error("ring.broken", queue=self.index, reason=reason)
        if self.error_notifier is not None:
            self._on_loop(self.error_notifier)
        else:
            _eventfd_signal(self.err_fd)

    def host_data(self) -> None:
        """The host has something for this host-fed queue: a native loop
        waiting for it is woken where it waits, anything else looks again."""
        if self._native_queue is not None and self._native_host_fd is not None:
            os.eventfd_write(self._native_host_fd, 1)
        else:
            self.wake()

    def wake(self) -> None:
        """Re-check the ring without a kick (enable, memory change, start)."""
        self._pause_native()  # it looks again at what changed, then goes on
        self._woken = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def process(self, handle: Handler) -> None:
        """Serve what the driver made available, then notify it once."""
        if self.broken or not self.enabled or not self.dma_allowed():
            return
        faults = memory_faults()
        try:
            # The walk keeps the ring it started with in hand: a reset on
            # the event loop may drop ``self.ring`` meanwhile (the walk then
            # finds out at its next round trip, see Turns).
            ring = self.ring
            if self._generation != self.memory.generation or ring is None:
                if ring is None and self._generation == self.memory.generation:
                    return  # unmapped ring, memory unchanged: keep waiting
                ring = self.attach()
            mark = ring.used_mark()
            generation = self.memory.generation
            if self.deferred:
                self._complete_deferred(ring, time.monotonic())
            if self.fill is not None:
                self._serve_held(ring, self.fill, generation)
            else:
                self._serve(ring, handle, generation)
            if self.memory.dirty is not None:
                self.memory.dirty.kick()
            if ring.should_notify(mark):
                self.stats.notified += 1
                self.signal_call()
            elif ring.used_mark() != mark:
                self.stats.suppressed += 1
        except WalkAbandoned:
            log.info("ring.walk_abandoned", queue=self.index)
        except MemoryMoved as exc:
            log.info("ring.memory_moved", queue=self.index, reason=str(exc))
            self.wake()  # the new layout is there already: look again
        except RingUnmapped as exc:
            if self.ring is not None:
                self.base = self.current_base()
                self.held.clear()
                self.ring = None
            self._generation = self.memory.generation  # retry on the next layout change
            log.warning("ring.unmapped", queue=self.index, reason=str(exc))
        except RingError as exc:
            self.fail(str(exc))
        except InflightError as exc:  # the front end can rewrite the region any time
            self.fail(f"inflight region: {exc}")
        except GuestMemoryError as exc:  # unmapped memory the VMM failed to serve
            self.fail(f"guest memory access failed: {exc}")
        except Exception as exc:  # a bug of ours: the queue breaks, not the session
            log.exception("ring.crashed", queue=self.index)
            self.fail(f"internal error: {exc!r}")
        if memory_faults() != faults:
            self.fail("the VMM truncated memory it shared with us")

    def _pop(self, ring: SplitRing | PackedRing, generation: int) -> tuple[int, Request | None]:
        """(the ring's base before, the next request or None)."""
        position = ring.base()
        try:
            return position, ring.pop()
        except RingError as exc:
            if _on_worker_thread() and self.memory.generation != generation:
                # The VMM changed the layout while this walk waited for it (a
                # memory transaction: unmap, then map again): try the chain
                # again on the new layout, not a broken ring.
                ring.rewind(position)
                raise MemoryMoved(str(exc)) from exc
            raise

    def _complete(self, ring: SplitRing | PackedRing, request: Request, written: int) -> None:
        self._complete_batch(ring, [(request, written)])

    def _complete_batch(
        self, ring: SplitRing | PackedRing, batch: list[tuple[Request, int]], clamp: bool = True
    ) -> None:
        done = []
        for request, written in batch:
            self.requests += 1
            if request.writeback:  # unmapped buffers: data before the used entry
                self.memory.flush(request.writeback)
            if clamp:  # (a deferred request was clamped before its views went)
                written = min(written, request.writable_size)
            if request.dirty_ranges:
                _mark_written(self.memory, request.dirty_ranges, written)
            done.append((request, written))
        ring.push_batch(done)
        now = time.monotonic_ns()
        tracing = tracer.wants("request")
        for request, written in done:
            latency = now - request.taken if request.taken else None
            self.stats.count(1, request.size_read + written, latency)
            if request.status is not None:
                self.stats.errors += 1
            if tracing:
                self._trace_completion(request, written, latency)

    def _trace_completion(self, request: Request, written: int, latency: int | None) -> None:
        fields: dict[str, Any] = {"queue": self.index, "head": request.head}
        if request.chain is not None:
            fields["chain"] = [
                f"{address:#x}+{length}{'w' if writable else 'r'}"
                for address, length, writable in request.chain
            ]
            fields["addresses"] = [address for address, _, _ in request.chain]
        if request.details:
            fields.update(request.details)
        if request.status is not None:
            fields["status"] = request.status
        fields["written"] = written
        if latency is not None:
            fields["latency_us"] = round(latency / 1000, 1)
        tracer.emit("request", "complete", **fields)

    def _complete_deferred(self, ring: SplitRing | PackedRing, now: float) -> None:
        """Complete what a delay rule held back and is due by ``now``."""
        due = [(r, w) for when, r, w in self.deferred if when <= now]
        if due:
            self.deferred = [entry for entry in self.deferred if entry[0] > now]
            self._complete_batch(ring, due, clamp=False)

    def _defer(self, request: Request, written: int, delay: float) -> None:
        written = min(written, request.writable_size)
        request.readable, request.writable = [], []  # no view outlives the walk
        self.deferred.append((time.monotonic() + delay, request, written))

    def _serve(self, ring: SplitRing | PackedRing, handle: Handler, generation: int) -> None:
        steering = faults.rules.steering
        for _ in range(ring.size):  # bounded so other queues get their turn
            _, request = self._pop(ring, generation)
            if request is None:
                if ring.arm():
                    continue
                return
            request.taken = time.monotonic_ns()
            request.size_read = request.readable_size
            if steering or tracer.wants("request"):
                request.details = {}  # the device says what the request is
            written = self._call_device(handle, request)
            if steering and request.details is not None:
                delay = faults.rules.request_delay(
                    self.index, request.details.get("type"), _sectors(request.details)
                )
                if delay:
                    self._defer(request, written, delay)
                    continue
            self._complete(ring, request, written)
        self.wake()  # more may be waiting: after the other queues

    def _serve_held(self, ring: SplitRing | PackedRing, fill: Filler, generation: int) -> None:
        # Take every buffer the driver made available: they wait, in order.
        while len(self.held) < ring.size:
            position, request = self._pop(ring, generation)
            if request is None:
                if ring.arm():
                    continue
                break
            chain = request.chain if request.chain is not None else []
            held = HeldBuffer(request.head, request.ndescs, request.inflight_entry, chain, position)
            self.held.append(held)
        # The oldest first, while the device has something for them.
        while self.held and self.has_data():
            if self.merged:
                if not self._fill_merged(ring, fill):
                    break
                continue
            request = ring.rebuild(self.held[0])
            if tracer.wants("request"):
                request.details = {}
            written = self._call_device(fill, request)
            if written is None:
                break
            self.held.popleft()
            self._complete(ring, request, written)

    def _fill_merged(self, ring: SplitRing | PackedRing, fill: Filler) -> bool:
        """One fill over the oldest waiting buffers seen as one (up to
        ``merge_bytes`` of them); the buffers it wrote into are completed
        together. False if the device kept them all for later."""
        parts: list[Request] = []
        capacity = 0
        for held in self.held:
            parts.append(ring.rebuild(held))
            capacity += parts[-1].writable_size
            if capacity >= self.merge_bytes:
                break
        request = Request([], [view for part in parts for view in part.writable])
        request.parts = [part.writable_size for part in parts]
        traced = tracer.wants("request")
        if traced:
            request.details = {}
        written = self._call_device(fill, request)
        if written is None:
            return False
        left = min(written, capacity)
        batch = []
        for part in parts[: request.buffers_used(left)]:
            if traced:
                part.details = request.details
            share = min(left, part.writable_size)
            batch.append((part, share))
            left -= share
            self.held.popleft()
        self._complete_batch(ring, batch)
        return True

    def _call_device(self, call: Callable[[Request], Any], request: Request) -> Any:
        try:
            return call(request)
        except WalkAbandoned:
            raise
        except Exception as exc:  # a device bug must not take the daemon down
            log.exception("device.failed", queue=self.index)
            raise RingError(f"device handler failed: {exc!r}") from exc

    def start(self, handle: Handler, nursery: trio.Nursery) -> None:
        """Serve the queue from a task of ``nursery`` until ``stop``.

        The cancel scope exists before the task runs, so a stop that comes
        first still wins.
        """
        self._scope = trio.CancelScope()
        self.started = True
        self.broken = False  # a restart follows a device reset: the driver starts over
        self.requests = 0
        nursery.start_soon(self._run, handle, self._scope)

    async def _run(self, handle: Handler, scope: trio.CancelScope) -> None:
        with scope:
            while not self.broken:
                if faults.rules.steering:
                    until = faults.rules.hang_until(self.index)
                    if until is not None:  # take nothing until the hang is over
                        await trio.sleep(max(0.0, until - time.monotonic()))
                        continue
                if self._native_ready():
                    outcome = await self._serve_native()
                    if outcome == lib.VFU_FAST_PUNT:
                        await self._process_anywhere(handle)  # what it leaves to Python
                    elif outcome == lib.VFU_FAST_FAULT:
                        self.fail("the VMM truncated memory it shared with us")
                    elif outcome == lib.VFU_FAST_BROKEN_FD:
                        self._native_off = True  # Python's own wait says why
                    await trio.lowlevel.checkpoint()
                    continue
                await self._process_anywhere(handle)
                if self._native_ready():
                    continue  # attached now: the fast path takes over
                await self._wait()
            await trio.sleep_forever()  # a broken queue waits for stop or reset

    async def _process_anywhere(self, handle: Handler) -> None:
        """``process`` where the memory allows: on the event loop, or, when
        part of it is reached through the VMM (memory may have changed while
        the fast path ran), on a worker thread."""
        if self.memory.has_unmapped and self.memory.remote is not None:
            # Every ring access is a round trip to the VMM: walk on a worker
            # thread that gives its turn up for each one, so the session
            # keeps serving the VMM (see Turns).
            if self.turns is None:
                self.fail("memory reached through the VMM, but no session to reach it")
                return
            async with self.turns.walk():
                await trio.to_thread.run_sync(self._process_in_worker, handle)
        else:
            self.process(handle)

    # -- the native fast path ---------------------------------------------------------

    def _native_ready(self) -> bool:
        """The fast path serves the common case of a split ring on mapped
        memory with eventfd notifications (host-fed queues too, when the
        device has a handler for them and no buffer waits in Python); Python
        keeps everything else (see ``python_because``)."""
        reason = self.python_because()
        if reason != self._python_reason:
            self._python_reason = reason
            if self._enabled:
                log.debug(
                    "ring.path", queue=self.index, path="native" if reason is None else reason
                )
        return reason is None

    def python_because(self) -> str | None:
        """Why Python serves this ring, or None when the native loop may."""
        checks = (
            (self.native is None, "no native handler"),
            (bool(self.held), "buffers wait in Python"),  # filled in order by Python
            (bool(self.deferred), "delayed completions"),  # a delay rule's, Python's to finish
            (self._native_off, "kick fd not pollable"),
            (
                self.notifier is not None and self._native_call_fd() is None,
                "interrupts not an eventfd",  # INTx, no MSI-X vector, bus mastering off
            ),
            (self.kick_fd is None or not self._kick_is_eventfd, "no kick eventfd"),
            (not self._enabled or self.broken, "not enabled"),
            (
                not isinstance(self.ring, SplitRing) or not self.ring.mapped,
                "not a mapped split ring",
            ),
            (isinstance(self.ring, SplitRing) and bool(self.ring.resubmit), "resubmitting"),
            (self._generation != self.memory.generation, "memory changed"),
            (self.memory.dirty is not None, "dirty logging"),
            (not self.dma_allowed(), "no DMA allowed"),
            (tracer.wants("request") or tracer.wants("irq"), "traced"),  # Python reports each
            (faults.rules.steering, "fault rules"),  # Python applies them
        )
        return next((reason for failing, reason in checks if failing), None)

    async def _serve_native(self) -> int:
        q = self._native_parameters()
        request, lock = self._native_request, self._native_lock

        def run() -> int:
            with lock:
                if q.stop:  # paused before it started
                    return int(lib.VFU_FAST_STOPPED)
                return int(lib.vfu_split_serve(q, request))

        if self._native_limiter is None:  # its own thread: never queued behind other rings
            self._native_limiter = trio.CapacityLimiter(1)
        try:
            return await trio.to_thread.run_sync(
                run, abandon_on_cancel=True, limiter=self._native_limiter
            )
        finally:
            # Done, or cancelled (the thread may still run): out of the ring
            # before anything else looks at it.
            self._pause_native()

    def _native_parameters(self) -> Any:
        """The loop's parameters: the ring, the memory table, the fds. The
        buffers stay exported as long as the loop may use them, and no
        longer (an exported buffer cannot be unmapped): only
        ``_native_exports`` holds them."""
        ring, native = self.ring, self.native
        assert isinstance(ring, SplitRing) and native is not None and self.kick_fd is not None
        if self._native_stop_fd is None:
            self._native_stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._native_stop_fd)  # a wake-up meant for the last run
        if self._native_request is None:
            self._native_request = ffi.new("struct vfu_request *")
        regions = [r for r in self.memory.regions if r.mapping is not None]
        table = ffi.new("struct vfu_region[]", max(len(regions), 1))
        exports: list[Any] = [table]
        for entry, region in zip(table, regions, strict=False):
            exports.append(ffi.from_buffer(region.slice(0, region.size), require_writable=False))
            entry.gpa, entry.size = region.guest_address, region.size
            entry.hva = ffi.cast("uint8_t *", exports[-1])
            entry.writable = int(region.writable)
        q = ffi.new("struct vfu_split_queue *")
        for name, view in (("desc", ring.desc), ("avail", ring.avail), ("used", ring.used16)):
            exports.append(ffi.from_buffer(view, require_writable=False))
            kind = "uint16_t *" if name == "avail" else "uint8_t *"
            setattr(q, name, ffi.cast(kind, exports[-1]))
        q.size, q.event_idx, q.indirect = ring.size, int(ring.event_idx), int(ring.indirect)
        q.last_avail_idx, q.used_idx = ring.last_avail_idx, ring.used_idx
        if ring.inflight is not None:
            exports.append(ffi.from_buffer(ring.inflight.view, require_writable=False))
            q.inflight = ffi.cast("uint8_t *", exports[-1])
            q.inflight_counter = ring.inflight.counter
        q.kick_fd, q.stop_fd = self.kick_fd, self._native_stop_fd
        q.host_fd = -1
        if native.ready is not None:
            if self._native_host_fd is None:
                self._native_host_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            q.host_fd = self._native_host_fd
        call_fd = self.call_fd if self.notifier is None else self._native_call_fd()
        q.call_fd = call_fd if call_fd is not None else -1
        q.regions, q.nregions = table, len(regions)
        q.check, q.serve, q.device = native.check, native.serve, native.device
        q.ready = native.ready if native.ready is not None else ffi.NULL
        q.batch_done = native.batch_done if native.batch_done is not None else ffi.NULL
        q.faults_at_start = lib.vfu_guard_hits()
        self._native_queue, self._native_exports = q, exports
        return q

    def _pause_native(self) -> None:
        """Stop the fast path's loop (it finishes the request in hand) and
        take its indexes back into the Python ring."""
        q = self._native_queue
        if q is None:
            return
        self._native_queue = None
        q.stop = 1
        if self._native_stop_fd is not None:
            os.eventfd_write(self._native_stop_fd, 1)
        with self._native_lock:  # held by the worker while the loop runs
            pass
        self._native_exports = []
        # Its eventfds go with it (made again for the next run): a queue that
        # outlives its session, as virtio-pci's do, keeps no fd of the last.
        for name in ("_native_stop_fd", "_native_host_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        ring = self.ring
        if isinstance(ring, SplitRing):
            ring.last_avail_idx, ring.used_idx = q.last_avail_idx, q.used_idx
            if ring.inflight is not None and q.inflight != ffi.NULL:
                ring.inflight.counter = q.inflight_counter
        self.requests += q.served
        self.stats.fold(q)

    def _process_in_worker(self, handle: Handler) -> None:
        assert self.turns is not None
        epoch = self.epoch
        self.turns.run_walk(lambda: self.epoch == epoch, lambda: self.process(handle))

    async def _wait(self) -> None:
        if not self._woken:
            deadline = math.inf
            if self.deferred:  # look again when the next held-back completion is due
                due = min(when for when, _, _ in self.deferred)
                deadline = trio.current_time() + max(0.0, due - time.monotonic())
            with trio.CancelScope(deadline=deadline) as self._wait_scope:
                if self.kick_fd is None:
                    await trio.sleep(POLL_INTERVAL)
                else:
                    kick_fd, kick_generation = self.kick_fd, self._kick_generation
                    try:
                        await trio.lowlevel.wait_readable(kick_fd)
                    except trio.ClosedResourceError:
                        pass  # the kick fd was replaced: wait on the new one
                    except trio.BusyResourceError:
                        # A stopped task of this queue has not unwound yet.
                        await trio.lowlevel.checkpoint()
                    except OSError as exc:  # e.g. a regular file: epoll refuses it
                        self.fail(f"kick fd {kick_fd} cannot be waited on: {exc.strerror}")
                    else:
                        # Woken, but other tasks ran first: the fd may have
                        # been replaced and closed since (its number even
                        # reused). Then the new fd's kick is not ours to eat.
                        if kick_generation == self._kick_generation:
                            unusable = _kick_drain(kick_fd)
                            if unusable is not None:
                                self.fail(f"kick fd {kick_fd} {unusable}")
            self._wait_scope = None
        else:
            await trio.lowlevel.checkpoint()
        self._woken = False

    def stop(self) -> None:
        self._pause_native()
        self._flush_deferred()
        self.epoch += 1
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        self.started = False

    def _flush_deferred(self) -> None:
        """A stopping ring completes what a delay rule still holds (the next
        back end, or the next start, must not find it taken and never used)."""
        if not self.deferred:
            return
        ring = self.ring
        if ring is None or self._generation != self.memory.generation or self.broken:
            log.warning("ring.deferred_dropped", queue=self.index, requests=len(self.deferred))
            self.deferred = []
            return
        mark = ring.used_mark()
        self._complete_deferred(ring, math.inf)
        if ring.should_notify(mark):
            self.signal_call()

    # -- fds ---------------------------------------------------------------------

    @staticmethod
    def _close(fd: int | None) -> None:
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise

    def _native_call_fd(self) -> int | None:
        return self.native_call() if self.native_call is not None else None

    def borrow_kick(self, fd: int | None) -> None:
        """A kick eventfd the transport owns (virtio-pci's notifications):
        waited on, polled by the native loop, never closed here."""
        self._pause_native()
        self._kick_is_eventfd = fd is not None
        self.kick_fd = fd

    def set_kick(self, fd: int | None) -> None:
        self._pause_native()  # it polls the old one
        # The fast path polls eventfds only (a file always polls readable);
        # Python's wait reports anything else.
        self._kick_is_eventfd = fd is not None and is_eventfd_like(fd)
        if fd is not None:
            os.set_blocking(fd, False)
        self._close(self.kick_fd)
        self.kick_fd = fd

    def set_call(self, fd: int | None) -> None:
        self._pause_native()  # it writes the old one
        if fd is not None:
            os.set_blocking(fd, False)
        self._close(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        self._pause_native()
        if fd is not None:
            os.set_blocking(fd, False)
        self._close(self.err_fd)
        self.err_fd = fd

    def signal_call(self) -> None:
        if faults.rules.has_rules:
            held = faults.rules.interrupt(queue=self.index)
            if held is not None:
                if held != math.inf:
                    self._on_loop(lambda: _spawn_later(held, self._signal_now))
                return
        self._signal_now()

    def _signal_now(self) -> None:
        if tracer.wants("irq"):
            where = "transport" if self.notifier is not None else "call eventfd"
            tracer.emit("irq", "queue", queue=self.index, via=where)
        if self.notifier is not None:
            self._on_loop(self.notifier)
        else:
            _eventfd_signal(self.call_fd)

    def close_fds(self) -> None:
        self.set_kick(None)
        self.set_call(None)
        self.set_err(None)
        for name in ("_native_stop_fd", "_native_host_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


_live_queues: weakref.WeakSet[Virtqueue] = weakref.WeakSet()


def _leave_or_rejoin_fast_path() -> None:
    """Tracing of requests or a fault rule started or ended: every ring
    looks again at whether the native fast path may serve it."""
    started = [queue for queue in list(_live_queues) if queue.started]
    if not started:
        return
    if _on_worker_thread():  # a counted rule used up by a walk over unmapped memory
        trio.from_thread.run_sync(_leave_or_rejoin_fast_path)
        return
    for queue in started:
        queue.wake()


tracer.on_change(_leave_or_rejoin_fast_path)
faults.rules.on_change(_leave_or_rejoin_fast_path)


def _sectors(details: dict[str, Any]) -> tuple[int, int] | None:
    sector, count = details.get("sector"), details.get("sectors")
    if isinstance(sector, int) and isinstance(count, int):
        return sector, sector + max(count, 1)
    return None


def _spawn_later(delay: float, action: Callable[[], None]) -> None:
    """Run ``action`` on the event loop ``delay`` seconds from now."""

    async def later() -> None:
        await trio.sleep(delay)
        try:
            action()
        except Exception:  # a late interrupt must never end the daemon
            log.exception("fault.delayed_action_failed")

    trio.lowlevel.spawn_system_task(later)


class QueueSet:
    """A device's virtqueues and the tasks serving them.

    Shared by the vhost-user session and the virtio-pci transport: both set
    ring parameters on ``queues``, then ``start`` and ``stop`` them.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        address_space: AddressSpace,
        turns: Turns | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self.turns = turns or Turns()
        self.queues = [Virtqueue(i, memory, address_space) for i in range(device.num_queues)]
        self._nursery: trio.Nursery | None = None
        self._device_task: trio.CancelScope | None = None  # the device's run()
        # The fast path must be out of guest memory before it is unmapped.
        memory.listeners.append(self._memory_changing)

    def _memory_changing(self) -> None:
        for queue in self.queues:
            queue._pause_native()

    def bind(self, nursery: trio.Nursery) -> None:
        """A session starts serving the device with these rings."""
        self._nursery = nursery
        self._device_task = None  # one of the last session's, ended with it
        self.device.serve_data_ready(self._data_ready)

    def _data_ready(self, index: int) -> None:
        if not 0 <= index < len(self.queues):
            return
        queue = self.queues[index]
        if _on_worker_thread():  # from handle() on a walk over unmapped memory
            trio.from_thread.run_sync(self._data_ready, index)
        elif queue.started:
            queue.host_data()

    def _start_device_task(self) -> None:
        if self._device_task is not None or type(self.device).run is VirtioDevice.run:
            return
        assert self._nursery is not None
        scope = self._device_task = trio.CancelScope()

        async def run() -> None:
            with scope:
                try:
                    await self.device.run()
                except Exception:  # a device bug must not end the session
                    log.exception("device.failed", task="run")

        self._nursery.start_soon(run)

    def _stop_device_task(self) -> None:
        if self._device_task is not None:
            self._device_task.cancel()
            self._device_task = None

    def set_features(self, features: int) -> None:
        self.device.set_driver_features(features)
        for queue in self.queues:
            queue.features = features
            queue.invalidate()
            if queue.started:
                queue.wake()

    def start(self, queue: Virtqueue, *, wait_for_memory: bool = False) -> None:
        """Start serving ``queue``; RingError if its setup is unusable. With
        ``wait_for_memory`` a ring outside current memory waits for a map."""
        if queue.started:
            queue.wake()
            return
        assert self._nursery is not None, "QueueSet.bind() first"
        queue.turns = self.turns
        index = queue.index
        queue.native = self.device.native_handler(index) if self.device.use_fast_path else None
        if index in self.device.host_fed_queues:
            queue.fill = lambda request: self.device.fill(index, request)
            queue.has_data = lambda: self.device.has_data(index)
            queue.merged = index in self.device.merged_queues
            queue.merge_bytes = self.device.merged_fill_bytes
        else:
            queue.fill = None
        # What a previous back end left in flight is taken back at the first
        # attach (SET_VRING_KICK after a reconnect, in vhost-user terms).
        queue._recover = queue.inflight is not None
        if not self.memory.has_unmapped:  # unmapped rings attach in their worker
            try:
                queue.attach()  # reports a bad set-up now
            except RingUnmapped:
                if not wait_for_memory:
                    raise

        def handle(request: Request) -> int:
            return self.device.handle(index, request)

        queue.start(handle, self._nursery)
        self._start_device_task()
        log.info(
            "ring.start",
            queue=index,
            size=queue.size,
            layout="packed" if queue.packed else "split",
            base=queue.current_base(),
        )

    def stop(self, queue: Virtqueue) -> int:
        """Stop serving; returns the ring base to resume from."""
        base = queue.current_base()  # held buffers given back
        if queue.started:
            queue.stop()
            log.info(
                "ring.stop",
                queue=queue.index,
                base=base,
                requests=queue.requests,
                **({"given_back": len(queue.held)} if queue.held else {}),
            )
        queue.base = base
        queue.ring = None
        queue.held.clear()
        if not any(q.started for q in self.queues):
            self._stop_device_task()
        return base

    def reset(self) -> None:
        self._stop_device_task()
        for queue in self.queues:
            self.stop(queue)
            queue.close_fds()
            queue.reset()
        self.device.reset()

    def memory_changed(self) -> None:
        for queue in self.queues:
            if queue.started:
                queue.wake()
