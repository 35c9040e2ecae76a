"""Guest memory: the one way the daemon touches memory a VMM shares with it.

The VMM (vhost-user front end or vfio-user client) passes an fd per region.
Each region is mapped through cffi ``mmap`` from file offset 0 with length
``mmap_offset + size`` (as the vhost-user spec requires), and every access is
a bounds-checked translation of a guest-physical (or front-end virtual)
address range into ``memoryview`` slices of those mappings, so I/O goes
straight into guest pages with no copies.

Memory layout changes bump ``generation``; users that cache views (the
virtqueues) re-translate when it changes, so no view outlives its mapping.

Regions a VMM shares without an fd (vfio-user DMA_MAP without one) cannot be
mapped: with a ``remote`` accessor installed, they are reached through it
(DMA_READ/DMA_WRITE messages), as ``RemoteView`` windows for ring structures
and as bounce buffers for data, which the caller writes back.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vfiouserd._native import ffi, lib

MAP_FAILED = ffi.cast("void *", -1)
# A VMM that truncates a file after sharing it would make our next touch of
# the lost pages raise SIGBUS; the native guard turns that into zero pages and
# a count (see memory_faults) instead of a dead daemon.
if lib.vfu_guard_install() != 0:
    raise ImportError("cannot install the SIGBUS guard for guest memory")
U64_LIMIT = 1 << 64
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class GuestMemoryError(ValueError):
    """An address range that is not (entirely) backed by shared memory, or a
    region that cannot be added."""


class RemoteAccessError(GuestMemoryError):
    """The VMM failed (or refused) to serve an access to unmapped memory."""


MAX_BOUNCE = 16 << 20  # bytes of unmapped memory one caller may stage at once


class RemoteAccess(Protocol):
    """Blocking access to memory the daemon cannot map (called from a worker
    thread; the implementation talks to the VMM)."""

    def read(self, address: int, size: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class RemoteView:
    """A window on unmapped guest memory that behaves like the parts of a
    ``memoryview`` the rings use: ``cast``, slicing, item get/set, and
    ``unpack``/``pack`` of structs. Every access is a round trip."""

    def __init__(self, remote: RemoteAccess, address: int, length: int, fmt: str = "B") -> None:
        self.remote = remote
        self.address = address
        self.length = length
        self.format = fmt
        self.itemsize = struct.calcsize(fmt)

    def __len__(self) -> int:
        return self.length // self.itemsize

    def cast(self, fmt: str) -> RemoteView:
        return RemoteView(self.remote, self.address, self.length, fmt)

    def _offset(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.address + index * self.itemsize

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("strided remote views are not supported")
            return RemoteView(
                self.remote,
                self.address + start * self.itemsize,
                max(0, stop - start) * self.itemsize,
                self.format,
            )
        data = self.remote.read(self._offset(index), self.itemsize)
        return struct.unpack("<" + self.format, data)[0]

    def __setitem__(self, index: int, value: int) -> None:
        self.remote.write(self._offset(index), struct.pack("<" + self.format, value))

    def unpack(self, layout: struct.Struct, offset: int) -> tuple[Any, ...]:
        if offset < 0 or offset + layout.size > self.length:
            raise IndexError(offset)
        return layout.unpack(self.remote.read(self.address + offset, layout.size))

    def pack(self, layout: struct.Struct, offset: int, *values: Any) -> None:
        if offset < 0 or offset + layout.size > self.length:
            raise IndexError(offset)
        self.remote.write(self.address + offset, layout.pack(*values))


Area = memoryview | RemoteView
WriteBack = list[tuple[int, memoryview]]


@dataclass
class Mapping:
    """One mmap of a region's fd."""

    fd: int
    length: int
    base: Any  # cffi void *
    buffer: memoryview
    lead: int = 0  # bytes mapped before the requested file offset (alignment)

    @classmethod
    def map_fd(
        cls, fd: int, length: int, *, file_offset: int = 0, writable: bool = True
    ) -> Mapping:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GuestMemoryError("memory fd is not a regular file or memfd")
        # mmap wants offsets aligned to the file's pages: 4 KiB, or a huge page
        # for hugetlbfs (QEMU maps 4 KiB-aligned sections of such files).
        block = info.st_blksize if info.st_blksize & (info.st_blksize - 1) == 0 else PAGE_SIZE
        block = max(block, PAGE_SIZE)
        lead = file_offset % block
        file_offset -= lead
        length += lead
        if info.st_size < file_offset + length:
            # Touching pages past the end of the file would raise SIGBUS.
            raise GuestMemoryError(
                f"memory fd holds {info.st_size} bytes but the region needs {file_offset + length}"
            )
        prot = lib.PROT_READ | (lib.PROT_WRITE if writable else 0)
        base = lib.mmap(ffi.NULL, length, prot, lib.MAP_SHARED, fd, file_offset)
        if base == MAP_FAILED:
            err = ffi.errno
            raise GuestMemoryError(f"mmap of {length} bytes failed: {os.strerror(err)}")
        if lib.vfu_guard_add(base, length) != 0:
            lib.munmap(base, length)
            raise GuestMemoryError("too many guest mappings to guard")
        buffer = memoryview(ffi.buffer(base, length))
        if not writable:
            buffer = buffer.toreadonly()
        return cls(fd, length, base, buffer, lead)

    def unmap(self, close_fd: bool = True) -> None:
        if self.base is not None:
            self.buffer.release()
            lib.vfu_guard_remove(self.base)
            lib.munmap(self.base, self.length)
            self.base = None
            if close_fd:
                os.close(self.fd)


