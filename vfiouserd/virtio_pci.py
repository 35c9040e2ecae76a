"""virtio-pci, modern (virtio 1.2 section 4.1): a virtio device as a PCI device.

The same ``VirtioDevice`` objects served over vhost-user become PCI functions
that the guest's unmodified ``virtio_pci`` driver drives:

- BAR4 (64-bit, 16 KiB): common configuration at 0x0000, ISR at 0x1000,
  device configuration at 0x2000, notifications at 0x3000 (4 bytes per queue).
- BAR1: the MSI-X table and PBA, one vector per queue plus one for config
  changes.
- Vendor capabilities pointing at those areas, plus the PCI configuration
  access window (VIRTIO_PCI_CAP_PCI_CFG).

Queues are the shared ``Virtqueue`` implementation; a notification write
wakes the queue through an eventfd that a VMM may also hand to KVM as an
ioeventfd (vfio-user GET_REGION_IO_FDS).
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from typing import Any

from vfiouserd.devices.pci import Bar, IrqKind, PciDevice
from vfiouserd.devices.virtio import (
    ConfigWriteError,
    DeviceId,
    Feature,
    Status,
    VirtioDevice,
    bit,
)
from vfiouserd.log import get_logger
from vfiouserd.state import BOOL, U8, U16, U32, U64, Field, Schema, StateError, records
from vfiouserd.virtqueue import AddressSpace, QueueSet, RingError, Virtqueue

log = get_logger("virtio_pci")

VIRTIO_VENDOR_ID = 0x1AF4
MODERN_DEVICE_ID_BASE = 0x1040
NO_VECTOR = 0xFFFF
PACKED_INITIAL_BASE = 1 << 15 | 1 << 31
MODERN_BAR = 4
MSIX_BAR = 1
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
COMMON_LENGTH = 0x38
CLASS_CODES = {DeviceId.NET: 0x020000, DeviceId.BLOCK: 0x010000}  # others: 0xFF0000


class CfgType(enum.IntEnum):
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI_CFG = 5


# struct virtio_pci_common_cfg: offset -> (field, size)
COMMON_FIELDS: dict[int, tuple[str, int]] = {
    0x00: ("device_feature_select", 4),
    0x04: ("device_feature", 4),
    0x08: ("driver_feature_select", 4),
    0x0C: ("driver_feature", 4),
    0x10: ("config_msix_vector", 2),
    0x12: ("num_queues", 2),
    0x14: ("device_status", 1),
    0x15: ("config_generation", 1),
    0x16: ("queue_select", 2),
    0x18: ("queue_size", 2),
    0x1A: ("queue_msix_vector", 2),
    0x1C: ("queue_enable", 2),
    0x1E: ("queue_notify_off", 2),
    0x20: ("queue_desc_lo", 4),
    0x24: ("queue_desc_hi", 4),
    0x28: ("queue_driver_lo", 4),
    0x2C: ("queue_driver_hi", 4),
    0x30: ("queue_device_lo", 4),
    0x34: ("queue_device_hi", 4),
}


# What the transport holds of the driver's set-up: the common configuration,
# and for each queue its set-up and where the ring stands.
QUEUE_STATE = records(
    size=U16,
    enabled=BOOL,
    vector=U16,
    desc=U64,
    driver=U64,
    device=U64,
    base=U32,
)
TRANSPORT_STATE = Schema(
    1,
    Field("device_feature_select", U32),
    Field("driver_feature_select", U32),
    Field("driver_features", U64),
    Field("config_msix_vector", U16),
    Field("device_status", U8),
    Field("config_generation", U8),
    Field("queue_select", U16),
    Field("isr", U8),
    Field("queues", QUEUE_STATE),
)


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


class VirtioPciDevice(PciDevice):
    vendor_id = VIRTIO_VENDOR_ID
    subsystem_vendor_id = VIRTIO_VENDOR_ID
    subsystem_id = 0x1100
    revision = 1  # modern-only device
    msix_bar = MSIX_BAR
    register_width = 4
    interrupts_ruled_by_queue = True

    def __init__(
        self, virtio: VirtioDevice, max_queue_size: int = 128, *, packed_ring: bool = False
    ) -> None:
        self.virtio = virtio
        # VIRTIO_F_RING_PACKED only when asked, as QEMU's own virtio-pci
        # devices (packed=off): a driver takes it when offered (Linux does),
        # and the native fast path serves split rings.
        self.offered_features = virtio.features & ~(0 if packed_ring else bit(Feature.RING_PACKED))
        self.name = f"virtio-{virtio.name}"
        self.description = virtio.description
        self.device_id = MODERN_DEVICE_ID_BASE + int(virtio.device_id)
        self.syscalls = virtio.syscalls
        self.jail_directories = virtio.jail_directories
        self.state = virtio.state  # the blob carries the virtio device's own fields
        self.abi_version = virtio.abi_version
        self.class_code = CLASS_CODES.get(virtio.device_id, 0xFF0000)
        self.msix_vectors = virtio.num_queues + 1
        self.max_queue_size = min(max_queue_size, virtio.max_queue_size)
        msix_bytes = 16 * self.msix_vectors + 8 * ((self.msix_vectors + 63) // 64) + 8
        super().__init__(
            {
                MSIX_BAR: Bar(_pow2_at_least(max(4096, msix_bytes))),
                MODERN_BAR: Bar(0x4000, is_64bit=True, prefetchable=True),
            }
        )
        self.queue_set = QueueSet(virtio, self.memory, AddressSpace.GUEST, self.turns)
        self._held = False  # rings stay stopped: a handover is under way
        self.kick_fds = [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in self.queue_set.queues
        ]
        for queue in self.queue_set.queues:
            queue.notifier = lambda q=queue.index: self._queue_interrupt(q)
            queue.error_notifier = self._needs_reset
        virtio.add_config_listener(self._config_changed)
        self.device_reset()

    # -- capabilities --------------------------------------------------------------

    def _vendor_cap(
        self,
        cfg_type: CfgType,
        offset: int,
        length: int,
        extra: bytes = b"",
        writable: bytes = b"",
        bar: int = MODERN_BAR,
    ) -> int:
        cap_len = 16 + len(extra)
        body = struct.pack("<BBBBxxII", cap_len, cfg_type, bar, 0, offset, length) + extra
        return self.add_capability(0x09, body, writable)

    def add_device_capabilities(self) -> None:
        queues = self.virtio.num_queues
        self._vendor_cap(CfgType.COMMON, COMMON_OFFSET, COMMON_LENGTH)
        self._vendor_cap(
            CfgType.NOTIFY,
            NOTIFY_OFFSET,
            NOTIFY_MULTIPLIER * queues,
            struct.pack("<I", NOTIFY_MULTIPLIER),
        )
        self._vendor_cap(CfgType.ISR, ISR_OFFSET, 1)
        config_size = len(self.virtio.config())
        if config_size:
            self._vendor_cap(CfgType.DEVICE, DEVICE_OFFSET, config_size)
        # The access window: bar (byte 2 of the body), offset, length and data
        # are the driver's to write.
        writable = bytearray(16 + 4 - 2)
        writable[2] = 0xFF
        writable[6:18] = b"\xff" * 12
        self._pci_cfg_cap = self._vendor_cap(
            CfgType.PCI_CFG, 0, 0, bytes(4), bytes(writable), bar=0
        )

    # -- state -------------------------------------------------------------------------

    def device_reset(self) -> None:
        """Virtio device reset (status 0), also part of a PCI function reset."""
        for queue in self.queue_set.queues:
            self.queue_set.stop(queue)
            queue.borrow_kick(None)  # the transport's eventfd: not the queue's to close
        self.queue_set.reset()  # queues back to their initial state, device reset
        for queue in self.queue_set.queues:
            queue.notifier = lambda q=queue.index: self._queue_interrupt(q)
            queue.native_call = lambda q=queue.index: self._queue_eventfd(q)
            queue.error_notifier = self._needs_reset
            queue.dma_allowed = lambda: self.bus_master
            queue.borrow_kick(self.kick_fds[queue.index])
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.device_status = 0
        self.config_generation = 0
        self.queue_select = 0
        self.queue_vectors = [NO_VECTOR] * len(self.queue_set.queues)
        self.queue_enabled = [False] * len(self.queue_set.queues)
        for queue in self.queue_set.queues:
            queue.size = self.max_queue_size
        self.isr = 0
        self.lower_interrupt()

    def _selected(self) -> Virtqueue | None:
        queues = self.queue_set.queues
        return queues[self.queue_select] if self.queue_select < len(queues) else None

    # -- BAR4 -----------------------------------------------------------------------------

    def _in_device_config(self, index: int, offset: int, size: int) -> bool:
        return index == MODERN_BAR and offset >= DEVICE_OFFSET and offset + size <= NOTIFY_OFFSET

    async def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if self._in_device_config(index, offset, size):  # memory-like: any access size
            start = offset - DEVICE_OFFSET
            return self.virtio.config()[start : start + size].ljust(size, b"\0")
        return await super().bar_read(index, offset, size)

    async def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if self._in_device_config(index, offset, len(data)):
            try:
                self.virtio.write_config(offset - DEVICE_OFFSET, data)
            except ConfigWriteError as exc:
                log.warning("config.write_ignored", reason=str(exc))
            return
        await super().bar_write(index, offset, data)

    async def read_register(self, bar: int, offset: int, size: int) -> int:
        if bar != MODERN_BAR:
            return 0
        if offset < ISR_OFFSET:
            return self._common_read(offset, size)
        if offset < DEVICE_OFFSET:
            if offset != ISR_OFFSET:
                return 0
            value, self.isr = self.isr, 0  # reading acknowledges (INTx)
            self.lower_interrupt()
            return value
        return 0  # device config is served by bar_read; notify is write-only

    async def write_register(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != MODERN_BAR:
            return
        if offset < ISR_OFFSET:
            self._common_write(offset, size, value)
        elif offset >= NOTIFY_OFFSET:
            queue = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if queue < len(self.kick_fds):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self.kick_fds[queue], 1)

    def memory_changed(self) -> None:
        self.queue_set.memory_changed()  # rings waiting for memory look again

    def io_eventfds(self, index: int) -> list[tuple[int, int, int]]:
        if index != MODERN_BAR:
            return []
        return [
            (NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q, 2, fd) for q, fd in enumerate(self.kick_fds)
        ]

    def _common_read(self, offset: int, size: int) -> int:
        field = COMMON_FIELDS.get(offset)
        if field is None or field[1] != size:
            return 0
        name = field[0]
        queue = self._selected()
        if name == "device_feature":
            if self.device_feature_select > 1:
                return 0
            return self.offered_features >> (32 * self.device_feature_select) & 0xFFFFFFFF
        if name == "driver_feature":
            if self.driver_feature_select > 1:
                return 0
            return self.driver_features >> (32 * self.driver_feature_select) & 0xFFFFFFFF
        if name == "num_queues":
            return len(self.queue_set.queues)
        if name.startswith("queue_") and name != "queue_select":
            if queue is None:
                return 0
            return self._queue_field(queue, name)
        return int(getattr(self, name))

    def _queue_field(self, queue: Virtqueue, name: str) -> int:
        if name == "queue_size":
            return queue.size
        if name == "queue_msix_vector":
            return self.queue_vectors[queue.index]
        if name == "queue_enable":
            return int(self.queue_enabled[queue.index])
        if name == "queue_notify_off":
            return queue.index
        area, half = name.rsplit("_", 1)
        address = {
            "queue_desc": queue.desc_address,
            "queue_driver": queue.avail_address,
            "queue_device": queue.used_address,
        }[area]
        return address >> 32 if half == "hi" else address & 0xFFFFFFFF

    def _common_write(self, offset: int, size: int, value: int) -> None:
        field = COMMON_FIELDS.get(offset)
        if field is None or field[1] != size:
            log.warning("common_cfg.bad_write", offset=offset, size=size)
            return
        name = field[0]
        if name in ("device_feature", "num_queues", "config_generation", "queue_notify_off"):
            return  # read-only fields: a write changes nothing
        if name in ("device_feature_select", "driver_feature_select", "queue_select"):
            setattr(self, name, value)
        elif name == "driver_feature" and self.driver_feature_select <= 1:
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | value << shift
        elif name == "config_msix_vector":
            self.config_msix_vector = value if value < self.msix_vectors else NO_VECTOR
        elif name == "device_status":
            self._set_status(value)
        elif name.startswith("queue_"):
            queue = self._selected()
            if queue is not None:
                self._set_queue_field(queue, name, value)

    def _set_queue_field(self, queue: Virtqueue, name: str, value: int) -> None:
        if name == "queue_msix_vector":
            queue.wake()  # a native loop signals the old vector's eventfd: it looks again
            self.queue_vectors[queue.index] = value if value < self.msix_vectors else NO_VECTOR
            return
        if name == "queue_enable":
            if value == 1 and not self.queue_enabled[queue.index]:
                self.queue_enabled[queue.index] = True
                # A fresh ring: packed rings start with both wrap counters at 1.
                queue.base = PACKED_INITIAL_BASE if queue.packed else 0
                queue.ring = None
                if self.device_status & Status.DRIVER_OK:
                    self._start(queue)
            return
        if self.queue_enabled[queue.index]:
            log.warning("queue.write_while_enabled", queue=queue.index, field=name)
            return
        if name == "queue_size":
            queue.size = value if 0 < value <= self.max_queue_size else queue.size
            return
        area, half = name.rsplit("_", 1)
        attribute = {
            "queue_desc": "desc_address",
            "queue_driver": "avail_address",
            "queue_device": "used_address",
        }[area]
        old = getattr(queue, attribute)
        new = (old & 0xFFFFFFFF) | value << 32 if half == "hi" else (old & ~0xFFFFFFFF) | value
        setattr(queue, attribute, new)
        queue.addresses_set = True

    def _set_status(self, value: int) -> None:
        if value == 0:
            log.info("device.reset", device=self.name)
            self.device_reset()
            return
        old = self.device_status
        if value & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            offered = self.offered_features
            if self.driver_features & ~offered or not self.driver_features & bit(Feature.VERSION_1):
                log.warning("features.refused", features=f"{self.driver_features:#x}")
                value &= ~int(Status.FEATURES_OK)
            else:
                self.queue_set.set_features(self.driver_features)
                log.info("features.set", features=f"{self.driver_features:#x}")
        self.device_status = value
        if value & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            for queue in self.queue_set.queues:
                if self.queue_enabled[queue.index]:
                    self._start(queue)

    def _start(self, queue: Virtqueue, *, wait_for_memory: bool = False) -> None:
        queue.enabled = True
        if self.stopped or self._held:
            return  # started by ``resume`` (or by the next daemon)
        try:
            self.queue_set.start(queue, wait_for_memory=wait_for_memory)
        except RingError as exc:
            queue.fail(f"cannot start: {exc}")

    # -- interrupts ---------------------------------------------------------------------

    def interrupts_changing(self) -> None:
        for queue in self.queue_set.queues:
            queue.wake()  # out of the native loop before an eventfd it writes is closed

    def _queue_eventfd(self, index: int) -> int | None:
        """The eventfd a native loop may signal for this queue's interrupt:
        its MSI-X vector's, while bus mastering is on (else Python's
        ``_queue_interrupt`` decides, as for INTx and its ISR bit)."""
        if self.irqs.active() is not IrqKind.MSIX or not self.bus_master:
            return None
        vector = self.queue_vectors[index]
        return None if vector == NO_VECTOR else self.irqs.eventfd(IrqKind.MSIX, vector)

    def command_changed(self, old: int, new: int) -> None:
        if (old ^ new) & 0x4:  # bus mastering: a native loop must stop or may start
            for queue in self.queue_set.queues:
                queue.wake()
        if new & 0x4 and not old & 0x4:  # bus mastering back on: look at the rings
            self.queue_set.memory_changed()

    def _queue_interrupt(self, index: int) -> None:
        if self.irqs.active() is IrqKind.MSIX:
            if not self.bus_master:  # an MSI is a memory write by the device
                return
            vector = self.queue_vectors[index]
            if vector != NO_VECTOR:
                self.irqs.fire(IrqKind.MSIX, vector)
        else:
            self.isr |= 1
            self.interrupt()

    def _config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.irqs.active() is IrqKind.MSIX and self.bus_master:
            if self.config_msix_vector != NO_VECTOR:
                self.irqs.fire(IrqKind.MSIX, self.config_msix_vector)
        else:
            self.isr |= 2
            self.interrupt()

    def _needs_reset(self) -> None:
        self.device_status |= Status.DEVICE_NEEDS_RESET
        self._config_changed()

    # -- PCI config access window ----------------------------------------------------------

    async def config_read(self, offset: int, size: int) -> bytes:
        data_offset = self._pci_cfg_cap + 16
        if offset < data_offset + 4 and data_offset < offset + size:
            await self._window(write=False)
        return await super().config_read(offset, size)

    async def config_write(self, offset: int, data: bytes) -> None:
        await super().config_write(offset, data)
        data_offset = self._pci_cfg_cap + 16
        if offset < data_offset + 4 and data_offset < offset + len(data):
            await self._window(write=True)

    async def _window(self, write: bool) -> None:
        cap = self._pci_cfg_cap
        bar = self.config.data[cap + 4]
        window_offset = self.config.get(cap + 8, "<I")
        length = self.config.get(cap + 12, "<I")
        if bar not in self.bars or length not in (1, 2, 4):
            return
        data = cap + 16
        if write:
            await self.bar_write(bar, window_offset, bytes(self.config.data[data : data + length]))
        else:
            self.config.data[data : data + length] = await self.bar_read(bar, window_offset, length)

    # -- migration ------------------------------------------------------------------------

    def quiesce(self) -> None:
        super().quiesce()
        for queue in self.queue_set.queues:
            self.queue_set.stop(queue)  # keeps where each ring stands

    def resume(self) -> None:
        super().resume()
        if self.device_status & Status.DRIVER_OK:
            for queue in self.queue_set.queues:
                if self.queue_enabled[queue.index]:
                    self._start(queue, wait_for_memory=True)

    def hold(self) -> None:
        self._held = True
        for queue in self.queue_set.queues:
            self.queue_set.stop(queue)

    def release(self) -> None:
        self._held = False
        if not self.stopped:
            self.resume()

    def handover_fds(self) -> dict[str, int]:
        kicks = {f"kick{index}": fd for index, fd in enumerate(self.kick_fds)}
        return {**super().handover_fds(), **kicks}

    def adopt_handover_fds(self, fds: dict[str, int | None]) -> None:
        kicks = {key: fd for key, fd in fds.items() if key.startswith("kick")}
        if len(kicks) != len(self.kick_fds):
            raise ValueError(f"{len(kicks)} notification eventfds for {len(self.kick_fds)} queues")
        super().adopt_handover_fds({k: v for k, v in fds.items() if k not in kicks})
        for key, fd in kicks.items():
            index = int(key.removeprefix("kick"))
            if fd is None or not 0 <= index < len(self.kick_fds):
                raise ValueError(f"notification eventfd {key}")
            os.close(self.kick_fds[index])
            os.set_blocking(fd, False)
            self.kick_fds[index] = fd
            self.queue_set.queues[index].borrow_kick(fd)

    def transport_state_sections(self) -> dict[str, Schema]:
        return {"virtio-pci": TRANSPORT_STATE}

    def save_transport_state(self) -> dict[str, dict[str, Any]]:
        values = {f.name: getattr(self, f.name) for f in TRANSPORT_STATE.fields[:-1]}
        values["queues"] = [
            {
                "size": queue.size,
                "enabled": self.queue_enabled[queue.index],
                "vector": self.queue_vectors[queue.index],
                "desc": queue.desc_address,
                "driver": queue.avail_address,
                "device": queue.used_address,
                "base": queue.current_base(),
            }
            for queue in self.queue_set.queues
        ]
        return {"virtio-pci": values}

    def check_transport_state(self, sections: dict[str, dict[str, Any]]) -> None:
        queues = sections["virtio-pci"]["queues"]
        if len(queues) != len(self.queue_set.queues):
            raise StateError(f"{len(queues)} queues, this device has {len(self.queue_set.queues)}")
        for index, saved in enumerate(queues):
            if saved.size > self.max_queue_size:
                raise StateError(f"queue {index} of {saved.size}, at most {self.max_queue_size}")
        features = sections["virtio-pci"]["driver_features"]
        if features & ~self.offered_features:
            raise StateError(f"driver features {features:#x} this device does not offer")

    def load_transport_state(self, sections: dict[str, dict[str, Any]]) -> None:
        values = sections["virtio-pci"]
        for queue in self.queue_set.queues:
            self.queue_set.stop(queue)
        for f in TRANSPORT_STATE.fields[:-1]:
            setattr(self, f.name, values[f.name])
        if self.device_status & Status.FEATURES_OK:
            self.queue_set.set_features(self.driver_features)
        for queue, saved in zip(self.queue_set.queues, values["queues"], strict=True):
            queue.size = saved.size
            queue.desc_address, queue.avail_address = saved.desc, saved.driver
            queue.used_address = saved.device
            queue.addresses_set = True
            queue.base = saved.base
            queue.ring = None
            self.queue_enabled[queue.index] = saved.enabled
            self.queue_vectors[queue.index] = saved.vector

    def save_device_state(self) -> dict[str, Any]:
        return self.virtio.save_state()["device"]

    def check_device_state(self, values: dict[str, Any]) -> None:
        self.virtio.check_state(values)

    def load_device_state(self, values: dict[str, Any]) -> None:
        self.virtio.load_state({"device": values})

    # -- the VMM connection -----------------------------------------------------------------

    def attach(self, nursery: Any) -> None:
        super().attach(nursery)
        self.queue_set.bind(nursery)
        if self.device_status & Status.DRIVER_OK:  # a client came back: carry on
            for queue in self.queue_set.queues:
                if self.queue_enabled[queue.index]:
                    self._start(queue, wait_for_memory=True)  # DMA_MAPs come next

    def detach(self) -> None:
        for queue in self.queue_set.queues:
            self.queue_set.stop(queue)
        super().detach()

    def close(self) -> None:
        for fd in self.kick_fds:
            os.close(fd)
        self.kick_fds = []
        self.virtio.close()
        super().close()
