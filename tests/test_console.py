"""virtio-console: ports on host sockets, control messages, backpressure both ways."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import struct

import pytest
import trio

from conftest import MiB, served, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness
from vfiouserd.devices.console import (
    BUFFERED,
    CONFIG,
    CONTROL,
    CONTROL_RX,
    CONTROL_TX,
    F_MULTIPORT,
    F_SIZE,
    Event,
    VirtioConsole,
    receive_queue,
    transmit_queue,
)
from vfiouserd.devices.virtio import ConfigWriteError, Feature, bit
from vfiouserd.state import StateError
from vfiouserd.virtio_pci import VirtioPciDevice


def console_device(
    tmp_path, *, console: bool = True, ports: tuple[str, ...] = (), size: str | None = None
) -> VirtioConsole:
    args = argparse.Namespace(
        console=str(tmp_path / "console.sock") if console else None,
        port=[f"{name}={tmp_path / name}.sock" for name in ports],
        size=size,
    )
    return VirtioConsole.from_args(args)


def control(harness: DeviceHarness[VirtioConsole], port: int, event: int, value: int = 1) -> None:
    harness.request(CONTROL_TX, [CONTROL.pack(port, event, value)])


def told(harness: DeviceHarness[VirtioConsole]) -> list[tuple[int, int, int, bytes]]:
    """Every control message waiting for the driver: (port, event, value, payload)."""
    messages = []
    while (done := harness.take(CONTROL_RX, 4096)) is not None:
        messages.append((*CONTROL.unpack_from(done.data), done.data[CONTROL.size :]))
    return messages


def test_a_console_alone_is_one_port_without_control_queues(tmp_path):
    device = console_device(tmp_path, size="100x40")
    try:
        assert device.num_queues == 2
        assert device.features & bit(F_SIZE) and not device.features & bit(F_MULTIPORT)
        harness = DeviceHarness(device)
        assert harness.config() == CONFIG.pack(100, 40, 1, 0)
        assert harness.take(transmit_queue(0), readable=[b"hello ", b"host"]).written == 0
        assert bytes(device.ports[0].to_host) == b"hello host"
        assert harness.take(receive_queue(0), 64) is None  # nothing from the host yet
        device.ports[0].to_guest += b"typed"
        assert harness.take(receive_queue(0), 3).data == b"typ"
        assert harness.take(receive_queue(0), 64).data == b"ed"
    finally:
        device.close()


def test_a_console_without_a_client_keeps_the_last_bytes_as_scrollback(tmp_path):
    device = console_device(tmp_path)
    try:
        harness = DeviceHarness(device)
        chunk = bytes(range(256)) * 64  # 16 KiB
        for _ in range(BUFFERED // len(chunk) + 3):  # a kernel never waits for the console
            assert harness.take(transmit_queue(0), readable=[chunk]) is not None
        port = device.ports[0]
        assert len(port.to_host) == BUFFERED and port.dropped == 3 * len(chunk)
    finally:
        device.close()


def test_a_named_port_without_a_client_holds_the_guest_once_full(tmp_path):
    device = console_device(tmp_path, ports=("agent",))
    try:
        harness = DeviceHarness(device)
        chunk = b"x" * (16 << 10)
        for _ in range(BUFFERED // len(chunk)):
            assert harness.take(transmit_queue(1), readable=[chunk]) is not None
        assert harness.take(transmit_queue(1), readable=[chunk]) is None  # waits: none dropped
        assert len(device.ports[1].to_host) == BUFFERED
    finally:
        device.close()


def test_multiport_control_messages_as_linux_and_qemu_exchange_them(tmp_path):
    device = console_device(tmp_path, ports=("org.qemu.guest_agent.0", "log"), size="80x25")
    try:
        assert device.num_queues == 8 and harness_config_ports(device) == 3
        harness = DeviceHarness(device)
        assert told(harness) == []
        control(harness, 0, Event.DEVICE_READY)
        assert told(harness) == [(n, Event.DEVICE_ADD, 1, b"") for n in (0, 1, 2)]
        control(harness, 0, Event.PORT_READY)
        assert told(harness) == [
            (0, Event.CONSOLE_PORT, 1, b""),
            (0, Event.RESIZE, 0, struct.pack("<HH", 80, 25)),
        ]
        control(harness, 1, Event.PORT_READY)
        assert told(harness) == [(1, Event.PORT_NAME, 1, b"org.qemu.guest_agent.0\0")]
        assert harness.take(receive_queue(1), 64) is None
        device.ports[1].to_guest += b"early"
        assert harness.take(receive_queue(1), 64) is None  # the guest has not opened it
        control(harness, 1, Event.PORT_OPEN)
        assert harness.take(receive_queue(1), 64).data == b"early"
        control(harness, 1, Event.PORT_OPEN, 0)
        assert device.ports[1].guest_open is False
    finally:
        device.close()


def harness_config_ports(device: VirtioConsole) -> int:
    return CONFIG.unpack(device.config())[2]


def test_bad_control_messages_change_nothing(tmp_path):
    device = console_device(tmp_path, ports=("a",))
    try:
        harness = DeviceHarness(device)
        harness.request(CONTROL_TX, [b"\x01\x00"])  # short
        control(harness, 7, Event.PORT_READY)  # no such port
        control(harness, 1, Event.RESIZE)  # a device's message, from the driver
        control(harness, 1, 999)
        control(harness, 0, Event.DEVICE_READY, 0)  # the driver failed
        assert told(harness) == []
        assert not any(port.added or port.guest_open for port in device.ports.values())
        control(harness, 0, Event.DEVICE_READY)
        assert harness.take(CONTROL_RX, 4) is not None  # too small: back empty ...
        assert [m[0] for m in told(harness)] == [0, 1]  # ... and nothing lost
    finally:
        device.close()


def test_state_round_trips_bytes_in_flight_and_control_messages(tmp_path):
    device = console_device(tmp_path, ports=("a",))
    other = None
    try:
        harness = DeviceHarness(device)
        control(harness, 0, Event.DEVICE_READY)
        control(harness, 1, Event.PORT_READY)
        control(harness, 1, Event.PORT_OPEN)
        harness.take(transmit_queue(1), readable=[b"to the host"])
        device.ports[1].to_guest += b"to the guest"
        device.close()  # its sockets: the destination makes its own

        def destination() -> VirtioConsole:
            nonlocal other
            other = console_device(tmp_path / "dest", ports=("a",))
            return other

        (tmp_path / "dest").mkdir()
        moved = harness.migrate(destination)
        port = moved.device.ports[1]
        assert port.added and port.guest_open and bytes(port.to_host) == b"to the host"
        assert moved.take(receive_queue(1), 64).data == b"to the guest"
        assert [m[:2] for m in told(moved)] == [
            (0, Event.DEVICE_ADD),
            (1, Event.DEVICE_ADD),
            (1, Event.PORT_NAME),
        ]
        with pytest.raises(StateError, match="ports"):
            moved.device.check_state({"port_records": [{"id": 5}], "control_pending": b""})
        with pytest.raises(StateError, match="control"):
            moved.device.check_state({"port_records": [], "control_pending": b"\x03\x00abc"})
    finally:
        device.close()
        if other is not None:
            other.close()


@pytest.mark.parametrize(
    "options",
    [
        {"console": None, "port": [], "size": None},
        {"console": None, "port": ["noequals"], "size": None},
        {"console": None, "port": ["a=/x", "a=/y"], "size": None},
        {"console": "/nonexistent/c.sock", "port": [], "size": "80by25"},
        {"console": "/nonexistent/c.sock", "port": [], "size": "0x25"},
    ],
)
def test_bad_options_are_refused_before_any_socket(options):
    with pytest.raises(ValueError):
        VirtioConsole.from_args(argparse.Namespace(**options))


# -- end to end, over vhost-user and vfio-user ---------------------------------


class Pool:
    """Buffers of one size, reused once the device gave them back."""

    def __init__(self, ram: GuestRam, size: int, count: int) -> None:
        self.ram, self.size = ram, size
        self.free = [ram.alloc(size, 64) for _ in range(count)]


class ConsoleDriver:
    """What the guest's virtio_console driver does with the queues."""

    def __init__(self, ram: GuestRam, queues: list) -> None:
        self.ram, self.queues = ram, queues
        self.control_buffers = Pool(ram, 512, 16)
        self.messages: list[tuple[int, int, int, bytes]] = []
        self.pools = {q: Pool(ram, 4096, 32) for q in range(len(queues))}
        self.received: dict[int, bytearray] = {}

    async def post_control(self) -> None:
        ring = self.queues[CONTROL_RX].ring
        while self.control_buffers.free:
            address = self.control_buffers.free.pop()
            ring.add([], [(address, 512)], address)
        await self.queues[CONTROL_RX].kick_async()

    def collect_control(self) -> None:
        for done in self.queues[CONTROL_RX].ring.collect():
            data = self.ram.read(done.token, done.written)
            self.messages.append((*CONTROL.unpack_from(data), data[CONTROL.size :]))
            self.control_buffers.free.append(done.token)

    async def tell(self, port: int, event: int, value: int = 1) -> None:
        address = self.ram.alloc(8, 8)
        self.ram.write(address, CONTROL.pack(port, event, value))
        self.queues[CONTROL_TX].ring.add([(address, 8)], [], address)
        await self.queues[CONTROL_TX].kick_async()

    async def expect(self, *wanted: tuple[int, int, int]) -> None:
        with trio.fail_after(5):
            while not all(w in [m[:3] for m in self.messages] for w in wanted):
                await self.post_control()
                await trio.sleep(0.01)
                self.collect_control()

    async def open_all(self, ports: list[int]) -> None:
        await self.post_control()
        await self.tell(0, Event.DEVICE_READY)
        await self.expect(*[(p, Event.DEVICE_ADD, 1) for p in ports])
        for port in ports:
            await self.post_receive(port)
            await self.tell(port, Event.PORT_READY)
            await self.tell(port, Event.PORT_OPEN)

    async def post_receive(self, port: int) -> None:
        queue = receive_queue(port)
        pool = self.pools[queue]
        while pool.free:
            address = pool.free.pop()
            self.queues[queue].ring.add([], [(address, pool.size)], address)
        await self.queues[queue].kick_async()

    async def receive(self, port: int, size: int, timeout: float = 20) -> bytes:
        queue = receive_queue(port)
        got = self.received.setdefault(port, bytearray())
        with trio.fail_after(timeout):
            while len(got) < size:
                for done in self.queues[queue].ring.collect():
                    got += self.ram.read(done.token, done.written)
                    self.pools[queue].free.append(done.token)
                await self.post_receive(port)
                await trio.sleep(0.002)
        data = bytes(got[:size])
        del got[:size]
        return data

    async def send(self, port: int, data: bytes, timeout: float = 20) -> None:
        """Write ``data`` through the port's transmit queue, waiting for the
        device to take buffers back when the pool runs dry."""
        queue = transmit_queue(port)
        pool, ring = self.pools[queue], self.queues[queue].ring
        with trio.fail_after(timeout):
            offset = 0
            while offset < len(data) or len(pool.free) < 32:
                for done in ring.collect():
                    pool.free.append(done.token)
                posted = False
                while offset < len(data) and pool.free:
                    address = pool.free.pop()
                    chunk = data[offset : offset + pool.size]
                    self.ram.write(address, chunk)
                    ring.add([(address, len(chunk))], [], address)
                    offset += len(chunk)
                    posted = True
                if posted:
                    await self.queues[queue].kick_async()
                await trio.sleep(0.002)


