"""virtio-input (virtio 1.2 5.8): a keyboard, mouse or tablet the host drives.

Events come from a UNIX socket (``--events-socket``, listening, made before
the jail): a client sends 8-byte records, the virtio event layout (type,
code as little-endian u16, value as little-endian s32), and gets back the
driver's status events (keyboard LEDs) in the same layout. Events wait for
the driver's buffers, in order; past ``MAX_PENDING`` the device stops
reading the socket, so a slow guest slows the client and nothing is lost.
The config space answers the driver's select/subsel with the capabilities
of ``--kind``.
"""

from __future__ import annotations

import argparse
import enum
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Self

import trio

from vfiouserd.devices.virtio import DeviceId, Request, VirtioDevice, adopt_socket
from vfiouserd.log import get_logger
from vfiouserd.sockets import listen_on_path
from vfiouserd.state import BYTES, INT_MAP, Field, Schema

log = get_logger("input")

EVENT = struct.Struct("<HHi")  # type, code, value
EVENT_QUEUE, STATUS_QUEUE = 0, 1
CONFIG_SIZE = 136  # select, subsel, size, reserved[5], u[128]
MAX_PENDING = 4096  # events waiting for driver buffers before the socket is left unread

# Linux input event types and codes (include/uapi/linux/input-event-codes.h).
EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_LED, EV_REP = 0x00, 0x01, 0x02, 0x03, 0x11, 0x14
REL_X, REL_Y, REL_WHEEL = 0x00, 0x01, 0x08
ABS_X, ABS_Y = 0x00, 0x01
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
LED_NUML, LED_CAPSL, LED_SCROLLL = 0x00, 0x01, 0x02
INPUT_PROP_DIRECT = 0x01
KEYBOARD_KEYS = range(1, 249)  # KEY_ESC .. KEY_MICMUTE
TABLET_RANGE = 32767  # absolute axes run 0..this, as QEMU's tablet
BUS_VIRTUAL = 0x06
VENDOR = 0x0627  # what QEMU's virtio input devices report


class Select(enum.IntEnum):
    UNSET = 0x00
    ID_NAME = 0x01
    ID_SERIAL = 0x02
    ID_DEVIDS = 0x03
    PROP_BITS = 0x10
    EV_BITS = 0x11
    ABS_INFO = 0x12


@dataclass(frozen=True)
class Kind:
    """What a kind of device reports it can do."""

    name: str
    product: int  # ID_DEVIDS
    events: dict[int, frozenset[int]]  # event type: codes
    absolute: dict[int, tuple[int, int]] = field(default_factory=dict)  # axis: min, max
    properties: frozenset[int] = frozenset()


KINDS = {
    "keyboard": Kind(
        "vfiouserd keyboard",
        1,
        {
            EV_KEY: frozenset(KEYBOARD_KEYS),
            EV_LED: frozenset({LED_NUML, LED_CAPSL, LED_SCROLLL}),
            EV_REP: frozenset(),
        },
    ),
    "mouse": Kind(
        "vfiouserd mouse",
        2,
        {
            EV_KEY: frozenset({BTN_LEFT, BTN_RIGHT, BTN_MIDDLE}),
            EV_REL: frozenset({REL_X, REL_Y, REL_WHEEL}),
        },
    ),
    "tablet": Kind(
        "vfiouserd tablet",
        3,
        {
            EV_KEY: frozenset({BTN_LEFT, BTN_RIGHT, BTN_MIDDLE}),
            EV_ABS: frozenset({ABS_X, ABS_Y}),
        },
        {ABS_X: (0, TABLET_RANGE), ABS_Y: (0, TABLET_RANGE)},
        frozenset({INPUT_PROP_DIRECT}),
    ),
}


