"""virtio-blk and virtio-rng over vfio-user through the virtio-pci transport:
the project's client plays VMM and guest driver (no QEMU has vfio-user-pci)."""

from __future__ import annotations

import os
import struct

import pytest
import trio

import vfiouserd.client.virtio_pci as virtio_pci
from conftest import MiB, make_blk, vfio_served
from vfiouserd.client.blk import BlkClient, RngClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.devices.blk import CONFIG, BlkStatus, RequestType
from vfiouserd.devices.rng import VirtioRng
from vfiouserd.devices.virtio import Feature, Status, bit
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import Command
from vfiouserd.virtio_pci import VirtioPciDevice


@pytest.fixture
def ram():
    guest = GuestRam([(0, 32 * MiB), (0x1_0000_0000, 16 * MiB)])
    yield guest
    guest.close()


def no(*features: int) -> int:
    return ~sum(bit(f) for f in features)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("msix", [True, False], ids=["msix", "intx"])
async def test_blk_io_reaches_the_image(ram, image, packed, msix):
    device = VirtioPciDevice(make_blk(image, size=8 * MiB), packed_ring=packed)
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        want = ~0 if packed else no(Feature.RING_PACKED)
        (queue,) = await driver.start(want=want, msix=msix)
        blk = BlkClient(ram, queue, arena=2 * MiB)
        data = os.urandom(128 * 1024)
        await blk.write(16, data, data_pieces=3)
        assert await blk.read(16, len(data), indirect=True, data_pieces=4) == data
        assert (await blk.request(RequestType.FLUSH)).status == BlkStatus.OK
        capacity = struct.unpack("<Q", await driver.read_config(0, 8))[0]
        assert capacity == 8 * MiB // 512
        driver.close()
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(len(data)) == data


async def test_blk_multiqueue_with_ioeventfd_doorbells(ram, image):
    device = VirtioPciDevice(make_blk(image, size=8 * MiB, num_queues=4))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        queues = await driver.start(ioeventfds=True)
        assert len(queues) == 4 and all(q.ioeventfd is not None for q in queues)
        blks = [BlkClient(ram, q, arena=1 * MiB) for q in queues]

        async def worker(index: int) -> None:
            for round_ in range(5):
                data = bytes([index * 10 + round_]) * 4096
                await blks[index].write(index * 100 + round_ * 8, data)
                assert await blks[index].read(index * 100 + round_ * 8, 4096) == data

        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(worker, index)
        num_queues = CONFIG.unpack(await driver.read_config(0, CONFIG.size))[13]
        assert num_queues == 4
        driver.close()


async def test_more_doorbells_than_one_message_carries_fds_for(ram, image):
    """64 queues, a client taking 16 fds a message (QEMU's value): the first
    16 doorbells come as ioeventfds, the others stay trapped, all work."""
    device = VirtioPciDevice(make_blk(image, size=8 * MiB, num_queues=64))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        queues = await driver.start(ioeventfds=True, queue_size=16)
        assert len(queues) == 64
        assert [q.ioeventfd is not None for q in queues] == [True] * 16 + [False] * 48
        for index in (0, 15, 16, 63):
            blk = BlkClient(ram, queues[index], arena=256 * 1024)
            data = bytes([index]) * 4096
            await blk.write(index * 8, data)
            assert await blk.read(index * 8, 4096) == data
        driver.close()


async def test_rng_over_vfio_user(ram):
    device = VirtioPciDevice(VirtioRng())
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        rng = RngClient(ram, queue, arena=MiB)
        first, second = await rng.read(512), await rng.read(512, pieces=2)
        assert len(first) == len(second) == 512 and first != second
        assert 4 not in driver.areas  # rng has no device config, so no DEVICE capability
        driver.close()


