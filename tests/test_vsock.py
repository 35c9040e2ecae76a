"""virtio-vsock: packets, credit, host programs through hybrid vsock, bad input."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from conftest import MiB, served, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness
from vfiouserd.devices.virtio import ConfigWriteError, Feature, bit
from vfiouserd.devices.vsock import (
    BUF_ALLOC,
    CONFIG,
    EVENT,
    EVENTS,
    FIRST_HOST_PORT,
    HEADER,
    HOST_CID,
    RX,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TO_GUEST,
    TX,
    TYPE_STREAM,
    Op,
    VirtioVsock,
)
from vfiouserd.state import StateError
from vfiouserd.virtio_pci import VirtioPciDevice

GUEST = 5


def vsock_device(tmp_path, guest_cid: int = GUEST) -> VirtioVsock:
    args = argparse.Namespace(guest_cid=guest_cid, uds_path=str(tmp_path / "v.sock"))
    return VirtioVsock.from_args(args)


def packet(op: int, src_port: int, dst_port: int, payload: bytes = b"", **fields: int) -> bytes:
    values = {
        "src_cid": GUEST,
        "dst_cid": HOST_CID,
        "len": len(payload),
        "type": TYPE_STREAM,
        "flags": 0,
        "buf_alloc": 1 << 20,
        "fwd_cnt": 0,
        **fields,
    }
    return (
        HEADER.pack(
            values["src_cid"],
            values["dst_cid"],
            src_port,
            dst_port,
            values["len"],
            values["type"],
            op,
            values["flags"],
            values["buf_alloc"],
            values["fwd_cnt"],
        )
        + payload
    )


def replies(harness: DeviceHarness[VirtioVsock]) -> list[tuple[int, ...]]:
    """Every packet waiting for the guest, as header fields (and the payload)."""
    found = []
    while (done := harness.take(RX, HEADER.size + 4096)) is not None:
        found.append((*HEADER.unpack_from(done.data), done.data[HEADER.size :]))
    return found


# -- the device alone ---------------------------------------------------------------


def test_the_config_space_is_the_guest_cid_and_read_only(tmp_path):
    device = vsock_device(tmp_path, guest_cid=42)
    try:
        harness = DeviceHarness(device)
        assert harness.config() == CONFIG.pack(42)
        with pytest.raises(ConfigWriteError):
            harness.write_config(0, CONFIG.pack(43))
        assert device.jail_directories == (str(tmp_path),)
    finally:
        device.close()


@pytest.mark.parametrize(
    ("why", "data"),
    [
        ("another CID", packet(Op.REQUEST, 1234, 80, dst_cid=9)),
        ("seqpacket", packet(Op.REQUEST, 1234, 80, type=2)),
        ("unknown op", packet(99, 1234, 80)),
        ("data on no connection", packet(Op.RW, 1234, 80, b"hello")),
        ("a shutdown on no connection", packet(Op.SHUTDOWN, 1234, 80, flags=SHUTDOWN_BOTH)),
        ("a response nobody asked for", packet(Op.RESPONSE, 1234, 80)),
    ],
)
def test_packets_that_fit_no_connection_are_answered_with_rst(tmp_path, why, data):
    device = vsock_device(tmp_path)
    try:
        harness = DeviceHarness(device)
        harness.request(TX, [data])
        (reply,) = replies(harness)
        src_cid, dst_cid, src_port, dst_port, _, kind, op, *_ = reply
        assert (src_cid, dst_cid, src_port, dst_port, kind, op) == (
            HOST_CID,
            GUEST,
            80,
            1234,
            TYPE_STREAM,
            Op.RST,
        ), why
        assert device.streams == {}
    finally:
        device.close()


@pytest.mark.parametrize(
    ("why", "data"),
    [
        ("shorter than a header", packet(Op.REQUEST, 1234, 80)[:43]),
        ("a length beyond what it carries", packet(Op.RW, 1234, 80, b"abc", len=4096)),
        ("a length of 4 GiB - 1", packet(Op.RW, 1234, 80, b"abc", len=0xFFFFFFFF)),
        ("a source that is not the guest", packet(Op.REQUEST, 1234, 80, src_cid=GUEST + 1)),
        ("a reset of nothing", packet(Op.RST, 1234, 80)),
    ],
)
def test_malformed_packets_are_dropped_without_a_reply(tmp_path, why, data):
    device = vsock_device(tmp_path)
    try:
        harness = DeviceHarness(device)
        harness.request(TX, [data])
        assert replies(harness) == [], why
        assert device.streams == {}
    finally:
        device.close()


def test_a_restarted_device_resets_every_connection_the_guest_had(tmp_path):
    """Host ends do not outlive the daemon: the next device tells the guest
    that each connection is reset, and sends a transport reset event."""
    device = vsock_device(tmp_path)
    other = None
    try:
        harness = DeviceHarness(device)
        harness.request(TX, [packet(Op.REQUEST, 1234, 80)])
        harness.request(TX, [packet(Op.REQUEST, 1235, 81)])
        assert len(device.streams) == 2
        device.close()
        harness = harness.migrate(lambda: vsock_device(tmp_path))
        other = harness.device
        got = sorted((r[2], r[3], r[6]) for r in replies(harness))
        assert got == [(80, 1234, Op.RST), (81, 1235, Op.RST)]
        event = harness.take(EVENTS, EVENT.size)
        assert event is not None and EVENT.unpack(event.data) == (0,)  # transport reset
        assert harness.take(EVENTS, EVENT.size) is None  # once
    finally:
        device.close()
        if other is not None:
            other.close()


def test_a_state_for_another_guest_cid_is_refused(tmp_path):
    device = vsock_device(tmp_path)
    saved = device.save_state()
    device.close()
    other = vsock_device(tmp_path, guest_cid=GUEST + 1)
    try:
        with pytest.raises(StateError, match="guest CID"):
            other.load_state(saved)
    finally:
        other.close()


@pytest.mark.parametrize("cid", ["0", "2", str(1 << 32)])
def test_reserved_guest_cids_are_refused(tmp_path, cid):
    with pytest.raises(ValueError, match="--guest-cid"):
        vsock_device(tmp_path, guest_cid=int(cid))
    assert not (tmp_path / "v.sock").exists()


# -- a guest's vsock stack, over vhost-user and vfio-user ---------------------------


class GuestStack:
    """What the guest's vsock driver does: RX buffers posted, packets sent
    on TX, credit kept (``buf_alloc`` bytes the guest may hold unread)."""

    def __init__(self, ram: GuestRam, queues: list, buf_alloc: int = 256 << 10) -> None:
        self.ram, self.queues = ram, queues
        self.buf_alloc = buf_alloc
        self.free = [ram.alloc(HEADER.size + 4096, 64) for _ in range(32)]
        self.tx_free = [ram.alloc(HEADER.size + 4096, 64) for _ in range(32)]
        self.packets: list[tuple[int, ...]] = []
        self.received: dict[int, bytearray] = {}  # by our port
        self.fwd_cnt: dict[int, int] = {}  # bytes the "application" consumed
        self.peer_credit: dict[int, tuple[int, int]] = {}  # buf_alloc, fwd_cnt
        self.sent: dict[int, int] = {}
        self.total: dict[int, int] = {}  # bytes received, by our port
        self.peers: dict[int, int] = {}  # the host port of each of our ports

    async def post(self) -> None:
        ring = self.queues[RX].ring
        while self.free:
            address = self.free.pop()
            ring.add([], [(address, HEADER.size + 4096)], address)
        await self.queues[RX].kick_async()

    def collect(self) -> None:
        for done in self.queues[RX].ring.collect():
            data = self.ram.read(done.token, done.written)
            fields = HEADER.unpack_from(data)
            port, op = fields[3], fields[6]
            self.peer_credit[port] = (fields[8], fields[9])
            if op == Op.RW:
                self.received.setdefault(port, bytearray()).extend(data[HEADER.size :])
                self.total[port] = self.total.get(port, 0) + len(data) - HEADER.size
            self.packets.append((*fields, data[HEADER.size :]))
            self.free.append(done.token)

    async def send(self, op: int, port: int, peer: int, payload: bytes = b"", **fields) -> None:
        data = packet(
            op,
            port,
            peer,
            payload,
            buf_alloc=self.buf_alloc,
            fwd_cnt=self.fwd_cnt.get(port, 0),
            **fields,
        )
        ring = self.queues[TX].ring
        with trio.fail_after(10):
            while not self.tx_free:  # the device takes them back as it goes
                self.tx_free.extend(done.token for done in ring.collect())
                await trio.sleep(0.002)
        address = self.tx_free.pop()
        self.ram.write(address, data)
        ring.add([(address, len(data))], [], address)
        await self.queues[TX].kick_async()
        self.tx_free.extend(done.token for done in ring.collect())

    async def expect(self, port: int, op: int, timeout: float = 5) -> tuple[int, ...]:
        with trio.fail_after(timeout):
            while True:
                for found in self.packets:
                    if found[3] == port and found[6] == op:
                        self.packets.remove(found)
                        return found
                await self.post()
                await trio.sleep(0.005)
                self.collect()

    async def connect(self, port: int, host_port: int) -> None:
        self.peers[port] = host_port
        await self.post()
        await self.send(Op.REQUEST, port, host_port)
        await self.expect(port, Op.RESPONSE)

    async def write(self, port: int, peer: int, data: bytes, timeout: float = 20) -> None:
        """Send ``data`` in packets of at most 4 KiB, within the host's credit."""
        offset = 0
        with trio.fail_after(timeout):
            while offset < len(data):
                self.collect()
                buf_alloc, fwd_cnt = self.peer_credit.get(port, (BUF_ALLOC, 0))
                credit = buf_alloc - (self.sent.get(port, 0) - fwd_cnt)
                if credit <= 0:
                    await self.post()
                    await trio.sleep(0.005)
                    continue
                chunk = data[offset : offset + min(4096, credit)]
                await self.send(Op.RW, port, peer, chunk)
                self.sent[port] = self.sent.get(port, 0) + len(chunk)
                offset += len(chunk)

    async def read(self, port: int, size: int, timeout: float = 20) -> bytes:
        """``size`` bytes of the connection, consumed (credit updates as Linux sends them)."""
        got = self.received.setdefault(port, bytearray())
        with trio.fail_after(timeout):
            while len(got) < size:
                # The application took everything so far: room for as much again.
                if self.total.get(port, 0) > self.fwd_cnt.get(port, 0):
                    self.fwd_cnt[port] = self.total[port]
                    await self.send(Op.CREDIT_UPDATE, port, self.peer_of(port))
                await self.post()
                await trio.sleep(0.005)
                self.collect()
        data = bytes(got[:size])
        del got[:size]
        return data

    def peer_of(self, port: int) -> int:
        return self.peers[port]


