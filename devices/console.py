"""virtio-console (virtio 1.2 5.3): a console and named ports, each a host UNIX socket.

Every port listens on a UNIX socket made before the jail: ``--console PATH``
is port 0, the guest's /dev/hvc0; ``--port NAME=PATH`` makes named ports 1,
2, ... (/dev/vportNpM in a Linux guest, the name in
/sys/class/virtio-ports/*/name). One host client per port at a time; its
connecting and leaving is what the guest sees as the host side of the port
opening and closing.

Bytes move with backpressure both ways. A client is read only while the
guest has its port open and fewer than ``BUFFERED`` bytes wait for the
guest's receive buffers; the guest's writes wait in its transmit queue while
``BUFFERED`` bytes wait for the client to read them. With no client, what
the guest writes to a named port is kept for the next client, the guest held
once ``BUFFERED`` bytes wait (Linux does not write to a port whose host side
is closed: this is what was in flight). The console is different: a kernel
writing to hvc0 spins until the device takes the buffer, so with no client
the console keeps its last ``BUFFERED`` bytes as scrollback for the next
client and logs how many older ones it dropped.

Named ports need ``VIRTIO_CONSOLE_F_MULTIPORT``, offered when there are any;
``--size COLSxROWS`` offers ``VIRTIO_CONSOLE_F_SIZE``.
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

from vfiouserd.devices.virtio import DeviceId, Request, VirtioDevice, bit
from vfiouserd.log import get_logger
from vfiouserd.sockets import listen_on_path
from vfiouserd.state import BOOL, BYTES, U32, Field, Schema, StateError, records

log = get_logger("console")

F_SIZE, F_MULTIPORT = 0, 1
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
CONTROL = struct.Struct("<IHH")  # port id, event, value
RESIZE = struct.Struct("<HH")  # after a RESIZE message: cols, rows (see resize_payload)
CONTROL_RX, CONTROL_TX = 2, 3
MAX_PORTS = 31  # 64 queues: the daemon's limit
BUFFERED = 64 << 10  # per port and direction, see above
READ_SIZE = 16 << 10
MAX_NAME = 255


class Event(enum.IntEnum):
    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


def receive_queue(port: int) -> int:
    return 0 if port == 0 else 2 * port + 2


def transmit_queue(port: int) -> int:
    return receive_queue(port) + 1


def port_of_queue(queue: int) -> tuple[int, bool] | None:
    """(port id, whether it is the port's transmit queue), None for control."""
    if queue in (CONTROL_RX, CONTROL_TX):
        return None
    port = 0 if queue < 2 else (queue - 2) // 2
    return port, queue % 2 == 1


@dataclass(eq=False)
class Port:
    id: int
    name: str  # "" for the console
    listener: socket.socket | None
    added: bool = False  # the driver said PORT_READY
    guest_open: bool = False
    to_host: bytearray = field(default_factory=bytearray)  # written by the guest
    to_guest: bytearray = field(default_factory=bytearray)  # read from the client
    listening: trio.socket.SocketType | None = None  # the listener, for trio
    client: trio.socket.SocketType | None = None
    dropped: int = 0  # scrollback bytes lost since the last client

    @property
    def console(self) -> bool:
        return self.id == 0


PORT_RECORD = records(id=U32, added=BOOL, guest_open=BOOL, to_host=BYTES, to_guest=BYTES)


class VirtioConsole(VirtioDevice):
    name = "console"
    description = "virtio-console: a console and named ports on host UNIX sockets"
    device_id = DeviceId.CONSOLE
    vhost_user_type = "console"
    feature_names = {F_SIZE: "size", F_MULTIPORT: "multiport"}
    max_queues = 2 * MAX_PORTS + 2
    # Receive queues wait for the client's bytes, transmit queues for room
    # towards it, the control receive queue for messages to the driver.
    host_fed_queues = frozenset(range(max_queues)) - {CONTROL_TX}
    config_can_change = False
    # What the driver set up and the bytes on their way: the ports' records
    # and the control messages it has not taken.
    state = Schema(
        1,
        Field("port_records", PORT_RECORD),
        Field("control_pending", BYTES),
    )

    def __init__(
        self,
        console: socket.socket | None = None,
        ports: dict[str, socket.socket | None] | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        named = ports or {}
        if len(named) >= MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS - 1} named ports")
        features = (bit(F_MULTIPORT) if named else 0) | (bit(F_SIZE) if size else 0)
        super().__init__(features=features, num_queues=2 * (len(named) + 1) + 2 if named else 2)
        self.size = size  # cols, rows
        self.ports: dict[int, Port] = {}
        if console is not None or not named:
            self.ports[0] = Port(0, "", console)
        for number, (name, listener) in enumerate(named.items(), 1):
            self.ports[number] = Port(number, name, listener)
        self.max_nr_ports = len(named) + 1
        self.control: deque[bytes] = deque()  # messages for the driver
        # fill() and handle() may run on a worker thread, the host side on
        # the event loop: the ports' buffers and flags change under the lock,
        # and the tasks are woken with wake_host_side().
        self._lock = threading.Lock()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--console", metavar="PATH", help="UNIX socket of the console port")
        parser.add_argument(
            "--port",
            metavar="NAME=PATH",
            action="append",
            default=[],
            help="a named port and its UNIX socket (repeatable)",
        )
        parser.add_argument("--size", metavar="COLSxROWS", help="the console's size")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        named: dict[str, str] = {}
        for spec in args.port:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--port {spec!r}: NAME=PATH")
            if len(name.encode()) > MAX_NAME or name in named:
                raise ValueError(f"--port {spec!r}: a name of at most {MAX_NAME} bytes, once")
            named[name] = path
        if args.console is None and not named:
            raise ValueError("give --console PATH, --port NAME=PATH, or both")
        size = None
        if args.size is not None:
            cols, sep, rows = args.size.partition("x")
            if not (sep and cols.isdigit() and rows.isdigit()) or not (
                0 < int(cols) < 65536 and 0 < int(rows) < 65536
            ):
                raise ValueError(f"--size {args.size!r}: COLSxROWS, e.g. 80x25")
            size = (int(cols), int(rows))
        # Made now: the jail has no file system.
        console = None if args.console is None else listen_on_path(args.console)
        return cls(console, {name: listen_on_path(path) for name, path in named.items()}, size)

    # -- config space ---------------------------------------------------------

    def config(self) -> bytes:
        cols, rows = self.size or (0, 0)
        return CONFIG.pack(cols, rows, self.max_nr_ports, 0)

    @property
    def multiport(self) -> bool:
        return self.has_feature(F_MULTIPORT)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.control.clear()
            for port in self.ports.values():
                port.added = port.guest_open = False
                if port.to_guest:  # the driver that would have read them is gone
                    log.info("console.reset_dropped", port=port.id, bytes=len(port.to_guest))
                    port.to_guest.clear()
        self.wake_host_side()

    # -- the driver's side ------------------------------------------------------

    def _port(self, queue: int) -> tuple[Port | None, bool]:
        where = port_of_queue(queue)
        assert where is not None
        number, transmit = where
        if number != 0 and not self.multiport:
            return None, transmit
        return self.ports.get(number), transmit

    def _readable(self, port: Port) -> bool:
        """Whether the guest takes the client's bytes now."""
        return port.guest_open or (port.console and not self.multiport)

    def has_data(self, queue: int) -> bool:
        if queue == CONTROL_RX:
            return bool(self.control)
        port, transmit = self._port(queue)
        if port is None:
            return transmit  # a queue without a port: its writes go nowhere
        if transmit:
            return len(port.to_host) < BUFFERED or (port.console and port.client is None)
        return bool(port.to_guest) and self._readable(port)

    def fill(self, queue: int, request: Request) -> int | None:
        if queue == CONTROL_RX:
            return self._send_control(request)
        port, transmit = self._port(queue)
        request.describe(
            port=None if port is None else port.id, direction="out" if transmit else "in"
        )
        if transmit:
            data = request.read(request.readable_size)
            if port is None:
                log.warning("console.no_port", queue=queue, dropped=len(data))
                return 0
            self._from_guest(port, data)
            return 0
        assert port is not None
        with self._lock:
            written = request.write(bytes(port.to_guest[: request.writable_size]))
            del port.to_guest[:written]
            # The reader waits for room, a closing client for the last byte.
            wake = len(port.to_guest) + written >= BUFFERED > len(port.to_guest)
            wake = wake or not port.to_guest
        if wake:
            self.wake_host_side()
        return written

    def _from_guest(self, port: Port, data: bytes) -> None:
        with self._lock:
            port.to_host += data
            excess = len(port.to_host) - BUFFERED
            if port.console and port.client is None and excess > 0:
                if not port.dropped:
                    log.info("console.scrollback_full", port=port.id, kept=BUFFERED)
                del port.to_host[:excess]
                port.dropped += excess
        self.wake_host_side()

    def _send_control(self, request: Request) -> int:
        with self._lock:
            message = self.control[0]
            if request.writable_size < len(message):  # of no use: back empty
                log.warning("console.control_buffer_too_small", size=request.writable_size)
                return 0
            self.control.popleft()
        return request.write(message)

    def _tell(self, port: int, event: Event, value: int = 1, payload: bytes = b"") -> None:
        """Queue a control message for the driver (the lock held)."""
        if self.multiport:
            self.control.append(CONTROL.pack(port, event, value) + payload)

    def handle(self, queue: int, request: Request) -> int:
        """The driver's control messages (the control transmit queue)."""
        data = request.read(min(request.readable_size, CONTROL.size))
        if len(data) < CONTROL.size:
            log.warning("console.control_short", size=len(data))
            return 0
        number, event, value = CONTROL.unpack(data)
        request.describe(type="control", port=number, event=_event_name(event), value=value)
        with self._lock:
            told = len(self.control)
            self._control_message(number, event, value)
            told = len(self.control) > told
        if told:
            self.data_ready(CONTROL_RX)
        self.wake_host_side()
        return 0

    def _control_message(self, number: int, event: int, value: int) -> None:
        if event == Event.DEVICE_READY:
            if not value:
                log.error("console.driver_failed")
                return
            for port_id in self.ports:
                self._tell(port_id, Event.DEVICE_ADD)
            return
        port = self.ports.get(number)
        if port is None:
            log.warning("console.unknown_port", port=number, message=event)
        elif event == Event.PORT_READY:
            if not value:
                log.error("console.port_failed", port=number)
                return
            port.added = True
            if port.console:
                self._tell(port.id, Event.CONSOLE_PORT)
                if self.size and self.has_feature(F_SIZE):
                    self._tell(port.id, Event.RESIZE, 0, resize_payload(*self.size))
            else:
                self._tell(port.id, Event.PORT_NAME, 1, port.name.encode() + b"\0")
            if port.client is not None:
                self._tell(port.id, Event.PORT_OPEN)
        elif event == Event.PORT_OPEN:
            port.guest_open = bool(value)
            log.info("console.guest_open", port=number, open=port.guest_open)
        else:
            log.warning("console.unexpected_control", port=number, message=event)

    # -- the host's side ----------------------------------------------------------

    async def run(self) -> None:
        # A client's connection outlives run(): rings stopped and started
        # again neither cut it nor lose what it sent meanwhile.
        async with trio.open_nursery() as nursery:
            for port in self.ports.values():
                if port.listener is not None:
                    nursery.start_soon(self._serve_port, port)

    async def _serve_port(self, port: Port) -> None:
        assert port.listener is not None
        if port.listening is None:
            port.listening = trio.socket.from_stdlib_socket(port.listener)
        while True:
            client = port.client  # one a previous run() or daemon kept
            if client is None:
                client, _ = await port.listening.accept()
                self._connected(port, client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_host, port, client)
                await self._to_guest(port, client)
                # The client is gone: the guest gets what it sent before it
                # hears that the host side closed.
                await self._delivered(port)
                nursery.cancel_scope.cancel()
            self._disconnected(port)

    async def _delivered(self, port: Port) -> None:
        while True:
            changed = self.host_side_wakeup()
            with self._lock:
                if not (port.to_guest and self._readable(port)):
                    return
            await changed.wait()

    def _connected(self, port: Port, client: trio.socket.SocketType) -> None:
        with self._lock:
            port.client = client
            if port.dropped:
                log.info("console.scrollback_dropped", port=port.id, bytes=port.dropped)
                port.dropped = 0
            if port.added:
                self._tell(port.id, Event.PORT_OPEN, 1)
        log.info("console.client", port=port.id)
        self.data_ready(CONTROL_RX)
        self.data_ready(transmit_queue(port.id))  # a console's guest may wait for room

    def _disconnected(self, port: Port) -> None:
        assert port.client is not None
        port.client.close()
        with self._lock:
            port.client = None
            if port.added:
                self._tell(port.id, Event.PORT_OPEN, 0)
        log.info("console.client_gone", port=port.id, unsent=len(port.to_host))
        self.data_ready(CONTROL_RX)
        self.data_ready(transmit_queue(port.id))

    async def _to_guest(self, port: Port, client: trio.socket.SocketType) -> None:
        """The client's bytes, read while the guest takes them."""
        while True:
            changed = self.host_side_wakeup()
            with self._lock:
                room = BUFFERED - len(port.to_guest) if self._readable(port) else 0
            if room <= 0:
                await changed.wait()
                continue
            try:
                data = await client.recv(min(room, READ_SIZE))
            except OSError:
                return
            if not data:
                return
            with self._lock:
                port.to_guest += data
            self.data_ready(receive_queue(port.id))

    async def _to_host(self, port: Port, client: trio.socket.SocketType) -> None:
        """The guest's bytes, sent as fast as the client reads them."""
        while True:
            changed = self.host_side_wakeup()
            with self._lock:
                chunk = bytes(port.to_host[:READ_SIZE])
            if not chunk:
                await changed.wait()
                continue
            try:
                sent = await client.send(chunk)
            except OSError:
                await trio.sleep_forever()  # the reading side sees the end
            with self._lock:
                full = len(port.to_host) >= BUFFERED
                del port.to_host[:sent]
                room_again = full and len(port.to_host) < BUFFERED
            if room_again:
                self.data_ready(transmit_queue(port.id))

    # -- state ----------------------------------------------------------------

    @property
    def port_records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "id": port.id,
                    "added": port.added,
                    "guest_open": port.guest_open,
                    "to_host": bytes(port.to_host),
                    "to_guest": bytes(port.to_guest),
                }
                for port in self.ports.values()
            ]

    @port_records.setter
    def port_records(self, saved: list[dict[str, Any]]) -> None:
        for record in saved:
            port = self.ports[record["id"]]
            port.added, port.guest_open = record["added"], record["guest_open"]
            port.to_host[:] = record["to_host"]
            port.to_guest[:] = record["to_guest"]

    @property
    def control_pending(self) -> bytes:
        with self._lock:
            return b"".join(struct.pack("<H", len(m)) + m for m in self.control)

    @control_pending.setter
    def control_pending(self, data: bytes) -> None:
        self.control = deque(split_messages(data))

    def check_state(self, values: dict[str, Any]) -> None:
        unknown = {record["id"] for record in values["port_records"]} - set(self.ports)
        if unknown:
            raise StateError(f"the saved device has ports {sorted(unknown)} this one has not")
        try:
            split_messages(values["control_pending"])
        except ValueError as exc:
            raise StateError(f"control messages: {exc}") from exc

    def host_fds(self) -> dict[str, int]:
        # The clients stay connected across a restart: what they sent and
        # did not have read waits in their sockets for the next daemon.
        return {f"port-{p.id}": p.client.fileno() for p in self.ports.values() if p.client}

    def adopt_host_fds(self, fds: dict[str, int]) -> None:
        for name, fd in fds.items():
            number = int(name.removeprefix("port-")) if name.startswith("port-") else -1
            port = self.ports.get(number)
            if port is None or port.client is not None:
                log.warning("console.handover_fd_unknown", name=name)
                os.close(fd)
                continue
            port.client = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    def close(self) -> None:
        for port in self.ports.values():
            if port.client is not None:  # at exit, after the event loop: no trio close
                os.close(port.client.detach())
                port.client = None
            if port.listener is not None:
                port.listener.close()


def resize_payload(cols: int, rows: int) -> bytes:
    # The spec's order. Linux read rows first from 2.6.35 until a 2025 fix
    # that stable kernels took (Debian's 6.1.0-57 has it): an older guest
    # sees the two swapped.
    return RESIZE.pack(cols, rows)


def split_messages(data: bytes) -> list[bytes]:
    messages, offset = [], 0
    while offset < len(data):
        if offset + 2 > len(data):
            raise ValueError("a length cut short")
        (length,) = struct.unpack_from("<H", data, offset)
        if length < CONTROL.size or offset + 2 + length > len(data):
            raise ValueError(f"a message of {length} bytes at {offset}")
        messages.append(data[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return messages


def _event_name(event: int) -> str:
    return Event(event).name if event in Event._value2member_map_ else str(event)