@dataclass(frozen=True)
class RegionSpec:
    """A region as a VMM describes it.

    vhost-user maps each fd from offset 0 and places the region at
    ``mmap_offset`` inside the mapping; vfio-user maps at a page-aligned
    ``file_offset``. Without an fd the region cannot be mapped: it is
    reachable only through the VMM (vfio-user DMA_READ/DMA_WRITE).
    """

    guest_address: int
    size: int
    fd: int | None
    user_address: int | None = None  # the VMM's own address (vhost-user)
    file_offset: int = 0
    mmap_offset: int = 0
    readable: bool = True
    writable: bool = True


@dataclass
class MemoryRegion:
    spec: RegionSpec
    mapping: Mapping | None = field(repr=False)

    @property
    def guest_address(self) -> int:
        return self.spec.guest_address

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def user_address(self) -> int | None:
        return self.spec.user_address

    @property
    def mmap_offset(self) -> int:
        return self.spec.mmap_offset

    @property
    def readable(self) -> bool:
        return self.spec.readable

    @property
    def writable(self) -> bool:
        return self.spec.writable

    @property
    def guest_end(self) -> int:
        return self.spec.guest_address + self.spec.size

    @property
    def user_end(self) -> int:
        return (self.spec.user_address or 0) + self.spec.size

    def slice(self, offset: int, length: int) -> memoryview:
        if self.mapping is None:
            raise GuestMemoryError(
                f"guest range {self.guest_address + offset:#x}+{length:#x} is not mapped "
                "into the daemon"
            )
        start = self.mapping.lead + self.spec.mmap_offset + offset
        return self.mapping.buffer[start : start + length]

    def release(self, close_fd: bool) -> None:
        if self.mapping is not None:
            self.mapping.unmap(close_fd)


def memory_faults() -> int:
    """How many times guest memory vanished under an access (the VMM shrank
    a file it shared) since the process started."""
    return int(lib.vfu_guard_hits())


def _overlaps(start_a: int, end_a: int, start_b: int, end_b: int) -> bool:
    return start_a < end_b and start_b < end_a


LOG_PAGE = 4096  # what one dirty bit stands for (vhost-user's VHOST_LOG_PAGE)


class DirtyLog(Protocol):
    """Where writes to guest memory are recorded while a VMM migrates."""

    def mark(self, address: int, length: int) -> None: ...

    def kick(self) -> None:
        """After a batch: tell the VMM, if it asked to be told."""


class SharedDirtyLog:
    """vhost-user LOG_SHMFD: the front end's bitmap, one bit per 4 KiB of
    guest-physical memory, in a memfd it shares. Bits are set with atomic ORs
    (QEMU reads and clears them meanwhile, other back ends share the log)."""

    def __init__(self, mapping: Mapping, size: int) -> None:
        self.mapping = mapping
        self.size = size
        self._bitmap = ffi.cast("uint8_t *", mapping.base) + mapping.lead
        self.beyond = 0  # pages written outside the log (a front end that sized it wrong)
        self.kick_fd: int | None = None  # SET_LOG_FD: told after each batch that logged
        self.pending = False

    def mark(self, address: int, length: int) -> None:
        if length <= 0:
            return
        first, last = address // LOG_PAGE, (address + length - 1) // LOG_PAGE
        self.beyond += lib.vfu_bitmap_set(self._bitmap, self.size, first, last)
        self.pending = True

    def kick(self) -> None:
        if self.pending and self.kick_fd is not None:
            with contextlib.suppress(BlockingIOError):  # saturated: it has been told
                os.eventfd_write(self.kick_fd, 1)
        self.pending = False

    def close(self) -> None:
        self.mapping.unmap()
        if self.kick_fd is not None:
            os.close(self.kick_fd)
            self.kick_fd = None