async def connect(path: str) -> trio.socket.SocketType:
    client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await client.connect(path)
    return client


async def receive_exactly(sock: trio.socket.SocketType, size: int, timeout: float = 20) -> bytes:
    data = bytearray()
    with trio.fail_after(timeout):
        while len(data) < size:
            chunk = await sock.recv(min(size - len(data), 65536))
            assert chunk, "the daemon closed the connection"
            data += chunk
    return bytes(data)


async def vhost_user_console(frontend, ram: GuestRam, num_queues: int) -> ConsoleDriver:
    await frontend.negotiate(want_features=~bit(Feature.RING_PACKED))
    await frontend.set_features()
    await frontend.share_memory(ram)
    queues = [
        await frontend.start_queue(index, frontend.make_ring(ram, 64))
        for index in range(num_queues)
    ]
    return ConsoleDriver(ram, queues)


async def exchange_on_a_named_port(driver: ConsoleDriver, path: str) -> None:
    """Two clients in turn on port 1: bytes both ways, opens and closes."""
    await driver.open_all([0, 1])
    for turn in range(2):
        client = await connect(path)
        await driver.expect((1, Event.PORT_OPEN, 1))
        to_guest, to_host = b"from the host %d" % turn, b"from the guest %d" % turn
        await client.send(to_guest)
        assert await driver.receive(1, len(to_guest)) == to_guest
        await driver.send(1, to_host)
        assert await receive_exactly(client, len(to_host)) == to_host
        client.close()
        await driver.expect((1, Event.PORT_OPEN, 0))
        driver.messages.clear()


