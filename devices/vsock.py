"""virtio-vsock (virtio 1.2 5.10): guest stream sockets to host UNIX sockets.

The host side follows the "hybrid vsock" conventions of Firecracker and
vhost-device-vsock, so their host tools work unchanged:

- A host program connects to the UNIX socket ``--uds-path PATH`` and writes
  ``CONNECT <port>\\n``; once the guest's listener on that port accepts, it
  reads ``OK <host port>\\n`` and then talks to the guest. A refused port
  closes its connection.
- A guest ``connect()`` to CID 2 (the host), port P reaches the program
  listening on the UNIX socket ``PATH_P``. The jail binds PATH's directory
  into its empty root, read-write, and nothing else (see
  ``jail_directories``); the daemon's user must be allowed to connect there.

Stream sockets only (no seqpacket), with the spec's credit-based flow
control: the guest may have ``BUF_ALLOC`` bytes in flight towards a host
program per connection, the device sends no more than the guest's credit,
and a host program is read only while fewer than ``TO_GUEST`` bytes wait
for the guest. Connections do not outlive the daemon: after a restart or a
migration every connection the guest had is reset (RST), and over a
transport that gives the device its event queue (vfio-user) the guest also
gets a transport reset, so its sockets fail cleanly instead of hanging.
"""

from __future__ import annotations

import argparse
import enum
import os
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import trio

from vfiouserd.devices.virtio import DeviceId, Request, VirtioDevice
from vfiouserd.log import get_logger
from vfiouserd.sockets import listen_on_path
from vfiouserd.state import BOOL, U32, U64, Field, Schema, StateError, records

log = get_logger("vsock")

HEADER = struct.Struct("<QQIIIHHIII")  # src/dst cid, src/dst port, len, type, op, flags, credit
CONFIG = struct.Struct("<Q")  # guest_cid
EVENT = struct.Struct("<I")
RX, TX, EVENTS = 0, 1, 2
HOST_CID = 2
TYPE_STREAM = 1
EVENT_TRANSPORT_RESET = 0
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
MAX_PAYLOAD = 64 << 10  # Linux's largest packet
BUF_ALLOC = 256 << 10  # per connection, guest to host: the credit we give
TO_GUEST = 64 << 10  # per connection, host to guest: read from the host no further
READ_SIZE = 16 << 10
FIRST_HOST_PORT = 1 << 30  # ports of host-initiated connections, as Firecracker numbers them
CONNECT_LINE = 64
CONNECT_TIMEOUT = 10.0
MAX_STREAMS = 1024


