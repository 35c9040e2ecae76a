"""A simulated guest: shared RAM and the driver side of virtqueues.

The project's vhost-user front end and vfio-user client play VMM *and*
guest driver in tests, benchmarks and tools. This module is the guest half:
RAM in memfds (shared with the back end exactly as QEMU's
memory-backend-memfd,share=on does), a simple allocator, and driver-side
split and packed rings that follow the virtio spec from the other side.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from vfiouserd._native import lib
from vfiouserd.memory import GuestMemory, RegionSpec
from vfiouserd.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_EVENT_DESC,
    PACKED_EVENT_DISABLE,
    PACKED_EVENT_ENABLE,
    need_event,
    packed_need_event,
)

USER_ADDRESS_OFFSET = 0x7E00_0000_0000  # front-end "virtual" = guest-physical + this


@dataclass
class RamRegion:
    guest_address: int
    size: int
    fd: int  # the memfd; the back end gets a copy of it

    @property
    def user_address(self) -> int:
        return self.guest_address + USER_ADDRESS_OFFSET


class GuestRam:
    """Guest RAM made of memfd regions, with a bump allocator per region."""

    def __init__(self, layout: list[tuple[int, int]]) -> None:
        """``layout``: (guest_address, size) per region."""
        self.memory = GuestMemory()
        self.regions: list[RamRegion] = []
        self._next: dict[int, int] = {}
        for guest_address, size in layout:
            fd = os.memfd_create("vfiouserd-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.memory.add_region(
                RegionSpec(
                    guest_address,
                    size,
                    os.dup(fd),
                    user_address=guest_address + USER_ADDRESS_OFFSET,
                )
            )
            self.regions.append(RamRegion(guest_address, size, fd))
            self._next[guest_address] = guest_address

    def alloc(self, size: int, align: int = 64, region: int = 0) -> int:
        base = self.regions[region].guest_address
        address = (self._next[base] + align - 1) & ~(align - 1)
        if address + size > base + self.regions[region].size:
            raise MemoryError("guest RAM exhausted")
        self._next[base] = address + size
        return address

    def view(self, address: int, size: int) -> memoryview:
        view = self.memory.guest_view(address, size)
        assert isinstance(view, memoryview)  # this RAM is mapped: never a RemoteView
        return view

    def read(self, address: int, size: int) -> bytes:
        return self.memory.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        self.memory.write(address, data)

    def close(self) -> None:
        self.memory.clear()
        for region in self.regions:
            os.close(region.fd)
        self.regions.clear()


Buffer = tuple[int, int]  # (guest address, length)


@dataclass
class Completion:
    token: Any
    written: int


class DriverSplitRing:
    """The driver side of a split virtqueue."""

    packed = False

    def __init__(
        self, ram: GuestRam, size: int, *, event_idx: bool = False, region: int = 0
    ) -> None:
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.desc_address = ram.alloc(16 * size, 16, region)
        self.avail_address = ram.alloc(6 + 2 * size, 2, region)
        self.used_address = ram.alloc(6 + 8 * size, 4, region)
        # A driver starts from zeroed rings (memory a device wrote before
        # may have been handed out again).
        for address, length in (
            (self.desc_address, 16 * size),
            (self.avail_address, 6 + 2 * size),
            (self.used_address, 6 + 8 * size),
        ):
            ram.write(address, bytes(length))
        self.desc = ram.view(self.desc_address, 16 * size)
        self.avail = ram.view(self.avail_address, 6 + 2 * size).cast("H")
        used = ram.view(self.used_address, 6 + 8 * size)
        self.used16 = used.cast("H")
        self.used32 = used[4 : 4 + 8 * size].cast("I")
        self.free = list(range(size))
        self.tokens: dict[int, tuple[Any, list[int]]] = {}
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_at = 0

    @property
    def areas(self) -> tuple[int, int, int]:
        """(descriptor, driver/avail, device/used) guest addresses."""
        return self.desc_address, self.avail_address, self.used_address

    def base(self) -> int:
        return 0

    def add(
        self, readable: list[Buffer], writable: list[Buffer], token: Any, *, indirect: bool = False
    ) -> int:
        """Make one chain available; returns its head descriptor."""
        chain = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if indirect:
            table = self.ram.alloc(16 * len(chain), 16)
            for i, (address, length, flags) in enumerate(chain):
                more = DESC_F_NEXT if i + 1 < len(chain) else 0
                struct.pack_into(
                    "<QIHH",
                    self.ram.view(table, 16 * len(chain)),
                    16 * i,
                    address,
                    length,
                    flags | more,
                    i + 1 if more else 0,
                )
            chain = [(table, 16 * len(chain), DESC_F_INDIRECT)]
        if len(chain) > len(self.free):
            raise BufferError("ring full")
        ids = [self.free.pop() for _ in chain]
        for i, (address, length, flags) in enumerate(chain):
            more = DESC_F_NEXT if i + 1 < len(chain) else 0
            struct.pack_into(
                "<QIHH",
                self.desc,
                16 * ids[i],
                address,
                length,
                flags | more,
                ids[i + 1] if more else 0,
            )
        head = ids[0]
        self.tokens[head] = (token, ids)
        self.avail[2 + self.avail_idx % self.size] = head
        lib.vfu_fence_release()
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail[1] = self.avail_idx
        return head

    def needs_kick(self) -> bool:
        """Whether the device asked to be notified about what was added since
        the last call (EVENT_IDX or the NO_NOTIFY flag)."""
        lib.vfu_fence_full()
        old, self.kicked_at = self.kicked_at, self.avail_idx
        if old == self.avail_idx:
            return False
        if self.event_idx:
            return need_event(self.used16[2 + 4 * self.size], self.avail_idx, old)
        return not self.used16[0] & 1

    def collect(self) -> list[Completion]:
        done = []
        while self.last_used != self.used16[1]:
            lib.vfu_fence_acquire()
            slot = self.last_used % self.size
            head, written = self.used32[2 * slot], self.used32[2 * slot + 1]
            token, ids = self.tokens.pop(head)
            self.free.extend(ids)
            done.append(Completion(token, written))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.avail[2 + self.size] = self.last_used  # interrupt me on the next one
        return done

    def suppress_interrupts(self, suppress: bool) -> None:
        self.avail[0] = AVAIL_F_NO_INTERRUPT if suppress else 0


class DriverPackedRing:
    """The driver side of a packed virtqueue."""

    packed = True

    def __init__(
        self, ram: GuestRam, size: int, *, event_idx: bool = False, region: int = 0
    ) -> None:
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.desc_address = ram.alloc(16 * size, 16, region)
        self.driver_address = ram.alloc(4, 4, region)
        self.device_address = ram.alloc(4, 4, region)
        for address, length in (
            (self.desc_address, 16 * size),
            (self.driver_address, 4),
            (self.device_address, 4),
        ):
            ram.write(address, bytes(length))  # zeroed, as a driver starts
        self.desc = ram.view(self.desc_address, 16 * size)
        self.driver_event = ram.view(self.driver_address, 4).cast("H")
        self.device_event = ram.view(self.device_address, 4).cast("H")
        self.free_ids = list(range(size))
        self.tokens: dict[int, tuple[Any, int]] = {}
        self.next_avail = 0
        self.avail_wrap = True
        self.next_used = 0
        self.used_wrap = True
        self.in_flight = 0
        self.added = 0  # free-running count of descriptors made available
        self.kicked_at = 0

    @property
    def areas(self) -> tuple[int, int, int]:
        return self.desc_address, self.driver_address, self.device_address

    def base(self) -> int:
        return 1 << 15 | 1 << 31  # both wrap counters start at 1

    def _flags(self, flags: int) -> int:
        if self.avail_wrap:
            return flags | PACKED_DESC_F_AVAIL
        return flags | PACKED_DESC_F_USED

    def add(
        self, readable: list[Buffer], writable: list[Buffer], token: Any, *, indirect: bool = False
    ) -> int:
        chain = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if indirect:
            table = self.ram.alloc(16 * len(chain), 16)
            view = self.ram.view(table, 16 * len(chain))
            for i, (address, length, flags) in enumerate(chain):
                struct.pack_into("<QIHH", view, 16 * i, address, length, 0, flags)
            chain = [(table, 16 * len(chain), DESC_F_INDIRECT)]
        if len(chain) > self.size - self.in_flight or not self.free_ids:
            raise BufferError("ring full")
        buffer_id = self.free_ids.pop()
        head_slot, head_flags = self.next_avail, 0
        for i, (address, length, flags) in enumerate(chain):
            more = DESC_F_NEXT if i + 1 < len(chain) else 0
            final = self._flags(flags | more)
            struct.pack_into("<QIH", self.desc, 16 * self.next_avail, address, length, buffer_id)
            if i == 0:
                head_flags = final  # published last, after the rest of the chain
            else:
                struct.pack_into("<H", self.desc, 16 * self.next_avail + 14, final)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap = not self.avail_wrap
        lib.vfu_fence_release()
        struct.pack_into("<H", self.desc, 16 * head_slot + 14, head_flags)
        self.tokens[buffer_id] = (token, len(chain))
        self.in_flight += len(chain)
        self.added = (self.added + len(chain)) & 0xFFFF
        return buffer_id

    def needs_kick(self) -> bool:
        lib.vfu_fence_full()
        old, self.kicked_at = self.kicked_at, self.added
        if old == self.added:
            return False
        off_wrap, flags = self.device_event[0], self.device_event[1]
        if flags == PACKED_EVENT_DISABLE:
            return False
        if flags != PACKED_EVENT_DESC or not self.event_idx:
            return True
        return packed_need_event(
            off_wrap, self.added, self.next_avail, self.avail_wrap, self.size, old
        )

    def collect(self) -> list[Completion]:
        done = []
        while True:
            _, written, buffer_id, flags = struct.unpack_from(
                "<QIHH", self.desc, 16 * self.next_used
            )
            if (
                bool(flags & PACKED_DESC_F_AVAIL) != self.used_wrap
                or bool(flags & PACKED_DESC_F_USED) != self.used_wrap
            ):
                break
            lib.vfu_fence_acquire()
            token, count = self.tokens.pop(buffer_id)
            self.free_ids.append(buffer_id)
            self.in_flight -= count
            done.append(Completion(token, written))
            self.next_used += count
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap
        return done

    def suppress_interrupts(self, suppress: bool) -> None:
        self.driver_event[1] = PACKED_EVENT_DISABLE if suppress else PACKED_EVENT_ENABLE


DriverRing = DriverSplitRing | DriverPackedRing