async def test_bytes_both_ways_on_a_named_port_with_a_slow_host_reader(tmp_path):
    """1 MiB each way through a named port, checksummed: the guest's writes
    wait while the client does not read (none dropped), the client's wait
    while the guest posts no buffers; the host side's open and close reach
    the driver as PORT_OPEN."""
    device = console_device(tmp_path, ports=("data",))
    ram = GuestRam([(0, 8 * MiB)])
    payload = os.urandom(MiB)
    try:
        async with served(device) as frontend:
            driver = await vhost_user_console(frontend, ram, device.num_queues)
            await driver.open_all([0, 1])
            client = await connect(str(tmp_path / "data.sock"))
            await driver.expect((1, Event.PORT_OPEN, 1))

            async def host_writes() -> None:
                view = memoryview(payload)
                while view:
                    view = view[await client.send(view) :]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(host_writes)
                assert await driver.receive(1, len(payload)) == payload

            # The client does not read: the guest is held once BUFFERED
            # bytes wait (and the socket's own buffer is full).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(driver.send, 1, payload)
                await trio.sleep(1)
                assert BUFFERED <= len(device.ports[1].to_host) < BUFFERED + 4096
                got = await receive_exactly(client, len(payload))  # the rest as it reads
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

            client.close()
            await driver.expect((1, Event.PORT_OPEN, 0))
            again = await connect(str(tmp_path / "data.sock"))
            await again.send(b"second client")
            assert await driver.receive(1, 13) == b"second client"
            again.close()
    finally:
        ram.close()
        device.close()


