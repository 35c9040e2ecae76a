"""virtio-net: frames both ways, the stream framing, the control queue, bad input."""

from __future__ import annotations

import argparse
import os
import socket
import struct

import pytest
import trio

from conftest import MiB, served, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness
from vfiouserd.devices.net import (
    ACK_ERR,
    ACK_OK,
    BUFFERED,
    CONFIG,
    CTRL,
    CTRL_MQ,
    CTRL_MQ_VQ_PAIRS_SET,
    F_MQ,
    F_MRG_RXBUF,
    HEADER,
    LENGTH,
    STATUS_LINK_UP,
    VirtioNet,
    rarp,
    rx,
    tx,
)
from vfiouserd.devices.virtio import ConfigWriteError, Feature, bit
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.state import StateError
from vfiouserd.virtio_pci import VirtioPciDevice

MAC = bytes.fromhex("525400abcdef")


def net_device(tmp_path, *, mtu: int = 1500, pairs: int = 1, listen: bool = True) -> VirtioNet:
    path = str(tmp_path / "wire.sock")
    args = argparse.Namespace(
        stream_listen=path if listen else None,
        stream_socket=None if listen else path,
        mac="52:54:00:ab:cd:ef",
        mtu=mtu,
        queue_pairs=pairs,
    )
    return VirtioNet.from_args(args)


def with_a_peer(device: VirtioNet) -> socket.socket:
    """A peer on the wire, as run() would have connected it; the other end."""
    ours, theirs = socket.socketpair()
    device.peer = trio.socket.from_stdlib_socket(ours)
    return theirs


def frame(size: int, fill: int = 0x11) -> bytes:
    return b"\xff" * 6 + MAC + b"\x08\x00" + bytes([fill]) * (size - 14)


def stream(*frames: bytes) -> bytes:
    """Frames as the peer's stream carries them."""
    return b"".join(LENGTH.pack(len(f)) + f for f in frames)


def sent(data: bytes, **fields: int) -> bytes:
    """A transmit buffer: the virtio-net header, then the frame."""
    header = {"flags": 0, "gso": 0, **fields}
    return HEADER.pack(header["flags"], header["gso"], 0, 0, 0, 0, 0) + data


# -- the device alone ---------------------------------------------------------------


def test_the_config_space_and_features(tmp_path):
    device = net_device(tmp_path, mtu=9000, pairs=2)
    try:
        harness = DeviceHarness(device)
        assert harness.config() == CONFIG.pack(MAC, 0, 2, 9000)  # no peer: link down
        assert device.features & bit(F_MQ) and device.features & bit(F_MRG_RXBUF)
        with pytest.raises(ConfigWriteError):
            harness.write_config(0, b"\x02" * 6)
        assert device.host_fed_queues == {0, 1, 2, 3}  # the control queue (4) is not
        assert device.merged_queues == {0, 2}
    finally:
        device.close()


def test_transmitted_frames_go_to_the_peer_framed(tmp_path):
    device = net_device(tmp_path)
    theirs = with_a_peer(device)
    try:
        harness = DeviceHarness(device)
        assert harness.take(tx(0), readable=[sent(frame(60))]) is not None
        assert harness.take(tx(0), readable=[sent(frame(1514, fill=0x22))]) is not None
        assert device.bytes_to_peer == stream(frame(60), frame(1514, 0x22))
    finally:
        theirs.close()
        device.close()


@pytest.mark.parametrize(
    ("why", "data"),
    [
        ("shorter than the header", sent(b"")[:11]),
        ("a checksum offload not offered", sent(frame(60), flags=1)),
        ("segmentation not offered", sent(frame(60), gso=1)),
        ("over the MTU", sent(frame(1500 + 18 + 1))),
        ("shorter than an Ethernet header", sent(b"\x00" * 13)),
    ],
)
def test_bad_transmit_buffers_are_dropped_and_counted(tmp_path, why, data):
    device = net_device(tmp_path)
    theirs = with_a_peer(device)
    try:
        harness = DeviceHarness(device)
        done = harness.take(tx(0), readable=[data])
        assert done is not None and done.written == 0, why
        assert device.bytes_to_peer == b"" and device.dropped == 1
    finally:
        theirs.close()
        device.close()


