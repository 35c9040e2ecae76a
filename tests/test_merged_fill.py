"""Fills that span several waiting buffers (``merged_queues``), as virtio-net's
mergeable receive buffers need: the device sees the waiting buffers as one,
the ring completes those it wrote into, in order, together."""

from __future__ import annotations

import struct
from collections import deque

import pytest
import trio

from conftest import MiB, served, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness
from vfiouserd.devices.virtio import DeviceId, Feature, Request, VirtioDevice, bit
from vfiouserd.virtio_pci import VirtioPciDevice

COUNT = struct.Struct("<H")  # as virtio-net's num_buffers: how many buffers the frame took


class Frames(VirtioDevice):
    """Frames for the driver, each led by the number of buffers it took."""

    name = "frames"
    description = "test device: frames over merged receive buffers"
    device_id = DeviceId.NET
    host_fed_queues = frozenset({0})
    merged_queues = frozenset({0})

    def __init__(self) -> None:
        super().__init__(num_queues=1)
        self.frames: deque[bytes] = deque()

    def has_data(self, queue: int) -> bool:
        return bool(self.frames)

    def fill(self, queue: int, request: Request) -> int | None:
        size = COUNT.size + len(self.frames[0])
        if request.writable_size < size:
            return None  # not enough buffers waiting: all stay
        request.write(COUNT.pack(request.buffers_used(size)) + self.frames.popleft())
        return size


def test_a_frame_fills_as_many_buffers_as_it_needs():
    device = Frames()
    harness = DeviceHarness(device)
    frame = bytes(range(256)) * 39  # 9,984 bytes
    device.frames.append(frame)
    done = harness.take_merged(0, 4096, 4096, 4096, 4096)
    assert done is not None
    assert [c.written for c in done] == [4096, 4096, 1794]
    whole = b"".join(c.buffers[0][: c.written] for c in done)
    assert COUNT.unpack_from(whole) == (3,) and whole[COUNT.size :] == frame


def test_too_few_buffers_keep_them_all_and_the_frame():
    device = Frames()
    harness = DeviceHarness(device)
    device.frames.append(b"x" * 9000)
    assert harness.take_merged(0, 4096, 4096) is None
    assert len(device.frames) == 1
    done = harness.take_merged(0, 4096, 4096, 1024)
    assert done is not None and [c.written for c in done] == [4096, 4096, 810]


def test_a_small_frame_takes_one_buffer():
    device = Frames()
    harness = DeviceHarness(device)
    device.frames.append(b"tiny")
    done = harness.take_merged(0, 1024, 1024)
    assert done is not None and [c.written for c in done] == [6]
    assert done[0].buffers[0][:6] == COUNT.pack(1) + b"tiny"


SIZES = [100, 3000, 1022, 1023, 2046, 5000, 1, 7000]  # 1 to 7 buffers of 1 KiB


class Receiver:
    """The driver's side: 8 buffers of 1 KiB posted again as they come back,
    frames put together from their num_buffers count."""

    def __init__(self, ram: GuestRam, queue) -> None:
        self.ram, self.queue = ram, queue
        self.buffers = [ram.alloc(1024, 64) for _ in range(8)]
        self.pending: list[bytes] = []  # buffers of a frame not yet whole
        self.frames: list[bytes] = []

    async def post(self, addresses: list[int]) -> None:
        for address in addresses:
            self.queue.ring.add([], [(address, 1024)], address)
        await self.queue.kick_async()

    async def receive(self, count: int) -> list[bytes]:
        await self.post(self.buffers)
        with trio.fail_after(10):
            while len(self.frames) < count:
                done = self.queue.ring.collect()
                if not done:
                    await trio.sleep(0.002)
                    continue
                for completion in done:
                    data = self.ram.read(completion.token, completion.written)
                    self.pending.append(data)
                    (needed,) = COUNT.unpack_from(self.pending[0])
                    if len(self.pending) == needed:
                        self.frames.append(b"".join(self.pending)[COUNT.size :])
                        self.pending = []
                await self.post([c.token for c in done])
        return self.frames


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_frames_over_merged_buffers_through_vhost_user(packed):
    device = Frames()
    frames = [bytes([n]) * size for n, size in enumerate(SIZES)]
    ram = GuestRam([(0, 4 * MiB)])
    try:
        async with served(device) as frontend:
            await frontend.negotiate(want_features=None if packed else ~bit(Feature.RING_PACKED))
            await frontend.set_features()
            assert bool(frontend.features & bit(Feature.RING_PACKED)) == packed
            await frontend.share_memory(ram)
            queue = await frontend.start_queue(0, frontend.make_ring(ram, 16))
            receiver = Receiver(ram, queue)
            device.frames.extend(frames)
            device.data_ready(0)
            assert await receiver.receive(len(frames)) == frames
            assert receiver.pending == []
    finally:
        ram.close()


@pytest.mark.parametrize("with_fd", [True, False], ids=["mapped", "through-dma"])
async def test_frames_over_merged_buffers_through_vfio_user(with_fd):
    device = Frames()
    frames = [bytes([n]) * size for n, size in enumerate(SIZES)]
    ram = GuestRam([(0, 4 * MiB)])
    try:
        async with vfio_served(VirtioPciDevice(device), ram=ram) as client:
            await client.map_ram(with_fd=with_fd)
            pci = VirtioPciDriver(client, ram)
            (queue,) = await pci.start(queue_count=1, queue_size=16)
            receiver = Receiver(ram, queue)
            device.frames.extend(frames)
            device.data_ready(0)
            assert await receiver.receive(len(frames)) == frames
            pci.close()
    finally:
        ram.close()
