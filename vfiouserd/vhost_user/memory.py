"""Guest memory as the front end shares it: SET_MEM_TABLE, or one region
at a time (ADD_MEM_REG, REM_MEM_REG) with CONFIGURE_MEM_SLOTS."""

from __future__ import annotations

import struct

from construct import Container

from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemory, GuestMemoryError, MemoryRegion, RegionSpec
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import close_fds
from vfiouserd.protocol.vhost_user import Message
from vfiouserd.vhost_user.messages import RequestFailed, u64_reply
from vfiouserd.virtqueue import QueueSet

log = get_logger("vhost_user")

MAX_MEM_SLOTS = 509  # what libvhost-user and rust-vmm advertise; QEMU allows 512


class MemoryTable:
    def __init__(self, memory: GuestMemory, queue_set: QueueSet) -> None:
        self.memory = memory
        self.queue_set = queue_set  # told of every change: rings look again

    def set_mem_table(self, message: Message) -> None:
        (count,) = struct.unpack_from("=I", message.payload)
        if count > vu.MAX_TABLE_REGIONS:
            raise RequestFailed(f"{count} regions exceed {vu.MAX_TABLE_REGIONS}")
        exact = 8 + vu.MemoryRegion.sizeof() * count
        full = 8 + vu.MemoryRegion.sizeof() * vu.MAX_TABLE_REGIONS
        if len(message.payload) not in (exact, full):
            raise RequestFailed(f"memory table of {len(message.payload)} bytes for {count} regions")
        if len(message.fds) != count:
            raise RequestFailed(f"{len(message.fds)} fds for {count} regions")
        table = vu.MemoryTable.parse(message.payload[:exact])
        specs = [
            RegionSpec(
                r.guest_address, r.size, fd, user_address=r.user_address, mmap_offset=r.mmap_offset
            )
            for r, fd in zip(table.regions, message.fds, strict=True)
        ]
        try:
            self.memory.replace(specs)
        except (GuestMemoryError, OSError) as exc:
            raise RequestFailed(f"memory table refused: {exc}") from exc
        message.fds.clear()  # now owned by the mappings
        for region in self.memory.regions:
            self._log_region("memory.region", region)
        self.queue_set.memory_changed()

    @staticmethod
    def _log_region(event: str, region: MemoryRegion | Container) -> None:
        log.info(
            event,
            guest=f"{region.guest_address:#x}",
            size=region.size,
            user=f"{region.user_address:#x}",
            offset=region.mmap_offset,
        )

    def get_max_mem_slots(self, message: Message) -> bytes:
        return u64_reply(MAX_MEM_SLOTS)

    def add_mem_reg(self, message: Message) -> None:
        region = message.parse(vu.SingleMemoryRegion).region
        try:
            self.memory.add_region(
                RegionSpec(
                    region.guest_address,
                    region.size,
                    message.fds[0],
                    user_address=region.user_address,
                    mmap_offset=region.mmap_offset,
                )
            )
        except (GuestMemoryError, OSError) as exc:
            raise RequestFailed(f"region refused: {exc}") from exc
        message.fds.clear()
        self._log_region("memory.add", region)
        self.queue_set.memory_changed()

    def rem_mem_reg(self, message: Message) -> None:
        close_fds(message.fds)  # tolerated for old front ends, never used
        region = message.parse(vu.SingleMemoryRegion).region
        try:
            self.memory.remove(
                self.memory.find_exact(region.guest_address, region.size, region.user_address)
            )
        except GuestMemoryError as exc:
            raise RequestFailed(str(exc)) from exc
        log.info("memory.remove", guest=f"{region.guest_address:#x}", size=region.size)
        self.queue_set.memory_changed()
