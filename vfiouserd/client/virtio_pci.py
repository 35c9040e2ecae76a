"""A guest's virtio-pci driver, driven through the vfio-user client.

It does what Linux's virtio_pci (modern) does with a device: find the vendor
capabilities, reset, negotiate features, set up queues and interrupt vectors,
set DRIVER_OK; then queues are used like any other (``RequestQueue``).
Notifications go as posted REGION_WRITEs (as QEMU sends them) or, if asked,
through the ioeventfds of GET_REGION_IO_FDS (as KVM would write them).
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass

import trio

from vfiouserd.client.guest import DriverPackedRing, DriverRing, DriverSplitRing, GuestRam
from vfiouserd.client.vfio_user import VfioUserClient, eventfd
from vfiouserd.devices.virtio import Feature, Status, bit
from vfiouserd.protocol import vfio_user as vfu

VENDOR_CAP = 0x09
MSIX_CAP = 0x11
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5
NO_VECTOR = 0xFFFF


@dataclass
class Area:
    bar: int
    offset: int
    length: int


class VirtioPciQueue:
    def __init__(
        self,
        driver: VirtioPciDriver,
        index: int,
        ring: DriverRing,
        notify_offset: int,
        call_fd: int,
        intx: bool,
    ) -> None:
        self.driver = driver
        self.index = index
        self.ring = ring
        self.notify_offset = notify_offset
        self.call = call_fd
        self.intx = intx
        self.ioeventfd: int | None = None

    async def kick_async(self) -> None:
        if self.ioeventfd is not None:
            os.eventfd_write(self.ioeventfd, 1)
        else:
            notify = self.driver.areas[CFG_NOTIFY]
            await self.driver.client.region_write(
                notify.bar,
                notify.offset + self.notify_offset,
                struct.pack("<H", self.index),
                no_reply=True,
            )

    async def wait_call(self) -> None:
        await trio.lowlevel.wait_readable(self.call)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call)
        if self.intx:  # read ISR to acknowledge, then unmask the automasked line
            await self.driver.read_isr()
            await self.driver.client.set_irqs(
                vfu.PciIrq.INTX, vfu.IrqSetFlag.DATA_NONE | vfu.IrqSetFlag.ACTION_UNMASK, 0, 1
            )


class VirtioPciDriver:
    def __init__(self, client: VfioUserClient, ram: GuestRam) -> None:
        self.client = client
        self.ram = ram
        self.areas: dict[int, Area] = {}
        self.notify_multiplier = 0
        self.msix_vectors = 0
        self.features = 0
        self.queues: list[VirtioPciQueue] = []
        self.config_fd: int | None = None
        self._fds: list[int] = []
        self._irq_fds: list[int] = []
        self._msix = True

    # -- discovery -----------------------------------------------------------------

    async def probe(self) -> None:
        for cap_id, offset in await self.client.capabilities():
            if cap_id == MSIX_CAP:
                self.msix_vectors = (await self.client.config_read(offset + 2, 2) & 0x7FF) + 1
            if cap_id != VENDOR_CAP:
                continue
            cfg_type = await self.client.config_read(offset + 3, 1)
            bar = await self.client.config_read(offset + 4, 1)
            area = Area(
                bar,
                await self.client.config_read(offset + 8, 4),
                await self.client.config_read(offset + 12, 4),
            )
            self.areas.setdefault(cfg_type, area)  # the first of each type wins
            if cfg_type == CFG_NOTIFY:
                self.notify_multiplier = await self.client.config_read(offset + 16, 4)
        missing = {CFG_COMMON, CFG_NOTIFY, CFG_ISR} - set(self.areas)
        if missing:
            raise ValueError(f"virtio-pci capabilities {sorted(missing)} are missing")

    async def common_read(self, offset: int, size: int) -> int:
        area = self.areas[CFG_COMMON]
        return int.from_bytes(
            await self.client.region_read(area.bar, area.offset + offset, size), "little"
        )

    async def common_write(self, offset: int, size: int, value: int) -> None:
        area = self.areas[CFG_COMMON]
        await self.client.region_write(
            area.bar, area.offset + offset, value.to_bytes(size, "little")
        )

    async def status(self) -> int:
        return await self.common_read(0x14, 1)

    async def read_isr(self) -> int:
        area = self.areas[CFG_ISR]
        return (await self.client.region_read(area.bar, area.offset, 1))[0]

    async def read_config(self, offset: int, size: int) -> bytes:
        area = self.areas[CFG_DEVICE]
        return await self.client.region_read(area.bar, area.offset + offset, size)

    async def write_config(self, offset: int, data: bytes) -> None:
        area = self.areas[CFG_DEVICE]
        await self.client.region_write(area.bar, area.offset + offset, data)

    # -- bring-up ---------------------------------------------------------------------

    async def start(
        self,
        *,
        want: int = ~0,
        queue_size: int | None = None,
        queue_count: int | None = None,
        msix: bool = True,
        ioeventfds: bool = False,
    ) -> list[VirtioPciQueue]:
        """Reset, negotiate, set up the queues and interrupts, DRIVER_OK."""
        if not self.areas:
            await self.probe()
        command = await self.client.config_read(0x04, 2)
        await self.client.config_write(0x04, 2, command | 0x6)  # memory space, bus master
        await self.common_write(0x14, 1, 0)
        if await self.status() != 0:
            raise RuntimeError("device did not reset")
        await self.common_write(0x14, 1, Status.ACKNOWLEDGE)
        await self.common_write(0x14, 1, Status.ACKNOWLEDGE | Status.DRIVER)
        offered = 0
        for select in (0, 1):
            await self.common_write(0x00, 4, select)
            offered |= await self.common_read(0x04, 4) << (32 * select)
        self.features = offered & want
        for select in (0, 1):
            await self.common_write(0x08, 4, select)
            await self.common_write(0x0C, 4, self.features >> (32 * select) & 0xFFFFFFFF)
        status = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
        await self.common_write(0x14, 1, status)
        if not await self.status() & Status.FEATURES_OK:
            raise RuntimeError(f"device refused features {self.features:#x}")

        # Like Linux, which uses one per vCPU: at most queue_count.
        count = await self.common_read(0x12, 2)
        count = count if queue_count is None else min(count, queue_count)
        fds = [eventfd() for _ in range(count + 1)] if msix else [eventfd()]
        self._fds = list(fds)  # everything to close at the end
        self._irq_fds = fds
        self._msix = msix
        await self._install_interrupts()
        if msix:
            await self.common_write(0x10, 2, 0)  # config changes on vector 0
        self.config_fd = fds[0]

        io_fds: list[int] = []
        if ioeventfds:
            entries, io_fds = await self.client.region_io_fds(self.areas[CFG_NOTIFY].bar)
        for index in range(count):
            await self.common_write(0x16, 2, index)
            size = await self.common_read(0x18, 2)
            if queue_size is not None:
                size = min(size, queue_size)
                await self.common_write(0x18, 2, size)
            event_idx = bool(self.features & bit(Feature.RING_EVENT_IDX))
            ring: DriverRing
            if self.features & bit(Feature.RING_PACKED):
                ring = DriverPackedRing(self.ram, size, event_idx=event_idx)
            else:
                ring = DriverSplitRing(self.ram, size, event_idx=event_idx)
            for field, address in zip((0x20, 0x28, 0x30), ring.areas, strict=True):
                await self.common_write(field, 4, address & 0xFFFFFFFF)
                await self.common_write(field + 4, 4, address >> 32)
            if msix:
                await self.common_write(0x1A, 2, index + 1)
                if await self.common_read(0x1A, 2) == NO_VECTOR:
                    raise RuntimeError(f"queue {index}: vector refused")
            notify_off = await self.common_read(0x1E, 2)
            queue = VirtioPciQueue(
                self,
                index,
                ring,
                notify_off * self.notify_multiplier,
                fds[index + 1] if msix else fds[0],
                intx=not msix,
            )
            for entry in entries if ioeventfds else []:
                if entry.offset == self.areas[CFG_NOTIFY].offset + queue.notify_offset:
                    queue.ioeventfd = io_fds[entry.fd_index]
            await self.common_write(0x1C, 2, 1)
            self.queues.append(queue)
        self._fds += io_fds
        await self.common_write(0x14, 1, status | Status.DRIVER_OK)
        return self.queues

    async def _install_interrupts(self) -> None:
        """SET_IRQS with our eventfds: MSI-X (config, then a vector per
        queue) or the INTx line."""
        kind = vfu.PciIrq.MSIX if self._msix else vfu.PciIrq.INTX
        vectors = self._irq_fds if self._msix else self._irq_fds[:1]
        await self.client.set_irqs(
            kind,
            vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER,
            0,
            len(vectors),
            fds=vectors,
        )

    async def move_to(self, client: VfioUserClient) -> None:
        """Follow the device to another connection (a migration destination,
        whose device state came with the migration): interrupts are the VMM's
        to set up again; doorbells go to the new connection, as region writes."""
        self.client = client
        await self._install_interrupts()
        for queue in self.queues:
            queue.ioeventfd = None

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._fds = []
