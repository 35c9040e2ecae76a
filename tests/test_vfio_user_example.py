"""The example PCI device over vfio-user: registers, its DMA engine (with
client memory mapped through fds, or reached only through DMA_READ/DMA_WRITE
messages) and its interrupt, as a guest driver would use them."""

from __future__ import annotations

import math
import os
import struct
import zlib

import pytest
import trio

from conftest import MiB, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import eventfd
from vfiouserd.devices.example import ExampleDevice
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.vfio_user.negotiation import DMA_CHUNK_LIMIT

BAR = 0
SRC, DST = 0x10_0000, 0x1_0000_0000 + 0x2000


def reg(value: int) -> bytes:
    return struct.pack("<I", value)


async def read(client, offset: int) -> int:
    return struct.unpack("<I", await client.region_read(BAR, offset, 4))[0]


async def start_copy(client, src: int, dst: int, length: int) -> None:
    await client.region_write(BAR, 0x10, struct.pack("<Q", src))  # 8-byte access
    await client.region_write(BAR, 0x18, reg(dst & 0xFFFFFFFF))
    await client.region_write(BAR, 0x1C, reg(dst >> 32))
    await client.region_write(BAR, 0x20, reg(length))
    await client.region_write(BAR, 0x24, reg(1))


@pytest.fixture
def ram():
    guest = GuestRam([(0, 4 * MiB), (0x1_0000_0000, MiB)])
    yield guest
    guest.close()


async def enable_msi(client) -> int:
    await client.config_write(0x04, 2, 0x6)  # memory space + bus master
    fd = eventfd()
    await client.set_irqs(
        vfu.PciIrq.MSI, vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER, 0, 1, fds=[fd]
    )
    return fd


async def wait_irq(fd: int) -> None:
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(fd)
    assert os.eventfd_read(fd) == 1


async def test_registers():
    async with vfio_served(ExampleDevice()) as client:
        assert await read(client, 0x00) == 0x56460001
        await client.region_write(BAR, 0x04, reg(0x12345678))
        assert await read(client, 0x04) == 0xEDCBA987
        for n in (0, 5, 12, 33, 34, 4_000_000_000):
            await client.region_write(BAR, 0x08, reg(n))
            assert await read(client, 0x08) == (math.factorial(n) % 2**32 if n < 34 else 0)
        assert await read(client, 0x200) == 0  # unused registers read as zero
        vendor, device = struct.unpack("<HH", await client.region_read(vfu.PciRegion.CONFIG, 0, 4))
        assert (vendor, device) == (0x1234, 0x5646)


@pytest.mark.parametrize("mode", ["fd", "messages", "twin-socket", "qemu-layout"])
async def test_dma_engine_copies_and_raises_msi(ram, mode):
    options = {"twin_socket": mode == "twin-socket", "qemu_dma_layout": mode == "qemu-layout"}
    async with vfio_served(ExampleDevice(), ram=ram, **options) as client:
        await client.map_ram(with_fd=mode == "fd")
        fd = await enable_msi(client)
        data = os.urandom(3 * 4096 + 100)
        ram.write(SRC, data)
        await start_copy(client, SRC, DST, len(data))
        await wait_irq(fd)
        assert ram.read(DST, len(data)) == data
        assert await read(client, 0x28) == zlib.crc32(data)
        if mode == "fd":
            assert client.dma_requests == 0
        else:  # every byte went through DMA_READ/DMA_WRITE messages
            assert client.dma_requests >= 2
            assert client.twin is not None if mode == "twin-socket" else client.twin is None
        # Asked at the first DMA message: none with fds.
        layout = {"fd": None, "qemu-layout": True}.get(mode, False)
        assert client.session.dma.qemu_dma_layout is layout
        os.close(fd)


async def test_dma_in_chunks_of_the_clients_max_transfer(ram):
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 4096, "pgsizes": 4096}
    async with vfio_served(ExampleDevice(), ram=ram, capabilities=caps) as client:
        await client.map_ram(with_fd=False)
        fd = await enable_msi(client)
        data = os.urandom(10000)
        ram.write(SRC, data)
        await start_copy(client, SRC, DST, len(data))
        await wait_irq(fd)
        assert ram.read(DST, len(data)) == data
        # The layout probe, then 10000 bytes: 3 reads and 3 writes of <= 4 KiB.
        assert client.dma_requests == 1 + 3 + 3
        os.close(fd)


async def test_dma_in_chunks_qemu_receives_whole(ram):
    """QEMU 10.2 cuts a message short when its socket does not take it all
    at once: however large the client's max_data_xfer_size, DMA_READ and
    DMA_WRITE move at most DMA_CHUNK_LIMIT bytes each."""
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096}
    async with vfio_served(ExampleDevice(), ram=ram, capabilities=caps) as client:
        await client.map_ram(with_fd=False)
        fd = await enable_msi(client)
        size = 4 * DMA_CHUNK_LIMIT + 100
        data = os.urandom(size)
        ram.write(SRC, data)
        await start_copy(client, SRC, DST, size)
        await wait_irq(fd)
        assert ram.read(DST, size) == data
        assert client.dma_requests == 1 + 5 + 5  # the probe, then 5 reads and 5 writes
        os.close(fd)