def test_without_a_peer_the_guests_frames_are_lost_not_held(tmp_path):
    device = net_device(tmp_path)
    try:
        harness = DeviceHarness(device)
        for _ in range(BUFFERED // 1518 + 10):
            assert harness.take(tx(0), readable=[sent(frame(1514))]) is not None
        assert device.bytes_to_peer == b"" and device.lost_without_peer == BUFFERED // 1518 + 10
    finally:
        device.close()


def test_the_guest_is_held_once_the_peer_is_slow(tmp_path):
    device = net_device(tmp_path)
    theirs = with_a_peer(device)
    try:
        harness = DeviceHarness(device)
        while harness.take(tx(0), readable=[sent(frame(1514))]) is not None:
            pass
        assert BUFFERED <= len(device.bytes_to_peer) < BUFFERED + 1518 + 4
    finally:
        theirs.close()
        device.close()


def test_received_frames_spread_over_mergeable_buffers(tmp_path):
    device = net_device(tmp_path, mtu=9000)
    try:
        harness = DeviceHarness(device)
        device.frames_to_guest = stream(frame(60), frame(9014, 0x33))
        (small,) = harness.take_merged(rx(0), 1526, 1526) or []
        assert small.written == HEADER.size + 60
        assert HEADER.unpack_from(small.buffers[0])[-1] == 1  # num_buffers
        big = harness.take_merged(rx(0), *[1526] * 8)
        assert big is not None and len(big) == 6  # 12 + 9014 bytes
        whole = b"".join(c.buffers[0][: c.written] for c in big)
        assert HEADER.unpack_from(whole)[-1] == 6 and whole[HEADER.size :] == frame(9014, 0x33)
    finally:
        device.close()


def test_without_mergeable_buffers_a_frame_must_fit_one(tmp_path):
    device = net_device(tmp_path, mtu=9000)
    try:
        harness = DeviceHarness(device, features=device.features & ~bit(F_MRG_RXBUF))
        device.frames_to_guest = stream(frame(9014), frame(100))
        (done,) = harness.take_merged(rx(0), 1526, 1526) or []
        assert done.written == HEADER.size + 100  # the big one dropped
        assert device.dropped == 1
    finally:
        device.close()


def test_a_device_reset_keeps_the_frame_the_peer_is_half_way_through(tmp_path):
    """The frames read for the old driver go at a reset; the start of the
    one the peer is still sending stays, or the rest of it would be read as
    a length prefix."""
    device = net_device(tmp_path)
    try:
        half = stream(frame(100, 0x44))[:60]
        device.frames_to_guest = stream(frame(60), frame(70))
        device.partial_from_peer = half
        device.reset()
        assert device.frames_to_guest == b"" and device.partial_from_peer == half
    finally:
        device.close()


def control(harness: DeviceHarness[VirtioNet], *data: bytes) -> int:
    done = harness.request(2 * harness.device.pairs, [b"".join(data)], [1])
    assert done.written == 1
    return done.buffers[0][0]


def test_the_control_queue_sets_queue_pairs(tmp_path):
    device = net_device(tmp_path, pairs=4)
    try:
        harness = DeviceHarness(device)
        assert control(harness, CTRL.pack(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET), b"\x03\x00") == ACK_OK
        assert device.active_pairs == 3
        for bad in (b"\x00\x00", b"\x05\x00", b"\x03"):
            assert control(harness, CTRL.pack(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET), bad) == ACK_ERR
        assert control(harness, CTRL.pack(9, 9)) == ACK_ERR  # a class nobody offered
        assert device.active_pairs == 3
    finally:
        device.close()


def test_queue_pairs_need_mq(tmp_path):
    device = net_device(tmp_path, pairs=2)
    try:
        harness = DeviceHarness(device, features=device.features & ~bit(F_MQ))
        assert control(harness, CTRL.pack(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET), b"\x02\x00") == ACK_ERR
    finally:
        device.close()


def test_state_round_trips_frames_both_ways(tmp_path):
    device = net_device(tmp_path, pairs=2)
    other = None
    theirs = with_a_peer(device)
    try:
        harness = DeviceHarness(device)
        device.frames_to_guest = stream(frame(60), frame(70))
        harness.take(tx(0), readable=[sent(frame(80))])
        device.active_pairs = 2
        device.close()
        harness = harness.migrate(lambda: net_device(tmp_path, pairs=2))
        other = harness.device
        assert other.frames_to_guest == stream(frame(60), frame(70))
        assert other.bytes_to_peer == LENGTH.pack(80) + frame(80)
        assert other.active_pairs == 2
    finally:
        theirs.close()
        device.close()
        if other is not None:
            other.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mtu": 9000}, "MTU"),
        ({"active_pairs": 3}, "queue pairs"),
        ({"frames_to_guest": b"\x00\x00\x01\x00abc"}, "cut short"),
    ],
)
def test_a_state_this_device_cannot_take_is_refused(tmp_path, change, message):
    device = net_device(tmp_path, pairs=2)
    saved = device.save_state()
    device.close()
    saved["device"].update(change)
    other = net_device(tmp_path, pairs=2)
    try:
        with pytest.raises(StateError, match=message):
            other.load_state(saved)
    finally:
        other.close()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("mac", "01:00:5e:00:00:01", "multicast"),
        ("mac", "52:54:00:zz:00:01", "six hex bytes"),
        ("mac", "52:54:00:00:01", "six hex bytes"),
        ("mtu", 67, "--mtu"),
        ("mtu", 65536, "--mtu"),
        ("queue_pairs", 0, "--queue-pairs"),
        ("queue_pairs", 17, "--queue-pairs"),
    ],
)
def test_bad_options_are_refused_before_any_socket(tmp_path, option, value, message):
    args = argparse.Namespace(
        stream_listen=str(tmp_path / "wire.sock"),
        stream_socket=None,
        mac=None,
        mtu=1500,
        queue_pairs=1,
    )
    setattr(args, option, value)
    with pytest.raises(ValueError, match=message):
        VirtioNet.from_args(args)
    assert not (tmp_path / "wire.sock").exists()


