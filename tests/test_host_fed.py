"""Buffers that wait for the host: a device keeps a receive queue's buffers
and fills them when it has something (devices/virtio.py, host_fed_queues).
A loopback device plays console: what the driver sends on queue 1, and what
the host injects, comes back on queue 0."""

from __future__ import annotations

import socket
from collections import deque

import pytest
import trio

from conftest import MiB, served, vfio_served
from vfiouserd.client.guest import DriverRing, GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness, HarnessError
from vfiouserd.devices.virtio import DeviceId, Feature, Request, VirtioDevice, bit
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.virtio_pci import VirtioPciDevice

RX, TX = 0, 1


class Loopback(VirtioDevice):
    name = "loopback"
    description = "test device: what comes in goes out on the receive queue"
    device_id = DeviceId.CONSOLE
    vhost_user_type = "console"
    max_queues = 2
    host_fed_queues = frozenset({RX})

    def __init__(self, host: socket.socket | None = None) -> None:
        super().__init__(num_queues=2)
        self.pending: deque[bytes] = deque()
        self.host = host  # bytes from it are injected by run()
        self.runs = 0
        self.fills = 0

    def inject(self, data: bytes) -> None:
        self.pending.append(data)
        self.data_ready(RX)

    def handle(self, queue: int, request: Request) -> int:
        assert queue == TX
        self.inject(request.read(request.readable_size))
        return 0

    def has_data(self, queue: int) -> bool:
        return bool(self.pending)

    def fill(self, queue: int, request: Request) -> int | None:
        data = self.pending[0]
        taken = request.write(data)
        if taken < len(data):
            self.pending[0] = data[taken:]
        else:
            self.pending.popleft()
        self.fills += 1
        return taken

    def reset(self) -> None:
        super().reset()
        self.pending.clear()

    async def run(self) -> None:
        self.runs += 1
        if self.host is None:
            return
        sock = trio.socket.from_stdlib_socket(self.host)
        while data := await sock.recv(4096):
            self.inject(data)


class Driver:
    """Receive buffers posted, completions collected, on one ring."""

    def __init__(self, ram: GuestRam, ring: DriverRing, kick) -> None:
        self.ram, self.ring, self.kick = ram, ring, kick
        self.done: list[tuple[int, bytes]] = []  # (buffer address, data), in completion order

    async def post(self, *sizes: int) -> list[int]:
        addresses = []
        for size in sizes:
            address = self.ram.alloc(size, 64)
            self.ram.write(address, b"\xee" * size)
            self.ring.add([], [(address, size)], address)
            addresses.append(address)
        await self.kick()
        return addresses

    def collect(self) -> list[tuple[int, bytes]]:
        for completion in self.ring.collect():
            self.done.append(
                (completion.token, self.ram.read(completion.token, completion.written))
            )
        return self.done

    async def received(self, count: int, timeout: float = 5) -> list[tuple[int, bytes]]:
        with trio.fail_after(timeout):
            while len(self.collect()) < count:
                await trio.sleep(0.005)
        return self.done


async def vhost_user_rings(frontend, ram, *, packed=False, bases=(None, None)):
    drop = 0 if packed else bit(Feature.RING_PACKED)
    await frontend.negotiate(want_features=~drop)
    await frontend.set_features()
    await frontend.share_memory(ram)
    handles = []
    for index in (RX, TX):
        ring = frontend.make_ring(ram, 16)
        handles.append(await frontend.start_queue(index, ring, base=bases[index]))
    return handles


@pytest.fixture
def ram():
    guest = GuestRam([(0, 8 * MiB)])
    yield guest
    guest.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_buffers_wait_for_the_host_and_fill_in_order(ram, packed):
    device = Loopback()
    async with served(device) as frontend:
        rx, _ = await vhost_user_rings(frontend, ram, packed=packed)
        driver = Driver(ram, rx.ring, rx.kick_async)
        first, second = await driver.post(8, 8)
        await trio.sleep(0.1)
        assert driver.collect() == []  # nothing to say: the buffers wait
        device.inject(b"hello")
        assert await driver.received(1) == [(first, b"hello")]
        device.inject(b"0123456789ABCDEF")  # fills the second, the rest waits
        assert (await driver.received(2))[1] == (second, b"01234567")
        (third,) = await driver.post(64)
        assert (await driver.received(3))[2] == (third, b"89ABCDEF")


async def test_what_the_driver_sends_comes_back(ram):
    async with served(Loopback()) as frontend:
        rx, tx = await vhost_user_rings(frontend, ram)
        driver = Driver(ram, rx.ring, rx.kick_async)
        await driver.post(64)
        message = ram.alloc(4, 64)
        ram.write(message, b"ping")
        tx.ring.add([(message, 4)], [], "ping")
        await tx.kick_async()
        assert [data for _, data in await driver.received(1)] == [b"ping"]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_a_stopped_ring_gives_its_waiting_buffers_back(ram, packed):
    """GET_VRING_BASE counts the buffers still waiting as not taken: the
    ring resumed from that base offers them again, and data that comes then
    fills them, each once (none lost, none completed twice)."""
    device = Loopback()
    async with served(device) as frontend:
        rx, _ = await vhost_user_rings(frontend, ram, packed=packed)
        driver = Driver(ram, rx.ring, rx.kick_async)
        device.inject(b"early")
        addresses = await driver.post(16, 16, 16)
        await driver.received(1)  # the first buffer took what was there
        base = await frontend.stop_queue(RX)
        expected = 1 | 1 << 15 | 1 << 16 | 1 << 31 if packed else 1
        assert base == expected  # two buffers given back
        await frontend.start_queue(RX, rx.ring, base=base)
        device.inject(b"late")
        device.inject(b"later")
        done = await driver.received(3)
        assert done == [(addresses[0], b"early"), (addresses[1], b"late"), (addresses[2], b"later")]
        await trio.sleep(0.1)
        assert len(driver.collect()) == 3 and device.fills == 3