async def test_driver_can_switch_off_the_write_cache(ram, image):
    blk_device = make_blk(image, size=MiB)
    device = VirtioPciDevice(blk_device)
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        await driver.start()
        await driver.write_config(32, b"\0")  # writeback = 0 (CONFIG_WCE)
        assert (await driver.read_config(32, 1)) == b"\0" and blk_device.writeback is False
        await driver.write_config(0, b"\xff" * 4)  # capacity is read-only: ignored
        assert struct.unpack("<I", await driver.read_config(0, 4))[0] == MiB // 512
        driver.close()


async def test_features_the_device_never_offered_are_refused(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        await driver.probe()
        await driver.common_write(0x14, 1, Status.ACKNOWLEDGE | Status.DRIVER)
        await driver.common_write(0x08, 4, 1)
        await driver.common_write(0x0C, 4, 1 << 30)  # bit 62: never offered
        await driver.common_write(0x14, 1, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert not await driver.status() & Status.FEATURES_OK


async def test_reset_by_status_zero_and_by_function_reset(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"1" * 512)
        driver.close()
        await client.reset()  # VFIO_USER_DEVICE_RESET: FLR semantics
        assert await driver.status() == 0
        assert await client.config_read(0x04, 2) == 0  # command register cleared
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_size=32)
        blk = BlkClient(ram, queue, arena=MiB)
        assert await blk.read(0, 512) == b"1" * 512
        driver.close()


async def test_broken_ring_sets_needs_reset_and_signals_config(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        queue.ring.add([(0x9000_0000, 16)], [(0x9000_0010, 1)], "hostile")
        await queue.kick_async()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(driver.config_fd)
        assert await driver.status() & Status.DEVICE_NEEDS_RESET
        driver.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("twin", [False, True], ids=["main-socket", "twin-socket"])
async def test_blk_with_guest_memory_shared_without_fds(ram, image, packed, twin):
    """No fd for guest RAM: every ring and buffer access becomes DMA_READ /
    DMA_WRITE messages (QEMU with non-shared RAM would do this)."""
    device = VirtioPciDevice(make_blk(image, size=8 * MiB), packed_ring=packed)
    async with vfio_served(device, ram=ram, twin_socket=twin) as client:
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        want = ~0 if packed else no(Feature.RING_PACKED)
        (queue,) = await driver.start(want=want, queue_size=16)
        blk = BlkClient(ram, queue, arena=MiB)
        data = os.urandom(3 * 4096)
        await blk.write(8, data, data_pieces=2, status_separate=False)
        assert await blk.read(8, len(data), indirect=True) == data
        result = await blk.request(RequestType.IN, 16 * 1024, in_size=512)  # beyond the disk
        assert result.status == BlkStatus.IOERR
        assert client.dma_requests > 10
        # An unmap waits for the ring walk in flight, then the queue has no
        # memory and waits; a new map lets it carry on.
        await client.dma_unmap(0x1_0000_0000, 16 * MiB)
        await client.dma_map(0x1_0000_0000, 16 * MiB)
        assert await blk.read(8, 4096) == data[:4096]
        driver.close()
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(len(data)) == data


async def test_writes_to_read_only_common_fields_change_nothing(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        for offset, size in [(0x1E, 2), (0x12, 2), (0x15, 1), (0x04, 4), (0x3E, 2)]:
            await driver.common_write(offset, size, 0xFFFF & ((1 << 8 * size) - 1))
        assert await driver.common_read(0x12, 2) == 1 and await driver.common_read(0x1E, 2) == 0
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"still" * 100 + bytes(12))
        assert (await blk.read(0, 512))[:5] == b"still"
        driver.close()


async def test_failing_dma_messages_break_the_queue_not_the_session(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_size=8)
        client.windows.clear()  # from now on the client refuses DMA (EFAULT)
        queue.ring.add([], [(0x1000, 1)], "refused")
        await queue.kick_async()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(driver.config_fd)
        assert await driver.status() & Status.DEVICE_NEEDS_RESET
        driver.close()


async def test_large_transfers_fit_the_servers_message_limit(ram, image):
    """The client takes 4 MiB per transfer, the server 1 MiB: a 2 MiB read on
    memory without fds is split by the smaller of the two."""
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 4 * MiB, "pgsizes": 4096}
    device = VirtioPciDevice(make_blk(image, size=8 * MiB))
    async with vfio_served(device, ram=ram, capabilities=caps) as client:
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_size=8)
        blk = BlkClient(ram, queue, arena=6 * MiB)
        data = os.urandom(2 * MiB)
        await blk.write(0, data)
        assert await blk.read(0, 2 * MiB) == data
        driver.close()


