"""The device's regions (config space and BARs): what GET_INFO,
GET_REGION_INFO and GET_REGION_IO_FDS say of them, and REGION_READ,
REGION_WRITE and REGION_WRITE_MULTI into them."""

from __future__ import annotations

import errno
import os

from vfiouserd import faults
from vfiouserd.devices.pci import Bar, DeviceAccessError, PciDevice
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import Message
from vfiouserd.trace import tracer
from vfiouserd.vfio_user.messages import Reply, RequestError, parse
from vfiouserd.vfio_user.negotiation import Terms

# Names for the trace and for fault rules (``region=bar0``).
REGION_NAMES = {r.value: r.name.lower() for r in vfu.PciRegion}


class Regions:
    def __init__(self, device: PciDevice, terms: Terms) -> None:
        self.device = device
        self.terms = terms

    def _region(self, index: int) -> tuple[int, Bar | None]:
        """(size, BAR) of a region; the config region has no BAR."""
        if index >= vfu.PCI_NUM_REGIONS:
            raise RequestError(errno.EINVAL, f"region {index} does not exist")
        if index == vfu.PciRegion.CONFIG:
            return self.device.config.size, None
        bar = self.device.bars.get(index) if index <= vfu.PciRegion.BAR5 else None
        return (bar.size if bar else 0), bar

    # -- information ----------------------------------------------------------------

    async def get_info(self, message: Message) -> Reply:
        request = parse(message, vfu.DeviceInfo, "GET_INFO")
        self.terms.check_argsz(request.argsz, vfu.DeviceInfo.sizeof(), "GET_INFO")
        return Reply(
            vfu.DeviceInfo.build(
                {
                    "argsz": vfu.DeviceInfo.sizeof(),
                    "flags": vfu.DeviceFlag.RESET | vfu.DeviceFlag.PCI,
                    "num_regions": vfu.PCI_NUM_REGIONS,
                    "num_irqs": vfu.PCI_NUM_IRQS,
                }
            )
        )

    async def get_region_info(self, message: Message) -> Reply:
        request = parse(message, vfu.RegionInfo, "GET_REGION_INFO")
        self.terms.check_argsz(request.argsz, vfu.RegionInfo.sizeof(), "GET_REGION_INFO")
        size, bar = self._region(request.index)
        flags = vfu.RegionFlag.READ | vfu.RegionFlag.WRITE if size else 0
        caps = b""
        fds: list[int] = []
        mmap_fd = bar.fd if bar is not None else None
        if bar is not None and mmap_fd is not None:
            flags |= vfu.RegionFlag.MMAP
            if bar.mmap_areas is not None:
                flags |= vfu.RegionFlag.CAPS
                caps = vfu.SparseMmapCap.build(
                    {
                        "header": {"id": vfu.REGION_CAP_SPARSE_MMAP, "version": 1, "next": 0},
                        "nr_areas": len(bar.mmap_areas),
                        "areas": [{"offset": o, "size": s} for o, s in bar.mmap_areas],
                    }
                )
        needed = vfu.RegionInfo.sizeof() + len(caps)
        fits = request.argsz >= needed
        if caps and not fits:  # CAPS only with the chain: QEMU checks cap_offset then
            flags &= ~int(vfu.RegionFlag.CAPS)
        if mmap_fd is not None and fits:  # MMAP is in the flags
            fds = [os.dup(mmap_fd)]
        info = vfu.RegionInfo.build(
            {
                "argsz": needed,
                "flags": flags,
                "index": request.index,
                "cap_offset": vfu.RegionInfo.sizeof() if caps and fits else 0,
                "size": size,
                "offset": 0,
            }
        )
        return Reply(info + (caps if fits else b""), fds)

    async def get_io_fds(self, message: Message) -> Reply:
        request = parse(message, vfu.RegionIoFds, "GET_REGION_IO_FDS")
        self.terms.check_argsz(request.argsz, vfu.RegionIoFds.sizeof(), "GET_REGION_IO_FDS")
        if request.flags or request.count:
            raise RequestError(errno.EINVAL, "GET_REGION_IO_FDS flags and count must be 0")
        size, bar = self._region(request.index)
        if bar is None or not size:
            raise RequestError(errno.EINVAL, f"region {request.index} has no I/O fds")
        # As many as one message may carry: the rest of the region stays
        # trapped (REGION_WRITE), which works the same, only slower.
        subregions = self.device.io_eventfds(request.index)[: self.terms.client.max_msg_fds]
        entries = b"".join(
            vfu.SubRegionIoFd.build(
                {
                    "offset": offset,
                    "size": length,
                    "fd_index": i,
                    "type": vfu.IoFdType.IOEVENTFD,
                    "flags": 0,
                    "datamatch": 0,
                }
            )
            for i, (offset, length, _) in enumerate(subregions)
        )
        needed = vfu.RegionIoFds.sizeof() + len(entries)
        fits = request.argsz >= needed
        header = vfu.RegionIoFds.build(
            {"argsz": needed, "flags": 0, "index": request.index, "count": len(subregions)}
        )
        if not fits:
            return Reply(header)
        return Reply(header + entries, [os.dup(fd) for _, _, fd in subregions])

    # -- access -----------------------------------------------------------------------

    def _check_access(self, index: int, offset: int, count: int) -> Bar | None:
        size, bar = self._region(index)
        if count > self.terms.config.max_data_xfer_size:
            raise RequestError(errno.EINVAL, f"access of {count} bytes exceeds max_data_xfer_size")
        if offset + count > size:
            raise RequestError(
                errno.EINVAL, f"access {offset:#x}+{count} beyond region {index} of {size:#x} bytes"
            )
        return bar

    async def _access(self, index: int, offset: int, data: bytes | None, count: int) -> bytes:
        self._check_access(index, offset, count)
        if count == 0:  # nothing to do (libvfio-user answers it the same way)
            return b""
        value = await self._device_access(index, offset, data, count)
        if data is None and faults.rules.has_rules:
            value = faults.rules.register_read(REGION_NAMES[index], offset, value)
        if tracer.wants("pci"):
            shown = value if data is None else data
            tracer.emit(
                "pci",
                "read" if data is None else "write",
                region=REGION_NAMES[index],
                offset=offset,
                size=count,
                value=int.from_bytes(shown[:8], "little") if count <= 8 else shown[:64].hex(),
            )
        return value

    async def _device_access(
        self, index: int, offset: int, data: bytes | None, count: int
    ) -> bytes:
        if index == vfu.PciRegion.CONFIG:
            if data is None:
                return await self.device.config_read(offset, count)
            await self.device.config_write(offset, data)
            return b""
        if data is None:
            value = await self.device.bar_read(index, offset, count)
            if len(value) != count:
                raise DeviceAccessError(errno.EIO, f"device returned {len(value)} bytes")
            return value
        await self.device.bar_write(index, offset, data)
        return b""

    async def read(self, message: Message) -> Reply:
        request = parse(message, vfu.RegionAccess, "REGION_READ")
        if len(message.payload) != vfu.RegionAccess.sizeof():
            raise RequestError(errno.EINVAL, "REGION_READ with data")
        data = await self._access(request.region, request.offset, None, request.count)
        return Reply(message.payload[: vfu.RegionAccess.sizeof()] + data)

    async def write(self, message: Message) -> Reply:
        request = parse(message, vfu.RegionAccess, "REGION_WRITE")
        data = message.payload[vfu.RegionAccess.sizeof() :]
        if len(data) != request.count:
            raise RequestError(
                errno.EINVAL, f"REGION_WRITE count {request.count} with {len(data)} bytes of data"
            )
        await self._access(request.region, request.offset, data, request.count)
        return Reply(message.payload[: vfu.RegionAccess.sizeof()])

    async def write_multi(self, message: Message) -> Reply:
        if not self.terms.client.write_multiple:
            raise RequestError(errno.EINVAL, "write_multiple was not negotiated")
        head = parse(message, vfu.WriteMultiHead, "REGION_WRITE_MULTI")
        entry_size = vfu.WriteMultiEntry.sizeof()
        if not 1 <= head.wr_cnt <= vfu.WRITE_MULTI_MAX or (
            len(message.payload) != 8 + head.wr_cnt * entry_size
        ):
            raise RequestError(
                errno.EINVAL, f"{head.wr_cnt} writes in {len(message.payload)} bytes"
            )
        entries = [
            vfu.WriteMultiEntry.parse(message.payload[8 + i * entry_size :])
            for i in range(head.wr_cnt)
        ]
        if any(not 1 <= e.count <= 8 for e in entries):
            raise RequestError(errno.EINVAL, "a coalesced write is not 1-8 bytes")
        for entry in entries:  # in order, as separate writes would be
            await self._access(entry.region, entry.offset, entry.data[: entry.count], entry.count)
        return Reply(vfu.WriteMultiHead.build({"wr_cnt": head.wr_cnt}))
