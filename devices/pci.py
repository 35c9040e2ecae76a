"""The PCI device API: config space, BARs and interrupts, for any PCI device.

A plugin describes its identity (IDs, class), its BARs and how many MSI /
MSI-X vectors it has, then answers register accesses. This module emulates
what every PCI function has in common, the way hardware does:

- Config space with per-bit write masks: read-only fields, RW1C status bits,
  BAR sizing (write all ones, read back the size mask), command register.
- Capabilities: power management, MSI (64-bit, per-vector masking), MSI-X
  (table and PBA in a BAR), PCI Express (endpoint), plus any a device adds
  (virtio's vendor capabilities).
- Interrupts: when the function raises INTx (level, the command register's
  disable bit, the status bit), MSI or MSI-X vectors. How they reach the VMM
  is the transport's (``InterruptDelivery``; vfio-user's eventfds live in
  vfiouserd.vfio_user.interrupts).

Nothing here knows about sockets; the vfio-user session calls in.
"""

from __future__ import annotations

import enum
import errno
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemory, GuestMemoryError
from vfiouserd.state import BOOL, BYTES, Field, Schema, StateError
from vfiouserd.trace import tracer
from vfiouserd.turns import Turns

log = get_logger("pci")

# Config space offsets
VENDOR_ID = 0x00
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40
LEGACY_CONFIG_SIZE = 256
EXPRESS_CONFIG_SIZE = 4096