def host_listener(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.setblocking(False)
    return listener


async def accept(listener: socket.socket) -> trio.socket.SocketType:
    await trio.lowlevel.wait_readable(listener)
    conn, _ = listener.accept()
    return trio.socket.from_stdlib_socket(conn)


async def receive_exactly(sock: trio.socket.SocketType, size: int, timeout: float = 20) -> bytes:
    data = bytearray()
    with trio.fail_after(timeout):
        while len(data) < size:
            chunk = await sock.recv(min(size - len(data), 65536))
            assert chunk, "closed early"
            data += chunk
    return bytes(data)


async def vhost_user_stack(frontend, ram: GuestRam, **options) -> GuestStack:
    await frontend.negotiate(want_features=~bit(Feature.RING_PACKED))
    await frontend.set_features()
    await frontend.share_memory(ram)
    # As QEMU: the event queue stays with the front end.
    queues = [await frontend.start_queue(i, frontend.make_ring(ram, 64)) for i in (RX, TX)]
    return GuestStack(ram, queues, **options)


@contextlib.asynccontextmanager
async def a_guest(tmp_path, **options) -> AsyncIterator[tuple]:
    """A device served over vhost-user, a guest stack driving it and a host
    program's listener on port 80: (device, front end, guest, listener)."""
    device = vsock_device(tmp_path)
    listener = host_listener(str(tmp_path / "v.sock_80"))
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            yield device, frontend, await vhost_user_stack(frontend, ram, **options), listener
    finally:
        listener.close()
        ram.close()
        device.close()


async def test_guest_connects_to_a_host_program_and_both_close(tmp_path):
    payload = os.urandom(MiB)
    async with a_guest(tmp_path) as (device, _frontend, guest, listener):
        await guest.connect(1234, 80)
        host = await accept(listener)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest.write, 1234, 80, payload)
            got = await receive_exactly(host, MiB)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await host.send(b"reply")
        assert await guest.read(1234, 5) == b"reply"
        # The host end closes: the guest hears SHUTDOWN(SEND) ...
        host.shutdown(socket.SHUT_WR)
        shutdown = await guest.expect(1234, Op.SHUTDOWN)
        assert shutdown[7] == SHUTDOWN_SEND
        # ... the guest closes its side too: RST, and the host reads the end.
        await guest.send(Op.SHUTDOWN, 1234, 80, flags=SHUTDOWN_BOTH)
        await guest.expect(1234, Op.RST)
        with trio.fail_after(5):
            assert await host.recv(10) == b""
        assert device.streams == {}
        host.close()