def test_the_default_mac_is_the_same_for_the_same_path(tmp_path):
    args = argparse.Namespace(
        stream_listen=None, stream_socket=str(tmp_path / "w"), mac=None, mtu=1500, queue_pairs=1
    )
    first, second = VirtioNet.from_args(args), VirtioNet.from_args(args)
    assert first.mac == second.mac and first.mac[:3] == b"\x52\x54\x00"
    assert first.jail_directories == (str(tmp_path),)


# -- with a peer on the stream, over vhost-user and vfio-user ---------------------------


class Guest:
    """The guest driver's side of one queue pair: 16 receive buffers of 2 KiB."""

    def __init__(self, ram: GuestRam, rxq, txq) -> None:
        self.ram, self.rxq, self.txq = ram, rxq, txq
        self.buffers = [ram.alloc(2048, 64) for _ in range(16)]
        self.tx_buffers = [ram.alloc(2048, 64) for _ in range(16)]
        self.pending: list[bytes] = []

    async def post(self, addresses: list[int]) -> None:
        for address in addresses:
            self.rxq.ring.add([], [(address, 2048)], address)
        await self.rxq.kick_async()

    async def receive(self, count: int, timeout: float = 10) -> list[bytes]:
        frames: list[bytes] = []
        await self.post(self.buffers)
        self.buffers = []
        with trio.fail_after(timeout):
            while len(frames) < count:
                done = self.rxq.ring.collect()
                if not done:
                    await trio.sleep(0.002)
                    continue
                for completion in done:
                    self.pending.append(self.ram.read(completion.token, completion.written))
                    if len(self.pending) == HEADER.unpack_from(self.pending[0])[-1]:
                        frames.append(b"".join(self.pending)[HEADER.size :])
                        self.pending = []
                await self.post([c.token for c in done])
        return frames

    async def send(self, data: bytes) -> None:
        with trio.fail_after(10):
            while not self.tx_buffers:
                self.tx_buffers.extend(c.token for c in self.txq.ring.collect())
                await trio.sleep(0.002)
        address = self.tx_buffers.pop()
        self.ram.write(address, sent(data))
        self.txq.ring.add([(address, HEADER.size + len(data))], [], address)
        await self.txq.kick_async()