async def test_the_guest_gets_what_a_client_sent_before_it_hears_the_close(tmp_path):
    device = console_device(tmp_path, ports=("data",))
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            driver = await vhost_user_console(frontend, ram, device.num_queues)
            await driver.post_control()
            await driver.tell(0, Event.DEVICE_READY)
            await driver.expect((1, Event.DEVICE_ADD, 1))
            await driver.tell(1, Event.PORT_READY)
            await driver.tell(1, Event.PORT_OPEN)
            client = await connect(str(tmp_path / "data.sock"))
            await driver.expect((1, Event.PORT_OPEN, 1))
            await client.send(b"last words" * 1000)
            client.close()
            await trio.sleep(0.2)  # no receive buffers yet: the close waits too
            driver.collect_control()
            assert (1, Event.PORT_OPEN, 0) not in [m[:3] for m in driver.messages]
            assert await driver.receive(1, 10000) == b"last words" * 1000
            await driver.expect((1, Event.PORT_OPEN, 0))
    finally:
        ram.close()
        device.close()


@pytest.mark.parametrize("with_fd", [True, False], ids=["mapped", "through-dma"])
async def test_a_console_over_vfio_user(tmp_path, with_fd):
    """The console port through the virtio-pci transport: text both ways."""
    device = console_device(tmp_path)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with vfio_served(VirtioPciDevice(device), ram=ram) as client:
            await client.map_ram(with_fd=with_fd)
            pci = VirtioPciDriver(client, ram)
            console = ConsoleDriver(ram, list(await pci.start(queue_count=2, queue_size=64)))
            host = await connect(str(tmp_path / "console.sock"))
            await console.post_receive(0)
            await host.send(b"ls -l\n")
            assert await console.receive(0, 6) == b"ls -l\n"
            await console.send(0, b"total 0\n")
            assert await receive_exactly(host, 8) == b"total 0\n"
            host.close()
            pci.close()
    finally:
        ram.close()
        device.close()


async def test_two_clients_in_turn_on_a_named_port(tmp_path):
    device = console_device(tmp_path, ports=("agent",))
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            driver = await vhost_user_console(frontend, ram, device.num_queues)
            await exchange_on_a_named_port(driver, str(tmp_path / "agent.sock"))
    finally:
        ram.close()
        device.close()


def test_the_config_space_is_read_only(tmp_path):
    device = console_device(tmp_path, ports=("a",), size="80x25")
    try:
        harness = DeviceHarness(device)
        with pytest.raises(ConfigWriteError):
            harness.write_config(0, b"\x10\x00")  # cols
        with pytest.raises(ConfigWriteError):
            harness.write_config(8, b"A\0\0\0")  # emerg_wr: not offered
        assert harness.config() == CONFIG.pack(80, 25, 2, 0)
    finally:
        device.close()


async def test_a_flooding_client_waits_for_the_guest(tmp_path):
    """A client that writes far more than the guest reads: the device holds
    at most BUFFERED bytes of it, the rest stays with the client (its
    writes block), and all of it arrives once the guest reads."""
    device = console_device(tmp_path, ports=("data",))
    ram = GuestRam([(0, 8 * MiB)])
    flood = os.urandom(4 * MiB)
    try:
        async with served(device) as frontend:
            driver = await vhost_user_console(frontend, ram, device.num_queues)
            await driver.open_all([1])
            client = await connect(str(tmp_path / "data.sock"))
            await driver.expect((1, Event.PORT_OPEN, 1))
            sent = 0

            async def flood_it() -> None:
                nonlocal sent
                view = memoryview(flood)
                while view:
                    done = await client.send(view)
                    sent += done
                    view = view[done:]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood_it)
                await trio.sleep(0.5)  # the driver's first buffers are full, it reads no more
                assert len(device.ports[1].to_guest) <= BUFFERED
                assert sent < len(flood)
                assert await driver.receive(1, len(flood), timeout=60) == flood
            client.close()
    finally:
        ram.close()
        device.close()