async def test_a_reset_drops_waiting_buffers_and_the_devices_task(ram):
    host, theirs = socket.socketpair()
    device = Loopback(theirs)
    async with served(device) as frontend:
        rx, _ = await vhost_user_rings(frontend, ram)
        driver = Driver(ram, rx.ring, rx.kick_async)
        await driver.post(32, 32)
        host.send(b"from the host")
        assert [data for _, data in await driver.received(1)] == [b"from the host"]
        assert device.runs == 1
        await frontend.call(R.RESET_DEVICE)
        await trio.sleep(0.05)
        host.send(b"nobody listens")  # the task is gone: nothing reads it
        await trio.sleep(0.1)
        assert not device.pending and len(driver.collect()) == 1
    host.close()
    theirs.close()


@pytest.mark.parametrize("with_fd", [True, False], ids=["mapped", "through-dma"])
async def test_over_vfio_user(ram, with_fd):
    """Through the virtio-pci transport, on memory the daemon maps and on
    memory it reaches only through the client (a fill on a worker thread)."""
    device = Loopback()
    async with vfio_served(VirtioPciDevice(device), ram=ram) as client:
        await client.map_ram(with_fd=with_fd)
        pci = VirtioPciDriver(client, ram)
        rx, tx = await pci.start(queue_count=2, queue_size=16)
        driver = Driver(ram, rx.ring, rx.kick_async)
        first, _ = await driver.post(32, 32)
        device.inject(b"over vfio-user")
        assert await driver.received(1) == [(first, b"over vfio-user")]
        message = ram.alloc(5, 64)
        ram.write(message, b"again")
        tx.ring.add([(message, 5)], [], "again")
        await tx.kick_async()
        assert (await driver.received(2))[1][1] == b"again"
        pci.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_waiting_buffers_survive_a_back_end_that_goes_away(ram, packed):
    """With an inflight region (QEMU's reconnect), the buffers a back end
    held are in flight there: the next back end takes them back, oldest
    first, and fills them; none is lost or filled twice."""
    first = Loopback()
    async with served(first) as frontend:
        drop = 0 if packed else bit(Feature.RING_PACKED)
        await frontend.negotiate(want_features=~drop)
        await frontend.set_features()
        region = await frontend.get_inflight(2, 16)
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, 16)
        start_base = ring.base()
        rx = await frontend.start_queue(RX, ring)
        driver = Driver(ram, ring, rx.kick_async)
        addresses = await driver.post(16, 16, 16)
        first.inject(b"one")
        await driver.received(1)
    # The front end reconnects to a new back end, the region kept; the base
    # is what QEMU sends then (the used index, or a packed ring's start).
    second = Loopback()
    async with served(second) as frontend:
        await frontend.negotiate(want_features=~drop)
        await frontend.set_features()
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        base = start_base if packed else ring.used16[1]
        rx = await frontend.start_queue(RX, ring, base=base)
        second.inject(b"two")
        second.inject(b"three")
        done = await driver.received(3)
        await trio.sleep(0.1)
        assert driver.collect() == done
        assert done == [(addresses[0], b"one"), (addresses[1], b"two"), (addresses[2], b"three")]
    region.close()


async def test_a_migration_gives_waiting_buffers_back(ram):
    """vfio-user: the transport state of a stopped device counts waiting
    buffers as not taken, and the device resumed from it fills them."""
    device = Loopback()
    pci_device = VirtioPciDevice(device)
    async with vfio_served(pci_device, ram=ram) as client:
        await client.map_ram()
        pci = VirtioPciDriver(client, ram)
        split = ~bit(Feature.RING_PACKED)
        rx, _ = await pci.start(want=split, queue_count=2, queue_size=16)
        driver = Driver(ram, rx.ring, rx.kick_async)
        addresses = await driver.post(16, 16, 16)
        device.inject(b"before")
        await driver.received(1)
        assert pci_device.save_transport_state()["virtio-pci"]["queues"][RX]["base"] == 1
        pci_device.quiesce()  # what MIG_DEVICE_STATE STOP does
        assert pci_device.save_transport_state()["virtio-pci"]["queues"][RX]["base"] == 1
        pci_device.resume()
        device.inject(b"after")
        device.inject(b"again")
        done = await driver.received(3)
        assert done == [
            (addresses[0], b"before"),
            (addresses[1], b"after"),
            (addresses[2], b"again"),
        ]
        pci.close()


def test_the_harness_offers_host_fed_buffers():
    harness = DeviceHarness(Loopback())
    assert harness.take(RX, 8) is None  # nothing from the host yet
    harness.device.pending.append(b"0123456789")
    assert harness.take(RX, 4, 4).data == b"01234567"
    assert harness.take(RX, 8).data == b"89"
    with pytest.raises(HarnessError, match="host-fed"):
        harness.request(RX, writable=[8])


async def test_a_device_keeps_no_session_that_ended(ram):
    """The device tells only the serving session's rings about host data;
    sessions that ended are not kept alive through it (our fuzzer: the
    daemon grew by some 40 KiB per vhost-user session)."""
    import gc
    import weakref

    from vfiouserd.vhost_user.backend import VhostUserBackend

    device = Loopback()
    ended = []
    for _ in range(3):
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = VhostUserBackend(device, theirs)
        ended.append(weakref.ref(backend.queue_set))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.serve)
            await trio.sleep(0.01)
            ours.close()
        del backend, nursery
    gc.collect()
    assert [ref() is None for ref in ended] == [True, True, False]  # the last one's sink stays