async def test_client_reconnects_and_the_running_device_carries_on(ram, image):
    """The spec keeps device state across a reconnection: the driver does not
    re-initialise, the client maps memory and installs vectors again."""
    from vfiouserd.client.vfio_user import eventfd
    from vfiouserd.protocol import vfio_user as vfu

    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(1, b"first" * 100 + bytes(12))
    async with vfio_served(device, ram=ram) as client:
        fds = [eventfd() for _ in range(2)]
        await client.set_irqs(
            vfu.PciIrq.MSIX,
            vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER,
            0,
            2,
            fds=fds,
        )
        await client.map_ram()
        driver.client = client
        queue.call = fds[1]
        assert await driver.status() & Status.DRIVER_OK
        assert not await driver.status() & Status.DEVICE_NEEDS_RESET
        assert (await blk.read(1, 512))[:5] == b"first"
        for fd in fds:
            os.close(fd)
    driver.close()


async def test_no_dma_while_bus_mastering_is_off(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        await client.config_write(0x04, 2, 0x2)  # memory space only
        blk = BlkClient(ram, queue, arena=MiB)
        header = blk.scratch(16)
        ram.write(header, struct.pack("<IIQ", RequestType.IN, 0, 0))
        status = blk.scratch(1)
        ram.write(status, b"\xee")
        queue.ring.add([(header, 16)], [(status, 1)], "held")
        await queue.kick_async()
        await trio.sleep(0.1)
        assert ram.read(status, 1) == b"\xee" and queue.ring.collect() == []
        await client.config_write(0x04, 2, 0x6)  # bus mastering back: served
        with trio.fail_after(5):
            while not queue.ring.collect():
                await queue.wait_call()
        assert ram.read(status, 1)[0] == BlkStatus.OK
        driver.close()


async def test_indirect_tables_are_capped(ram, image):
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(want=no(Feature.RING_PACKED))
        table = ram.alloc(16 * 1025, 16)
        ring = queue.ring
        struct.pack_into("<QIHH", ring.desc, 0, table, 16 * 1025, 4, 0)  # INDIRECT
        ring.avail[2] = 0
        ring.avail[1] = 1
        await queue.kick_async()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(driver.config_fd)
        assert await driver.status() & Status.DEVICE_NEEDS_RESET
        driver.close()


async def fd_less_blk(client, ram, want: int = ~0) -> tuple[VirtioPciDriver, BlkClient]:
    """virtio-blk on guest memory without fds: every ring access a DMA message."""
    await client.map_ram(with_fd=False)
    driver = VirtioPciDriver(client, ram)
    (queue,) = await driver.start(queue_count=1, want=want)
    blk = BlkClient(ram, queue, arena=MiB)
    await blk.write(0, b"w" * 4096)  # the DMA layout is asked for here
    return driver, blk


async def test_commands_are_served_while_a_ring_walk_waits_for_the_vmm(ram, image):
    """QEMU answers the daemon's DMA messages only when none of its threads
    waits for a reply from the daemon: a command must never wait for a walk
    that waits for the VMM. Here every DMA reply takes 0.3 s."""
    device = VirtioPciDevice(make_blk(image, size=8 * MiB))
    async with vfio_served(device, ram=ram) as client:
        driver, blk = await fd_less_blk(client, ram)
        client.dma_reply_delay = 0.3
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blk.write, 8, b"x" * 4096)  # a walk of several round trips
            await trio.sleep(0.1)
            with trio.fail_after(0.25):
                assert await driver.status() & Status.DRIVER_OK
                await client.dma_map(0x2_0000_0000, MiB)
        client.dma_reply_delay = 0
        assert await blk.read(8, 4096) == b"x" * 4096
        driver.close()