class Cmd(enum.IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


class Sts(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    MASTER_DATA_PARITY = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


STATUS_RW1C = 0xF900  # the error bits a driver clears by writing 1


class CapId(enum.IntEnum):
    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    VENDOR = 0x09
    EXPRESS = 0x10
    MSIX = 0x11


class IrqKind(enum.IntEnum):
    """VFIO's PCI interrupt indexes."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class DeviceAccessError(Exception):
    """A register access the device refuses; carries the errno for the VMM."""

    def __init__(self, error: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = error


@dataclass
class Bar:
    """One Base Address Register.

    ``fd`` (a memfd the device also maps) makes the BAR, or the ``mmap_areas``
    of it, mappable by the VMM: guest accesses there never reach the daemon.
    """

    size: int
    is_64bit: bool = False
    prefetchable: bool = False
    io: bool = False
    fd: int | None = None
    mmap_areas: list[tuple[int, int]] | None = None  # (offset, size); None: all of it

    def __post_init__(self) -> None:
        minimum = 4 if self.io else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two >= {minimum}")

    @property
    def type_bits(self) -> int:
        if self.io:
            return 0x1
        return (0x4 if self.is_64bit else 0) | (0x8 if self.prefetchable else 0)


# What every PCI function carries in its state blob, around the plugin's own.
PCI_STATE = Schema(
    1,
    Field("config", BYTES),
    Field("msix_table", BYTES),
    Field("intx_asserted", BOOL),
)


class ConfigSpace:
    """Bytes plus masks: which bits a driver may set, which it clears by
    writing 1. Writes go through ``write`` so hooks see every change."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.writable = bytearray(size)
        self.write_one_to_clear = bytearray(size)
        self.defaults = b""

    def set(self, offset: int, fmt: str, value: int, *, writable: int = 0, w1c: int = 0) -> None:
        struct.pack_into(fmt, self.data, offset, value)
        struct.pack_into(fmt, self.writable, offset, writable)
        struct.pack_into(fmt, self.write_one_to_clear, offset, w1c)

    def get(self, offset: int, fmt: str) -> int:
        return int(struct.unpack_from(fmt, self.data, offset)[0])

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            at = offset + i
            old = self.data[at]
            new = (old & ~self.writable[at]) | (value & self.writable[at])
            new &= ~(value & self.write_one_to_clear[at])
            self.data[at] = new & 0xFF

    def snapshot_defaults(self) -> None:
        self.defaults = bytes(self.data)

    def restore_defaults(self) -> None:
        self.data[:] = self.defaults


@dataclass
class Capability:
    cap_id: int
    offset: int
    length: int


class InterruptDelivery(Protocol):
    """Where a function's interrupts go: the transport's business. Over
    vfio-user, eventfds the VMM installs (vfiouserd.vfio_user.interrupts)."""

    def active(self) -> IrqKind | None:
        """The kind the driver set up (MSI-X, MSI, INTx), None for none."""
        ...

    def fire(self, kind: IrqKind, vector: int) -> bool:
        """Deliver ``vector`` of ``kind``; False if it is not set up."""
        ...

    def pending(self, kind: IrqKind, vector: int) -> bool:
        """Fired while masked and not delivered yet (the MSI-X PBA)."""
        ...

    def eventfd(self, kind: IrqKind, vector: int) -> int | None:
        """An eventfd whose signal delivers ``vector`` now (a native loop
        may write it directly), or None if delivery needs more than that."""
        ...

    def close(self) -> None:
        """The VMM went away: what it installed goes."""
        ...


class Undelivered:
    """No transport has set interrupts up yet: nothing reaches anyone, as
    with a function whose driver enabled no vector."""

    def active(self) -> IrqKind | None:
        return None

    def fire(self, kind: IrqKind, vector: int) -> bool:
        return False

    def pending(self, kind: IrqKind, vector: int) -> bool:
        return False

    def eventfd(self, kind: IrqKind, vector: int) -> int | None:
        return None

    def close(self) -> None:
        pass


class RemoteDma(Protocol):
    """Client memory without an fd, reached through the VMM (DMA messages)."""

    async def dma_read(self, address: int, size: int) -> bytes: ...

    async def dma_write(self, address: int, data: bytes) -> None: ...


class PciDevice:
    """Base class of PCI device plugins (vfio-user).

    Subclasses set the identity and ``bars``, then implement
    ``read_register``/``write_register`` (or ``bar_read``/``bar_write`` for
    BARs that are not made of registers).
    """

    # Class attributes a plugin sets; a transport wrapping another device
    # model (virtio-pci) sets some per instance instead.
    name: str
    description: str
    vendor_id: ClassVar[int]
    device_id: int
    subsystem_vendor_id: ClassVar[int] = 0
    subsystem_id: ClassVar[int] = 0
    class_code: int = 0xFF0000  # unclassified
    revision: ClassVar[int] = 0
    interrupt_pin: ClassVar[int] = 1  # INTA; 0 for none
    # Its interrupts for virtqueues met the fault rules at their queue already
    # (vfiouserd.faults); rules naming no queue or vector then skip them here.
    interrupts_ruled_by_queue: ClassVar[bool] = False
    express: ClassVar[bool] = True
    msi_vectors: ClassVar[int] = 0
    msix_vectors: int = 0
    msix_bar: ClassVar[int] = 0  # where the MSI-X table (at 0) and PBA live
    register_width: ClassVar[int] = 8  # 4: 8-byte accesses become two 4-byte ones
    syscalls: frozenset[str] = frozenset()  # beyond the daemon's own, for the jail
    # Host directories the device reaches by path after the jail, bound
    # into its empty root read-write at the same path (set by from_args).
    jail_directories: tuple[str, ...] = ()
    # Migration and restarts (vfiouserd.state): the plugin's own fields,
    # declared once; config space and MSI-X table come with every device.
    # ``abi_version`` pins what the guest sees: raise it when that changes.
    abi_version: int = 1
    state: Schema = Schema(1)

    def __init__(self, bars: dict[int, Bar] | None = None) -> None:
        self.bars: dict[int, Bar] = dict(bars or {})
        self.memory = GuestMemory(max_regions=65535)  # what the VMM lets us DMA to
        # Taken in turns by the session's commands and by ring walks on memory
        # reached through the VMM (see vfiouserd.turns).
        self.turns = Turns()
        self._tasks: Any = None  # the session's nursery, for work of the device's own
        self.remote_dma: RemoteDma | None = None
        self.capabilities: list[Capability] = []
        self.config = ConfigSpace(EXPRESS_CONFIG_SIZE if self.express else LEGACY_CONFIG_SIZE)
        self.irqs: InterruptDelivery = Undelivered()
        # The INTx line (level triggered) and the command register's disable bit.
        self.intx_asserted = False
        self.intx_disabled = False
        self.stopped = False  # migration: no DMA, no interrupts, no progress
        self._msix_table = bytearray()
        self._msi_offset = 0
        self._msix_table_offset = 0
        self._msix_pba_offset = 0
        if self.msix_vectors:
            self._place_msix()
        self._build_config()

    # -- plugin wiring --------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        """Add the device's own command-line options."""

    @classmethod
    def from_args(cls, args: Any) -> PciDevice:
        return cls()

    # -- config space construction -------------------------------------------------

    def _build_config(self) -> None:
        c = self.config
        c.set(VENDOR_ID, "<H", self.vendor_id)
        c.set(VENDOR_ID + 2, "<H", self.device_id)
        command_bits = Cmd.MEMORY | Cmd.BUS_MASTER | Cmd.PARITY | Cmd.SERR | Cmd.INTX_DISABLE
        if any(bar.io for bar in self.bars.values()):
            command_bits |= Cmd.IO
        c.set(COMMAND, "<H", 0, writable=command_bits)
        c.set(STATUS, "<H", Sts.CAP_LIST, w1c=STATUS_RW1C)
        c.set(REVISION_ID, "<B", self.revision)
        c.data[CLASS_CODE : CLASS_CODE + 3] = self.class_code.to_bytes(3, "little")
        c.set(CACHE_LINE_SIZE, "<B", 0, writable=0xFF)
        c.set(SUBSYSTEM_VENDOR_ID, "<H", self.subsystem_vendor_id)
        c.set(SUBSYSTEM_VENDOR_ID + 2, "<H", self.subsystem_id)
        c.set(INTERRUPT_LINE, "<B", 0, writable=0xFF)
        c.set(INTERRUPT_PIN, "<B", self.interrupt_pin)
        for index, bar in self.bars.items():
            self._build_bar(index, bar)
        self._next_capability = FIRST_CAPABILITY
        self.add_capability(CapId.POWER_MANAGEMENT, self._pm_body(), writable=b"\0\0\x03\x01")
        if self.msi_vectors:
            self._add_msi()
        if self.msix_vectors:
            self._add_msix()
        if self.express:
            self._add_express()
        self.add_device_capabilities()
        c.snapshot_defaults()

    def add_device_capabilities(self) -> None:
        """Hook for capabilities of the device class (virtio's vendor caps)."""

    def _build_bar(self, index: int, bar: Bar) -> None:
        if not 0 <= index <= 5 or (bar.is_64bit and index == 5):
            raise ValueError(f"BAR{index} cannot hold this BAR")
        mask = ~(bar.size - 1)
        offset = BAR0 + 4 * index
        low_fixed = 0x3 if bar.io else 0xF
        self.config.set(offset, "<I", bar.type_bits, writable=mask & 0xFFFFFFFF & ~low_fixed)
        if bar.is_64bit:
            if index + 1 in self.bars:
                raise ValueError(f"BAR{index} is 64-bit; BAR{index + 1} must stay free")
            self.config.set(offset + 4, "<I", 0, writable=(mask >> 32) & 0xFFFFFFFF)

    def add_capability(
        self, cap_id: int, body: bytes, writable: bytes = b"", w1c: bytes = b""
    ) -> int:
        """Append a capability (``body`` starts after the ID and next bytes).

        Returns its config-space offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > LEGACY_CONFIG_SIZE:
            raise ValueError("capabilities do not fit in the first 256 bytes")
        c = self.config
        c.data[offset] = cap_id
        c.data[offset + 2 : offset + length] = body
        c.writable[offset + 2 : offset + 2 + len(writable)] = writable
        c.write_one_to_clear[offset + 2 : offset + 2 + len(w1c)] = w1c
        if self.capabilities:
            c.data[self.capabilities[-1].offset + 1] = offset
        else:
            c.data[CAPABILITY_LIST] = offset
        self.capabilities.append(Capability(cap_id, offset, length))
        self._next_capability = (offset + length + 3) & ~3
        return offset

    @staticmethod
    def _pm_body() -> bytes:
        # PMC: version 3, no PME, no D1/D2; PMCSR: D0, No_Soft_Reset (D3hot->D0 keeps state)
        return struct.pack("<HHBB", 0x0003, 0x0008, 0, 0)

    def _add_msi(self) -> None:
        vectors = self.msi_vectors
        if vectors & (vectors - 1) or not 1 <= vectors <= 32:
            raise ValueError("MSI vectors must be a power of two up to 32")
        mmc = vectors.bit_length() - 1
        control = mmc << 1 | 1 << 7 | 1 << 8  # 64-bit address, per-vector masking
        mask_bits = (1 << vectors) - 1
        body = struct.pack("<HIIHHII", control, 0, 0, 0, 0, 0, 0)
        writable = struct.pack("<HIIHHII", 0x0071, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF, 0, mask_bits, 0)
        self._msi_offset = self.add_capability(CapId.MSI, body, writable)

    def _place_msix(self) -> None:
        table_size = 16 * self.msix_vectors
        self._msix_table_offset = 0
        self._msix_pba_offset = (table_size + 7) & ~7
        pba_size = 8 * ((self.msix_vectors + 63) // 64)
        needed = self._msix_pba_offset + pba_size
        bar = self.bars.get(self.msix_bar)
        if bar is None or bar.size < needed:
            raise ValueError(f"MSI-X needs BAR{self.msix_bar} of at least {needed} bytes")
        # Reset state: message address/data 0, every vector masked (PCI spec).
        self._msix_table = bytearray(table_size)
        for vector in range(self.msix_vectors):
            self._msix_table[16 * vector + 12] = 1

    def _add_msix(self) -> None:
        control = self.msix_vectors - 1
        body = struct.pack(
            "<HII",
            control,
            self._msix_table_offset | self.msix_bar,
            self._msix_pba_offset | self.msix_bar,
        )
        self.add_capability(CapId.MSIX, body, struct.pack("<HII", 0xC000, 0, 0))

    def _add_express(self) -> None:
        # Version 2 endpoint with function-level reset; link 1 lane at 2.5 GT/s.
        body = struct.pack(
            "<HIHHIHHIHHHHIIHHIHHIHH",
            0x0002,  # PCIe capabilities: version 2, endpoint
            1 << 28 | 1 << 15,  # device capabilities: FLR, role-based error reporting
            0x2810,
            0,  # device control (max read 512, no snoop, relaxed ordering), status
            0x00000011,  # link capabilities: 2.5 GT/s, x1
            0,
            0x0011,  # link control, link status: 2.5 GT/s, x1
            0,
            0,
            0,  # slot capabilities, control, status
            0,
            0,
            0,  # root control, root capabilities, root status
            0,  # device capabilities 2
            0,
            0,  # device control 2, status 2
            1 << 1,  # link capabilities 2: 2.5 GT/s supported
            0,
            0,  # link control 2, status 2
            0,
            0,
            0,  # slot capabilities 2, control 2, status 2
        )
        assert len(body) == 58
        writable = bytearray(len(body))
        struct.pack_into("<H", writable, 6, 0x7CFF | 0x8000)  # device control (+FLR bit)
        # Link control: ASPM, read completion boundary, common clock, extended
        # synch; device control 2: nothing, as device capabilities 2 offer nothing.
        struct.pack_into("<H", writable, 14, 0x00CB)
        w1c = bytearray(len(body))
        struct.pack_into("<H", w1c, 8, 0x000F)  # device status error bits
        self._express_offset = self.add_capability(CapId.EXPRESS, body, bytes(writable), bytes(w1c))

    # -- config space accesses --------------------------------------------------------

    async def config_read(self, offset: int, size: int) -> bytes:
        self._refresh_status()
        return self.config.read(offset, size)

    async def config_write(self, offset: int, data: bytes) -> None:
        before_command = self.config.get(COMMAND, "<H")
        pm = self.capabilities[0].offset  # power management comes first
        power_state = self.config.data[pm + 4] & 0x3
        self.config.write(offset, data)
        if self.config.data[pm + 4] & 0x3 in (1, 2):  # D1/D2 are not offered: ignored
            self.config.data[pm + 4] = self.config.data[pm + 4] & ~0x3 | power_state
        command = self.config.get(COMMAND, "<H")
        if command != before_command:
            self.command_changed(before_command, command)
        if (before_command ^ command) & Cmd.INTX_DISABLE:
            self.intx_disabled = bool(command & Cmd.INTX_DISABLE)
            if self.intx_up:
                self.irqs.fire(IrqKind.INTX, 0)
        msi = self._msi_offset
        if msi and offset <= msi + 2 < offset + len(data):
            control = self.config.get(msi + 2, "<H")
            capable, enabled = control >> 1 & 7, control >> 4 & 7
            if enabled > capable:  # software may not enable more than offered
                self.config.set(msi + 2, "<H", control & ~0x70 | capable << 4, writable=0x0071)
        if self.express and offset <= self._express_offset + 9 < offset + len(data):
            control = self.config.get(self._express_offset + 8, "<H")
            if control & 0x8000:  # Initiate Function Level Reset
                self.reset()

    def _refresh_status(self) -> None:
        status = self.config.get(STATUS, "<H")
        status = (status | Sts.INTERRUPT) if self.intx_asserted else (status & ~int(Sts.INTERRUPT))
        struct.pack_into("<H", self.config.data, STATUS, status)

    @property
    def intx_up(self) -> bool:
        """INTx asserted and not disabled: a VMM unmasking it hears it again."""
        return self.intx_asserted and not self.intx_disabled

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line (level triggered)."""
        if level == self.intx_asserted:
            return
        self.intx_asserted = level
        self._refresh_status()
        if self.intx_up:
            self.irqs.fire(IrqKind.INTX, 0)

    @property
    def bus_master(self) -> bool:
        return bool(self.config.get(COMMAND, "<H") & Cmd.BUS_MASTER)

    def bar_address(self, index: int) -> int:
        """The address the guest programmed into a BAR (for logs and tests)."""
        bar = self.bars[index]
        low = self.config.get(BAR0 + 4 * index, "<I") & ~(0x3 if bar.io else 0xF)
        high = self.config.get(BAR0 + 4 * index + 4, "<I") if bar.is_64bit else 0
        return high << 32 | low

    # -- BAR accesses ------------------------------------------------------------------

    def _in_msix(self, index: int, offset: int, size: int) -> bool:
        return (
            self.msix_vectors > 0
            and index == self.msix_bar
            and offset < self._msix_pba_offset + 8 * ((self.msix_vectors + 63) // 64)
        )

    def _in_memory(self, index: int, offset: int, size: int) -> int | None:
        """The fd behind a memory-backed part of a BAR the access lies in."""
        bar = self.bars.get(index)
        if bar is None or bar.fd is None:
            return None
        areas = bar.mmap_areas if bar.mmap_areas is not None else [(0, bar.size)]
        if any(start <= offset and offset + size <= start + length for start, length in areas):
            return bar.fd
        return None

    async def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if self._in_msix(index, offset, size):
            return self._msix_read(offset, size)
        fd = self._in_memory(index, offset, size)
        if fd is not None:  # what the VMM could also reach through its mmap
            return os.pread(fd, size, offset).ljust(size, b"\0")
        if size not in (1, 2, 4, 8):
            raise DeviceAccessError(errno.EINVAL, f"{size}-byte register read")
        if size > self.register_width:
            low = await self.bar_read(index, offset, self.register_width)
            return low + await self.bar_read(
                index, offset + self.register_width, size - self.register_width
            )
        value = await self.read_register(index, offset, size)
        return (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    async def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if self._in_msix(index, offset, len(data)):
            self._msix_write(offset, data)
            return
        fd = self._in_memory(index, offset, len(data))
        if fd is not None:
            os.pwrite(fd, data, offset)
            return
        if len(data) not in (1, 2, 4, 8):
            raise DeviceAccessError(errno.EINVAL, f"{len(data)}-byte register write")
        if len(data) > self.register_width:
            await self.bar_write(index, offset, data[: self.register_width])
            await self.bar_write(index, offset + self.register_width, data[self.register_width :])
            return
        await self.write_register(index, offset, len(data), int.from_bytes(data, "little"))

    async def read_register(self, bar: int, offset: int, size: int) -> int:
        return 0

    async def write_register(self, bar: int, offset: int, size: int, value: int) -> None:
        return None

    def _msix_read(self, offset: int, size: int) -> bytes:
        if offset < len(self._msix_table):
            return bytes(self._msix_table[offset : offset + size]).ljust(size, b"\0")
        if offset >= self._msix_pba_offset:
            pending = (self.irqs.pending(IrqKind.MSIX, v) for v in range(self.msix_vectors))
            pba = sum(1 << v for v, up in enumerate(pending) if up)
            raw = pba.to_bytes(8 * ((self.msix_vectors + 63) // 64), "little")
            start = offset - self._msix_pba_offset
            return raw[start : start + size].ljust(size, b"\0")
        return bytes(size)

    def _msix_write(self, offset: int, data: bytes) -> None:
        # The table is storage for VMMs that pass it through; the PBA is read-only.
        end = min(offset + len(data), len(self._msix_table))
        if offset < end:
            self._msix_table[offset:end] = data[: end - offset]

    def statistics(self) -> dict[str, Any]:
        """The device's own figures for ``vfiouserd stats`` (queues count apart)."""
        return {}

    def memory_changed(self) -> None:
        """The VMM mapped or unmapped DMA memory (hook for the device)."""

    def command_changed(self, old: int, new: int) -> None:
        """The driver changed the command register (bus mastering...)."""

    def io_eventfds(self, index: int) -> list[tuple[int, int, int]]:
        """(offset, size, eventfd) of BAR areas whose writes only need to wake
        the device (doorbells): a VMM can hand them to KVM as ioeventfds."""
        return []

    # -- DMA ----------------------------------------------------------------------------

    async def dma_read(self, address: int, size: int) -> bytes:
        """Read guest memory as a bus master: mapped memory directly, the rest
        through the VMM. GuestMemoryError if the range is not all readable."""
        self._check_bus_master()
        chunks = []
        for region, start, length in self.memory.ranges(address, size, writable=False):
            if region.mapping is not None:
                chunks.append(bytes(region.slice(start - region.guest_address, length)))
            else:
                chunks.append(await self._remote().dma_read(start, length))
        data = b"".join(chunks)
        if tracer.wants("dma"):
            _trace_dma("read", address, data)
        return data

    async def dma_write(self, address: int, data: bytes) -> None:
        self._check_bus_master()
        if tracer.wants("dma"):
            _trace_dma("write", address, data)
        done = 0
        for region, start, length in self.memory.ranges(address, len(data), writable=True):
            chunk = data[done : done + length]
            if region.mapping is not None:
                region.slice(start - region.guest_address, length)[:] = chunk
            else:
                await self._remote().dma_write(start, chunk)
            self.memory.mark_dirty(start, length)
            done += length

    def _check_bus_master(self) -> None:
        if not self.bus_master:
            raise GuestMemoryError("DMA while bus mastering is disabled")
        if self.stopped:
            raise GuestMemoryError("DMA while the device is stopped for migration")

    def _remote(self) -> RemoteDma:
        if self.remote_dma is None:
            raise GuestMemoryError("no VMM connection to reach unmapped memory")
        return self.remote_dma

    # -- interrupts and reset ---------------------------------------------------------------

    def interrupt(self, vector: int = 0) -> None:
        """Raise an interrupt the way the driver set the device up: the MSI-X
        or MSI vector, else the INTx line (which stays asserted until the
        device calls ``lower_interrupt``, when the driver acknowledges)."""
        kind = self.irqs.active()
        if kind is IrqKind.MSIX or kind is IrqKind.MSI:
            self.irqs.fire(kind, vector)
        else:
            self.set_intx(True)

    def lower_interrupt(self) -> None:
        self.set_intx(False)

    def reset(self) -> None:
        """Function-level reset: config space and the device's own state."""
        self.config.restore_defaults()
        self.intx_disabled = False
        self.set_intx(False)
        if self.msix_vectors:
            self._place_msix()
        self.device_reset()

    def device_reset(self) -> None:
        """Hook: reset the device's own registers."""

    def interrupts_changing(self) -> None:
        """Hook: the VMM is about to change the interrupts' eventfds (whoever
        writes one directly must stop first: it may be closed)."""

    # -- migration ---------------------------------------------------------------------------

    def quiesce(self) -> None:
        """Stop: no more DMA, interrupts or device progress until ``resume``."""
        self.stopped = True

    def resume(self) -> None:
        self.stopped = False

    # -- handover (restart without disconnect) --------------------------------------------

    def hold(self) -> None:
        """Stop work the device does on its own (rings), keep answering the
        VMM: the session is about to be handed to the next daemon."""

    def release(self) -> None:
        """The handover did not happen: carry on."""

    def handover_fds(self) -> dict[str, int]:
        """Fds of the device's own the VMM also holds (memory-backed BARs,
        notification eventfds): the next daemon must use the same ones."""
        return {f"bar{index}": bar.fd for index, bar in self.bars.items() if bar.fd is not None}

    def adopt_handover_fds(self, fds: dict[str, int | None]) -> None:
        for key, fd in fds.items():
            index = int(key.removeprefix("bar"))
            if fd is None or index not in self.bars or self.bars[index].fd is None:
                raise ValueError(f"no memory-backed BAR for {key}")
            os.close(self.bars[index].fd)  # type: ignore[arg-type]
            self.bars[index].fd = fd

    def state_sections(self) -> dict[str, Schema]:
        return {"pci": PCI_STATE, **self.transport_state_sections(), "device": self.state}

    def transport_state_sections(self) -> dict[str, Schema]:
        """Hook: state of a transport between PCI and the device (virtio-pci)."""
        return {}

    def save_state(self) -> dict[str, dict[str, Any]]:
        return {
            "pci": {
                "config": bytes(self.config.data),
                "msix_table": bytes(self._msix_table),
                "intx_asserted": self.intx_asserted,
            },
            **self.save_transport_state(),
            "device": self.save_device_state(),
        }

    def save_transport_state(self) -> dict[str, dict[str, Any]]:
        return {}

    def save_device_state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.state.fields}

    def load_state(self, sections: dict[str, dict[str, Any]]) -> None:
        pci = sections["pci"]
        self._check_config(pci["config"])
        if len(pci["msix_table"]) != len(self._msix_table):
            raise StateError(
                f"an MSI-X table of {len(pci['msix_table'])} bytes, this device has "
                f"{len(self._msix_table)}"
            )
        self.check_transport_state(sections)
        self.check_device_state(sections["device"])
        self.config.data[:] = pci["config"]
        self._msix_table[:] = pci["msix_table"]
        self.intx_disabled = bool(self.config.get(COMMAND, "<H") & Cmd.INTX_DISABLE)
        self.intx_asserted = pci["intx_asserted"]
        self.load_transport_state(sections)
        self.load_device_state(sections["device"])

    def _check_config(self, config: bytes) -> None:
        """The saved config space must be this function's: same size, same
        read-only bits (identity, BAR types, capabilities) except the status
        register, which reflects live state."""
        space = self.config
        if len(config) != space.size:
            raise StateError(f"a config space of {len(config)} bytes, this device has {space.size}")
        for at, (saved, default) in enumerate(zip(config, space.defaults, strict=True)):
            if STATUS <= at < STATUS + 2:
                continue
            fixed = ~(space.writable[at] | space.write_one_to_clear[at]) & 0xFF
            if saved & fixed != default & fixed:
                raise StateError(
                    f"config space byte {at:#x} is {saved:#04x}, this device has {default:#04x}"
                )

    def check_transport_state(self, sections: dict[str, dict[str, Any]]) -> None:
        """Hook: raise StateError if the transport state cannot be taken."""

    def load_transport_state(self, sections: dict[str, dict[str, Any]]) -> None:
        """Hook: take the transport state (already checked)."""

    def check_device_state(self, values: dict[str, Any]) -> None:
        """Hook: raise StateError if this device cannot take ``values``."""

    def load_device_state(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    # -- the VMM connection ------------------------------------------------------------------

    def attach(self, nursery: Any) -> None:
        """A VMM connected; device tasks (virtqueues) may start in ``nursery``."""
        self._tasks = nursery

    def run_in_background(self, work: Callable[[], Awaitable[None]]) -> None:
        """Do ``work`` (a DMA transfer, say) once the register write that asked
        for it is answered, as hardware does: a VMM need not serve the
        device's DMA before that answer, and QEMU does not."""
        if self._tasks is None:
            raise DeviceAccessError(errno.EIO, "no VMM connected")

        async def run() -> None:
            try:
                await work()
            except Exception:  # a device bug must not end the session
                log.exception("device.failed", work=getattr(work, "__name__", "work"))
            finally:
                self.turns.work_done()

        self.turns.work_started()  # now: a command right behind this one sees it
        self._tasks.start_soon(run)

    def detach(self) -> None:
        """The VMM went away: its memory and eventfds go, the device state stays."""
        self._tasks = None
        self.irqs.close()
        self.memory.clear()

    def close(self) -> None:
        """Release host resources at exit."""
        for bar in self.bars.values():
            if bar.fd is not None:
                os.close(bar.fd)
                bar.fd = None


def _trace_dma(direction: str, address: int, data: bytes) -> None:
    shown = {"data": data[: tracer.data_bytes].hex()} if tracer.data_bytes else {}
    tracer.emit("dma", direction, address=address, size=len(data), **shown)