async def test_a_port_nobody_listens_on_is_refused(tmp_path):
    async with a_guest(tmp_path) as (device, _frontend, guest, _listener):
        await guest.post()
        await guest.send(Op.REQUEST, 1234, 81)
        await guest.expect(1234, Op.RST)
        assert device.streams == {}


async def test_the_device_sends_no_more_than_the_guest_has_room_for(tmp_path):
    """Credit from the host's side: with 8 KiB of buffer and no credit update
    the guest gets 8 KiB, however much the host program writes; each update
    lets more through, and the host program waits meanwhile."""
    payload = os.urandom(256 << 10)
    async with a_guest(tmp_path, buf_alloc=8192) as (_device, _frontend, guest, listener):
        await guest.connect(1234, 80)
        host = await accept(listener)
        async with trio.open_nursery() as nursery:

            async def host_writes() -> None:
                view = memoryview(payload)
                while view:
                    view = view[await host.send(view) :]

            nursery.start_soon(host_writes)
            await trio.sleep(0.5)
            await guest.post()
            await trio.sleep(0.2)
            guest.collect()
            assert len(guest.received.get(1234, b"")) == 8192
            got = await guest.read(1234, len(payload))  # credit updates as it reads
        assert got == payload
        host.close()


async def test_a_guest_that_overruns_its_credit_is_reset(tmp_path):
    async with a_guest(tmp_path) as (device, _frontend, guest, listener):
        await guest.connect(1234, 80)
        host = await accept(listener)
        # The host program does not read: past BUF_ALLOC the guest has no credit.
        chunk = b"x" * 4096
        for _ in range(BUF_ALLOC // len(chunk) + 64):
            await guest.send(Op.RW, 1234, 80, chunk)
        await guest.expect(1234, Op.RST)
        assert device.streams == {}
        with trio.fail_after(5):
            while await host.recv(65536):  # what it had, then the end
                pass
        host.close()


async def connect_host(path: str, line: bytes) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    await sock.send(line)
    return sock


async def test_a_host_program_connects_to_a_guest_listener(tmp_path):
    async with a_guest(tmp_path) as (_device, _frontend, guest, _listener):
        await guest.post()
        host = await connect_host(str(tmp_path / "v.sock"), b"CONNECT 52\n")
        request = await guest.expect(52, Op.REQUEST)
        host_port = request[2]
        assert host_port == FIRST_HOST_PORT
        guest.peers[52] = host_port
        await guest.send(Op.RESPONSE, 52, host_port)
        assert await receive_exactly(host, len(f"OK {host_port}\n")) == (
            f"OK {host_port}\n".encode()
        )
        await host.send(b"ping")
        assert await guest.read(52, 4) == b"ping"
        await guest.write(52, host_port, b"pong")
        assert await receive_exactly(host, 4) == b"pong"
        # The guest resets: the host program sees the end.
        await guest.send(Op.RST, 52, host_port)
        with trio.fail_after(5):
            assert await host.recv(10) == b""
        host.close()


@pytest.mark.parametrize(
    "line",
    [b"CONNECT\n", b"CONNECT x\n", b"LISTEN 5\n", b"CONNECT 99999999999\n", b"C" * 200],
    ids=["no-port", "not-a-number", "other-word", "too-big", "too-long"],
)
async def test_a_bad_connect_line_closes_the_host_program(tmp_path, line):
    async with a_guest(tmp_path) as (device, _frontend, guest, _listener):
        await guest.post()
        host = await connect_host(str(tmp_path / "v.sock"), line)
        # Closed (reset, as it had bytes it did not read).
        with trio.fail_after(5), contextlib.suppress(ConnectionResetError):
            assert await host.recv(10) == b""
        host.close()
        await trio.sleep(0.1)
        guest.collect()
        assert guest.packets == [] and device.streams == {}


async def test_a_guest_that_refuses_closes_the_host_program(tmp_path):
    async with a_guest(tmp_path) as (_device, _frontend, guest, _listener):
        await guest.post()
        host = await connect_host(str(tmp_path / "v.sock"), b"CONNECT 53\n")
        request = await guest.expect(53, Op.REQUEST)
        await guest.send(Op.RST, 53, request[2])
        with trio.fail_after(5):
            assert await host.recv(10) == b""
        host.close()


@pytest.mark.parametrize("with_fd", [True, False], ids=["mapped", "through-dma"])
async def test_vsock_over_vfio_user_has_its_event_queue(tmp_path, with_fd):
    """Through the virtio-pci transport the device owns all three queues:
    a connection works, and a restored device's transport reset arrives."""
    device = vsock_device(tmp_path)
    listener = host_listener(str(tmp_path / "v.sock_80"))
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with vfio_served(VirtioPciDevice(device), ram=ram) as client:
            await client.map_ram(with_fd=with_fd)
            pci = VirtioPciDriver(client, ram)
            queues = list(await pci.start(queue_count=3, queue_size=64))
            guest = GuestStack(ram, queues)
            await guest.connect(1234, 80)
            host = await accept(listener)
            await guest.write(1234, 80, b"over vfio-user")
            assert await receive_exactly(host, 14) == b"over vfio-user"
            host.close()
            event_buffer = ram.alloc(8, 8)
            queues[EVENTS].ring.add([], [(event_buffer, 8)], event_buffer)
            await queues[EVENTS].kick_async()
            device.stream_records = [{"host_port": 80, "guest_port": 1234}]  # as a restore does
            device.wake_host_side()
            device.data_ready(EVENTS)
            with trio.fail_after(5):
                while not (done := list(queues[EVENTS].ring.collect())):
                    await trio.sleep(0.01)
            assert EVENT.unpack(ram.read(done[0].token, done[0].written)) == (0,)
            pci.close()
    finally:
        listener.close()
        ram.close()
        device.close()


async def test_a_host_program_that_vanishes_resets_the_guest_connection(tmp_path):
    """The host end closes with bytes it never read (a crash): the guest
    gets RST, not a hang."""
    async with a_guest(tmp_path) as (device, _frontend, guest, listener):
        await guest.connect(1234, 80)
        host = await accept(listener)
        await guest.write(1234, 80, b"unread" * 1000)
        await trio.sleep(0.1)
        host.close()
        await guest.write(1234, 80, b"more")
        await guest.expect(1234, Op.RST)
        assert device.streams == {}


async def test_a_flooding_host_program_is_held_while_the_guest_has_no_buffers(tmp_path):
    async with a_guest(tmp_path) as (device, _frontend, guest, listener):
        await guest.connect(1234, 80)
        host = await accept(listener)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        flood = os.urandom(4 * MiB)
        sent = 0
        with trio.move_on_after(1):  # until its writes block
            while sent < len(flood):
                sent += await host.send(flood[sent : sent + 65536])
        assert sent < len(flood)
        (stream,) = device.streams.values()
        assert len(stream.to_guest) <= TO_GUEST
        async with trio.open_nursery() as nursery:

            async def rest() -> None:
                view = memoryview(flood)[sent:]
                while view:
                    view = view[await host.send(view) :]

            nursery.start_soon(rest)
            assert await guest.read(1234, len(flood), timeout=60) == flood
        host.close()


async def test_a_driver_reset_with_rings_stopped_closes_the_host_ends(tmp_path):
    """Rings stopped (run() cancelled), then a device reset: the guest's
    connections are gone, and so are their host ends, not left open."""
    async with a_guest(tmp_path) as (device, frontend, guest, listener):
        await guest.connect(1234, 80)
        host = await accept(listener)
        await frontend.stop_queue(RX)
        await frontend.stop_queue(TX)
        await trio.sleep(0.1)  # run() is cancelled with the last ring
        (stream,) = device.streams.values()  # held: no collector closes it for us
        device.reset()
        assert stream.sock is None
        with trio.fail_after(5):
            assert await host.recv(10) == b""
        assert device.streams == {}
        host.close()