async def test_a_reset_while_a_walk_waits_for_the_vmm_ends_the_walk(ram, image):
    """The reset is served at once; the walk, back from its round trip,
    finds its queue reset and makes no further DMA; the driver starts over."""
    device = VirtioPciDevice(make_blk(image, size=8 * MiB))
    async with vfio_served(device, ram=ram) as client:
        driver, blk = await fd_less_blk(client, ram)
        client.dma_reply_delay = 0.3
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blk.write, 8, b"x" * 4096)
            await trio.sleep(0.1)
            with trio.fail_after(0.25):
                await driver.common_write(0x14, 1, 0)  # device reset
            after_reset = client.dma_requests
            await trio.sleep(1.0)
            assert client.dma_requests <= after_reset + 1  # the one in flight
            nursery.cancel_scope.cancel()  # that request is gone with the reset
        client.dma_reply_delay = 0
        driver.close()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(16, b"y" * 4096)
        assert await blk.read(16, 4096) == b"y" * 4096
        driver.close()


async def test_a_chain_that_meets_a_memory_transaction_is_tried_again(ram, image):
    """QEMU changes its memory map as a transaction: unmap, then map again.
    A walk that comes back in between finds a hole where its buffers were:
    it takes the chain back and serves it on the new layout, and the ring
    is not broken. (A split ring: the walk looks its buffers up right after
    reading the descriptor that the unmap came behind.)"""
    device = VirtioPciDevice(make_blk(image, size=8 * MiB))
    async with vfio_served(device, ram=ram) as client:
        driver, blk = await fd_less_blk(client, ram, want=no(Feature.RING_PACKED))
        unmapped = trio.Event()

        async def unmap_during_a_descriptor_read(message) -> None:
            request = vfu.DmaAccess.parse(message.payload)
            if (
                message.command == Command.DMA_READ
                and request.count == 16
                and not unmapped.is_set()
            ):
                await client.dma_unmap(0, 32 * MiB)  # the walk resumes after this
                unmapped.set()

        client.before_dma_reply = unmap_during_a_descriptor_read
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blk.write, 8, b"z" * 4096)
            await unmapped.wait()
            await trio.sleep(0.2)
            client.before_dma_reply = None
            await client.dma_map(0, 32 * MiB)  # the transaction completes
        assert await blk.read(8, 4096) == b"z" * 4096
        assert not device.queue_set.queues[0].broken
        driver.close()


async def test_a_driver_reset_while_a_ring_lies_outside_memory_breaks_nothing(
    ram, image, monkeypatch
):
    """Memory without fds, a queue whose avail ring is in a hole of guest
    memory (the walk on the worker thread finds it unmapped), new memory
    mapped and unmapped meanwhile (so the walk looks again), and driver
    resets among it all: the guest's to do, so it must never crash the
    session (the fuzzer saw an AssertionError there), and a driver that sets
    the device up properly afterwards is served."""
    from vfiouserd.client import guest, virtio_pci

    class RingInAHole(guest.DriverSplitRing):
        @property
        def areas(self) -> tuple[int, int, int]:
            return self.desc_address, 0x8000_0000, self.used_address

    device = VirtioPciDevice(make_blk(image, size=MiB))
    extra = GuestRam([(0x2_0000_0000, MiB)])
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram(with_fd=False)
        for attempt in range(12):
            driver = VirtioPciDriver(client, ram)
            with monkeypatch.context() as patch:
                patch.setattr(virtio_pci, "DriverSplitRing", RingInAHole)
                (queue,) = await driver.start(
                    want=no(Feature.RING_PACKED), queue_count=1, queue_size=16
                )
            for step in range(attempt % 4 + 1):
                await queue.kick_async()
                await client.dma_map(0x2_0000_0000, MiB)  # the walk looks again
                if step == attempt % 3:
                    await driver.common_write(0x14, 1, 0)  # the driver resets
                await client.dma_unmap(0x2_0000_0000, MiB)
            await driver.common_write(0x14, 1, 0)
            driver.close()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(want=no(Feature.RING_PACKED), queue_size=16)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"after" * 100 + bytes(12))
        assert (await blk.read(0, 512))[:5] == b"after"
        driver.close()
    extra.close()