async def connect_peer(path: str) -> trio.socket.SocketType:
    peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await peer.connect(path)
    return peer


async def read_frames(peer: trio.socket.SocketType, count: int, timeout: float = 10) -> list[bytes]:
    data, frames = b"", []
    with trio.fail_after(timeout):
        while len(frames) < count:
            chunk = await peer.recv(65536)
            assert chunk, "the daemon closed the stream"
            data += chunk
            while len(data) >= 4 and len(data) >= 4 + LENGTH.unpack_from(data)[0]:
                (length,) = LENGTH.unpack_from(data)
                frames.append(data[4 : 4 + length])
                data = data[4 + length :]
    return frames


async def vhost_user_guest(frontend, ram: GuestRam) -> Guest:
    await frontend.negotiate(want_features=~bit(Feature.RING_PACKED))
    await frontend.set_features()
    await frontend.share_memory(ram)
    queues = [await frontend.start_queue(i, frontend.make_ring(ram, 64)) for i in (0, 1)]
    return Guest(ram, *queues)


async def test_frames_both_ways_and_a_peer_that_breaks_the_framing(tmp_path):
    """Frames both ways; a length of 0 and frames over the MTU from the
    peer are dropped and counted; a 4 GiB length cuts the peer off (link
    down), and the next peer is served."""
    device = net_device(tmp_path)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            guest = await vhost_user_guest(frontend, ram)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            frames = [frame(60 + n * 100, n) for n in range(10)]
            await peer.send(b"".join(LENGTH.pack(len(f)) + f for f in frames))
            assert await guest.receive(10) == frames
            for f in frames[:3]:
                await guest.send(f)
            assert await read_frames(peer, 3) == frames[:3]
            await peer.send(LENGTH.pack(0) + LENGTH.pack(1519) + frame(1519))
            await peer.send(LENGTH.pack(64) + frame(64, 0x77))
            assert await guest.receive(1) == [frame(64, 0x77)]
            assert device.dropped == 2
            await peer.send(LENGTH.pack(0xFFFFFFFF) + b"garbage")
            with trio.fail_after(5):
                assert await peer.recv(10) == b""  # cut off
            peer.close()
            again = await connect_peer(str(tmp_path / "wire.sock"))
            await again.send(LENGTH.pack(64) + frame(64, 0x78))
            assert await guest.receive(1) == [frame(64, 0x78)]
            again.close()
    finally:
        ram.close()
        device.close()


async def test_send_rarp_announces_the_guest_to_the_peer(tmp_path):
    device = net_device(tmp_path)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            await vhost_user_guest(frontend, ram)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            moved = bytes.fromhex("52540012ab34")
            await frontend.call(R.SEND_RARP, moved + b"\0\0")
            assert await read_frames(peer, 1) == [rarp(moved)]
            announced = rarp(moved)
            assert announced[:6] == b"\xff" * 6 and announced[12:14] == b"\x80\x35"
            peer.close()
    finally:
        ram.close()
        device.close()


