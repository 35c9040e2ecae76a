"""The vfio-user-nvme back end of bench/blk.py: the controller driven as a
guest's nvme driver drives it through QEMU's vfio-user-pci.

The project's NVMe driver (vfiouserd/client/nvme.py) brings the controller
up over the project's vfio-user client: guest RAM mapped with its fd, bus
mastering, an eventfd per MSI-X vector, enable, Identify, one I/O queue
pair per queue on its own vector, and shadow doorbells (Doorbell Buffer
Config) when the controller offers them (Identify Controller OACS bit 8)
and the caller wants them. Then nvme_driver.c takes each queue pair on its
own thread: commands in flight, completions by phase tag, the eventfd when
nothing is complete, doorbells as posted REGION_WRITEs written on the
vfio-user socket itself.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from common import compile_driver, ram_base

import vfiouserd.devices.nvme.formats as nvme
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.nvme import DriverQueue, NvmeDriver
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.devices.nvme.formats import AdminOpcode

NVME = "vfio-user-nvme"
ENTRIES = 1024  # per SQ and CQ, as Linux's nvme driver (io_queue_depth): a doorbell at each wrap
NSID = 1
OACS_DOORBELL_BUFFER_CONFIG = 1 << 8


def load_driver() -> ModuleType:
    """nvme_driver.c, compiled into .cache/bench once."""
    return compile_driver(
        "_bench_nvme_driver",
        "nvme_driver.c",
        """
        struct nvme_args {
            uint8_t *ram;
            uint64_t ram_gpa, sq_gpa, cq_gpa;
            uint32_t entries;
            uint16_t qid;
            uint32_t nsid;
            int sock_fd, irq_fd, shadow;
            uint64_t shadow_gpa, eventidx_gpa, slots_gpa;
            uint32_t slot_bytes;
            uint64_t capacity_sectors;
            uint32_t block_size, depth;
            uint64_t duration_ns, seed;
            int write, sequential;
            uint64_t next_block;
            int verify;
            uint64_t *slot_lba, *latencies;
            uint64_t max_latencies, completed, errors, bad_data, elapsed_ns;
            uint64_t doorbells, doorbells_skipped, interrupts;
        };
        int run_nvme(struct nvme_args *a);
        int nvme_need_event(uint16_t event, uint16_t new_value, uint16_t old);
        uint64_t nvme_pattern(uint64_t offset);
    """,
    )


@dataclass
class Controller:
    """What the C loops need of a controller brought up."""

    sock_fd: int  # the vfio-user socket
    queues: list[DriverQueue]  # I/O queue pairs, QID 1 up
    irq_fds: list[int]  # each queue's MSI-X eventfd
    offers_shadow: bool
    shadow_pages: tuple[int, int] | None  # (shadow doorbells, EventIdx) when configured


@asynccontextmanager
async def attach(
    sock: str, ram: GuestRam, queues: int, *, shadow: bool = True
) -> AsyncIterator[Controller]:
    async with VfioUserClient.connect(sock, ram=ram) as client:
        await client.map_ram()
        driver = NvmeDriver(client, ram, vectors=queues + 1)
        ram.alloc(nvme.PAGE, nvme.PAGE)  # the controller takes address 0 for "not set"
        try:
            await driver.setup_pci()
            await driver.enable()
            if (await driver.cap()) >> 32 & 0xF:
                raise RuntimeError(f"{NVME}: CAP.DSTRD is not 0, the C driver assumes it")
            status, identity = await driver.identify(1)
            if status:
                raise RuntimeError(f"{NVME}: Identify Controller failed with status {status:#x}")
            (oacs,) = struct.unpack_from("<H", identity, 0x100)
            offers_shadow = bool(oacs & OACS_DOORBELL_BUFFER_CONFIG)
            await driver.create_io_queues(queues, ENTRIES)
            pages = None
            if shadow and offers_shadow:
                # After the I/O queues, as Linux does; fresh pages: every value 0,
                # as the fresh queues' tails and heads are.
                pages = driver.alloc_pages(1), driver.alloc_pages(1)
                done = await driver.admin(
                    nvme.command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=pages[0], prp2=pages[1])
                )
                if done.status:
                    raise RuntimeError(f"{NVME}: Doorbell Buffer Config failed: {done.status:#x}")
            yield Controller(
                client.sock.fileno(),
                [driver.queues[qid] for qid in range(1, queues + 1)],
                driver.irq_fds[1 : queues + 1],
                offers_shadow,
                pages,
            )
            # As a VMM does when its guest goes: nothing of this RAM stays in use.
            await client.reset()
        finally:
            driver.close()


def queue_args(driver: ModuleType, ram: GuestRam, controller: Controller, index: int) -> Any:
    """nvme_driver.c's arguments for one queue pair (the workload's fields:
    common.request_args)."""
    queue = controller.queues[index]
    args = driver.ffi.new("struct nvme_args *")
    args.ram = driver.ffi.cast("uint8_t *", ram_base(ram))
    args.ram_gpa = 0
    args.sq_gpa, args.cq_gpa = queue.sq_base, queue.cq_base
    args.entries = queue.size
    args.qid = queue.qid
    args.nsid = NSID
    args.sock_fd = controller.sock_fd
    args.irq_fd = controller.irq_fds[index]
    if controller.shadow_pages is not None:
        args.shadow = 1
        args.shadow_gpa, args.eventidx_gpa = controller.shadow_pages
    return args