class Op(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(eq=False)
class Stream:
    """One connection: ``host_port`` is the host end's port as the guest sees it."""

    host_port: int
    guest_port: int
    host_initiated: bool
    open: bool = False  # both ends agreed (REQUEST answered)
    gone: bool = False  # reset by either side: the host task closes the socket
    sock: trio.socket.SocketType | None = None
    to_host: bytearray = field(default_factory=bytearray)
    to_guest: bytearray = field(default_factory=bytearray)
    guest_buf_alloc: int = 0
    guest_fwd_cnt: int = 0
    sent: int = 0  # bytes sent to the guest (tx_cnt)
    forwarded: int = 0  # guest bytes handed to the host (fwd_cnt)
    told_forwarded: int = 0  # the fwd_cnt the guest last heard
    guest_shutdown: int = 0  # SHUTDOWN flags the guest sent
    host_done: bool = False  # the host end will send no more
    told_shutdown: bool = False
    host_shut_write: bool = False
    update_queued: bool = False
    greeted: bool = False  # a host-initiated one: its program got OK

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    @property
    def credit(self) -> int:
        """Bytes the guest has room for now."""
        return max(0, self.guest_buf_alloc - (self.sent - self.guest_fwd_cnt))


def check_guest_cid(cid: int) -> None:
    # 0-2 are the hypervisor, local and host; -1 is "any".
    if not 3 <= cid < 0xFFFFFFFF:
        raise ValueError(f"--guest-cid {cid}: 3 .. 4294967294")


STREAM_RECORD = records(host_port=U32, guest_port=U32)


class VirtioVsock(VirtioDevice):
    name = "vsock"
    description = "virtio-vsock: guest stream sockets to host UNIX sockets (hybrid vsock)"
    device_id = DeviceId.SOCKET
    vhost_user_type = "vsock"
    max_queues = 3
    # Packets for the guest wait for its receive buffers, the transport reset
    # for an event buffer; the transmit queue is answered at once.
    host_fed_queues = frozenset({RX, EVENTS})
    syscalls = frozenset({"socket", "connect", "shutdown"})  # reaching PATH_<port>
    # The connections to reset after a restart or a migration.
    # Loaded in this order: the records set a reset due.
    state = Schema(
        1,
        Field("guest_cid", U64),
        Field("transport_reset_due", BOOL),
        Field("stream_records", STREAM_RECORD),
    )

    def __init__(
        self, guest_cid: int = 3, uds_path: str | None = None, listener: socket.socket | None = None
    ) -> None:
        super().__init__(num_queues=3)
        check_guest_cid(guest_cid)
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = listener
        self.jail_directories = (os.path.dirname(os.path.abspath(uds_path)),) if uds_path else ()
        self.streams: dict[tuple[int, int], Stream] = {}
        self.control: deque[tuple[Stream | None, bytes]] = deque()  # headers, oldest first
        self.transport_reset_due = False
        self._next_host_port = FIRST_HOST_PORT
        self._serving: set[Stream] = set()
        self._turn = 0  # round robin over streams with data
        # handle() and fill() may run on a ring's worker thread, the host
        # side on the event loop: streams change under the lock.
        self._lock = threading.Lock()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--guest-cid", type=int, default=3, help="the guest's CID")
        parser.add_argument(
            "--uds-path",
            metavar="PATH",
            help="host programs connect here (CONNECT <port>); the guest reaches PATH_<port>",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        check_guest_cid(args.guest_cid)  # before the socket is made
        listener = None if args.uds_path is None else listen_on_path(args.uds_path)
        return cls(args.guest_cid, args.uds_path, listener)

    # -- config and reset -----------------------------------------------------

    def config(self) -> bytes:
        return CONFIG.pack(self.guest_cid)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            for stream in self.streams.values():
                stream.gone = True
                if stream not in self._serving and stream.sock is not None:
                    # No task of run() holds it (rings stopped first): close it
                    # here, without trio (this may not be the loop's thread).
                    os.close(stream.sock.detach())
                    stream.sock = None
            self.streams.clear()
            self.control.clear()
            self.transport_reset_due = False
        self.wake_host_side()

    # -- packets from the guest ----------------------------------------------

    def handle(self, queue: int, request: Request) -> int:
        packet = request.read(min(request.readable_size, HEADER.size + MAX_PAYLOAD))
        if len(packet) < HEADER.size:
            log.warning("vsock.short_packet", size=len(packet))
            return 0
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = (
            HEADER.unpack_from(packet)
        )
        if length > len(packet) - HEADER.size:
            log.warning("vsock.bad_length", length=length, carried=len(packet) - HEADER.size)
            return 0
        if src_cid != self.guest_cid:
            log.warning("vsock.foreign_source", src_cid=src_cid)
            return 0
        payload = packet[HEADER.size : HEADER.size + length]
        request.describe(op=_op_name(op), src_port=src_port, dst_port=dst_port, length=length)
        with self._lock:
            told = len(self.control)
            credit = self._packet(
                dst_cid, src_port, dst_port, kind, op, flags, buf_alloc, fwd_cnt, payload
            )
            told = len(self.control) > told
        if told or credit:
            self.data_ready(RX)
        self.wake_host_side()
        return 0

    def _packet(
        self,
        dst_cid: int,
        guest_port: int,
        host_port: int,
        kind: int,
        op: int,
        flags: int,
        buf_alloc: int,
        fwd_cnt: int,
        payload: bytes,
    ) -> bool:
        """One packet from the guest (the lock held); True if it gave the
        device more credit to send with."""
        stream = self.streams.get((host_port, guest_port))
        if op == Op.RST:
            if stream is not None:
                self._forget(stream)
            return False
        if dst_cid != HOST_CID or kind != TYPE_STREAM or op not in tuple(Op):
            log.warning("vsock.refused", dst_cid=dst_cid, type=kind, op=op)
            self._reset(host_port, guest_port)
            return False
        if op == Op.REQUEST:
            if stream is not None or self.uds_path is None or len(self.streams) >= MAX_STREAMS:
                self._reset(host_port, guest_port)
                return False
            stream = Stream(host_port, guest_port, host_initiated=False)
            self.streams[stream.key] = stream
        elif stream is None:
            self._reset(host_port, guest_port)
            return False
        credit = stream.credit
        stream.guest_buf_alloc, stream.guest_fwd_cnt = buf_alloc, fwd_cnt
        more_credit = stream.credit > credit
        if op == Op.RESPONSE:
            if not stream.host_initiated or stream.open:
                self._reset_stream(stream)
                return more_credit
            stream.open = True
        elif op == Op.RW:
            if not stream.open or stream.guest_shutdown & SHUTDOWN_SEND:
                self._reset_stream(stream)
                return more_credit
            if len(stream.to_host) + len(payload) > BUF_ALLOC:  # more than its credit
                log.warning("vsock.credit_overrun", port=guest_port, bytes=len(payload))
                self._reset_stream(stream)
                return more_credit
            stream.to_host += payload
        elif op == Op.SHUTDOWN:
            stream.guest_shutdown |= flags & SHUTDOWN_BOTH
            if stream.guest_shutdown & SHUTDOWN_RCV:
                stream.to_guest.clear()  # it reads no more
            self._finish_if_done(stream)
        elif op == Op.CREDIT_REQUEST:
            self._credit_update(stream)
        return more_credit

    def _reset(self, host_port: int, guest_port: int) -> None:
        self.control.append((None, self._header(Op.RST, host_port, guest_port)))

    def _reset_stream(self, stream: Stream) -> None:
        self._forget(stream)
        self.control.append((None, self._header(Op.RST, stream.host_port, stream.guest_port)))

    def _forget(self, stream: Stream) -> None:
        stream.gone = True
        self.streams.pop(stream.key, None)
        self.control = deque((s, h) for s, h in self.control if s is not stream)

    def _credit_update(self, stream: Stream) -> None:
        if not stream.update_queued:
            stream.update_queued = True
            self.control.append((stream, b""))  # the header is made when sent: latest counts

    def _finish_if_done(self, stream: Stream) -> None:
        """Both ends are done, or the guest closed and has nothing left for the
        host: end with RST, as Linux does when it receives a full shutdown."""
        guest_closed = stream.guest_shutdown == SHUTDOWN_BOTH and not stream.to_host
        both_done = (
            stream.told_shutdown and stream.guest_shutdown & SHUTDOWN_SEND and not stream.to_host
        )
        if stream.open and (guest_closed or both_done):
            self._reset_stream(stream)

    def _header(
        self,
        op: Op,
        host_port: int,
        guest_port: int,
        *,
        length: int = 0,
        flags: int = 0,
        stream: Stream | None = None,
    ) -> bytes:
        buf_alloc = forwarded = 0
        if stream is not None:
            buf_alloc, forwarded = BUF_ALLOC, stream.forwarded
            stream.told_forwarded = forwarded
        return HEADER.pack(
            HOST_CID,
            self.guest_cid,
            host_port,
            guest_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            forwarded,
        )

    # -- packets for the guest ---------------------------------------------------

    def has_data(self, queue: int) -> bool:
        with self._lock:
            if queue == EVENTS:
                return self.transport_reset_due
            return bool(self.control) or any(self._sendable(s) for s in self.streams.values())

    @staticmethod
    def _sendable(stream: Stream) -> bool:
        if not stream.open:
            return False
        if stream.to_guest:
            return stream.credit > 0
        return stream.host_done and not stream.told_shutdown

    def fill(self, queue: int, request: Request) -> int | None:
        if queue == EVENTS:
            with self._lock:
                if not self.transport_reset_due:
                    return None
                if request.writable_size < EVENT.size:
                    log.warning("vsock.event_buffer_too_small", size=request.writable_size)
                    return 0
                self.transport_reset_due = False
            return request.write(EVENT.pack(EVENT_TRANSPORT_RESET))
        if request.writable_size < HEADER.size:
            log.warning("vsock.rx_buffer_too_small", size=request.writable_size)
            return 0
        with self._lock:
            packet = self._next_packet(request.writable_size - HEADER.size)
            if packet is None:
                return None
        return request.write(packet)

    def _next_packet(self, room: int) -> bytes | None:
        """The next packet for the guest, at most ``room`` bytes of payload (the lock held)."""
        while self.control:
            stream, header = self.control.popleft()
            if stream is None:
                return header
            stream.update_queued = False
            if not stream.gone:
                return self._header(Op.CREDIT_UPDATE, *stream.key, stream=stream)
        streams = [s for s in self.streams.values() if self._sendable(s)]
        if not streams:
            return None
        self._turn = (self._turn + 1) % len(streams)
        stream = streams[self._turn]
        if not stream.to_guest:
            stream.told_shutdown = True
            packet = self._header(Op.SHUTDOWN, *stream.key, flags=SHUTDOWN_SEND, stream=stream)
            self._finish_if_done(stream)
            return packet
        size = min(len(stream.to_guest), stream.credit, room, MAX_PAYLOAD)
        data = bytes(stream.to_guest[:size])
        del stream.to_guest[:size]
        stream.sent += size
        if len(stream.to_guest) + size >= TO_GUEST > len(stream.to_guest):
            self.wake_host_side()  # its reader waits for room
        return self._header(Op.RW, *stream.key, length=size, stream=stream) + data

    # -- the host's side ------------------------------------------------------------

    async def run(self) -> None:
        # Connections outlive run(): rings stopped and started again (a
        # paused VM) neither cut them nor lose what they carried.
        async with trio.open_nursery() as nursery:
            if self.listener is not None:
                nursery.start_soon(self._accept, trio.socket.from_stdlib_socket(self.listener))
            while True:
                wakeup = self.host_side_wakeup()
                with self._lock:
                    new = [s for s in self.streams.values() if s not in self._serving]
                for stream in new:
                    self._serving.add(stream)
                    nursery.start_soon(self._serve, stream)
                await wakeup.wait()

    async def _accept(self, listening: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                client, _ = await listening.accept()
                nursery.start_soon(self._host_connects, client)

    async def _host_connects(self, client: trio.socket.SocketType) -> None:
        """A host program's ``CONNECT <port>``: ask the guest (``_serve``
        answers ``OK <port>`` once it accepts)."""
        port = None
        try:
            port = await self._connect_line(client)
        finally:
            if port is None:
                client.close()
        if port is None:
            return
        with self._lock:
            if len(self.streams) >= MAX_STREAMS:
                log.warning("vsock.too_many_streams")
                client.close()
                return
            stream = Stream(self._free_host_port(port), port, host_initiated=True)
            stream.sock = client
            self.streams[stream.key] = stream
            self.control.append((None, self._header(Op.REQUEST, *stream.key, stream=stream)))
        self.data_ready(RX)
        self.wake_host_side()  # run() serves it

    @staticmethod
    async def _connect_line(client: trio.socket.SocketType) -> int | None:
        line = b""
        with trio.move_on_after(CONNECT_TIMEOUT):
            while not line.endswith(b"\n") and len(line) < CONNECT_LINE:
                try:
                    data = await client.recv(1)  # no further: the rest is the guest's
                except OSError:
                    return None
                if not data:
                    return None
                line += data
        word, _, port = line.decode(errors="replace").strip().partition(" ")
        if not (line.endswith(b"\n") and word == "CONNECT" and port.isdigit()) or (
            int(port) > 0xFFFFFFFF
        ):
            log.warning("vsock.bad_connect", line=line[:CONNECT_LINE])
            return None
        return int(port)

    def _free_host_port(self, guest_port: int) -> int:
        while (self._next_host_port, guest_port) in self.streams:
            self._next_host_port += 1
        port = self._next_host_port
        self._next_host_port = FIRST_HOST_PORT + (port + 1 - FIRST_HOST_PORT) % (1 << 30)
        return port

    async def _serve(self, stream: Stream) -> None:
        try:
            if stream.host_initiated and not stream.greeted:
                if not await self._until(stream, lambda: stream.open):
                    return
                assert stream.sock is not None
                try:
                    await stream.sock.send(f"OK {stream.host_port}\n".encode())
                except OSError as exc:
                    self._host_end_failed(stream, exc)
                    return
                stream.greeted = True
            elif stream.sock is None and not await self._connect_host(stream):
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_host, stream)
                nursery.start_soon(self._to_guest, stream)
                await self._until(stream, lambda: False)  # until it is gone
                nursery.cancel_scope.cancel()  # a recv or send waiting on the host end
        finally:
            with self._lock:
                self._serving.discard(stream)
                if stream.gone and stream.sock is not None:
                    stream.sock.close()
                    stream.sock = None

    def _host_end_failed(self, stream: Stream, error: OSError) -> None:
        log.info("vsock.host_end_failed", port=stream.guest_port, error=str(error))
        with self._lock:
            if not stream.gone:
                self._reset_stream(stream)
        self.data_ready(RX)
        self.wake_host_side()

    async def _until(self, stream: Stream, ready: Any) -> bool:
        """Wait until ``ready()``; False if the stream went first."""
        while True:
            wakeup = self.host_side_wakeup()
            with self._lock:
                if stream.gone:
                    return False
                if ready():
                    return True
            await wakeup.wait()

    async def _connect_host(self, stream: Stream) -> bool:
        """The guest's REQUEST: connect to ``PATH_<port>``, answer RESPONSE or RST."""
        assert self.uds_path is not None
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(f"{self.uds_path}_{stream.host_port}".encode())
        except OSError as exc:
            sock.close()
            log.info("vsock.refused_by_host", port=stream.host_port, error=exc.strerror)
            with self._lock:
                if not stream.gone:
                    self._reset_stream(stream)
            self.data_ready(RX)
            return False
        except BaseException:
            sock.close()
            raise
        with self._lock:
            if stream.gone:
                sock.close()
                return False
            stream.sock = sock
            stream.open = True
            self.control.append((None, self._header(Op.RESPONSE, *stream.key, stream=stream)))
        self.data_ready(RX)
        return True

    async def _to_guest(self, stream: Stream) -> None:
        """The host end's bytes, read while the guest takes them."""
        assert stream.sock is not None
        while True:
            wakeup = self.host_side_wakeup()
            with self._lock:
                if stream.gone or stream.guest_shutdown & SHUTDOWN_RCV:
                    return
                room = TO_GUEST - len(stream.to_guest)
            if room <= 0:
                await wakeup.wait()
                continue
            try:
                data = await stream.sock.recv(min(room, READ_SIZE))
            except OSError as exc:
                self._host_end_failed(stream, exc)
                return
            with self._lock:
                if stream.gone:
                    return
                if data:
                    stream.to_guest += data
                else:
                    stream.host_done = True
            self.data_ready(RX)
            if not data:
                return

    async def _to_host(self, stream: Stream) -> None:
        """The guest's bytes, sent as fast as the host end reads them."""
        assert stream.sock is not None
        while True:
            wakeup = self.host_side_wakeup()
            with self._lock:
                if stream.gone:
                    return
                chunk = bytes(stream.to_host[:READ_SIZE])
                shut = not chunk and stream.guest_shutdown & SHUTDOWN_SEND
            try:
                if shut and not stream.host_shut_write:
                    stream.host_shut_write = True
                    stream.sock.shutdown(socket.SHUT_WR)
                if not chunk:
                    await wakeup.wait()
                    continue
                sent = await stream.sock.send(chunk)
            except OSError as exc:
                self._host_end_failed(stream, exc)
                return
            with self._lock:
                del stream.to_host[:sent]
                stream.forwarded += sent
                # Tell the guest about room once a quarter of it is free
                # again, or everything is: it may be waiting for credit.
                if not stream.to_host or stream.forwarded - stream.told_forwarded >= BUF_ALLOC // 4:
                    self._credit_update(stream)
                self._finish_if_done(stream)
            self.data_ready(RX)

    # -- state ----------------------------------------------------------------

    @property
    def stream_records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"host_port": s.host_port, "guest_port": s.guest_port}
                for s in self.streams.values()
            ]

    @stream_records.setter
    def stream_records(self, saved: list[dict[str, Any]]) -> None:
        # The host ends stayed with the previous daemon: the guest hears
        # that each of these connections is reset.
        with self._lock:
            for record in saved:
                self._reset(record["host_port"], record["guest_port"])
            if saved:
                self.transport_reset_due = True

    def check_state(self, values: dict[str, Any]) -> None:
        if values["guest_cid"] != self.guest_cid:
            raise StateError(
                f"the saved device has guest CID {values['guest_cid']}, this one {self.guest_cid}"
            )

    def close(self) -> None:
        for stream in self.streams.values():
            if stream.sock is not None:  # at exit, after the event loop: no trio close
                os.close(stream.sock.detach())
        if self.listener is not None:
            self.listener.close()


def _op_name(op: int) -> str:
    return Op(op).name if op in Op._value2member_map_ else str(op)