async def test_memory_unmapped_while_a_ring_attaches_through_the_vmm(ram, image):
    """Attaching a packed ring over memory without fds writes to it (a round
    trip); the VMM unmapping all memory meanwhile left a ring built on the
    old layout that the next walk used on the event loop (found by our
    fuzzer as a crashed ring). The walk must see the new layout; the device
    serves a driver that starts over on memory mapped again."""
    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        unmapped = trio.Event()

        async def unmap_all_during_the_first_write(message) -> None:
            if message.command == Command.DMA_WRITE and not unmapped.is_set():
                unmapped.set()
                windows = list(client.windows)
                await client.dma_unmap(0, 0, flags=vfu.DMA_UNMAP_FLAG_ALL)
                client.windows = windows  # a VMM that still answers for it

        client.before_dma_reply = unmap_all_during_the_first_write
        (queue,) = await driver.start(queue_count=1, queue_size=16)  # packed: offered
        with trio.fail_after(5):
            await unmapped.wait()
        client.before_dma_reply = None
        for _ in range(3):
            await queue.kick_async()
            await trio.sleep(0.1)
        driver.close()
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)  # the driver resets and starts over
        (queue,) = await driver.start(queue_count=1, queue_size=16)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"remap" * 100 + bytes(12))
        assert (await blk.read(0, 512))[:5] == b"remap"
        driver.close()


