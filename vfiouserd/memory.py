"""Guest memory: the one way the daemon touches memory a VMM shares with it.

The VMM (vhost-user front end or vfio-user client) passes an fd per region.
Each region is mapped through cffi ``mmap`` from file offset 0 with length
``mmap_offset + size`` (as the vhost-user spec requires), and every access is
a bounds-checked translation of a guest-physical (or front-end virtual)
address range into ``memoryview`` slices of those mappings, so I/O goes
straight into guest pages with no copies.

Memory layout changes bump ``generation``; users that cache views (the
virtqueues) re-translate when it changes, so no view outlives its mapping.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from vfiouserd._native import ffi, lib

MAP_FAILED = ffi.cast("void *", -1)
U64_LIMIT = 1 << 64


class GuestMemoryError(ValueError):
    """An address range that is not (entirely) backed by shared memory, or a
    region that cannot be added."""


@dataclass
class Mapping:
    """One mmap of a region's fd, from file offset 0."""

    fd: int
    length: int
    base: Any  # cffi void *
    buffer: memoryview

    @classmethod
    def map_fd(cls, fd: int, length: int, *, writable: bool = True) -> Mapping:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GuestMemoryError("memory fd is not a regular file or memfd")
        if info.st_size < length:
            # Touching pages past the end of the file would raise SIGBUS.
            raise GuestMemoryError(
                f"memory fd holds {info.st_size} bytes but the region needs {length}"
            )
        prot = lib.PROT_READ | (lib.PROT_WRITE if writable else 0)
        base = lib.mmap(ffi.NULL, length, prot, lib.MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            err = ffi.errno
            raise GuestMemoryError(f"mmap of {length} bytes failed: {os.strerror(err)}")
        buffer = memoryview(ffi.buffer(base, length))
        if not writable:
            buffer = buffer.toreadonly()
        return cls(fd, length, base, buffer)

    def unmap(self) -> None:
        if self.base is not None:
            self.buffer.release()
            lib.munmap(self.base, self.length)
            self.base = None
            os.close(self.fd)


@dataclass
class MemoryRegion:
    guest_address: int
    size: int
    user_address: int
    mmap_offset: int
    mapping: Mapping = field(repr=False)

    @property
    def guest_end(self) -> int:
        return self.guest_address + self.size

    @property
    def user_end(self) -> int:
        return self.user_address + self.size

    def slice(self, offset: int, length: int) -> memoryview:
        start = self.mmap_offset + offset
        return self.mapping.buffer[start : start + length]


def _overlaps(start_a: int, end_a: int, start_b: int, end_b: int) -> bool:
    return start_a < end_b and start_b < end_a


class GuestMemory:
    """The set of shared regions of one VMM connection."""

    def __init__(self, max_regions: int = 509) -> None:
        self.max_regions = max_regions
        self._regions: list[MemoryRegion] = []  # sorted by guest address
        self.generation = 0

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    # -- layout -------------------------------------------------------------

    def _check_new(
        self,
        guest_address: int,
        size: int,
        user_address: int,
        mmap_offset: int,
        others: list[MemoryRegion],
    ) -> None:
        if size == 0:
            raise GuestMemoryError("region has size 0")
        for name, value in (
            ("guest", guest_address),
            ("user", user_address),
            ("mmap offset", mmap_offset),
        ):
            if value + size > U64_LIMIT:
                raise GuestMemoryError(f"{name} address range wraps around 2^64")
        for region in others:
            if _overlaps(
                guest_address, guest_address + size, region.guest_address, region.guest_end
            ):
                raise GuestMemoryError(
                    f"guest range {guest_address:#x}+{size:#x} overlaps region at "
                    f"{region.guest_address:#x}"
                )
            if _overlaps(user_address, user_address + size, region.user_address, region.user_end):
                raise GuestMemoryError(
                    f"user range {user_address:#x}+{size:#x} overlaps region at "
                    f"{region.user_address:#x}"
                )

    def _map(
        self, guest_address: int, size: int, user_address: int, mmap_offset: int, fd: int
    ) -> MemoryRegion:
        mapping = Mapping.map_fd(fd, mmap_offset + size)
        return MemoryRegion(guest_address, size, user_address, mmap_offset, mapping)

    def add_region(
        self, guest_address: int, size: int, user_address: int, mmap_offset: int, fd: int
    ) -> MemoryRegion:
        """Map a region. On success the region owns ``fd``; on error the
        caller still does."""
        if len(self._regions) >= self.max_regions:
            raise GuestMemoryError(f"all {self.max_regions} memory slots are in use")
        self._check_new(guest_address, size, user_address, mmap_offset, self._regions)
        region = self._map(guest_address, size, user_address, mmap_offset, fd)
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.guest_address)
        self.generation += 1
        return region

    def remove_region(self, guest_address: int, user_address: int, size: int) -> None:
        for region in self._regions:
            if (region.guest_address, region.user_address, region.size) == (
                guest_address,
                user_address,
                size,
            ):
                self._regions.remove(region)
                self.generation += 1
                region.mapping.unmap()
                return
        raise GuestMemoryError(
            f"no region at guest {guest_address:#x} user {user_address:#x} size {size:#x}"
        )

    def replace(self, table: list[tuple[int, int, int, int, int]]) -> None:
        """Atomically replace all regions with ``(gpa, size, uva, offset, fd)``.

        Either every new region maps (and owns its fd) and the old ones go,
        or nothing changes and the caller still owns every fd.
        """
        if len(table) > self.max_regions:
            raise GuestMemoryError(f"{len(table)} regions exceed {self.max_regions} slots")
        new: list[MemoryRegion] = []
        try:
            for gpa, size, uva, offset, fd in table:
                self._check_new(gpa, size, uva, offset, new)
                new.append(self._map(gpa, size, uva, offset, fd))
        except BaseException:
            for region in new:
                region.mapping.buffer.release()
                lib.munmap(region.mapping.base, region.mapping.length)
            raise
        old, self._regions = self._regions, sorted(new, key=lambda r: r.guest_address)
        self.generation += 1
        for region in old:
            region.mapping.unmap()

    def clear(self) -> None:
        old, self._regions = self._regions, []
        self.generation += 1
        for region in old:
            region.mapping.unmap()

    # -- translation --------------------------------------------------------

    def _find_guest(self, address: int) -> MemoryRegion | None:
        for region in self._regions:
            if region.guest_address <= address < region.guest_end:
                return region
        return None

    def guest_buffers(self, address: int, length: int, *, writable: bool) -> list[memoryview]:
        """Views of ``[address, address+length)`` in guest-physical space.

        A range may span regions that are adjacent in guest-physical space;
        any gap or overrun raises GuestMemoryError. Ranges the device only
        reads come back read-only.
        """
        if length < 0 or address + length > U64_LIMIT:
            raise GuestMemoryError(f"invalid guest range {address:#x}+{length:#x}")
        views: list[memoryview] = []
        while length > 0:
            region = self._find_guest(address)
            if region is None:
                raise GuestMemoryError(f"guest address {address:#x} is not in shared memory")
            chunk = min(length, region.guest_end - address)
            view = region.slice(address - region.guest_address, chunk)
            views.append(view if writable else view.toreadonly())
            address += chunk
            length -= chunk
        return views

    def guest_view(self, address: int, length: int) -> memoryview:
        """One contiguous writable view; the range must lie in one region."""
        region = self._find_guest(address)
        if region is None or address + length > region.guest_end or length < 0:
            raise GuestMemoryError(
                f"guest range {address:#x}+{length:#x} is not inside one shared region"
            )
        return region.slice(address - region.guest_address, length)

    def user_to_guest(self, address: int, length: int) -> int:
        """Translate a front-end virtual range (vhost-user ring addresses) to
        a guest-physical address; the range must lie in one region."""
        for region in self._regions:
            if region.user_address <= address < region.user_end:
                if address + length > region.user_end:
                    break
                return region.guest_address + (address - region.user_address)
        raise GuestMemoryError(
            f"user range {address:#x}+{length:#x} is not inside one shared region"
        )

    def read(self, address: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.guest_buffers(address, length, writable=False))

    def write(self, address: int, data: bytes) -> None:
        views = self.guest_buffers(address, len(data), writable=True)
        offset = 0
        for view in views:
            view[:] = data[offset : offset + len(view)]
            offset += len(view)
