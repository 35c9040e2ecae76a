"""virtio-net (virtio 1.2 5.1): a network device whose wire is a UNIX stream socket.

The host side carries Ethernet frames, each after a 4-byte big-endian
length: the framing of QEMU's ``-netdev stream`` and of passt.
``--stream-socket PATH`` connects to such a socket (again, every second,
after the peer goes); ``--stream-listen PATH`` takes one peer at a time. The
link is up while a peer is there (VIRTIO_NET_S_LINK_UP, with a config
change interrupt where the device owns the config space: vfio-user).

Features: MAC, STATUS, MTU (``--mtu``, 1500 by default: longer frames from
either side are dropped and counted), MRG_RXBUF (a frame spread over
several receive buffers), MQ with ``--queue-pairs`` and the control queue
(VQ_PAIRS_SET) where the transport gives it to the device. No checksum or
segmentation offloads are offered: the guest sends whole, checksummed
frames. Over vhost-user QEMU keeps the config space and the control queue;
it asks for a RARP announcement after a migration (``announce``).
Backpressure both ways: a peer is read only while fewer than 256 KiB of
frames wait for the guest, the guest's transmit buffers wait while
``BUFFERED`` bytes wait for the peer. With no peer (an unplugged cable) the
guest's frames are lost, as on a real link, never held: over vhost-user the
guest cannot see the link go down, and a transmit queue held for long makes
Linux reset the device.

The frames wait in two byte queues in the stream's format, in C
(net_fastpath.c), shared with the native fast path: on split rings over
vhost-user its worker threads fill a receive buffer with a frame and send a
transmit buffer's frame per request, with the GIL released; this module
reads the peer's socket into the queue (up to 64 KiB at a time), keeps the
connection, and serves whatever the fast path leaves to it (frames spread
over several buffers, bad buffers, no peer, vfio-user, packed rings).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import socket
import struct
from typing import Any, Self

import trio

from vfiouserd._native import ffi, lib
from vfiouserd.devices.virtio import (
    DeviceId,
    NativeHandler,
    Request,
    VirtioDevice,
    adopt_socket,
    bit,
)
from vfiouserd.log import get_logger
from vfiouserd.sockets import listen_on_path
from vfiouserd.state import BYTES, U16, Field, Schema, StateError

log = get_logger("net")

F_MTU, F_MAC, F_MRG_RXBUF, F_STATUS, F_CTRL_VQ, F_MQ = 3, 5, 15, 16, 17, 22
HEADER = struct.Struct("<BBHHHHH")  # flags, gso type, hdr len, gso size, csum start/offset, buffers
CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
LENGTH = struct.Struct(">I")  # before each frame on the stream
STATUS_LINK_UP = 1
CTRL = struct.Struct("<BB")  # class, command; the device writes one ack byte after the data
CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET = 4, 0
ACK_OK, ACK_ERR = 0, 1
ETHERNET = 14 + 4  # header and a VLAN tag
MAX_PAIRS = 16
BUFFERED = 256 << 10  # guest to peer, bytes (net_fastpath.c's VFU_NET_FOR_PEER)
FOR_GUEST = (256 + 64) << 10  # whole frames read ahead for the guest, at most
RECONNECT = 1.0
MAX_STREAM_FRAME = 1 << 18  # a longer length prefix is not a frame: the peer is cut off


def rx(pair: int) -> int:
    return 2 * pair


def tx(pair: int) -> int:
    return 2 * pair + 1


def check_options(mtu: int, pairs: int) -> None:
    if not 68 <= mtu <= 65535:
        raise ValueError(f"--mtu {mtu}: 68 .. 65535")
    if not 1 <= pairs <= MAX_PAIRS:
        raise ValueError(f"--queue-pairs {pairs}: 1 .. {MAX_PAIRS}")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"--mac {text!r}: six hex bytes, e.g. 52:54:00:12:34:56")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"--mac {text!r}: six hex bytes, e.g. 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise ValueError(f"--mac {text!r} is a multicast address")
    return mac


def rarp(mac: bytes) -> bytes:
    """The frame a switch learns ``mac`` from (RFC 903 reverse request)."""
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return b"\xff" * 6 + mac + b"\x80\x35" + body.ljust(46, b"\0")


class VirtioNet(VirtioDevice):
    name = "net"
    description = (
        "virtio-net: Ethernet frames over a UNIX stream socket (QEMU -netdev stream, passt)"
    )
    device_id = DeviceId.NET
    vhost_user_type = "net"
    feature_names = {F_MTU: "mtu", F_MAC: "mac", F_MRG_RXBUF: "mrg-rxbuf", F_MQ: "mq"}
    max_queues = 2 * MAX_PAIRS + 1
    config_can_change = True  # the link status
    announces = True
    syscalls = frozenset({"socket", "connect"})  # --stream-socket: (re)connecting after the jail
    merged_fill_bytes = HEADER.size + 65535 + ETHERNET
    state = Schema(
        1,
        Field("mac", BYTES),
        Field("mtu", U16),
        Field("active_pairs", U16),
        Field("frames_to_guest", BYTES),
        Field("bytes_to_peer", BYTES),
        Field("partial_from_peer", BYTES),  # a frame the peer has sent part of
    )

    def __init__(
        self,
        mac: bytes,
        *,
        mtu: int = 1500,
        pairs: int = 1,
        peer_path: str | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        check_options(mtu, pairs)
        features = bit(F_MAC) | bit(F_STATUS) | bit(F_MTU) | bit(F_MRG_RXBUF) | bit(F_CTRL_VQ)
        if pairs > 1:
            features |= bit(F_MQ)
        super().__init__(features=features, num_queues=2 * pairs + 1)
        self.mac, self.mtu, self.pairs = mac, mtu, pairs
        self.peer_path, self.listener = peer_path, listener
        self.jail_directories = (os.path.dirname(peer_path),) if peer_path else ()
        # Receive queues wait for frames, transmit queues for room towards
        # the peer; the control queue (the last) is answered at once.
        self.host_fed_queues = frozenset(range(2 * pairs))
        self.merged_queues = frozenset(rx(pair) for pair in range(pairs))
        self._listening: trio.socket.SocketType | None = None
        # The frames both ways (net_fastpath.c), with their own lock: the
        # fast path's threads, fill() on a ring's worker thread and the
        # peer's side on the event loop all use them. It tells this side
        # through the eventfd when the guest made room or left bytes unsent.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        queues = lib.vfu_net_new(mtu, self._wake_fd)
        if queues == ffi.NULL:
            raise MemoryError("virtio-net frame queues")
        self._queues = ffi.gc(queues, lib.vfu_net_free)
        self._settings = lib.vfu_net_settings(self._queues)
        self._handles = [
            ffi.new("struct vfu_net_queue *", {"net": self._queues, "index": index})
            for index in range(2 * pairs)
        ]
        self._frame = ffi.new("uint8_t[]", 65535 + ETHERNET)  # fill()'s copy of a frame
        self._frame_size = ffi.new("uint32_t *")
        self._peer: trio.socket.SocketType | None = None
        self.dropped = 0
        self.lost_without_peer = 0  # since the last peer went

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        wire = parser.add_mutually_exclusive_group()
        wire.add_argument("--stream-socket", metavar="PATH", help="connect to a frame stream")
        wire.add_argument("--stream-listen", metavar="PATH", help="take a frame stream's peer")
        parser.add_argument("--mac", help="the MAC address (default: one made from the path)")
        parser.add_argument("--mtu", type=int, default=1500, help="the largest frame's payload")
        parser.add_argument("--queue-pairs", type=int, default=1, help="receive/transmit pairs")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        path = args.stream_socket or args.stream_listen
        if path is None:
            raise ValueError("give --stream-socket PATH or --stream-listen PATH")
        path = os.path.abspath(path)
        if args.mac is not None:
            mac = parse_mac(args.mac)
        else:  # locally administered, the same for the same path: restarts agree
            mac = b"\x52\x54\x00" + hashlib.sha256(path.encode()).digest()[:3]
        check_options(args.mtu, args.queue_pairs)  # before the socket is made
        if args.stream_listen is not None:
            return cls(mac, mtu=args.mtu, pairs=args.queue_pairs, listener=listen_on_path(path))
        return cls(mac, mtu=args.mtu, pairs=args.queue_pairs, peer_path=path)

    # -- config space and control queue ----------------------------------------------

    def config(self) -> bytes:
        status = STATUS_LINK_UP if self.peer is not None else 0
        return CONFIG.pack(self.mac, status, self.pairs, self.mtu)

    @property
    def peer(self) -> trio.socket.SocketType | None:
        return self._peer

    @peer.setter
    def peer(self, peer: trio.socket.SocketType | None) -> None:
        # Under the queues' lock: no fast path thread sends to an fd closed
        # (and maybe reused) after this.
        lib.vfu_net_set_peer(self._queues, -1 if peer is None else peer.fileno())
        self._peer = peer

    @property
    def active_pairs(self) -> int:
        return int(self._settings.active_pairs)

    @active_pairs.setter
    def active_pairs(self, pairs: int) -> None:
        self._settings.active_pairs = pairs

    def native_handler(self, queue: int) -> NativeHandler | None:
        if queue >= 2 * self.pairs:
            return None  # the control queue: Python's
        handle = self._handles[queue]
        if queue % 2:
            return NativeHandler(
                lib.vfu_net_tx_check, lib.vfu_net_tx_serve, handle, None, lib.vfu_net_tx_batch_done
            )
        return NativeHandler(
            lib.vfu_net_rx_check, lib.vfu_net_rx_serve, handle, lib.vfu_net_rx_ready
        )

    def reset(self) -> None:
        super().reset()
        self.active_pairs = 1
        # The frames read for the old driver go; the start of one the peer
        # is still sending stays, or the stream would be read out of step.
        self._load_to_guest(self.partial_from_peer)
        self.wake_host_side()

    def statistics(self) -> dict[str, Any]:
        return {
            "peer": self.peer is not None,
            "frames_dropped": self.dropped,
            "active_pairs": self.active_pairs,
        }

    def handle(self, queue: int, request: Request) -> int:
        """The control queue: class and command, data, then our ack byte."""
        data = request.read(min(request.readable_size, 64))
        if request.writable_size < 1 or len(data) < CTRL.size:
            log.warning("net.control_malformed", readable=len(data), writable=request.writable_size)
            return 0
        kind, command = CTRL.unpack_from(data)
        request.describe(type="control", ctrl_class=kind, command=command)
        ack = ACK_ERR
        if (kind, command) == (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) and len(data) >= CTRL.size + 2:
            (pairs,) = struct.unpack_from("<H", data, CTRL.size)
            if self.has_feature(F_MQ) and 1 <= pairs <= self.pairs:
                self.active_pairs = pairs
                ack = ACK_OK
                log.info("net.queue_pairs", pairs=pairs)
        if ack != ACK_OK:
            log.warning("net.control_refused", kind=kind, command=command)
        return request.write(bytes([ack]))

    # -- frames for the guest --------------------------------------------------------

    def has_data(self, queue: int) -> bool:
        if queue % 2:
            return bool(lib.vfu_net_size(self._queues, lib.VFU_NET_TO_PEER) < BUFFERED)
        return bool(lib.vfu_net_whole_size(self._queues)) and queue < 2 * self.active_pairs

    def fill(self, queue: int, request: Request) -> int | None:
        if queue % 2:
            return self._transmit(request)
        merged = self.has_feature(F_MRG_RXBUF)
        room = request.writable_size if merged else (request.parts or [0])[0]
        room = max(0, min(room - HEADER.size, len(self._frame)))
        while True:
            outcome = lib.vfu_net_take(self._queues, self._frame, room, self._frame_size)
            size = int(self._frame_size[0])
            if outcome < 0:
                return None
            if outcome == 0:
                break
            if merged:  # more buffers may come: it waits for them
                return None
            lib.vfu_net_drop_oldest(self._queues)
            self._drop("net.frame_too_big_for_buffer", size)
        count = request.buffers_used(HEADER.size + size)
        request.describe(type="receive", frame=size, num_buffers=count)
        header = HEADER.pack(0, 0, 0, 0, 0, 0, count)
        return request.write(header + ffi.buffer(self._frame, size)[:])

    def _transmit(self, request: Request) -> int:
        data = request.read(request.readable_size)
        if len(data) < HEADER.size:
            self._drop("net.short_transmit", len(data))
            return 0
        flags, gso_type = data[0], data[1]
        frame = data[HEADER.size :]
        request.describe(type="transmit", frame=len(frame), flags=flags, gso_type=gso_type)
        if self.peer is None:  # no cable: what the guest sends is lost, as on a real link
            self.lost_without_peer += 1
            if self.lost_without_peer == 1:
                log.info("net.no_peer_dropping")
        elif flags or gso_type:  # no offload was offered
            self._drop("net.offload_not_offered", len(frame))
        elif not 14 <= len(frame) <= self.mtu + ETHERNET:
            self._drop("net.frame_size", len(frame))
        elif lib.vfu_net_queue_frame(self._queues, frame, len(frame)) != 0:
            self._drop("net.no_room_for_peer", len(frame))  # has_data said there was
        else:
            self.wake_host_side()
        return 0

    def _drop(self, event: str, size: int) -> None:
        self.dropped += 1
        log.warning(event, size=size, dropped=self.dropped)

    def announce(self, mac: bytes) -> None:
        """After a migration: a RARP from the guest's MAC tells the network
        where it went (vhost-user SEND_RARP)."""
        if lib.vfu_net_queue_frame(self._queues, rarp(mac), 60) != 0:
            self._drop("net.no_room_for_peer", 60)
        log.info("net.announce", mac=mac.hex(":"))
        self.wake_host_side()

    # -- the peer ------------------------------------------------------------------

    async def run(self) -> None:
        # The peer's connection outlives run(): rings stopped and started
        # again (a paused VM) do not cut it.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._relay_native_wakeups)
            await self._serve_peers()

    async def _serve_peers(self) -> None:
        while True:
            if self.peer is None:
                peer = await self._next_peer()
                self.partial_from_peer = b""  # a new stream starts with a frame
                self.peer = peer
                if self.lost_without_peer:
                    log.info("net.lost_without_peer", frames=self.lost_without_peer)
                log.info("net.link", up=True)
                self.config_changed()
            assert self.peer is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_peer, self.peer, nursery.cancel_scope)
                await self._from_peer(self.peer)
                nursery.cancel_scope.cancel()
            peer, self.peer = self.peer, None  # no thread sends to it from now on
            peer.close()
            lib.vfu_net_to_peer_clear(self._queues)  # what that peer did not take
            self.lost_without_peer = 0
            log.info("net.link", up=False)
            self.config_changed()

    async def _relay_native_wakeups(self) -> None:
        """The fast path's threads made room for the peer's frames or left
        bytes the peer did not take yet: the peer's tasks look again."""
        while True:
            await trio.lowlevel.wait_readable(self._wake_fd)
            try:
                os.eventfd_read(self._wake_fd)
            except BlockingIOError:
                continue
            self.wake_host_side()

    async def _next_peer(self) -> trio.socket.SocketType:
        if self.listener is not None:
            if self._listening is None:
                self._listening = trio.socket.from_stdlib_socket(self.listener)
            peer, _ = await self._listening.accept()
            return peer
        assert self.peer_path is not None
        while True:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(self.peer_path)
                return sock
            except OSError:
                sock.close()
            await trio.sleep(RECONNECT)

    async def _from_peer(self, peer: trio.socket.SocketType) -> None:
        """Frames from the peer, read while the guest takes them. What was
        read of an unfinished frame is device state: a restart between two
        reads carries it to the next daemon, which reads on from there."""
        while True:
            wakeup = self.host_side_wakeup()
            if not lib.vfu_net_wants_peer(self._queues):
                await wakeup.wait()
                continue
            await trio.lowlevel.wait_readable(peer)
            dropped = int(self._settings.dropped_from_peer)
            got = lib.vfu_net_pull(self._queues)
            if got == -errno.EAGAIN:
                continue
            if got == lib.VFU_NET_VIOLATION:
                log.warning("net.peer_violation", reason="a length no frame has")
                return
            if got <= 0:  # the end of the stream, or an error on it
                return
            if int(self._settings.dropped_from_peer) != dropped:
                self.dropped += int(self._settings.dropped_from_peer) - dropped
                size = int(self._settings.last_dropped_size)
                log.warning("net.peer_frame_size", size=size, dropped=self.dropped)
            if lib.vfu_net_whole_size(self._queues):
                for pair in range(self.active_pairs):
                    self.data_ready(rx(pair))

    async def _to_peer(self, peer: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        """The guest's frames, sent as fast as the peer reads them."""
        while True:
            wakeup = self.host_side_wakeup()
            was_full = lib.vfu_net_size(self._queues, lib.VFU_NET_TO_PEER) >= BUFFERED
            left = lib.vfu_net_flush(self._queues)
            if left < 0:
                scope.cancel()  # the reading side ends the connection
                return
            if was_full and left < BUFFERED:
                for pair in range(self.pairs):
                    self.data_ready(tx(pair))
            if left:
                await trio.lowlevel.wait_writable(peer)
            else:
                await wakeup.wait()

    # -- state ---------------------------------------------------------------------

    @property
    def frames_to_guest(self) -> bytes:
        return self._to_guest()[: lib.vfu_net_whole_size(self._queues)]

    @frames_to_guest.setter
    def frames_to_guest(self, data: bytes) -> None:
        split_frames(data)  # whole frames
        self._load_to_guest(data + self.partial_from_peer)

    @property
    def partial_from_peer(self) -> bytes:
        return self._to_guest()[lib.vfu_net_whole_size(self._queues) :]

    @partial_from_peer.setter
    def partial_from_peer(self, data: bytes) -> None:
        self._load_to_guest(self.frames_to_guest + data)

    def _to_guest(self) -> bytes:
        return self._copy(lib.VFU_NET_TO_GUEST, 0)  # only this thread adds to it

    def _copy(self, direction: int, more: int) -> bytes:
        room = lib.vfu_net_size(self._queues, direction) + more
        buffer = ffi.new("uint8_t[]", max(1, room))
        return bytes(ffi.buffer(buffer, lib.vfu_net_copy(self._queues, direction, buffer, room)))

    def _load_to_guest(self, data: bytes) -> None:
        if lib.vfu_net_load(self._queues, lib.VFU_NET_TO_GUEST, data, len(data)) != 0:
            raise ValueError("frames for the guest that the stream could not carry")

    @property
    def bytes_to_peer(self) -> bytes:
        # A fast path thread may add one frame meanwhile.
        return self._copy(lib.VFU_NET_TO_PEER, LENGTH.size + 65535 + ETHERNET)

    @bytes_to_peer.setter
    def bytes_to_peer(self, data: bytes) -> None:
        if lib.vfu_net_load(self._queues, lib.VFU_NET_TO_PEER, data, len(data)) != 0:
            raise ValueError(f"{len(data)} bytes for the peer: more than the device holds")

    def check_state(self, values: dict[str, Any]) -> None:
        if values["mtu"] != self.mtu:
            raise StateError(f"the saved device has an MTU of {values['mtu']}, this one {self.mtu}")
        if not 1 <= values["active_pairs"] <= self.pairs:
            raise StateError(
                f"{values['active_pairs']} queue pairs active, this one has {self.pairs}"
            )
        if len(values["partial_from_peer"]) >= LENGTH.size + MAX_STREAM_FRAME:
            raise StateError("a partial frame longer than any frame")
        if len(values["frames_to_guest"]) > FOR_GUEST:
            raise StateError("more frames for the guest than this device holds")
        if len(values["bytes_to_peer"]) > BUFFERED + LENGTH.size + 65535 + ETHERNET:
            raise StateError("more bytes for the peer than this device holds")
        if len(values["mac"]) != 6:
            raise StateError("a MAC address of another length")
        try:
            split_frames(values["frames_to_guest"])
        except ValueError as exc:
            raise StateError(f"frames for the guest: {exc}") from exc

    def host_fds(self) -> dict[str, int]:
        # The peer stays connected across a restart: what it sent meanwhile
        # waits in the socket for the next daemon.
        return {} if self.peer is None else {"peer": self.peer.fileno()}

    def adopt_host_fds(self, fds: dict[str, int]) -> None:
        self.peer = adopt_socket(fds, "peer", self.peer is not None, "net") or self.peer

    def close(self) -> None:
        if self.peer is not None:  # at exit, after the event loop: no trio close
            peer, self.peer = self.peer, None
            os.close(peer.detach())
        if self.listener is not None:
            self.listener.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1


def take_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole frames at the start of ``data`` (length-prefixed, as on the
    stream) and the rest, the start of the next one; ValueError for a length
    no frame has."""
    frames, at = [], 0
    while len(data) - at >= LENGTH.size:
        (length,) = LENGTH.unpack_from(data, at)
        if length > MAX_STREAM_FRAME:
            raise ValueError(f"a length of {length} bytes at {at}")
        if len(data) - at < LENGTH.size + length:
            break
        frames.append(data[at + LENGTH.size : at + LENGTH.size + length])
        at += LENGTH.size + length
    return frames, data[at:]


def split_frames(data: bytes) -> list[bytes]:
    """Frames in the state format (the stream's): whole ones only."""
    frames, rest = take_frames(data)
    if rest:
        raise ValueError(f"a frame cut short after {len(data) - len(rest)} bytes")
    return frames