@pytest.mark.parametrize("qemu_layout", [False, True], ids=["spec-layout", "qemu-layout"])
async def test_the_dma_layout_is_probed_once_when_queues_start_together(ram, image, qemu_layout):
    """Two walks reaching memory through the VMM at once used to send two
    probes, and the second answer overturned the first (our fuzzer: a QEMU-
    layout client then had its DMA replies misread, and I/O stopped)."""
    device = VirtioPciDevice(make_blk(image, size=MiB, num_queues=2))
    async with vfio_served(device, ram=ram, qemu_dma_layout=qemu_layout) as client:
        probes = 0

        async def count_probes(message) -> None:
            nonlocal probes
            fields = vfu.DmaAccess.parse(message.payload[: vfu.DmaAccess.sizeof()])
            if message.command == Command.DMA_READ and fields.count == vfu.DMA_LAYOUT_PROBE:
                probes += 1

        client.before_dma_reply = count_probes
        client.dma_reply_delay = 0.05  # both walks ask before the first answer
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        queues = await driver.start(queue_count=2, queue_size=16)
        await trio.sleep(0.2)  # the walks' first round trips
        client.dma_reply_delay = 0
        for index, queue in enumerate(queues):
            blk = BlkClient(ram, queue, arena=MiB // 2)
            await blk.write(index * 8, bytes([index + 1]) * 4096)
            assert await blk.read(index * 8, 4096) == bytes([index + 1]) * 4096
        assert probes == 1
        driver.close()


@pytest.mark.parametrize("qemu_layout", [False, True], ids=["spec-layout", "qemu-layout"])
async def test_a_ring_at_the_end_of_memory_does_not_decide_the_dma_layout(
    ram, image, qemu_layout, monkeypatch
):
    """The layout probe used to ask at the device's first access, wherever
    the guest pointed: a ring area in the last bytes of a region made the
    probe reach past it, a QEMU-layout client refused, the daemon took it
    for the spec's layout and misread every DMA reply after it; the driver
    starting over got no completion and nothing was logged (our fuzzer)."""
    end = 0x1_0000_0000 + 16 * MiB  # the end of the second region

    class RingAtTheEnd(virtio_pci.DriverPackedRing):
        @property
        def areas(self) -> tuple[int, int, int]:
            return self.desc_address, self.driver_address, end - 4

    device = VirtioPciDevice(make_blk(image, size=MiB))
    async with vfio_served(device, ram=ram, qemu_dma_layout=qemu_layout) as client:
        await client.map_ram(with_fd=False)
        with monkeypatch.context() as patch:
            patch.setattr(virtio_pci, "DriverPackedRing", RingAtTheEnd)
            driver = VirtioPciDriver(client, ram)
            (queue,) = await driver.start(queue_count=1, queue_size=16)
        await queue.kick_async()
        await trio.sleep(0.2)  # the device's first accesses
        driver.close()
        driver = VirtioPciDriver(client, ram)  # the driver resets and starts over
        (queue,) = await driver.start(want=no(Feature.RING_PACKED), queue_size=16)
        blk = BlkClient(ram, queue, arena=MiB)
        with trio.fail_after(10):
            await blk.write(0, b"again" * 100 + bytes(12))
            assert (await blk.read(0, 512))[:5] == b"again"
        driver.close()


@pytest.mark.parametrize("ioeventfds", [True, False], ids=["ioeventfd", "region-write"])
async def test_the_native_fast_path_serves_virtio_pci_rings_with_msix(
    ram, image, monkeypatch, ioeventfds
):
    """Over vfio-user too the split ring's common requests never reach
    Python: the loop polls the transport's notification eventfd (kicked by
    an ioeventfd or by REGION_WRITE) and signals the queue's MSI-X eventfd.
    With INTx, or while bus mastering is off, Python serves again."""
    virtio = make_blk(image, size=8 * MiB)
    python: list[int] = []
    original = virtio.handle

    def handle(queue: int, request: object) -> int:
        python.append(queue)
        return original(queue, request)  # type: ignore[arg-type]

    monkeypatch.setattr(virtio, "handle", handle)
    device = VirtioPciDevice(virtio)
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(want=no(Feature.RING_PACKED), ioeventfds=ioeventfds)
        blk = BlkClient(ram, queue, arena=2 * MiB)
        for number in range(100):
            data = bytes([number]) * 4096
            await blk.write(8 * number, data)
            assert await blk.read(8 * number, 4096) == data
        assert python == []
        assert virtio.native_handler(0) is not None
        assert device.queue_set.queues[0].stats.snapshot()["native"] is True
        # Bus mastering off and on again: nothing is served meanwhile, then
        # the fast path takes over again.
        await client.config_write(0x04, 2, 0x2)
        await client.config_write(0x04, 2, 0x6)
        await blk.write(0, b"z" * 4096)
        assert await blk.read(0, 4096) == b"z" * 4096
        assert python == []
        driver.close()


async def test_intx_keeps_virtio_pci_rings_in_python(ram, image, monkeypatch):
    virtio = make_blk(image, size=8 * MiB)
    python: list[int] = []
    original = virtio.handle
    monkeypatch.setattr(virtio, "handle", lambda q, r: (python.append(q), original(q, r))[1])
    device = VirtioPciDevice(virtio)
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(want=no(Feature.RING_PACKED), msix=False)
        blk = BlkClient(ram, queue, arena=2 * MiB)
        await blk.write(0, b"i" * 4096)
        assert await blk.read(0, 4096) == b"i" * 4096
        assert python == [0, 0]  # the ISR bit and the INTx level are Python's
        driver.close()