@pytest.mark.parametrize("with_fd", [True, False], ids=["mapped", "through-dma"])
async def test_net_over_vfio_user_link_status_and_queue_pairs(tmp_path, with_fd):
    """The device owns the config space and the control queue: the link
    follows the peer (with a config interrupt), VQ_PAIRS_SET is answered,
    frames flow on the second pair."""
    device = net_device(tmp_path, pairs=2)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with vfio_served(VirtioPciDevice(device), ram=ram) as client:
            await client.map_ram(with_fd=with_fd)
            pci = VirtioPciDriver(client, ram)
            queues = await pci.start(queue_count=5, queue_size=64)
            status = 6
            assert struct.unpack("<H", await pci.read_config(status, 2)) == (0,)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            with trio.fail_after(5):
                while struct.unpack("<H", await pci.read_config(status, 2)) != (STATUS_LINK_UP,):
                    await trio.sleep(0.01)
            assert os.eventfd_read(pci.config_fd) >= 1  # the config interrupt
            # VQ_PAIRS_SET 2 on the control queue (index 4).
            command = ram.alloc(4, 8)
            ack = ram.alloc(1, 8)
            ram.write(command, CTRL.pack(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) + b"\x02\x00")
            queues[4].ring.add([(command, 4)], [(ack, 1)], "ctrl")
            await queues[4].kick_async()
            with trio.fail_after(5):
                while not queues[4].ring.collect():
                    await trio.sleep(0.01)
            assert ram.read(ack, 1) == bytes([ACK_OK]) and device.active_pairs == 2
            guest = Guest(ram, queues[rx(1)], queues[tx(1)])
            await guest.send(frame(100, 5))
            assert await read_frames(peer, 1) == [frame(100, 5)]
            await peer.send(LENGTH.pack(90) + frame(90, 6))
            second = Guest(ram, queues[rx(0)], queues[tx(0)])
            async with trio.open_nursery() as nursery:  # whichever pair takes it
                got: list[bytes] = []

                async def take(g: Guest) -> None:
                    got.extend(await g.receive(1))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(take, guest)
                nursery.start_soon(take, second)
            assert got == [frame(90, 6)]
            peer.close()
            with trio.fail_after(5):
                while struct.unpack("<H", await pci.read_config(status, 2)) != (0,):
                    await trio.sleep(0.01)
            pci.close()
    finally:
        ram.close()
        device.close()


def test_a_handed_over_peer_is_adopted_and_anything_else_closed(tmp_path):
    device = net_device(tmp_path)
    try:
        ours, theirs = socket.socketpair()
        stray_a, stray_b = socket.socketpair()
        device.adopt_host_fds({"peer": ours.detach(), "other": stray_a.detach()})
        assert device.peer is not None
        with pytest.raises(BrokenPipeError):  # the stray fd was closed
            for _ in range(100):
                stray_b.send(b"x" * 65536)
        late, late_b = socket.socketpair()
        late_fd = late.detach()
        device.adopt_host_fds({"peer": late_fd})  # one is held already
        with pytest.raises(OSError):
            os.fstat(late_fd)
        theirs.close()
        stray_b.close()
        late_b.close()
    finally:
        device.close()


# -- the native fast path (net_fastpath.c) over vhost-user ------------------------------


def count_python_fills(device: VirtioNet, monkeypatch) -> list[int]:
    """Buffers that reach the device's Python ``fill`` (the fast path's go
    to its C handlers)."""
    seen: list[int] = []
    original = device.fill

    def fill(queue: int, request: object) -> int | None:
        seen.append(queue)
        return original(queue, request)  # type: ignore[arg-type]

    monkeypatch.setattr(device, "fill", fill)
    return seen


async def test_the_fast_path_carries_frames_both_ways_without_python(tmp_path, monkeypatch):
    device = net_device(tmp_path)
    python = count_python_fills(device, monkeypatch)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            guest = await vhost_user_guest(frontend, ram)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            with trio.fail_after(5):
                while device.peer is None:
                    await trio.sleep(0.01)
            to_guest = [frame(60 + (n * 37) % 1455, n % 256) for n in range(300)]
            await send_all(peer, stream(*to_guest))
            assert await guest.receive(300) == to_guest
            to_peer = [frame(1514 - (n * 53) % 1450, n % 256) for n in range(300)]
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def read() -> None:
                    got.extend(await read_frames(peer, 300))

                nursery.start_soon(read)
                for f in to_peer:
                    await guest.send(f)
            assert got == to_peer
            peer.close()
    finally:
        ram.close()
        device.close()
    assert python == []
    assert device._settings.frames_to_guest == 300 and device._settings.frames_to_peer == 300