async def test_dma_failures_are_reported_by_the_device(ram):
    async with vfio_served(ExampleDevice(), ram=ram) as client:
        await client.dma_map(0, 4 * MiB, fd=ram.regions[0].fd)
        await client.dma_map(
            0x1_0000_0000, MiB, fd=ram.regions[1].fd, flags=vfu.DmaFlag.READ
        )  # the device may only read here
        fd = await enable_msi(client)
        ram.write(SRC, b"x" * 64)
        for src, dst, length in [
            (0x9000_0000, DST, 64),  # source not mapped
            (SRC, DST, 64),  # destination read-only
            (SRC, 4 * MiB - 32, 64),  # runs off the end
            (SRC, 0, (1 << 20) + 1),
        ]:  # longer than the engine allows
            await start_copy(client, src, dst, length)
            await wait_irq(fd)
            assert await read(client, 0x28) == 0xFFFFFFFF
        assert ram.read(DST, 64) == bytes(64)
        # With bus mastering off the device may not touch memory at all.
        await client.config_write(0x04, 2, 0x2)
        await start_copy(client, SRC, 0x20_0000, 64)
        await wait_irq(fd)
        assert await read(client, 0x28) == 0xFFFFFFFF and ram.read(0x20_0000, 64) == bytes(64)
        os.close(fd)


async def test_unmap_of_mapped_memory_waits_for_dma_in_flight(ram):
    """The spec: no reference to a mapped region may outlive the DMA_UNMAP
    reply. One sent right behind DMA_START is answered once the copy is done."""
    async with vfio_served(ExampleDevice(), ram=ram) as client:
        await client.map_ram(with_fd=True)
        fd = await enable_msi(client)
        data = os.urandom(1 << 20)
        ram.write(SRC, data)
        await client.region_write(BAR, 0x10, struct.pack("<Q", SRC))
        await client.region_write(BAR, 0x18, struct.pack("<Q", DST - 0x2000))
        await client.region_write(BAR, 0x20, reg(len(data)))
        await client.region_write(BAR, 0x24, reg(1), no_reply=True)  # posted, like QEMU
        await client.dma_unmap(0x1_0000_0000, MiB)
        assert ram.read(DST - 0x2000, len(data)) == data  # the copy completed before the unmap
        await wait_irq(fd)
        assert await read(client, 0x28) == zlib.crc32(data)
        os.close(fd)


async def test_commands_are_answered_while_dma_through_messages_is_in_flight(ram):
    """QEMU serves our DMA_READ/DMA_WRITE only when none of its threads waits
    for a reply from us: a DMA_START must not hold up the next command. An
    unmap answered meanwhile ends the copy cleanly: nothing reaches the
    unmapped range afterwards, and the interrupt still says it is over."""
    async with vfio_served(ExampleDevice(), ram=ram) as client:
        await client.map_ram(with_fd=False)
        fd = await enable_msi(client)
        data = os.urandom(64 * 1024)
        ram.write(SRC, data)
        await client.region_write(BAR, 0x10, struct.pack("<Q", SRC))
        await client.region_write(BAR, 0x18, struct.pack("<Q", DST))
        await client.region_write(BAR, 0x20, reg(len(data)))
        client.dma_reply_delay = 0.5  # a slow VMM: the copy takes a second
        await client.region_write(BAR, 0x24, reg(1), no_reply=True)
        with trio.fail_after(0.4):  # long before the copy could be done
            assert await read(client, 0x00) == 0x56460001
            await client.dma_unmap(0x1_0000_0000, MiB)
        after_unmap = ram.read(DST, len(data))
        await wait_irq(fd)
        assert ram.read(DST, len(data)) == after_unmap == bytes(len(data))
        assert await read(client, 0x28) == 0xFFFFFFFF  # the copy failed: its target went
        os.close(fd)


async def test_intx_when_no_msi_is_set_up(ram):
    async with vfio_served(ExampleDevice(), ram=ram) as client:
        await client.map_ram()
        await client.config_write(0x04, 2, 0x6)
        fd = eventfd()
        await client.set_irqs(
            vfu.PciIrq.INTX,
            vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER,
            0,
            1,
            fds=[fd],
        )
        ram.write(SRC, b"intx")
        await start_copy(client, SRC, DST, 4)
        await wait_irq(fd)
        assert await client.config_read(0x06, 2) & 0x08
        await client.region_write(BAR, 0x2C, reg(0))  # acknowledge
        assert not await client.config_read(0x06, 2) & 0x08
        os.close(fd)