class GuestMemory:
    """The set of shared regions of one VMM connection."""

    def __init__(self, max_regions: int = 509) -> None:
        self.max_regions = max_regions
        self._regions: list[MemoryRegion] = []  # sorted by guest address
        self._starts: list[int] = []  # their guest addresses, for bisect
        self.generation = 0
        self.listeners: list[Callable[[], None]] = []  # told of every layout change
        self.has_unmapped = False  # some region is reachable only through ``remote``
        self.remote: RemoteAccess | None = None
        self._dirty: DirtyLog | None = None  # set while the VMM tracks our writes

    @property
    def dirty(self) -> DirtyLog | None:
        return self._dirty

    @dirty.setter
    def dirty(self, log: DirtyLog | None) -> None:
        if log is not None and self._dirty is None:
            for listener in self.listeners:  # a native loop, which logs nothing, stops
                listener()
        self._dirty = log

    def mark_dirty(self, address: int, length: int) -> None:
        if self._dirty is not None:
            self._dirty.mark(address, length)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    # -- layout -------------------------------------------------------------

    @staticmethod
    def _check_new(spec: RegionSpec, others: list[MemoryRegion]) -> None:
        if spec.size == 0:
            raise GuestMemoryError("region has size 0")
        for name, value in (
            ("guest", spec.guest_address),
            ("user", spec.user_address or 0),
            ("mmap offset", spec.mmap_offset),
            ("file offset", spec.file_offset),
        ):
            if value < 0 or value + spec.size > U64_LIMIT:
                raise GuestMemoryError(f"{name} address range wraps around 2^64")
        for region in others:
            if _overlaps(
                spec.guest_address,
                spec.guest_address + spec.size,
                region.guest_address,
                region.guest_end,
            ):
                raise GuestMemoryError(
                    f"guest range {spec.guest_address:#x}+{spec.size:#x} overlaps region at "
                    f"{region.guest_address:#x}"
                )
            if (
                spec.user_address is not None
                and region.user_address is not None
                and _overlaps(
                    spec.user_address,
                    spec.user_address + spec.size,
                    region.user_address,
                    region.user_end,
                )
            ):
                raise GuestMemoryError(
                    f"user range {spec.user_address:#x}+{spec.size:#x} overlaps region at "
                    f"{region.user_address:#x}"
                )

    @staticmethod
    def _map(spec: RegionSpec) -> MemoryRegion:
        if spec.fd is None:
            return MemoryRegion(spec, None)
        mapping = Mapping.map_fd(
            spec.fd,
            spec.mmap_offset + spec.size,
            file_offset=spec.file_offset,
            writable=spec.writable,
        )
        return MemoryRegion(spec, mapping)

    def add_region(self, spec: RegionSpec) -> MemoryRegion:
        """Add a region. On success it owns ``spec.fd``; on error the caller does."""
        if len(self._regions) >= self.max_regions:
            raise GuestMemoryError(f"all {self.max_regions} memory slots are in use")
        self._check_new(spec, self._regions)
        region = self._map(spec)
        self._regions.append(region)
        self._changed()
        return region

    def _changed(self) -> None:
        for listener in self.listeners:  # before anything old is unmapped
            listener()
        self._regions.sort(key=lambda r: r.guest_address)
        self._starts = [r.guest_address for r in self._regions]
        self.has_unmapped = any(r.mapping is None for r in self._regions)
        self.generation += 1

    def find_exact(
        self, guest_address: int, size: int, user_address: int | None = None
    ) -> MemoryRegion:
        for region in self._regions:
            if (
                region.guest_address == guest_address
                and region.size == size
                and (user_address is None or region.user_address == user_address)
            ):
                return region
        raise GuestMemoryError(f"no region at guest {guest_address:#x} size {size:#x}")

    def remove(self, region: MemoryRegion) -> None:
        self._regions.remove(region)
        self._changed()
        region.release(close_fd=True)

    def replace(self, specs: list[RegionSpec]) -> None:
        """Atomically replace all regions.

        Either every new region maps (and owns its fd) and the old ones go,
        or nothing changes and the caller still owns every fd.
        """
        if len(specs) > self.max_regions:
            raise GuestMemoryError(f"{len(specs)} regions exceed {self.max_regions} slots")
        new: list[MemoryRegion] = []
        try:
            for spec in specs:
                self._check_new(spec, new)
                new.append(self._map(spec))
        except BaseException:
            for region in new:
                region.release(close_fd=False)
            raise
        old, self._regions = self._regions, new
        self._changed()
        for region in old:
            region.release(close_fd=True)

    def clear(self) -> None:
        old, self._regions = self._regions, []
        self._changed()
        for region in old:
            region.release(close_fd=True)

    # -- translation --------------------------------------------------------

    def _find_guest(self, address: int) -> MemoryRegion | None:
        # Regions never overlap, so the candidate is the last one starting at or below.
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and address < self._regions[index].guest_end:
            return self._regions[index]
        return None

    def ranges(
        self, address: int, length: int, *, writable: bool
    ) -> list[tuple[MemoryRegion, int, int]]:
        """Cut ``[address, address+length)`` at region boundaries:
        (region, start, length) each, checked for presence and permission."""
        if length < 0 or address + length > U64_LIMIT:
            raise GuestMemoryError(f"invalid guest range {address:#x}+{length:#x}")
        pieces = []
        while length > 0:
            region = self._find_guest(address)
            if region is None:
                raise GuestMemoryError(f"guest address {address:#x} is not in shared memory")
            if not (region.writable if writable else region.readable):
                raise GuestMemoryError(
                    f"guest address {address:#x} is not "
                    f"{'writable' if writable else 'readable'} for the device"
                )
            chunk = min(length, region.guest_end - address)
            pieces.append((region, address, chunk))
            address += chunk
            length -= chunk
        return pieces

    def guest_buffers(
        self, address: int, length: int, *, writable: bool, writeback: WriteBack | None = None
    ) -> list[memoryview]:
        """Views of ``[address, address+length)`` in guest-physical space.

        A range may span regions that are adjacent in guest-physical space;
        any gap, overrun or permission it lacks raises GuestMemoryError.
        Ranges the device only reads come back read-only. Unmapped ranges
        come back as bounce buffers read through ``remote``; writable ones
        are listed in ``writeback`` for the caller to ``flush``.
        """
        views = []
        for region, start, chunk in self.ranges(address, length, writable=writable):
            if region.mapping is None:
                views.append(self._bounce(start, chunk, writable, writeback))
                continue
            view = region.slice(start - region.guest_address, chunk)
            views.append(view if writable else view.toreadonly())
        return views

    def _bounce(
        self, address: int, length: int, writable: bool, writeback: WriteBack | None
    ) -> memoryview:
        if self.remote is None:
            raise GuestMemoryError(
                f"guest range {address:#x}+{length:#x} is not mapped into the daemon"
            )
        if writable and writeback is None:
            raise GuestMemoryError("writable unmapped memory needs a write-back list")
        if writeback is not None:
            staged = sum(len(v) for _, v in writeback) + length
            if staged > MAX_BOUNCE:
                raise GuestMemoryError(f"{staged} bytes of unmapped buffers in one request")
        # Writable buffers are read first so bytes the device leaves alone
        # are written back unchanged.
        data = self.remote.read(address, length)
        if not writable:
            return memoryview(data)
        buffer = memoryview(bytearray(data))
        assert writeback is not None
        writeback.append((address, buffer))
        return buffer

    def flush(self, writeback: WriteBack) -> None:
        """Write bounce buffers back to unmapped guest memory."""
        if writeback and self.remote is not None:
            for address, buffer in writeback:
                self.remote.write(address, bytes(buffer))
        writeback.clear()

    def guest_view(self, address: int, length: int) -> Area:
        """One contiguous readable and writable window; the range must lie in
        one region (a ``RemoteView`` if that region is not mapped)."""
        region = self._find_guest(address)
        if region is None or address + length > region.guest_end or length < 0:
            raise GuestMemoryError(
                f"guest range {address:#x}+{length:#x} is not inside one shared region"
            )
        if not (region.readable and region.writable):
            raise GuestMemoryError(f"guest range {address:#x} is not readable and writable")
        if region.mapping is None:
            if self.remote is None:
                raise GuestMemoryError(f"guest range {address:#x} is not mapped into the daemon")
            return RemoteView(self.remote, address, length)
        return region.slice(address - region.guest_address, length)

    def user_to_guest(self, address: int, length: int) -> int:
        """Translate a front-end virtual range (vhost-user ring addresses) to
        a guest-physical address; the range must lie in one region."""
        for region in self._regions:
            if region.user_address is not None and region.user_address <= address < region.user_end:
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
        self.mark_dirty(address, len(data))