async def test_what_the_fast_path_leaves_to_python_keeps_the_order(tmp_path, monkeypatch):
    """A frame that needs several receive buffers and a transmit buffer
    with an offload flag go to Python; the frames around them stay in
    order and the fast path takes over again."""
    device = net_device(tmp_path, mtu=9000)
    python = count_python_fills(device, monkeypatch)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            guest = await vhost_user_guest(frontend, ram)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            with trio.fail_after(5):
                while device.peer is None:
                    await trio.sleep(0.01)
            frames = [frame(100, 1), frame(9014, 2), frame(200, 3)] + [
                frame(300, n) for n in range(40)
            ]
            await send_all(peer, stream(*frames))
            assert await guest.receive(len(frames)) == frames
            assert 0 in python  # the big one, over 5 buffers
            address = guest.tx_buffers.pop()
            ram.write(address, sent(frame(60, 9), flags=1))  # NEEDS_CSUM: not offered
            guest.txq.ring.add([(address, HEADER.size + 60)], [], address)
            await guest.txq.kick_async()
            await guest.send(frame(61, 8))
            assert await read_frames(peer, 1) == [frame(61, 8)]
            assert device.dropped == 1 and 1 in python
            python.clear()
            await peer.send(stream(frame(70, 4)))
            assert await guest.receive(1) == [frame(70, 4)]
            assert python == []  # back on the fast path
            peer.close()
    finally:
        ram.close()
        device.close()


async def test_transmit_buffers_the_fast_path_refuses_are_dropped_by_python(tmp_path):
    """Over vhost-user, where the fast path runs: a frame over the MTU, one
    shorter than an Ethernet header and a segmentation offload reach Python,
    which drops and counts them; none reaches the peer."""
    device = net_device(tmp_path)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            guest = await vhost_user_guest(frontend, ram)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            with trio.fail_after(5):
                while device.peer is None:
                    await trio.sleep(0.01)
            for bad in (sent(frame(1519)), sent(b"\x00" * 13), sent(frame(60), gso=1)):
                address = guest.tx_buffers.pop()
                ram.write(address, bad)
                guest.txq.ring.add([(address, len(bad))], [], address)
                await guest.txq.kick_async()
            await guest.send(frame(62, 7))
            assert await read_frames(peer, 1) == [frame(62, 7)]
            assert device.dropped == 3
            peer.close()
    finally:
        ram.close()
        device.close()


async def test_a_slow_peer_and_a_slow_guest_hold_the_frames_back_not_lose_them(tmp_path):
    """More than the queues hold each way: the peer reads slowly while the
    guest sends, then the peer sends faster than the guest takes."""
    device = net_device(tmp_path)
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            guest = await vhost_user_guest(frontend, ram)
            peer = await connect_peer(str(tmp_path / "wire.sock"))
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with trio.fail_after(5):
                while device.peer is None:
                    await trio.sleep(0.01)
            count = 3 * BUFFERED // 1518
            to_peer = [frame(1514, n % 256) for n in range(count)]
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def read_later() -> None:
                    await trio.sleep(0.5)  # everything the guest sends meanwhile waits
                    got.extend(await read_frames(peer, count, timeout=30))

                nursery.start_soon(read_later)
                for f in to_peer:
                    await guest.send(f)
            assert got == to_peer
            to_guest = [frame(1000, n % 256) for n in range(4 * BUFFERED // 1000)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, peer, stream(*to_guest))
                assert await guest.receive(len(to_guest), timeout=30) == to_guest
            peer.close()
    finally:
        ram.close()
        device.close()


async def send_all(peer: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await peer.send(view) :]