def bitmap(bits: frozenset[int]) -> bytes:
    """Bit n of byte n // 8, as long as the highest bit needs."""
    if not bits:
        return b""
    data = bytearray(max(bits) // 8 + 1)
    for bit in bits:
        data[bit // 8] |= 1 << (bit % 8)
    return bytes(data)


class VirtioInput(VirtioDevice):
    name = "input"
    description = "virtio-input keyboard, mouse or tablet fed through a UNIX socket"
    device_id = DeviceId.INPUT
    vhost_user_type = "input"
    max_queues = 2
    host_fed_queues = frozenset({EVENT_QUEUE})
    config_can_change = False
    # The LEDs the driver set (a restarted daemon tells its client again),
    # the events read from the host that no buffer took yet; for a client
    # kept connected across a restart, the start of a record it has not
    # finished and the status events it has not been sent yet.
    state = Schema(
        3,
        Field("leds", INT_MAP),
        Field("pending_events", BYTES, since=2, default=b""),
        Field("partial_record", BYTES, since=3, default=b""),
        Field("status_to_send", BYTES, since=3, default=b""),
    )
    kind_names: ClassVar[tuple[str, ...]] = tuple(KINDS)

    def __init__(
        self, kind: str = "keyboard", listener: socket.socket | None = None, serial: str = ""
    ) -> None:
        super().__init__(num_queues=2)
        self.kind = KINDS[kind]
        self.serial = serial
        self.listener = listener
        self._listening = None if listener is None else trio.socket.from_stdlib_socket(listener)
        self.select = 0
        self.subsel = 0
        self.leds: dict[int, int] = {}
        # Filled by run() on the event loop, emptied by fill() where rings
        # run (maybe a worker thread): deques are safe between threads, and
        # run() is woken with wake_host_side().
        self.pending: deque[bytes] = deque()
        self.outgoing: deque[bytes] = deque()  # status events for the client
        self._blocked = False  # run() waits for the driver to take events
        self._client: trio.socket.SocketType | None = None
        self._partial = b""  # the start of a record the client has not finished
        self._told_leds = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--events-socket",
            metavar="PATH",
            required=True,
            help="UNIX socket a client writes 8-byte events to (type, code: u16; value: s32)",
        )
        parser.add_argument("--kind", choices=cls.kind_names, default="keyboard")
        parser.add_argument("--serial", default="", help="ID_SERIAL the guest sees")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        # Made now: the jail has no file system.
        return cls(args.kind, listen_on_path(args.events_socket), args.serial)

    # -- config space ---------------------------------------------------------

    def _selected(self) -> bytes:
        kind, select, subsel = self.kind, self.select, self.subsel
        if select == Select.ID_NAME and subsel == 0:
            return kind.name.encode()[:128]
        if select == Select.ID_SERIAL and subsel == 0:
            return self.serial.encode()[:128]
        if select == Select.ID_DEVIDS and subsel == 0:
            return struct.pack("<HHHH", BUS_VIRTUAL, VENDOR, kind.product, 1)
        if select == Select.PROP_BITS and subsel == 0:
            return bitmap(kind.properties)
        if select == Select.EV_BITS and subsel in kind.events:
            return bitmap(kind.events[subsel])
        if select == Select.ABS_INFO and subsel in kind.absolute:
            low, high = kind.absolute[subsel]
            return struct.pack("<iiiii", low, high, 0, 0, 0)
        return b""

    def config(self) -> bytes:
        data = self._selected()
        head = bytes([self.select, self.subsel, len(data)]) + bytes(5)
        return (head + data).ljust(CONFIG_SIZE, b"\0")

    def write_config(self, offset: int, data: bytes, *, migration: bool = False) -> None:
        # select and subsel are the only fields a driver writes; QEMU's
        # vhost-user-input sends the whole space each time, the rest stale.
        for at, value in enumerate(data, offset):
            if at == 0:
                self.select = value
            elif at == 1:
                self.subsel = value

    def reset(self) -> None:
        super().reset()
        self.select = self.subsel = 0
        self.pending.clear()
        self.wake_host_side()

    # -- queues -----------------------------------------------------------------

    def has_data(self, queue: int) -> bool:
        return bool(self.pending)

    def fill(self, queue: int, request: Request) -> int | None:
        if request.writable_size < EVENT.size:
            log.warning("input.buffer_too_small", size=request.writable_size)
            return 0  # back to the driver empty: it is of no use
        event = self.pending.popleft()
        if request.details is not None:
            request.describe(**_described(event))
        written = request.write(event)
        if self._blocked:
            self.wake_host_side()
        return written

    def handle(self, queue: int, request: Request) -> int:
        """Status events from the driver (LEDs): kept, and told to the client."""
        data = request.read(request.readable_size)
        if request.details is not None and len(data) >= EVENT.size:
            request.describe(**_described(data[: EVENT.size]))
        for offset in range(0, len(data) - EVENT.size + 1, EVENT.size):
            kind, code, value = EVENT.unpack_from(data, offset)
            if kind == EV_LED and code in self.kind.events.get(EV_LED, ()):
                self.leds[code] = value
            # A new client is told the LED state: nothing waits for it. A
            # client that never reads loses the oldest beyond the bound.
            if self._client is not None and len(self.outgoing) < MAX_PENDING:
                self.outgoing.append(data[offset : offset + EVENT.size])
        if self.outgoing:
            self.wake_host_side()
        return 0

    @property
    def pending_events(self) -> bytes:
        return b"".join(self.pending)

    @pending_events.setter
    def pending_events(self, data: bytes) -> None:
        whole = len(data) - len(data) % EVENT.size
        self.pending = deque(data[at : at + EVENT.size] for at in range(0, whole, EVENT.size))

    @property
    def partial_record(self) -> bytes:
        return self._partial

    @partial_record.setter
    def partial_record(self, data: bytes) -> None:
        self._partial = data[: EVENT.size - 1]

    @property
    def status_to_send(self) -> bytes:
        return b"".join(self.outgoing)

    @status_to_send.setter
    def status_to_send(self, data: bytes) -> None:
        whole = len(data) - len(data) % EVENT.size
        self.outgoing = deque(data[at : at + EVENT.size] for at in range(0, whole, EVENT.size))

    # -- the events socket --------------------------------------------------------

    async def run(self) -> None:
        # The client's connection outlives run(): rings stopped and started
        # again (a paused VM, a migration that did not happen) neither cut
        # it nor lose what it sent meanwhile.
        if self._listening is None:
            return
        while True:
            if self._client is None:
                self._client, _ = await self._listening.accept()
                self._partial = b""
                self._told_leds = False
                log.info("input.client", kind=self.kind.name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_status, self._client, nursery.cancel_scope)
                await self._receive_events(self._client)
                nursery.cancel_scope.cancel()
            self._client.close()
            self._client = None
            log.info("input.client_gone")

    async def _receive_events(self, client: trio.socket.SocketType) -> None:
        while True:
            while len(self.pending) >= MAX_PENDING:  # the guest is slow: so is the client
                room = self.host_side_wakeup()
                self._blocked = True
                if len(self.pending) >= MAX_PENDING:
                    await room.wait()
                self._blocked = False
            try:
                data = await client.recv(EVENT.size * 64)
            except OSError:
                return
            if not data:
                return
            self._partial += data
            whole = len(self._partial) - len(self._partial) % EVENT.size
            for offset in range(0, whole, EVENT.size):
                self.pending.append(self._partial[offset : offset + EVENT.size])
            self._partial = self._partial[whole:]
            if whole:
                self.data_ready(EVENT_QUEUE)

    async def _send_status(self, client: trio.socket.SocketType, ends: trio.CancelScope) -> None:
        """Status events (LEDs) to the client; a client gone (EPIPE) ends its
        connection, never the device."""
        try:
            await self._send_status_until_gone(client)
        except OSError as exc:
            log.info("input.client_lost", reason=str(exc))
            ends.cancel()

    async def _send_status_until_gone(self, client: trio.socket.SocketType) -> None:
        if not self._told_leds:  # a new client learns where the LEDs stand
            self.outgoing.extendleft(
                EVENT.pack(EV_LED, code, value)
                for code, value in sorted(self.leds.items(), reverse=True)
            )
            self._told_leds = True
        while True:
            while self.outgoing:
                record = self.outgoing[0]  # taken once sent: a cancel loses nothing
                sent = 0
                while sent < len(record):
                    sent += await client.send(record[sent:])
                self.outgoing.popleft()
            more = self.host_side_wakeup()
            if not self.outgoing:
                await more.wait()

    def host_fds(self) -> dict[str, int]:
        # The client stays connected across a restart: events it sent that
        # were not read yet wait in its socket for the next daemon.
        return {} if self._client is None else {"client": self._client.fileno()}

    def adopt_host_fds(self, fds: dict[str, int]) -> None:
        client = adopt_socket(fds, "client", self._client is not None, "input")
        if client is not None:
            self._client = client
            self._told_leds = True  # by the previous daemon

    def close(self) -> None:
        if self._client is not None:  # at exit, after the event loop: no trio close
            os.close(self._client.detach())
            self._client = None
        if self.listener is not None:
            self.listener.close()


def _described(event: bytes) -> dict[str, int]:
    kind, code, value = EVENT.unpack_from(event)
    return {"ev_type": kind, "ev_code": code, "ev_value": value}
