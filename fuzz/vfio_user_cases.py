"""vfio-user cases: a hostile VMM (QEMU's part) and a hostile guest driver.

The daemon serves one connection at a time and its device outlives each
one, so every case meets the device as earlier cases left it. A case opens
its own connections and guest RAM (memfds), negotiates with the project's
client and then misbehaves in one way per kind:

- ``mutate``: mutated messages of every client command (fields, flags,
  sizes, fds) amid guest I/O, each reply judged;
- ``version``: negotiation itself, bent;
- ``config-space``: PCI config and BAR accesses at odd offsets and sizes,
  out of range, BAR sizing, the virtio-pci access window, function reset;
- ``hostile-ring``: descriptor tables, indexes and ring addresses outside
  memory or in ranges never mapped (blk); DMA engine programming (example);
- ``remote-dma``: guest RAM mapped without fds, so the device reaches it
  through DMA_READ/DMA_WRITE, answered late, wrongly, with errors or never;
- ``pipeline``: ~1500 commands with replies read only now and then, DMA
  requests unanswered, then a hang-up;
- lifecycle kinds: driver and function resets mid-I/O, migration state
  walks with garbage data, DMA logging with hostile ranges, interrupt
  set-up churn, DMA map churn, a hang-up mid-I/O;
- ``random-bytes``: valid headers with random payloads, and raw garbage.

Where a case ends with the device reset by a fresh, correct client, that
client must get I/O through (``ctx.violation`` otherwise). All randomness
comes from ``ctx.rng``; what depends on timing (how many DMA requests the
daemon makes) draws from a generator seeded from it, so a replayed case
sends the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from construct import ConstructError

from fuzz.harness import (
    DISK_SECTORS,
    HOLE,
    LAYOUT,
    SCRATCH,
    CaseContext,
    CaseSet,
    MiB,
    describe,
    is_expected,
    mutate_bytes,
    mutate_fields,
    mutate_int,
)
from vfiouserd.client.guest import DriverPackedRing, DriverRing, DriverSplitRing, GuestRam
from vfiouserd.client.vfio_user import CLIENT_MAX_DATA_XFER, VfioUserClient, VfioUserError
from vfiouserd.client.virtio_pci import (
    CFG_NOTIFY,
    VirtioPciDriver,
    VirtioPciQueue,
)
from vfiouserd.devices.blk import RequestType
from vfiouserd.devices.virtio import Feature, Status, bit
from vfiouserd.memory import GuestMemoryError
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.protocol.vfio_user import MigrationState as S
from vfiouserd.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

# A range the client never maps (beside the harness's LAYOUT).
NEVER_MAPPED = 0x2_0000_0000
CHECK_AREA = 64 * 1024
PAGE = vfu.PAGE_SIZE
CONFIG_REGION = vfu.PciRegion.CONFIG
MODERN_BAR = 4  # virtio-pci: common, ISR, device config, notify (vfiouserd/virtio_pci.py)
COMMON_STATUS = 0x14
EXAMPLE_BAR = 0
EXAMPLE_REGISTERS = (0x00, 0x04, 0x08, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x2C)
COMMANDS = tuple(Command)
# Client-to-server commands and the size of their fixed structure.
FIXED = {
    Command.DMA_MAP: vfu.DmaMap.sizeof(),
    Command.DMA_UNMAP: vfu.DmaUnmap.sizeof(),
    Command.DEVICE_GET_INFO: vfu.DeviceInfo.sizeof(),
    Command.DEVICE_GET_REGION_INFO: vfu.RegionInfo.sizeof(),
    Command.DEVICE_GET_REGION_IO_FDS: vfu.RegionIoFds.sizeof(),
    Command.DEVICE_GET_IRQ_INFO: vfu.IrqInfo.sizeof(),
    Command.DEVICE_SET_IRQS: vfu.IrqSetHead.sizeof(),
    Command.REGION_READ: vfu.RegionAccess.sizeof(),
    Command.REGION_WRITE: vfu.RegionAccess.sizeof(),
}
# Commands whose successful reply may carry fds.
FD_REPLIES = (Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_IO_FDS)

Raw = tuple[int, int, bytes, list[int]]  # command, flags, payload, fds


# --- the client ----------------------------------------------------------------------------


# How a hostile VMM answers one DMA request of the daemon's: (name, weight).
DMA_ANSWERS = (
    ("correct", 40),
    ("late", 10),
    ("late-aside", 6),  # answered later by another task, others meanwhile
    ("error", 8),
    ("garbage", 8),  # the right length, wrong bytes
    ("short", 4),
    ("long", 4),
    ("wrong-command", 3),
    ("as-command", 2),  # flagged as a command, not a reply
    ("with-fd", 3),
    ("twice", 3),
    ("never", 6),
    ("stray", 2),  # a reply to a request never sent, then the right one
)


class FuzzClient(VfioUserClient):
    """The project's client, plus what a case needs of it: a hostile way of
    answering the daemon's DMA requests, reading that stops and resumes,
    and a check of every message the daemon sends."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        ram: GuestRam | None = None,
        *,
        qemu_dma_layout: bool = False,
    ) -> None:
        super().__init__(sock, ram, qemu_dma_layout=qemu_dma_layout)
        self.ctx: CaseContext | None = None
        self.dma_rng = random.Random(0)
        # How the daemon's DMA requests are answered: "correct", "hostile"
        # (each one its own way, DMA_ANSWERS) or "never".
        self.dma_mode = "correct"
        self.dma_budget = 0
        self.paused = False  # stop reading the socket (and answering) while set
        self.no_reply_ids: set[int] = set()
        self.unanswered = 0
        self.confusing = False  # we sent what makes the daemon's msg ids meet ours
        self.probe_bent = False  # the DMA layout probe got a hostile answer
        self.aside: trio.Nursery | None = None

    def violation(self, text: str) -> None:
        if self.ctx is not None:
            self.ctx.violation(text)

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        try:
            while True:
                while self.paused:
                    await trio.sleep(0.005)
                message = await vfu.read_message(sock, CLIENT_MAX_DATA_XFER + vfu.MAX_MESSAGE_SLACK)
                if message.kind == vfu.TYPE_REPLY:
                    waiter = self._pending.pop(message.msg_id, None)
                    if waiter is not None:
                        waiter.send_nowait(message)
                        continue
                    message.close_fds()
                    if message.msg_id in self.no_reply_ids:
                        self.violation(
                            f"a reply to command {message.command} (msg {message.msg_id})"
                            " sent with NO_REPLY"
                        )
                    continue
                if message.kind != vfu.TYPE_COMMAND or message.command not in (
                    Command.DMA_READ,
                    Command.DMA_WRITE,
                ):
                    message.close_fds()
                    self.violation(
                        f"the daemon sent command {message.command} flags {message.flags:#x}:"
                        " only DMA_READ and DMA_WRITE go to the client"
                    )
                    continue
                self._server_requests.send_nowait((sock, message))
        except (ConnectionClosed, FramingError, OSError, trio.ClosedResourceError):
            for waiter in self._pending.values():
                waiter.close()
            self._pending.clear()

    # -- DMA requests from the daemon ------------------------------------------------------

    def answer(self, message: Message) -> tuple[int | None, bytes]:
        """(errno or None, payload) a correct client answers with."""
        layout, pad = vfu.dma_access_layout(self.qemu_dma_layout)
        try:
            request = layout.parse(message.payload)
        except ConstructError:
            return errno.EINVAL, b""
        address, count = request.address, request.count
        if count > CLIENT_MAX_DATA_XFER:
            return errno.E2BIG, b""
        if self.ram is None or not self._dma_allowed(address, count):
            return errno.EFAULT, b""
        head = layout.build({"address": address, "count": count})
        try:  # a window mapped without RAM of ours behind it: EFAULT
            if message.command == Command.DMA_READ:
                return None, head + self.ram.read(address, count) + bytes(pad)
            data = message.payload[layout.sizeof() : layout.sizeof() + count]
            room = len(message.payload) - layout.sizeof() - pad
            if room < count if self.qemu_dma_layout else room != count:
                return errno.EINVAL, b""
            self.ram.write(address, data)
        except GuestMemoryError:
            return errno.EFAULT, b""
        if self.qemu_dma_layout:
            return None, b""
        return None, vfu.DmaWriteReply.build({"address": address, "count": count})

    async def _serve_server_request(self, sock: trio.socket.SocketType, message: Message) -> None:
        message.close_fds()
        self.dma_requests += 1
        rng = self.dma_rng
        if self.dma_mode == "budget":  # correct answers while the budget lasts
            self.dma_budget -= 1
            how = "correct" if self.dma_budget >= 0 else "never"
        elif self.dma_mode == "hostile":
            names = [name for name, _ in DMA_ANSWERS]
            how = rng.choices(names, [weight for _, weight in DMA_ANSWERS])[0]
        else:
            how = self.dma_mode
        if how not in ("correct", "late", "late-aside") and self.is_layout_probe(message):
            self.probe_bent = True  # the daemon now reads our DMA replies wrongly
        if how in ("never", "as-command"):
            self.unanswered += 1
        if how == "never":
            return
        error, payload = self.answer(message)
        reply_id, command, flags, fds = message.msg_id, message.command, vfu.TYPE_REPLY, []
        if how in ("late", "late-aside"):
            delay = rng.choice((0.001, 0.01, 0.05, 0.3, 1.0))
            if how == "late-aside" and self.aside is not None:
                self.aside.start_soon(self._answer_late, sock, message, error, payload, delay)
                return
            await trio.sleep(delay)
        elif how == "error":
            error = rng.choice((errno.EFAULT, errno.EINVAL, errno.EIO, 0, 0xFFFF_FFFF))
        elif how == "garbage" and payload:
            cut = 16 if len(payload) > 16 else len(payload)
            payload = payload[:cut] + rng.randbytes(len(payload) - cut)
        elif how == "short" and payload:
            payload = payload[: rng.randrange(len(payload))]
        elif how == "long":
            payload += rng.randbytes(rng.choice((1, 4, 8, 4096)))
        elif how == "wrong-command":
            command = rng.choice((Command.DMA_WRITE, Command.DMA_READ, Command.VERSION, 99))
        elif how == "as-command":
            flags = vfu.TYPE_COMMAND
            self.confusing = True
        elif how == "with-fd" and self.ctx is not None:
            fds = [self.ctx.eventfd()]
        elif how == "stray":
            await self._send(
                sock,
                vfu.encode(
                    (reply_id + 1 + rng.randrange(100)) & 0xFFFF, command, payload, reply=True
                ),
            )
        data = self._reply_bytes(reply_id, command, flags, payload, error)
        await self._send(sock, data, fds)
        if how == "twice":
            await self._send(sock, data)

    @staticmethod
    def is_layout_probe(message: Message) -> bool:
        """The daemon's first DMA_READ asks how we lay DMA messages out."""
        return (
            message.command == Command.DMA_READ
            and len(message.payload) >= 16
            and struct.unpack_from("=Q", message.payload, 8)[0] == vfu.DMA_LAYOUT_PROBE
        )

    async def _answer_late(
        self,
        sock: trio.socket.SocketType,
        message: Message,
        error: int | None,
        payload: bytes,
        delay: float,
    ) -> None:
        await trio.sleep(delay)
        data = self._reply_bytes(message.msg_id, message.command, vfu.TYPE_REPLY, payload, error)
        with contextlib.suppress(ConnectionClosed, OSError, trio.ClosedResourceError):
            await self._send(sock, data)

    @staticmethod
    def _reply_bytes(
        msg_id: int, command: int, flags: int, payload: bytes, error: int | None
    ) -> bytes:
        if error is not None:
            flags |= vfu.FLAG_ERROR
            payload = b""
        header = vfu.Header.build(
            {
                "msg_id": msg_id,
                "command": command,
                "msg_size": vfu.HEADER_SIZE + len(payload),
                "flags": flags,
                "error": error or 0,
            }
        )
        return header + payload


# --- a case's guest and its sessions --------------------------------------------------------


@dataclass
class Guest:
    """A case's guest RAM (it outlives connections, as a VM's does) and a
    round-robin scratch area for request buffers."""

    ram: GuestRam
    scratch: int
    check_area: int  # the example device's checking copies, and nothing else
    cursor: int = 0

    def buffer(self, size: int) -> int:
        size = min(size, SCRATCH)
        if self.cursor + size > SCRATCH:
            self.cursor = 0
        address = self.scratch + self.cursor
        self.cursor += (size + 63) & ~63
        return address


def new_guest(ctx: CaseContext) -> Guest:
    ram = ctx.guest_ram(LAYOUT)
    return Guest(ram, ram.alloc(SCRATCH, PAGE), ram.alloc(CHECK_AREA, PAGE))


@dataclass
class Pending:
    """A raw command sent, its reply still to be judged."""

    msg_id: int
    command: int
    payload: bytes
    refusal: str | None  # why a correct daemon must refuse it, if it must
    receive: trio.MemoryReceiveChannel[Message]


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return str(command)


class Session:
    """One client connection: the correct set-up, then what a case does."""

    def __init__(self, ctx: CaseContext, guest: Guest) -> None:
        self.ctx = ctx
        self.rng = ctx.rng
        self.guest = guest
        self.ram = guest.ram
        self.client: FuzzClient | None = None
        self.driver: VirtioPciDriver | None = None
        self.queues: list[VirtioPciQueue] = []
        self.windows: list[tuple[int, int]] = []  # (address, size) mapped
        self.windows_known = True  # False once a map's outcome went unseen
        self.with_fd = True
        self.region_sizes: dict[int, int] = {}
        self.outstanding: list[Pending] = []
        self.desynced = False  # the stream may be out of step: replies are not judged
        self.judged = 0
        self.last_copy = b""  # what the example device was last asked to copy
        self.features = 0

    @property
    def blk(self) -> bool:
        return self.ctx.spec.model == "blk"

    @property
    def c(self) -> FuzzClient:
        assert self.client is not None
        return self.client

    # -- connecting ---------------------------------------------------------------------------

    def capabilities(self) -> tuple[dict[str, Any], bool]:
        """What the client offers in VERSION (a correct client varies too)."""
        rng = self.rng
        twin = rng.random() < 0.2
        caps: dict[str, Any] = {
            "max_msg_fds": rng.choice((16, 16, 1, 4)),
            "max_data_xfer_size": rng.choice((CLIENT_MAX_DATA_XFER, CLIENT_MAX_DATA_XFER, 4096)),
            "max_dma_maps": 65535,
            "pgsizes": rng.choice((PAGE, PAGE, PAGE | 2 * MiB)),
            "write_multiple": rng.random() < 0.7,
        }
        if rng.random() < 0.3:  # QEMU's legacy object
            caps["migration"] = {"pgsize": PAGE, "max_bitmap_size": 256 * MiB}
        if rng.random() < 0.1:
            del caps[rng.choice(sorted(caps))]
        if twin:
            caps["twin_socket"] = {"supported": True}
        return caps, twin

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[FuzzClient]:
        """Connect and negotiate; the client serves the daemon's DMA requests
        in the background until the block ends, then the connection closes."""
        ctx, rng = self.ctx, self.rng
        caps, twin = self.capabilities()
        qemu_layout = rng.random() < 0.3
        dma_seed = rng.getrandbits(64)
        sock = await ctx.connect()
        client = FuzzClient(sock, self.ram, qemu_dma_layout=qemu_layout)
        client.ctx = ctx
        client.dma_rng = random.Random(dma_seed)
        ctx.note(f"connect twin={twin} qemu_layout={qemu_layout} caps={sorted(caps)}")
        with trio.fail_after(10):
            await client.negotiate(twin_socket=twin, capabilities=caps)
        if client.twin is not None:
            ctx.on_close(client.twin.close)
        self.client = client
        try:
            async with trio.open_nursery() as nursery:
                client.aside = nursery
                client.start_serving(nursery)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            ctx.note(
                f"hang up: {client.dma_requests} DMA requests ({client.unanswered} unanswered),"
                f" {self.judged} replies judged"
            )
            client.close()
            self.client = None
            self.driver = None
            self.queues = []
            self.windows = []
            self.outstanding = []

    # -- memory ----------------------------------------------------------------------------

    async def map_memory(self, *, with_fd: bool | None = None, partial: bool = False) -> None:
        """DMA_MAP guest RAM as QEMU does (maybe in pieces); without fds the
        daemon reaches it through DMA_READ/DMA_WRITE."""
        rng = self.rng
        self.with_fd = rng.random() < 0.6 if with_fd is None else with_fd
        pieces = rng.choice((1, 1, 1, 2, 4))
        regions = self.ram.regions[:1] if partial else self.ram.regions
        self.ctx.note(f"map memory with_fd={self.with_fd} pieces={pieces} partial={partial}")
        for region in regions:
            step = region.size // pieces
            for start in range(0, region.size, step):
                fd = region.fd if self.with_fd else None
                await self.c.dma_map(region.guest_address + start, step, fd=fd, offset=start)
                self.windows.append((region.guest_address + start, step))

    async def known_region_sizes(self) -> None:
        for index in range(vfu.PCI_NUM_REGIONS):
            with contextlib.suppress(VfioUserError):
                self.region_sizes[index] = (await self.c.region_info(index)).size

    # -- the virtio-pci driver (blk) ---------------------------------------------------------

    def choose_features(self, offered: int) -> int:
        rng = self.rng
        features = offered
        if rng.random() < 0.5:
            features &= ~bit(Feature.RING_PACKED)
        for feature in (Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC):
            if rng.random() < 0.2:
                features &= ~bit(feature)
        return features

    async def bring_up(
        self,
        *,
        queue_count: int | None = None,
        queue_size: int | None = None,
        msix: bool | None = None,
        hostile_queue: int | None = None,
        hole: bool = False,
    ) -> list[VirtioPciQueue]:
        """What Linux's virtio_pci does: reset, features, queues, interrupts,
        DRIVER_OK; with ``hostile_queue``, one of that queue's ring addresses
        points outside memory (or somewhere nothing was mapped)."""
        rng, ctx, client = self.rng, self.ctx, self.c
        driver = VirtioPciDriver(client, self.ram)
        self.driver = driver
        await driver.probe()
        command = await client.config_read(0x04, 2)
        await client.config_write(0x04, 2, command | 0x6)
        await driver.common_write(COMMON_STATUS, 1, 0)
        await driver.common_write(COMMON_STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER)
        offered = 0
        for select in (0, 1):
            await driver.common_write(0x00, 4, select)
            offered |= await driver.common_read(0x04, 4) << (32 * select)
        self.features = features = self.choose_features(offered)
        for select in (0, 1):
            await driver.common_write(0x08, 4, select)
            await driver.common_write(0x0C, 4, features >> (32 * select) & 0xFFFF_FFFF)
        status = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
        await driver.common_write(COMMON_STATUS, 1, status)
        if not await driver.status() & Status.FEATURES_OK:
            ctx.violation(f"features {features:#x} (all offered) were refused")
            return []
        available = await driver.common_read(0x12, 2)
        count = rng.randint(1, available) if queue_count is None else min(queue_count, available)
        msix = rng.random() < 0.8 if msix is None else msix
        size = queue_size or rng.choice((1, 2, 4, 8, 16, 32, 64, 128))
        irq_fds = [ctx.eventfd() for _ in range(count + 1 if msix else 1)]
        kind = vfu.PciIrq.MSIX if msix else vfu.PciIrq.INTX
        trigger = vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER
        await self.disable_irqs(but=kind)
        await client.set_irqs(kind, trigger, 0, len(irq_fds), fds=irq_fds)
        if msix:
            await driver.common_write(0x10, 2, 0)
        ctx.note(f"bring up {count} queues of {size} msix={msix} features={features:#x}")
        self.queues = []
        packed = bool(features & bit(Feature.RING_PACKED))
        event_idx = bool(features & bit(Feature.RING_EVENT_IDX))
        for index in range(count):
            await driver.common_write(0x16, 2, index)
            most = await driver.common_read(0x18, 2)
            size_here = min(size, most) if most else size
            await driver.common_write(0x18, 2, size_here)
            ring: DriverRing
            if packed:
                ring = DriverPackedRing(self.ram, size_here, event_idx=event_idx)
            else:
                ring = DriverSplitRing(self.ram, size_here, event_idx=event_idx)
            addresses = list(ring.areas)
            if index == hostile_queue:
                which = rng.choice((0, 1, 1, 2))  # the driver (avail) area most
                addresses[which] = self.hostile_address()
                if hole:  # the avail ring in the hole between the RAM regions
                    which, addresses[1] = 1, HOLE
                ctx.note(f"queue {index} area {which} at {addresses[which]:#x}")
            for field, address in zip((0x20, 0x28, 0x30), addresses, strict=True):
                await driver.common_write(field, 4, address & 0xFFFF_FFFF)
                await driver.common_write(field + 4, 4, address >> 32)
            if msix:
                await driver.common_write(0x1A, 2, index + 1)
            notify_off = await driver.common_read(0x1E, 2)
            queue = VirtioPciQueue(
                driver,
                index,
                ring,
                notify_off * driver.notify_multiplier,
                irq_fds[index + 1] if msix else irq_fds[0],
                intx=not msix,
            )
            await driver.common_write(0x1C, 2, 1)
            self.queues.append(queue)
        await driver.common_write(COMMON_STATUS, 1, status | Status.DRIVER_OK)
        return self.queues

    async def disable_irqs(self, but: int) -> None:
        """As QEMU does before it enables one kind: the others off (a kind the
        device does not have refuses)."""
        disable = vfu.IrqSetFlag.DATA_NONE | vfu.IrqSetFlag.ACTION_TRIGGER
        for kind in (vfu.PciIrq.INTX, vfu.PciIrq.MSI, vfu.PciIrq.MSIX):
            if kind != but:
                with contextlib.suppress(VfioUserError):
                    await self.c.set_irqs(kind, disable, 0, 0)

    def hostile_address(self) -> int:
        end = LAYOUT[0][0] + LAYOUT[0][1]
        return self.rng.choice(
            (
                HOLE,
                HOLE,
                NEVER_MAPPED,
                NEVER_MAPPED,
                end,
                end - self.rng.choice((2, 16, 64)),
                LAYOUT[1][0] + LAYOUT[1][1] - 8,
                (1 << 64) - self.rng.choice((2, 4096)),
                (1 << 63),
                self.rng.getrandbits(64) & ~1,
                self.guest.buffer(64) + 1,  # misaligned
            )
        )

    # -- guest requests -------------------------------------------------------------------------

    def blk_request(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """A virtio-blk request, mostly well formed."""
        rng, guest = self.rng, self.guest
        kind = rng.choices([*RequestType, rng.getrandbits(32)], [30, 30, 5, 5, 2, 5, 5, 2, 3])[0]
        sector = rng.choice(
            (rng.randrange(DISK_SECTORS), DISK_SECTORS - 1, DISK_SECTORS, rng.getrandbits(64))
        )
        size = rng.choice((512, 4096, 8192, 65536, rng.randint(1, 70000)))
        header = guest.buffer(16)
        self.ram.write(header, struct.pack("<IIQ", kind, 0, sector))
        readable = [(header, 16)]
        writable: list[tuple[int, int]] = []
        if kind in (RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES):
            data = guest.buffer(size)
            if kind != RequestType.OUT:
                segments = [
                    (rng.randrange(DISK_SECTORS), rng.choice((1, 8, 1 << 20)), rng.choice((0, 1)))
                    for _ in range(rng.randint(1, 4))
                ]
                blob = b"".join(struct.pack("<QII", *s) for s in segments)
                self.ram.write(data, blob)
                size = len(blob) if rng.random() < 0.9 else size
            readable.append((data, size))
        elif kind in (RequestType.IN, RequestType.GET_ID, RequestType.GET_LIFETIME):
            writable.append((guest.buffer(size), size))
        if rng.random() < 0.95:
            writable.append((guest.buffer(1), 1))
        return readable, writable

    def post(self, queue: VirtioPciQueue, count: int) -> int:
        """Make ``count`` requests available (fewer if the ring is full).
        All are drawn first: how many fit depends on the daemon's progress."""
        indirect_ok = bool(self.features & bit(Feature.RING_INDIRECT_DESC))
        drawn = [
            (*self.blk_request(), self.rng.random() < (0.2 if indirect_ok else 0.01))
            for _ in range(count)
        ]
        posted = 0
        for readable, writable, indirect in drawn:
            try:
                queue.ring.add(readable, writable, object(), indirect=indirect)
            except (BufferError, MemoryError):
                break
            posted += 1
        return posted

    @staticmethod
    def reap(queue: VirtioPciQueue) -> int:
        try:
            return len(queue.ring.collect())
        except (KeyError, IndexError, ValueError):  # a used ring that makes no sense to us
            return 0

    async def kick_all(self) -> None:
        for queue in self.queues:
            await queue.kick_async()

    async def serves(self, queue: VirtioPciQueue, what: str) -> bool:
        """A well-formed read completes within 5 s (polling the used ring)."""
        guest = self.guest
        header, status = guest.buffer(16), guest.buffer(1)
        self.ram.write(header, struct.pack("<IIQ", RequestType.IN, 0, 0))
        self.ram.write(status, b"\xee")
        token = object()
        queue.ring.add([(header, 16)], [(guest.buffer(512), 512), (status, 1)], token)
        await queue.kick_async()
        with trio.move_on_after(5):
            while True:
                if any(done.token is token for done in queue.ring.collect()):
                    if self.ram.read(status, 1) != b"\0":
                        self.ctx.violation(f"{what}: a read of sector 0 failed")
                    return True
                await trio.sleep(0.005)
        if await alive(self):
            self.ctx.violation(f"{what}: a valid request did not complete within 5 s")
        return False

    # -- the example device ------------------------------------------------------------------------

    async def example_copy(self, src: int, dst: int, length: int, *, posted: bool = True) -> None:
        client = self.c
        await client.region_write(EXAMPLE_BAR, 0x10, struct.pack("<Q", src))
        await client.region_write(EXAMPLE_BAR, 0x18, struct.pack("<Q", dst))
        await client.region_write(EXAMPLE_BAR, 0x20, struct.pack("<I", length & 0xFFFF_FFFF))
        await client.region_write(EXAMPLE_BAR, 0x24, struct.pack("<I", 1), no_reply=posted)

    async def example_irqs(self) -> int:
        """Bus mastering on; MSI (or INTx) on an eventfd of the case's."""
        client, ctx = self.c, self.ctx
        await client.config_write(0x04, 2, 0x6)
        fd = ctx.eventfd()
        kind = vfu.PciIrq.MSI if self.rng.random() < 0.8 else vfu.PciIrq.INTX
        trigger = vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER
        await self.disable_irqs(but=kind)
        await client.set_irqs(kind, trigger, 0, 1, fds=[fd])
        return fd

    async def example_serves(self, what: str) -> bool:
        """A copy inside mapped memory lands within 5 s. The example device
        reads DMA_DST only once its read is done, so a copy started earlier
        and still reading may land on this one's destination: the copy is
        started again every 250 ms until its data is seen."""
        rng = self.rng
        data = rng.randbytes(rng.choice((1, 100, 4096, 3 * 4096 + 7)))
        src, dst = self.guest.check_area, self.guest.check_area + CHECK_AREA // 2
        self.ram.write(src, data)
        self.last_copy = data
        await self.c.config_write(0x04, 2, 0x6)
        with trio.move_on_after(5):
            while True:
                self.ram.write(dst, bytes(len(data)))
                await self.example_copy(src, dst, len(data))
                with trio.move_on_after(0.25):
                    while self.ram.read(dst, len(data)) != data:
                        await trio.sleep(0.005)
                    return True
        if await alive(self):
            self.ctx.violation(f"{what}: a DMA copy of {len(data)} bytes did not complete in 5 s")
        return False

    async def exercise(self) -> None:
        """A little guest work, whatever the device: requests kicked (blk),
        a copy started (example)."""
        rng = self.rng
        if self.blk:
            for queue in self.queues:
                self.reap(queue)
                self.post(queue, rng.randint(1, 4))
            await self.kick_all()
        else:
            length = rng.choice((64, 4096, 70000))
            src = rng.choice((self.guest.buffer(length), self.guest.buffer(length)))
            dst = rng.choice((self.guest.buffer(length), LAYOUT[1][0] + 64))
            await self.example_copy(src, dst, length)

    async def setup(self, depth: int) -> None:
        """Memory (1), interrupts and driver (2), guest work (3); the
        connection is the caller's (``connected``)."""
        rng = self.rng
        if rng.random() < 0.5:
            await self.c.reset()
        if depth < 1:
            return
        await self.map_memory()
        if depth < 2:
            return
        if self.blk:
            await self.bring_up()
        else:
            await self.example_irqs()
        if depth < 3:
            return
        await self.exercise()

    # -- raw commands, their replies judged ---------------------------------------------------

    async def send(
        self,
        command: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        flags: int = vfu.TYPE_COMMAND,
        size: int | None = None,
    ) -> Pending | None:
        """Send one command as given; a reply is expected unless NO_REPLY
        (or a message type other than a command) says otherwise."""
        client = self.c
        msg_id = client._msg_id()
        header = vfu.Header.build(
            {
                "msg_id": msg_id,
                "command": command,
                "msg_size": vfu.HEADER_SIZE + len(payload) if size is None else size,
                "flags": flags,
                "error": 0,
            }
        )
        if size is not None:
            self.desynced = True
        replies = flags & vfu.FLAG_TYPE_MASK == vfu.TYPE_COMMAND and not flags & vfu.FLAG_NO_REPLY
        pending = None
        if replies:
            send, receive = trio.open_memory_channel[Message](1)
            client._pending[msg_id] = send
            refusal = refusal_reason(self, command, flags, payload, fds or [])
            pending = Pending(msg_id, command, payload, refusal, receive)
            self.outstanding.append(pending)
        else:
            if flags & vfu.FLAG_NO_REPLY and flags & vfu.FLAG_TYPE_MASK == vfu.TYPE_COMMAND:
                client.no_reply_ids.add(msg_id)
            if command in (Command.DMA_MAP, Command.DMA_UNMAP):
                self.windows_known = False
        await client._send(client.sock, header + payload, fds)
        return pending

    async def settle(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout`` in all) for the replies outstanding and judge them."""
        if self.desynced:  # replies may never come: the daemon waits for bytes
            timeout = min(timeout, 0.1)
        with trio.move_on_after(timeout):
            while self.outstanding:
                pending = self.outstanding[0]
                try:
                    reply = await pending.receive.receive()
                except trio.EndOfChannel:  # the connection closed
                    self.outstanding.clear()
                    return
                self.outstanding.pop(0)
                self.judge(pending, reply)
        if self.outstanding:
            self.ctx.note(f"{len(self.outstanding)} replies still outstanding")
            self.windows_known = False

    def judge(self, pending: Pending, reply: Message) -> None:
        """Find in ``reply`` what no correct daemon could have answered."""
        try:
            if self.desynced or self.c.confusing:
                self.windows_known = False
                return
            self.judged += 1
            name = command_name(pending.command)
            if reply.command != pending.command:
                self.ctx.violation(f"{name} (msg {pending.msg_id}) answered as {reply.command}")
                return
            if reply.is_error:
                if reply.payload:
                    self.ctx.violation(f"{name}: an error reply with {len(reply.payload)} bytes")
                if reply.error == 0:
                    self.ctx.violation(f"{name}: an error reply without an errno")
                return
            if pending.refusal is not None:
                self.ctx.violation(f"{name} succeeded although {pending.refusal}")
            self.track_maps(pending)
            if reply.fds and pending.command not in FD_REPLIES:
                self.ctx.violation(f"{name}: a reply with {len(reply.fds)} fds")
            check_reply_shape(self.ctx, pending, reply)
        finally:
            reply.close_fds()

    def track_maps(self, pending: Pending) -> None:
        """Follow the mappings a mutated DMA_MAP/DMA_UNMAP made or removed."""
        payload = pending.payload
        if pending.command == Command.DMA_MAP and len(payload) >= 32:
            address, size = struct.unpack_from("=QQ", payload, 16)
            self.windows.append((address, size))
        elif pending.command == Command.DMA_UNMAP and len(payload) >= 24:
            flags, address, size = struct.unpack_from("=IQQ", payload, 4)
            if flags == vfu.DMA_UNMAP_FLAG_ALL:
                self.windows.clear()
            elif (address, size) in self.windows:
                self.windows.remove((address, size))


# --- what a correct daemon must refuse, and what its replies look like ----------------------


def refusal_reason(
    session: Session, command: int, flags: int, payload: bytes, fds: list[int]
) -> str | None:
    """Why the spec makes a correct daemon refuse this command, if it must
    (None when it may succeed, or when the rules here do not tell)."""
    size = len(payload)
    if flags & ~vfu.FLAGS_KNOWN or flags & vfu.FLAG_ERROR:
        return f"its flags are {flags:#x}"
    if command == Command.VERSION:
        return "VERSION comes once, first"
    limits = {
        Command.DMA_MAP: 1,
        Command.DEVICE_SET_IRQS: session.c.server.max_msg_fds,
    }
    if command not in FIXED and command not in (
        Command.DEVICE_RESET,
        Command.REGION_WRITE_MULTI,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
    ):
        return f"{command_name(command)} is not a client-to-server command"
    if len(fds) > limits.get(command, 0):
        return f"it carried {len(fds)} fds"
    fixed = FIXED.get(command, 0)
    if size < fixed:
        return f"its payload has {size} of {fixed} bytes"
    if command == Command.DMA_MAP:
        argsz, map_flags, _, address, length = struct.unpack_from("=IIQQQ", payload)
        if argsz != size or size != fixed:
            return f"argsz {argsz} with a {size}-byte payload"
        if map_flags & ~vfu.DMA_FLAGS_KNOWN:
            return f"DMA_MAP flags {map_flags:#x}"
        if length == 0 or (address | length) % PAGE:
            return f"{address:#x}+{length:#x} is empty or not page aligned"
        if address + length > 1 << 64:
            return "the range wraps around"
        return None
    if command == Command.DMA_UNMAP:
        argsz, unmap_flags, address, length = struct.unpack_from("=IIQQ", payload)
        if argsz < fixed:
            return f"argsz {argsz}"
        if unmap_flags not in (0, vfu.DMA_UNMAP_FLAG_ALL):
            return f"DMA_UNMAP flags {unmap_flags:#x}"
        if unmap_flags and (address or length):
            return "unmap-all with an address"
        maps_pending = any(
            p.command in (Command.DMA_MAP, Command.DMA_UNMAP) for p in session.outstanding
        )
        if (
            not unmap_flags
            and session.windows_known
            and not maps_pending
            and (address, length) not in session.windows
        ):
            return f"{address:#x}+{length:#x} was never mapped as such"
        return None
    if command in (
        Command.DEVICE_GET_INFO,
        Command.DEVICE_GET_REGION_INFO,
        Command.DEVICE_GET_IRQ_INFO,
    ):
        argsz, _, index = struct.unpack_from("=III", payload)
        if argsz < fixed:
            return f"argsz {argsz}"
        if command == Command.DEVICE_GET_REGION_INFO and index >= vfu.PCI_NUM_REGIONS:
            return f"there is no region {index}"
        if command == Command.DEVICE_GET_IRQ_INFO and index >= vfu.PCI_NUM_IRQS:
            return f"there is no IRQ index {index}"
        return None
    if command in (Command.REGION_READ, Command.REGION_WRITE):
        offset, region, count = struct.unpack_from("=QII", payload)
        data = size - fixed
        if command == Command.REGION_READ and data:
            return "REGION_READ carried data"
        if command == Command.REGION_WRITE and data != count:
            return f"count {count} with {data} bytes"
        if region >= vfu.PCI_NUM_REGIONS:
            return f"there is no region {region}"
        if count > session.c.server.max_data_xfer_size:
            return f"{count} bytes exceed max_data_xfer_size"
        known = session.region_sizes.get(region)
        if known is not None and offset + count > known:
            return f"{offset:#x}+{count} lies beyond region {region} of {known:#x} bytes"
        return None
    if command == Command.DEVICE_RESET and payload:
        return "DEVICE_RESET takes no payload"
    return None


def check_reply_shape(ctx: CaseContext, pending: Pending, reply: Message) -> None:
    """A successful reply must have the shape its command's reply has."""
    name = command_name(pending.command)
    payload, request = reply.payload, pending.payload
    if pending.command == Command.REGION_READ and len(request) >= 16:
        count = struct.unpack_from("=QII", request)[2]
        if len(payload) != 16 + count or payload[:16] != request[:16]:
            ctx.violation(f"REGION_READ of {count} bytes answered with {len(payload)} bytes")
    elif pending.command == Command.DEVICE_GET_INFO:
        if len(payload) != vfu.DeviceInfo.sizeof():
            ctx.violation(f"{name} answered with {len(payload)} bytes")
    elif pending.command == Command.DEVICE_GET_REGION_INFO:
        if len(payload) < vfu.RegionInfo.sizeof():
            ctx.violation(f"{name} answered with {len(payload)} bytes")
        elif reply.fds and not vfu.RegionInfo.parse(payload).flags & vfu.RegionFlag.MMAP:
            ctx.violation(f"{name}: an fd for a region that is not mappable")
    elif pending.command == Command.DEVICE_GET_IRQ_INFO:
        if len(payload) != vfu.IrqInfo.sizeof():
            ctx.violation(f"{name} answered with {len(payload)} bytes")
    elif pending.command == Command.DEVICE_FEATURE and len(request) >= 8 + 24:
        flags = struct.unpack_from("=I", request, 4)[0]
        if flags != vfu.DeviceFeature.DMA_LOGGING_REPORT | vfu.FEATURE_GET:
            return
        _, length, page_size = struct.unpack_from("=QQQ", request, 8)
        if not page_size:
            return
        pages = (length + page_size - 1) // page_size
        expected = 8 + 24 + (pages + 63) // 64 * 8
        if len(payload) != expected:
            ctx.violation(f"a DMA logging report of {pages} pages in {len(payload)} bytes")
    elif pending.command == Command.MIG_DATA_READ and len(request) >= 8:
        wanted = struct.unpack_from("=II", request)[1]
        if len(payload) < 8:
            ctx.violation(f"{name} answered with {len(payload)} bytes")
            return
        argsz, given = struct.unpack_from("=II", payload)
        if given > wanted or len(payload) != 8 + given or argsz != 8 + given:
            ctx.violation(
                f"{name} of {wanted} bytes: size {given}, argsz {argsz}, {len(payload)} bytes"
            )


# --- mutated commands ----------------------------------------------------------------------

Template = Callable[[], tuple[bytes, list[int]]]
# struct layouts of the fixed part of each command, for field mutations
LAYOUTS = {
    Command.VERSION: "=HH",
    Command.DMA_MAP: "=IIQQQ",
    Command.DMA_UNMAP: "=IIQQ",
    Command.DEVICE_GET_INFO: "=IIII",
    Command.DEVICE_GET_REGION_INFO: "=IIIIQQ",
    Command.DEVICE_GET_REGION_IO_FDS: "=IIII",
    Command.DEVICE_GET_IRQ_INFO: "=IIII",
    Command.DEVICE_SET_IRQS: "=IIIII",
    Command.REGION_READ: "=QII",
    Command.REGION_WRITE: "=QII",
    Command.DMA_READ: "=QQ",
    Command.DMA_WRITE: "=QQ",
    Command.REGION_WRITE_MULTI: "=Q",
    Command.DEVICE_FEATURE: "=II",
    Command.MIG_DATA_READ: "=II",
    Command.MIG_DATA_WRITE: "=II",
}


def edge(rng: random.Random, size: int) -> int:
    """An offset in, at or past the end of something ``size`` bytes long."""
    return rng.choice(
        (
            0,
            rng.randrange(max(size, 1)),
            max(size - 1, 0),
            max(size - 4, 0),
            size,
            size + 4,
            rng.choice((3, 5, 6, 7, 0x10, 0x3F, 0x40, 0xFF, 0x100, 0xFFF, 0x1000)),
            1 << 32,
            (1 << 64) - 1,
            rng.getrandbits(64),
        )
    )


def access_count(rng: random.Random) -> int:
    return rng.choice((1, 2, 4, 8, 0, 3, 5, 16, 64, 4096, 1 << 20, (1 << 20) + 1, 0xFFFF_FFFF))


def region_index(rng: random.Random) -> int:
    return rng.choice(
        (
            0,
            1,
            4,
            4,
            CONFIG_REGION,
            CONFIG_REGION,
            2,
            3,
            5,
            6,
            8,
            9,
            0xFFFF_FFFF,
            rng.getrandbits(32),
        )
    )


def feature_request(session: Session) -> bytes:
    """A DEVICE_FEATURE payload: any feature, any operation, data that fits or not."""
    rng = session.rng
    index = rng.choice((*vfu.DeviceFeature, 0, 3, 9, 0xFFFF))
    operation = rng.choice(
        (
            vfu.FEATURE_GET,
            vfu.FEATURE_SET,
            vfu.FEATURE_PROBE,
            vfu.FEATURE_PROBE | vfu.FEATURE_GET,
            vfu.FEATURE_GET | vfu.FEATURE_SET,
            0,
            1 << rng.randrange(19, 32),
        )
    )
    data = b""
    if index == vfu.DeviceFeature.MIG_DEVICE_STATE:
        data = vfu.MigDeviceState.build(
            {"device_state": rng.choice((*S, 8, 0xFFFF_FFFF)), "data_fd": rng.choice((0, 3))}
        )
    elif index == vfu.DeviceFeature.DMA_LOGGING_START:
        data = logging_start_data(session)
    elif index == vfu.DeviceFeature.DMA_LOGGING_REPORT:
        data = logging_report_data(session)
    room = rng.choice((0, 8, 64, 4096, rng.getrandbits(20)))
    head = vfu.DeviceFeatureHead.sizeof()
    argsz = head + max(len(data), room)
    return vfu.DeviceFeatureHead.build({"argsz": argsz, "flags": index | operation}) + data


def logging_ranges(session: Session) -> list[tuple[int, int]]:
    rng = session.rng
    ranges = []
    for _ in range(rng.choice((0, 1, 1, 2, 3, 8))):
        if session.windows and rng.random() < 0.6:
            address, size = rng.choice(session.windows)
        else:
            address, size = rng.choice(LAYOUT)
        roll = rng.random()
        if roll < 0.2:
            address, size = rng.choice(
                (
                    (HOLE, PAGE),
                    (NEVER_MAPPED, 2 * MiB),
                    (address + PAGE, size),
                    (address, size + PAGE),
                    (0, 1 << 48),
                    (address + 1, size),
                    (address, 0),
                    ((1 << 64) - PAGE, PAGE),
                    ((1 << 64) - PAGE, 2 * PAGE),
                )
            )
        elif roll < 0.35:
            size = PAGE * rng.randint(1, 16)
        ranges.append((address, size))
    if ranges and rng.random() < 0.1:
        ranges.append(ranges[0])  # overlapping
    return ranges


def logging_start_data(session: Session, ranges: list[tuple[int, int]] | None = None) -> bytes:
    rng = session.rng
    ranges = logging_ranges(session) if ranges is None else ranges
    page_size = rng.choice((PAGE, PAGE, 2 * MiB, 0, 1, 512, PAGE + 1, 1 << 40, 1 << 63))
    count = len(ranges) if rng.random() < 0.9 else mutate_int(rng, len(ranges), 32)
    data = vfu.DmaLoggingControl.build({"page_size": page_size, "num_ranges": count})
    return data + b"".join(
        vfu.DmaLoggingRange.build({"iova": a & ((1 << 64) - 1), "length": n}) for a, n in ranges
    )


def logging_report_data(session: Session) -> bytes:
    rng = session.rng
    address, size = rng.choice(session.windows or LAYOUT)
    roll = rng.random()
    if roll < 0.3:
        address, size = rng.choice(((HOLE, PAGE), (address, 1 << 40), (address + 1, size)))
    page_size = rng.choice((PAGE, PAGE, 2 * PAGE, 2 * MiB, 0, 3, 1 << 63))
    return vfu.DmaLoggingReport.build({"iova": address, "length": size, "page_size": page_size})


def templates(session: Session) -> dict[int, Template]:
    """A mostly valid payload (and fds) for every client command, drawn anew."""
    rng, ctx, ram = session.rng, session.ctx, session.ram

    def version() -> tuple[bytes, list[int]]:
        caps, _ = session.capabilities()
        head = vfu.VersionHead.build(
            {"major": rng.choice((0, 0, 1)), "minor": rng.choice((0, 1, 9))}
        )
        return head + vfu.encode_version_data(caps), []

    def dma_map() -> tuple[bytes, list[int]]:
        region = rng.choice(ram.regions)
        address = rng.choice(
            (
                region.guest_address,
                region.guest_address + PAGE,
                NEVER_MAPPED,
                HOLE,
                region.guest_address + region.size - PAGE,
                (1 << 64) - PAGE,
            )
        )
        size = rng.choice((PAGE, region.size, MiB, 2 * region.size, 0, PAGE - 1))
        with_fd = rng.random() < 0.5
        offset = rng.choice((0, 0, PAGE, region.size, 1 << 40)) if with_fd else 0
        flags = rng.choice((3, 3, 3, 1, 2, 0, 4, 8, rng.getrandbits(32)))
        payload = vfu.DmaMap.build(
            {"argsz": 32, "flags": flags, "offset": offset, "address": address, "size": size}
        )
        fds = [region.fd] if with_fd else []
        roll = rng.random()
        if roll < 0.15:
            kind, fd = ctx.junk_fd()
            ctx.note(f"  fd: {kind}")
            fds = [fd]
        elif roll < 0.2:
            fds = [ctx.memfd(rng.choice((0, PAGE, MiB)))]
        elif roll < 0.23:
            fds = [region.fd, ctx.eventfd()]
        return payload, fds

    def dma_unmap() -> tuple[bytes, list[int]]:
        if session.windows and rng.random() < 0.7:
            address, size = rng.choice(session.windows)
        else:
            address, size = rng.choice(LAYOUT)
        flags = rng.choice(
            (0, 0, 0, vfu.DMA_UNMAP_FLAG_ALL, vfu.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 4)
        )
        if flags == vfu.DMA_UNMAP_FLAG_ALL and rng.random() < 0.8:
            address = size = 0
        argsz = rng.choice((24, 24, 24, 16, 4096))
        return vfu.DmaUnmap.build(
            {"argsz": argsz, "flags": flags, "address": address, "size": size}
        ), []

    def four(layout: Any, index: int) -> Template:
        def build() -> tuple[bytes, list[int]]:
            argsz = rng.choice((layout.sizeof(), layout.sizeof(), 0, 8, 4096, 1 << 20, 1 << 31))
            values = struct.pack("=IIII", argsz, 0, index, 0)
            return values, []

        return build

    def region_info() -> tuple[bytes, list[int]]:
        argsz = rng.choice((32, 32, 64, 256, 31, 0, 1 << 20, 0xFFFF_FFFF))
        return vfu.RegionInfo.build(
            {
                "argsz": argsz,
                "flags": 0,
                "index": region_index(rng),
                "cap_offset": 0,
                "size": 0,
                "offset": 0,
            }
        ), []

    def io_fds() -> tuple[bytes, list[int]]:
        argsz = rng.choice((16, 16, 4096, 15, 1 << 20))
        index = region_index(rng)
        flags, count = rng.choice(((0, 0), (0, 0), (1, 0), (0, 1)))
        return vfu.RegionIoFds.build(
            {"argsz": argsz, "flags": flags, "index": index, "count": count}
        ), []

    def irq_info() -> tuple[bytes, list[int]]:
        index = rng.choice((0, 1, 2, 3, 4, 5, 0xFFFF_FFFF))
        argsz = rng.choice((16, 16, 15, 4096))
        return vfu.IrqInfo.build({"argsz": argsz, "flags": 0, "index": index, "count": 0}), []

    def set_irqs() -> tuple[bytes, list[int]]:
        index = rng.choice((0, 1, 2, 2, 3, 4, 5))
        data_kind = rng.choice(
            (vfu.IrqSetFlag.DATA_EVENTFD, vfu.IrqSetFlag.DATA_NONE, vfu.IrqSetFlag.DATA_BOOL)
        )
        action = rng.choice(
            (
                vfu.IrqSetFlag.ACTION_TRIGGER,
                vfu.IrqSetFlag.ACTION_MASK,
                vfu.IrqSetFlag.ACTION_UNMASK,
            )
        )
        flags = int(data_kind | action)
        if rng.random() < 0.1:
            flags = rng.choice((0, flags | vfu.IrqSetFlag.DATA_BOOL, rng.getrandbits(32)))
        start = rng.choice((0, 0, 1, 2, 3, 64, 0xFFFF_FFFF))
        count = rng.choice((0, 1, 1, 2, 3, 17, 0xFFFF_FFFF))
        fds: list[int] = []
        data = b""
        if data_kind == vfu.IrqSetFlag.DATA_EVENTFD:
            wanted = min(count, 17) if rng.random() < 0.8 else rng.choice((0, 1, 2))
            for _ in range(wanted):
                if rng.random() < 0.1:
                    kind, fd = ctx.junk_fd()
                    ctx.note(f"  fd: {kind}")
                else:
                    fd = ctx.eventfd()
                fds.append(fd)
        elif data_kind == vfu.IrqSetFlag.DATA_BOOL:
            data = bytes(rng.getrandbits(1) for _ in range(min(count, 64)))
        argsz = vfu.IrqSetHead.sizeof() + len(data) + rng.choice((0, 0, 0, 4 * len(fds), 1))
        head = vfu.IrqSetHead.build(
            {"argsz": argsz, "flags": flags, "index": index, "start": start, "count": count}
        )
        return head + data, fds

    def access(write: bool) -> Template:
        def build() -> tuple[bytes, list[int]]:
            region = region_index(rng)
            known = session.region_sizes.get(region, 0x4000)
            offset = edge(rng, known)
            count = access_count(rng)
            head = vfu.RegionAccess.build(
                {"offset": offset & ((1 << 64) - 1), "region": region, "count": count}
            )
            if not write:
                return head, []
            data = rng.randbytes(min(count, 1 << 20) if rng.random() < 0.9 else rng.randint(0, 9))
            return head + data, []

        return build

    def write_multi() -> tuple[bytes, list[int]]:
        count = rng.choice((1, 1, 2, 8, 200, 0, 201))
        entries = []
        for _ in range(min(count, 201)):
            region = region_index(rng)
            size = rng.choice((1, 2, 4, 8, 0, 9))
            offset = edge(rng, session.region_sizes.get(region, 0x4000))
            entries.append(
                vfu.WriteMultiEntry.build(
                    {
                        "offset": offset & ((1 << 64) - 1),
                        "region": region,
                        "count": size,
                        "data": rng.randbytes(8),
                    }
                )
            )
        return vfu.WriteMultiHead.build({"wr_cnt": count}) + b"".join(entries), []

    def mig_data(write: bool) -> Template:
        def build() -> tuple[bytes, list[int]]:
            size = rng.choice((0, 1, 16, 4096, 1 << 20, (1 << 20) + 1, 0xFFFF_FFFF))
            argsz = 8 + size if rng.random() < 0.8 else rng.choice((0, 8, 1 << 31))
            data = rng.randbytes(min(size, 4096)) if write else b""
            return vfu.MigDataHead.build({"argsz": argsz & 0xFFFF_FFFF, "size": size}) + data, []

        return build

    def dma_access() -> tuple[bytes, list[int]]:
        return vfu.DmaAccess.build({"address": 0, "count": 8}) + rng.randbytes(8), []

    return {
        Command.VERSION: version,
        Command.DMA_MAP: dma_map,
        Command.DMA_UNMAP: dma_unmap,
        Command.DEVICE_GET_INFO: four(vfu.DeviceInfo, 0),
        Command.DEVICE_GET_REGION_INFO: region_info,
        Command.DEVICE_GET_REGION_IO_FDS: io_fds,
        Command.DEVICE_GET_IRQ_INFO: irq_info,
        Command.DEVICE_SET_IRQS: set_irqs,
        Command.REGION_READ: access(False),
        Command.REGION_WRITE: access(True),
        Command.DMA_READ: dma_access,
        Command.DMA_WRITE: dma_access,
        Command.DEVICE_RESET: lambda: (b"" if rng.random() < 0.9 else rng.randbytes(8), []),
        Command.REGION_WRITE_MULTI: write_multi,
        Command.DEVICE_FEATURE: lambda: (feature_request(session), []),
        Command.MIG_DATA_READ: mig_data(False),
        Command.MIG_DATA_WRITE: mig_data(True),
    }


# Weights: the commands with the most to check come up most.
WEIGHTS = {
    Command.VERSION: 2,
    Command.DMA_MAP: 8,
    Command.DMA_UNMAP: 6,
    Command.DEVICE_GET_INFO: 3,
    Command.DEVICE_GET_REGION_INFO: 5,
    Command.DEVICE_GET_REGION_IO_FDS: 4,
    Command.DEVICE_GET_IRQ_INFO: 3,
    Command.DEVICE_SET_IRQS: 10,
    Command.REGION_READ: 10,
    Command.REGION_WRITE: 10,
    Command.DMA_READ: 2,
    Command.DMA_WRITE: 2,
    Command.DEVICE_RESET: 3,
    Command.REGION_WRITE_MULTI: 5,
    Command.DEVICE_FEATURE: 10,
    Command.MIG_DATA_READ: 4,
    Command.MIG_DATA_WRITE: 4,
}


def mutated_message(session: Session) -> Raw:
    rng = session.rng
    table = templates(session)
    if rng.random() < 0.04:
        command = rng.choice((0, 14, 19, 0xFFFF, rng.getrandbits(16)))
        payload, fds = rng.randbytes(rng.choice((0, 8, 40))), []
    else:
        names = sorted(table)
        command = rng.choices(names, [WEIGHTS[n] for n in names])[0]
        payload, fds = table[command]()
        layout = LAYOUTS.get(Command(command))
        if layout is not None and rng.random() < 0.5:
            payload = mutate_fields(rng, payload, layout, rng.randint(1, 2))
    if rng.random() < 0.15:
        payload = mutate_bytes(rng, payload)
    flags = vfu.TYPE_COMMAND
    roll = rng.random()
    if roll < 0.12:
        flags |= vfu.FLAG_NO_REPLY
    elif roll < 0.15:
        flags |= vfu.FLAG_ERROR
    elif roll < 0.17:
        flags = rng.choice((vfu.TYPE_REPLY, 2, 0xF, 0x40, rng.getrandbits(32)))
    return command, flags, payload, fds


async def send_mutated(session: Session) -> None:
    command, flags, payload, fds = mutated_message(session)
    rng = session.rng
    session.ctx.note(
        f"send {command_name(command)} flags={flags:#x} size={len(payload)} fds={len(fds)}"
    )
    roll = rng.random()
    size = None
    if roll < 0.02:  # the header claims more than comes: the stream desyncs
        size = vfu.HEADER_SIZE + len(payload) + rng.choice((1, 8, 100))
    elif roll < 0.035:  # a size no message may have: the connection must close
        size = rng.choice((0, 8, 15, 2 * MiB, 0xFFFF_FFFF))
    if size is not None:
        session.ctx.note(f"  msg_size {size}")
    await session.send(command, payload, fds, flags=flags, size=size)


# --- a hostile guest's rings -----------------------------------------------------------------


def ring_scribble(session: Session, ring: DriverRing) -> None:
    """Write what a hostile guest may into ``ring``'s memory."""
    rng, ram, guest = session.rng, session.ram, session.guest
    desc_address, driver_address, device_address = ring.areas
    size = ring.size

    def address() -> int:
        return rng.choice(
            (
                guest.buffer(64),
                session.hostile_address(),
                LAYOUT[1][0] + rng.randrange(0, LAYOUT[1][1], 512),  # maybe never mapped
                desc_address,
                driver_address,
            )
        )

    def length() -> int:
        return rng.choice((0, 1, 16, 512, 4096, 65536, MiB, 1 << 31, 0xFFFF_FFFF))

    def flags() -> int:
        return rng.choice(
            (
                0,
                DESC_F_NEXT,
                DESC_F_WRITE,
                DESC_F_NEXT | DESC_F_WRITE,
                DESC_F_INDIRECT,
                DESC_F_INDIRECT | DESC_F_NEXT,
                rng.getrandbits(16),
            )
        )

    tricks = ["descriptors", "indirect", "loop", "buffers", "self-write", "events"]
    tricks += ["packed-chain"] if ring.packed else ["avail-jump", "avail-heads", "used-index"]
    trick = rng.choice(tricks)
    session.ctx.note(f"  ring trick {trick} (size {size}, packed={ring.packed})")
    desc = ram.view(desc_address, 16 * size)
    avail_bits = 0
    if isinstance(ring, DriverPackedRing):
        avail_bits = (1 << 7) if ring.avail_wrap else (1 << 15)
    if trick == "descriptors":
        for _ in range(rng.randint(1, size)):
            i = rng.randrange(size)
            struct.pack_into(
                "<QIHH", desc, 16 * i, address(), length(), flags(), rng.getrandbits(16)
            )
            if ring.packed and rng.random() < 0.8:
                struct.pack_into("<H", desc, 16 * i + 14, flags() | avail_bits)
    elif trick == "indirect":
        entries = rng.choice((1, 2, 16, 64))
        table = guest.buffer(16 * entries)
        for k in range(entries):
            ram.write(
                table + 16 * k,
                struct.pack("<QIHH", address(), length(), flags(), rng.randrange(entries + 2)),
            )
        table_length = rng.choice((16 * entries, 16 * entries + 8, 0, 16 * 1025, 0xFFFF_FFF0))
        i = rng.randrange(size)
        extra = avail_bits if ring.packed else 0
        struct.pack_into("<QIHH", desc, 16 * i, table, table_length, i if ring.packed else 0, 0)
        struct.pack_into("<H", desc, 16 * i + (14 if ring.packed else 12), DESC_F_INDIRECT | extra)
    elif trick == "loop":
        for i in range(size):
            target = (i + rng.choice((0, 1))) % size
            if ring.packed:
                struct.pack_into(
                    "<QIHH", desc, 16 * i, guest.buffer(16), 16, i, DESC_F_NEXT | avail_bits
                )
            else:
                struct.pack_into("<QIHH", desc, 16 * i, guest.buffer(16), 16, DESC_F_NEXT, target)
    elif trick == "buffers":
        for i in range(size):
            struct.pack_into("<QI", desc, 16 * i, address(), length())
    elif trick == "self-write":
        for i in range(size):
            target = rng.choice((desc_address, driver_address, device_address))
            struct.pack_into("<QI", desc, 16 * i, target, rng.choice((16, 512, 4096)))
    elif trick == "events":
        ram.write(driver_address, rng.randbytes(4))
        ram.write(device_address, rng.randbytes(4))
    elif trick == "avail-jump":
        ram.write(driver_address + 2, struct.pack("<H", rng.getrandbits(16)))
    elif trick == "avail-heads":
        assert isinstance(ring, DriverSplitRing)
        count = rng.randint(1, size)
        for k in range(count):
            slot = (ring.avail_idx + k) % size
            head = rng.choice((rng.randrange(size), size, 0xFFFF, rng.getrandbits(16)))
            ram.write(driver_address + 4 + 2 * slot, struct.pack("<H", head))
        ring.avail_idx = (ring.avail_idx + count) & 0xFFFF
        ram.write(driver_address + 2, struct.pack("<H", ring.avail_idx))
    elif trick == "used-index":
        ram.write(device_address + 2, struct.pack("<H", rng.getrandbits(16)))
    else:  # packed-chain: every slot available and chained, forever
        for i in range(size):
            struct.pack_into(
                "<QIHH", desc, 16 * i, guest.buffer(16), 16, i, DESC_F_NEXT | avail_bits
            )


# --- checks shared by the cases ----------------------------------------------------------------


async def check_serves(ctx: CaseContext, guest: Guest, what: str) -> None:
    """A fresh, correct client (DEVICE_RESET first unless the device is
    RUNNING already and the draw says not to) gets I/O through. Anything
    else is a violation: the device must survive whatever came before."""
    rng = ctx.rng
    reset = rng.random() < 0.7
    session = Session(ctx, guest)
    ctx.note(f"check: {what} (reset={reset})")
    try:
        with trio.fail_after(20):
            async with session.connected():
                client = session.c
                if not reset and await client.migration_state() is not S.RUNNING:
                    reset = True
                if reset:
                    await client.reset()
                    state = await client.migration_state()
                    if state is not S.RUNNING:
                        ctx.violation(f"{what}: the device is {state.name} after DEVICE_RESET")
                        return
                await session.map_memory()
                if session.blk:
                    queues = await session.bring_up(
                        queue_count=rng.randint(1, 2), queue_size=rng.choice((8, 64, 128))
                    )
                    for queue in queues:
                        if not await session.serves(queue, f"{what}, queue {queue.index}"):
                            return
                else:
                    await session.example_serves(what)
    except Exception as exc:
        if not is_expected(exc):
            raise
        ctx.violation(f"{what}: {describe(exc)}")


async def alive(session: Session) -> bool:
    """Whether the connection still serves a command (within 5 s)."""
    try:
        with trio.fail_after(5):
            await session.c.device_info()
    except Exception as exc:
        if not is_expected(exc):
            raise
        return False
    return True


async def serves_here(session: Session, what: str) -> None:
    """After a reset on this connection, the driver starts over and gets
    I/O through, unless the connection itself is gone."""
    client = session.c
    client.dma_mode = "correct"
    try:
        with trio.fail_after(15):
            if session.blk:
                size = session.rng.choice((4, 16, 64, 128))
                queues = await session.bring_up(queue_count=1, queue_size=size)
                if queues and not await session.serves(queues[0], what):
                    return
            else:
                await session.example_serves(what)
    except Exception as exc:
        if not is_expected(exc):
            raise
        if client.sock.fileno() >= 0 and await alive(session):
            session.ctx.violation(f"{what}: {describe(exc)}")


# --- the cases ------------------------------------------------------------------------------


async def case_mutate(ctx: CaseContext) -> None:
    """A correct set-up cut anywhere, then mutated commands of every type
    amid guest work, each reply judged."""
    rng = ctx.rng
    session = Session(ctx, new_guest(ctx))
    depth = rng.randint(0, 3)
    async with session.connected():
        await session.known_region_sizes()
        await session.setup(depth)
        for _ in range(rng.randint(1, 12)):
            await send_mutated(session)
            if rng.random() < 0.3:
                with contextlib.suppress(VfioUserError):
                    await session.exercise()
            if rng.random() < 0.6:
                await session.settle(1.0)
        await session.settle(2.0)


def version_payloads(rng: random.Random) -> list[tuple[str, bytes, str | None]]:
    """(what, VERSION payload, verdict): "accept", "refuse" or None (either)."""
    good = {"max_msg_fds": 16, "max_data_xfer_size": MiB, "pgsizes": PAGE}

    def head(major: int = 0, minor: int = 1) -> bytes:
        return vfu.VersionHead.build({"major": major, "minor": minor})

    def caps(**changes: Any) -> bytes:
        document = {**good, **changes}
        return head() + vfu.encode_version_data(document)

    return [
        ("plain", caps(), "accept"),
        ("no data", head(), "accept"),
        ("minor 0xffff", head(0, 0xFFFF) + vfu.encode_version_data(good), "accept"),
        ("legacy migration", caps(migration={"pgsize": PAGE}), "accept"),
        ("unknown capability", caps(colour="blue"), "accept"),
        ("twin socket", caps(twin_socket={"supported": True}), "accept"),
        ("major 1", head(1, 0) + vfu.encode_version_data(good), "refuse"),
        ("short", head()[: rng.randrange(4)], "refuse"),
        ("max_msg_fds 0", caps(max_msg_fds=0), None),
        ("max_msg_fds true", caps(max_msg_fds=True), None),
        ("max_data_xfer huge", caps(max_data_xfer_size=1 << 40), None),
        ("pgsizes 512", caps(pgsizes=512), "refuse"),
        ("pgsizes string", caps(pgsizes="4096"), None),
        ("twin socket 1", caps(twin_socket=1), None),
        ("fd_index -1", caps(twin_socket={"supported": True, "fd_index": -1}), None),
        ("no NUL", head() + json.dumps({"capabilities": good}).encode(), None),
        ("NUL inside", head() + b'{"capabilities":{}}\0\0', None),
        ("not JSON", head() + b"{capabilities\0", "refuse"),
        ("array", head() + b"[1,2]\0", "refuse"),
        ("not UTF-8", head() + b'{"\xff":1}\0', "refuse"),
        ("capabilities list", head() + b'{"capabilities":[1]}\0', None),
        ("deep", head() + b"[" * 5000 + b"]" * 5000 + b"\0", "refuse"),
        ("big", caps(padding="x" * 60000), None),
        ("random", head() + rng.randbytes(rng.randint(1, 200)), None),
    ]


async def case_version(ctx: CaseContext) -> None:
    """Negotiation bent: broken VERSION payloads, fds with it, other commands
    first, VERSION twice, a hang-up halfway; each verdict checked."""
    rng = ctx.rng
    sock = await ctx.connect()
    limit = CLIENT_MAX_DATA_XFER + vfu.MAX_MESSAGE_SLACK
    negotiated = False
    for step in range(rng.randint(1, 3)):
        roll = rng.random()
        fds: list[int] = []
        command, flags = Command.VERSION, vfu.TYPE_COMMAND
        what, payload, verdict = rng.choice(version_payloads(rng))
        if roll < 0.1:
            command, payload, verdict, what = (
                Command.DEVICE_GET_INFO,
                bytes(16),
                "refuse",
                "GET_INFO",
            )
        elif roll < 0.2:
            fds, verdict, what = [ctx.eventfd()], None, f"{what} with an fd"
        elif roll < 0.25:
            flags, verdict = vfu.FLAG_NO_REPLY, "refuse"
        elif roll < 0.3:
            ctx.note("half a header, then hang up")
            await sock.send(vfu.encode(1, Command.VERSION, payload)[: rng.randint(1, 15)])
            return
        if negotiated and command == Command.VERSION:
            verdict = "refuse"  # once only
        ctx.note(f"version step {step}: {what} ({verdict})")
        message = vfu.Header.build(
            {
                "msg_id": step,
                "command": command,
                "msg_size": vfu.HEADER_SIZE + len(payload),
                "flags": flags,
                "error": 0,
            }
        )
        await vfu.write_message(sock, message + payload, fds)
        if flags & vfu.FLAG_NO_REPLY:
            return
        try:
            with trio.fail_after(5):
                reply = await vfu.read_message(sock, limit)
        except (ConnectionClosed, OSError):
            if verdict == "accept":
                ctx.violation(f"VERSION ({what}) closed the connection")
            return
        reply.close_fds()
        accepted = not reply.is_error
        if reply.command != command or reply.kind != vfu.TYPE_REPLY or reply.msg_id != step:
            ctx.violation(f"{what}: answered with command {reply.command} msg {reply.msg_id}")
            return
        if verdict == "accept" and not accepted:
            ctx.violation(f"VERSION ({what}) refused with errno {reply.error}")
        if verdict == "refuse" and accepted:
            ctx.violation(f"{what} accepted")
        if not accepted:
            return
        if not negotiated and command == Command.VERSION:
            check_version_reply(ctx, what, reply)
            negotiated = True
        if rng.random() < 0.5:
            request = vfu.DeviceInfo.build(
                {"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0}
            )
            await vfu.write_message(sock, vfu.encode(100, Command.DEVICE_GET_INFO, request))
            with trio.fail_after(5):
                info = await vfu.read_message(sock, limit)
            info.close_fds()
            if info.is_error or info.command != Command.DEVICE_GET_INFO:
                ctx.violation(f"GET_INFO after VERSION ({what}) failed: {info.error}")


def check_version_reply(ctx: CaseContext, what: str, reply: Message) -> None:
    if len(reply.payload) < vfu.VersionHead.sizeof():
        ctx.violation(f"VERSION ({what}) reply of {len(reply.payload)} bytes")
        return
    head = vfu.VersionHead.parse(reply.payload)
    if head.major != vfu.MAJOR:
        ctx.violation(f"VERSION ({what}) answered with major {head.major}")
    try:
        vfu.parse_version_data(reply.payload[vfu.VersionHead.sizeof() :])
    except vfu.VersionError as exc:
        ctx.violation(f"VERSION ({what}) reply capabilities: {exc}")


async def case_config_space(ctx: CaseContext) -> None:
    """PCI config and BAR accesses at odd offsets and sizes, out of range,
    BAR sizing, capability bodies, the virtio-pci access window, FLR; the
    identity registers must not change."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    async with session.connected():
        client = session.c
        await session.known_region_sizes()
        await session.setup(rng.randint(0, 2))
        identity = await client.config_read(0, 4)
        caps = await client.capabilities()
        config_size = session.region_sizes.get(CONFIG_REGION, 256)
        for _ in range(rng.randint(4, 30)):
            trick = rng.choice(
                (
                    "read",
                    "write",
                    "write",
                    "capability",
                    "bar-sizing",
                    "bar",
                    "bar",
                    "window",
                    "multi",
                    "flr",
                )
            )
            if trick == "read":
                offset, count = edge(rng, config_size), access_count(rng)
                head = vfu.RegionAccess.build(
                    {"offset": offset & ((1 << 64) - 1), "region": CONFIG_REGION, "count": count}
                )
                await session.send(Command.REGION_READ, head)
            elif trick in ("write", "capability"):
                if trick == "capability" and caps:
                    _, at = rng.choice(caps)
                    offset = at + rng.randrange(0, 24)
                else:
                    offset = rng.choice(
                        (
                            0x04,
                            0x06,
                            0x0C,
                            0x10,
                            0x14,
                            0x24,
                            0x30,
                            0x3C,
                            0x34,
                            edge(rng, config_size),
                        )
                    )
                data = rng.choice(
                    (b"\xff" * 4, bytes(4), rng.randbytes(rng.choice((1, 2, 3, 4, 8, 64))))
                )
                ctx.note(f"config write {offset:#x} {data[:8].hex()}")
                head = vfu.RegionAccess.build(
                    {
                        "offset": offset & ((1 << 64) - 1),
                        "region": CONFIG_REGION,
                        "count": len(data),
                    }
                )
                await session.send(Command.REGION_WRITE, head + data)
            elif trick == "bar-sizing":
                index = rng.randrange(6)
                ctx.note(f"size BAR{index}")
                with contextlib.suppress(VfioUserError):
                    await client.bar_size(index)
            elif trick == "bar":
                region = rng.choice((0, 1, 2, 4, 4, 5))
                known = session.region_sizes.get(region, 0)
                offset = edge(rng, known) & ((1 << 64) - 1)
                count = rng.choice((1, 2, 3, 4, 8, 16, 0, 5))
                if rng.random() < 0.5:
                    head = vfu.RegionAccess.build(
                        {"offset": offset, "region": region, "count": count}
                    )
                    await session.send(Command.REGION_WRITE, head + rng.randbytes(count))
                else:
                    head = vfu.RegionAccess.build(
                        {"offset": offset, "region": region, "count": count}
                    )
                    await session.send(Command.REGION_READ, head)
            elif trick == "window" and session.blk:
                window = [at for cap_id, at in caps if cap_id == 0x09]
                if window:
                    at = window[-1]  # VIRTIO_PCI_CAP_PCI_CFG comes last
                    bar = rng.choice((MODERN_BAR, 1, 0, 5, 6, 0xFF))
                    offset = edge(rng, 0x4000) & 0xFFFF_FFFF
                    length = rng.choice((1, 2, 4, 0, 3, 8, 0xFFFF_FFFF))
                    ctx.note(f"window bar {bar} offset {offset:#x} length {length}")
                    await client.config_write(at + 4, 1, bar)
                    await client.config_write(at + 8, 4, offset)
                    await client.config_write(at + 12, 4, length)
                    if rng.random() < 0.5:
                        await client.config_write(at + 16, 4, rng.getrandbits(32))
                    else:
                        await client.config_read(at + 16, 4)
            elif trick == "multi" and client.server.write_multiple:
                writes = [
                    (
                        rng.choice((CONFIG_REGION, MODERN_BAR, 0, 1)),
                        edge(rng, 0x100) & 0xFFFF,
                        rng.randbytes(rng.choice((1, 2, 4, 8))),
                    )
                    for _ in range(rng.randint(1, 8))
                ]
                with contextlib.suppress(VfioUserError):
                    await client.write_multi(writes)
            elif trick == "flr":
                express = [at for cap_id, at in caps if cap_id == 0x10]
                if express:
                    ctx.note("function level reset")
                    await client.config_write(express[0] + 8, 2, 0x8000)
            if rng.random() < 0.5:
                await session.settle(1.0)
        await session.settle(2.0)
        if await client.config_read(0, 4) != identity:
            ctx.violation("the vendor and device IDs changed under config writes")
    if rng.random() < 0.3:
        await check_serves(ctx, guest, "after hostile config accesses")


async def case_hostile_ring(ctx: CaseContext) -> None:
    """blk: rings with garbage descriptors, indexes and addresses outside
    memory or in RAM never mapped, kicked while rewritten. example: the DMA
    engine aimed at the same places. Then the device must serve again."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    async with session.connected():
        await session.c.reset()
        await session.map_memory(partial=rng.random() < 0.2)
        if session.blk:
            hostile = rng.choice((0, 1)) if rng.random() < 0.3 else None
            queues = await session.bring_up(hostile_queue=hostile)
            if not queues:
                return
            for _ in range(rng.randint(1, 4)):
                victim = rng.choice(queues)
                session.post(victim, rng.randint(0, 4))
                ring_scribble(session, victim.ring)
                for _ in range(rng.randint(1, 3)):
                    await victim.kick_async()
                    await trio.sleep(0.002)
        else:
            await session.example_irqs()
            for _ in range(rng.randint(1, 6)):
                length = rng.choice((0, 1, 64, 4096, MiB, MiB + 1, 0xFFFF_FFFF))
                src = rng.choice((guest.buffer(64), session.hostile_address(), LAYOUT[1][0]))
                dst = rng.choice((guest.buffer(64), session.hostile_address(), src))
                ctx.note(f"copy {src:#x} -> {dst:#x} ({length})")
                await session.example_copy(src, dst, length)
                if rng.random() < 0.2:
                    await session.c.config_write(0x04, 2, rng.choice((0, 0x2, 0x6)))
                if rng.random() < 0.3:
                    await session.c.region_write(EXAMPLE_BAR, 0x2C, bytes(4))
        await trio.sleep(0.02)
        if rng.random() < 0.4:
            status = rng.choice((0, 0, Status.FAILED))
            ctx.note(f"driver writes status {status:#x}")
            if session.blk:
                assert session.driver is not None
                await session.driver.common_write(COMMON_STATUS, 1, status)
            else:
                await session.c.reset()
            await serves_here(session, "the driver starting over after a hostile ring")
            return
    if rng.random() < 0.5:
        await check_serves(ctx, guest, "a fresh session after a hostile ring")


async def case_remote_dma(ctx: CaseContext) -> None:
    """Guest RAM mapped without fds: the device reaches rings and buffers
    through DMA_READ/DMA_WRITE, which this VMM answers late, wrongly, with
    errors, twice or never, while it sends commands that must not wait."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    async with session.connected():
        client = session.c
        if rng.random() < 0.8:
            await client.reset()
        await session.map_memory(with_fd=False, partial=rng.random() < 0.1)
        client.dma_mode = rng.choice(("hostile", "hostile", "hostile", "never"))
        ctx.note(f"DMA answers: {client.dma_mode}")
        if session.blk:
            await session.bring_up()
        else:
            await session.example_irqs()
        for _ in range(rng.randint(1, 6)):
            with contextlib.suppress(VfioUserError):
                await session.exercise()
            if rng.random() < 0.5:
                # Commands are answered while ring walks wait for the VMM.
                try:
                    with trio.fail_after(5):
                        await client.device_info()
                except trio.TooSlowError:
                    if await alive(session):  # it answered later: it waited for the walk
                        ctx.violation("DEVICE_GET_INFO waited > 5 s behind DMA requests")
                    return
            await trio.sleep(rng.choice((0, 0.005, 0.05)))
        if rng.random() < 0.3 and not client.probe_bent:
            # (A bent layout probe leaves this connection's DMA replies
            # misread for good: only a new connection starts afresh.)
            ctx.note("answers turn correct, device reset")
            client.dma_mode = "correct"
            await client.reset()  # the DMA maps stay
            await serves_here(session, "after hostile DMA answers and a DEVICE_RESET")
            return
    if rng.random() < 0.4:
        await check_serves(ctx, guest, "a fresh session after hostile DMA answers")


async def case_pipeline(ctx: CaseContext) -> None:
    """~1500 commands sent while replies are read only now and then and the
    daemon's DMA requests go unanswered, then a hang-up (issue 11, defect 1)."""
    rng = ctx.rng
    session = Session(ctx, new_guest(ctx))
    async with session.connected():
        client = session.c
        await client.reset()
        await session.map_memory(with_fd=rng.random() < 0.2)
        client.dma_mode = rng.choice(("never", "never", "budget"))
        client.dma_budget = rng.choice((1, 3, 10, 50))
        if session.blk:
            await session.bring_up()
        else:
            await session.example_irqs()
        await session.exercise()
        count = rng.choice((500, 1500, 1500, 3000))
        kind = rng.choice(("info", "info", "config", "big-config", "region-info", "mixed"))
        ctx.note(f"{count} x {kind}, replies read now and then, DMA {client.dma_mode}")
        kick = b""
        if session.blk and session.queues and session.driver is not None:
            notify = session.driver.areas[CFG_NOTIFY]
            queue = rng.choice(session.queues)
            for other in session.queues:
                session.post(other, other.ring.size)
            head = vfu.RegionAccess.build(
                {"offset": notify.offset + queue.notify_offset, "region": notify.bar, "count": 2}
            )
            kick = head + struct.pack("<H", queue.index)
        elif not session.blk:
            kick = vfu.RegionAccess.build({"offset": 0x24, "region": 0, "count": 4}) + bytes(
                [1, 0, 0, 0]
            )
        messages = []
        for _ in range(count):
            which = kind if kind != "mixed" else rng.choice(("info", "config", "region-info"))
            msg_id = client._msg_id()
            if kick and rng.random() < 0.05:  # a doorbell among them, posted
                messages.append(vfu.encode(msg_id, Command.REGION_WRITE, kick, no_reply=True))
            elif which == "big-config":
                payload = vfu.RegionAccess.build(
                    {"offset": 0, "region": CONFIG_REGION, "count": 4096}
                )
                messages.append(vfu.encode(msg_id, Command.REGION_READ, payload))
            elif which == "info":
                payload = vfu.DeviceInfo.build(
                    {"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0}
                )
                messages.append(vfu.encode(msg_id, Command.DEVICE_GET_INFO, payload))
            elif which == "config":
                payload = vfu.RegionAccess.build({"offset": 0, "region": CONFIG_REGION, "count": 4})
                messages.append(vfu.encode(msg_id, Command.REGION_READ, payload))
            else:
                payload = vfu.RegionInfo.build(
                    {"argsz": 32, "flags": 0, "index": 4, "cap_offset": 0, "size": 0, "offset": 0}
                )
                messages.append(vfu.encode(msg_id, Command.DEVICE_GET_REGION_INFO, payload))
        batches = [b"".join(messages[i : i + 50]) for i in range(0, count, 50)]
        read_every = rng.choice((3, 10, 1000))
        client.paused = True
        with trio.move_on_after(1.5):  # the daemon stops reading once we never do
            for number, batch in enumerate(batches):
                await client._send(client.sock, batch)  # the lock: DMA answers go out too
                if number % read_every == read_every - 1:
                    client.paused = False
                    await trio.sleep(0.002)
                    client.paused = True
        if rng.random() < 0.3:
            await client._send(client.sock, vfu.encode(0, Command.DEVICE_GET_INFO)[:7])
        ctx.note("hang up")


async def case_reset_mid_io(ctx: CaseContext) -> None:
    """Resets while requests are in flight: virtio status 0, DEVICE_RESET,
    FLR, bus mastering off, often with a ring's address outside memory and
    memory mapped and unmapped meanwhile (so waiting walks look again; issue
    11, defect 4); the driver then starts over and must be served."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    how = rng.choice(("status", "status", "device-reset", "flr", "bus-master"))
    # What once broke a walk (defect 4): memory without fds, the avail ring
    # in a hole, driver resets while memory comes and goes.
    hole = session.blk and rng.random() < 0.3
    if hole:
        how = "status"
    async with session.connected():
        client = session.c
        await client.reset()
        await session.map_memory(with_fd=not hole and rng.random() < 0.4)

        async def start() -> None:
            if session.blk:
                hostile = rng.choice((0, 1)) if rng.random() < 0.6 or hole else None
                await session.bring_up(hostile_queue=hostile, hole=hole)
            else:
                await session.example_irqs()

        await start()
        ctx.note(f"reset by {how}")
        express = [at for cap_id, at in await client.capabilities() if cap_id == 0x10]
        extra = ctx.memfd(MiB) if rng.random() < 0.5 else None

        async def reset() -> None:
            if how == "status" and session.driver is not None:
                await session.driver.common_write(COMMON_STATUS, 1, 0)
            elif how == "device-reset" or (how == "status" and session.driver is None):
                await client.reset()
            elif how == "flr" and express:
                await client.config_write(express[0] + 8, 2, 0x8000)
            else:
                await client.config_write(0x04, 2, 0x2)
                await trio.sleep(0.005)
                await client.config_write(0x04, 2, 0x6)

        for _ in range(rng.randint(1, 12)):
            for queue in session.queues:
                session.post(queue, rng.randint(1, queue.ring.size))
            with contextlib.suppress(VfioUserError):
                await session.exercise()
            churn = rng.random() < 0.5  # memory changes: walks waiting for it look again
            reset_now = rng.random() < 0.6
            ctx.note(f"round: memory churn {churn}, reset {reset_now}")
            if churn:
                with contextlib.suppress(VfioUserError):
                    await client.dma_map(NEVER_MAPPED, MiB, fd=extra)
            await trio.sleep(rng.choice((0, 0, 0.001, 0.01)))
            if reset_now:
                await reset()
            if churn and rng.random() < 0.8:
                with contextlib.suppress(VfioUserError):
                    await client.dma_unmap(NEVER_MAPPED, MiB)
            if reset_now and rng.random() < 0.5:
                await start()
            await session.kick_all()
        if rng.random() < 0.6:
            if rng.random() < 0.5:
                with contextlib.suppress(VfioUserError):
                    await client.dma_unmap(NEVER_MAPPED, MiB)
            await serves_here(session, f"the driver starting over after a {how} mid-I/O")
            return
    if rng.random() < 0.5:
        await check_serves(ctx, guest, f"a fresh session after a {how} mid-I/O")


async def case_migration(ctx: CaseContext) -> None:
    """The migration state machine walked at random (GET after every SET),
    data read in STOP_COPY, garbage or a damaged saved state written in
    RESUMING, guest work in between; a hang-up in any state, then a reset
    that must bring I/O back."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    blob = b""  # what STOP_COPY gave
    async with session.connected():
        client = session.c
        if rng.random() < 0.6:
            await client.reset()
        await session.setup(rng.randint(1, 3))
        written, only_random = 0, True  # written in RESUMING since the last state change
        for _ in range(rng.randint(1, 10)):
            roll = rng.random()
            if roll < 0.4:
                target = rng.choice((*S, S.STOP_COPY, S.RESUMING, S.STOP, 8, 0xFFFF_FFFF))
                before = await client.migration_state()
                try:
                    await client.set_migration_state(target)  # type: ignore[arg-type]
                except VfioUserError as exc:
                    ctx.note(f"state {before.name} -> {target}: {exc}")
                    if before == S.RESUMING and target in (S.STOP, S.RUNNING):
                        written, only_random = 0, True  # a refused load drops its data
                    continue
                now = await client.migration_state()
                ctx.note(f"state {before.name} -> {now.name}")
                if now != target:
                    ctx.violation(
                        f"SET state {target} from {before.name} succeeded, now {now.name}"
                    )
                if before == S.RESUMING and now != S.RESUMING and written >= 16 and only_random:
                    ctx.violation(f"{written} bytes of random garbage loaded as device state")
                written, only_random = 0, True
            elif roll < 0.5:
                size = rng.choice((1, 16, 4096, MiB, 0))
                head = vfu.MigDataHead.build({"argsz": 8 + size, "size": size})
                await session.send(Command.MIG_DATA_READ, head)  # its reply judged
                await session.settle(2.0)
            elif roll < 0.6:
                with contextlib.suppress(VfioUserError):
                    blob += await client.migration_read(rng.choice((16, 4096, MiB)))
                ctx.note(f"saved state so far: {len(blob)} bytes")
            elif roll < 0.8:
                if blob and rng.random() < 0.5:
                    data = mutate_bytes(rng, blob)[:65536]
                    random_data = False
                else:
                    data, random_data = rng.randbytes(rng.choice((1, 16, 200, 4096))), True
                try:
                    await client.migration_write(data)
                except VfioUserError as exc:
                    ctx.note(f"{len(data)} bytes written: {exc}")
                else:
                    written += len(data)
                    only_random = only_random and random_data
            else:
                with contextlib.suppress(VfioUserError):
                    await session.exercise()
            await session.settle(1.0)
        ctx.note(f"hang up in {(await client.migration_state()).name}")
    await check_serves(ctx, guest, "reconnect and DEVICE_RESET after a migration walk")


async def case_dma_logging(ctx: CaseContext) -> None:
    """DMA logging started, reported and stopped with hostile ranges, page
    sizes and reply room, memory unmapped and mapped under it, guest work."""
    rng = ctx.rng
    session = Session(ctx, new_guest(ctx))
    async with session.connected():
        client = session.c
        await session.setup(rng.randint(1, 2))
        head_size = vfu.DeviceFeatureHead.sizeof()
        for _ in range(rng.randint(2, 10)):
            roll = rng.random()
            if roll < 0.3:
                data = logging_start_data(session)
                flags = vfu.DeviceFeature.DMA_LOGGING_START | vfu.FEATURE_SET
            elif roll < 0.6:
                data = logging_report_data(session)
                flags = vfu.DeviceFeature.DMA_LOGGING_REPORT | vfu.FEATURE_GET
            elif roll < 0.7:
                data, flags = b"", vfu.DeviceFeature.DMA_LOGGING_STOP | vfu.FEATURE_SET
            elif roll < 0.8 and session.windows:
                address, size = rng.choice(session.windows)
                ctx.note(f"unmap {address:#x}+{size:#x} while logging")
                await client.dma_unmap(address, size)
                session.windows.remove((address, size))
                if rng.random() < 0.7:
                    region = next(
                        r
                        for r in session.ram.regions
                        if r.guest_address <= address < r.guest_address + r.size
                    )
                    fd = region.fd if session.with_fd else None
                    await client.dma_map(
                        address, size, fd=fd, offset=address - region.guest_address
                    )
                    session.windows.append((address, size))
                continue
            else:
                with contextlib.suppress(VfioUserError):
                    await session.exercise()
                continue
            room = rng.choice((0, len(data), len(data) + 8, len(data) + 4096, 1 << 20))
            argsz = head_size + max(len(data), room) if rng.random() < 0.9 else rng.getrandbits(32)
            payload = vfu.DeviceFeatureHead.build({"argsz": argsz, "flags": flags}) + data
            ctx.note(f"feature {flags:#x} argsz {argsz} data {len(data)}")
            await session.send(Command.DEVICE_FEATURE, payload)
            await session.settle(1.0)


async def case_irqs(ctx: CaseContext) -> None:
    """Interrupt set-up churn: kinds switched, vectors beyond the count,
    disable-all, masks, the INTx unmask eventfd, triggers, MSI-X table and
    enable bits, all while the device raises interrupts."""
    rng = ctx.rng
    session = Session(ctx, new_guest(ctx))
    async with session.connected():
        client = session.c
        await session.setup(rng.randint(1, 3))
        counts = {}
        for index in range(vfu.PCI_NUM_IRQS):
            counts[index] = (await client.irq_info(index)).count
        caps = await client.capabilities()
        table = templates(session)
        for _ in range(rng.randint(2, 12)):
            roll = rng.random()
            if roll < 0.4:
                kind = rng.choice([k for k, n in counts.items() if n] or [0])
                count = counts[kind]
                start = rng.randrange(count) if count else 0
                number = rng.randint(0, count - start) if rng.random() < 0.8 else count + 1
                fds = [ctx.eventfd() for _ in range(min(number, 17))]
                flags = vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER
                if rng.random() < 0.2:
                    fds = []  # unassign
                head = vfu.IrqSetHead.build(
                    {"argsz": 20, "flags": flags, "index": kind, "start": start, "count": number}
                )
                ctx.note(f"SET_IRQS {kind} {start}+{number} fds={len(fds)}")
                await session.send(Command.DEVICE_SET_IRQS, head, fds[: client.server.max_msg_fds])
            elif roll < 0.7:
                payload, fds = table[Command.DEVICE_SET_IRQS]()
                await session.send(Command.DEVICE_SET_IRQS, payload, fds)
            elif roll < 0.8:
                msix = [at for cap_id, at in caps if cap_id == 0x11]
                msi = [at for cap_id, at in caps if cap_id == 0x05]
                at = rng.choice(msix + msi or [0x04])
                value = rng.choice((0x8000, 0xC000, 0x4000, 0, 0x0001, 0x0071))
                ctx.note(f"capability control at {at:#x} = {value:#x}")
                await client.config_write(at + 2 if at != 0x04 else at, 2, value)
            elif roll < 0.9 and session.blk:
                offset = rng.randrange(0, 64, 4)
                await client.region_write(1, offset, rng.randbytes(4))
            else:
                with contextlib.suppress(VfioUserError):
                    await session.exercise()
            if rng.random() < 0.5:
                await session.settle(1.0)
        await session.settle(2.0)


async def case_dma_map(ctx: CaseContext) -> None:
    """DMA maps made and removed under running I/O: pieces, overlaps,
    unmap-all, many small maps, and a region whose memfd shrinks after the
    map (the daemon must end the session, not crash)."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    async with session.connected():
        client = session.c
        await session.setup(rng.randint(1, 3))
        for _ in range(rng.randint(2, 10)):
            roll = rng.random()
            if roll < 0.25 and session.windows:
                address, size = rng.choice(session.windows)
                ctx.note(f"unmap {address:#x}+{size:#x}")
                await client.dma_unmap(address, size)
                session.windows.remove((address, size))
            elif roll < 0.35:
                ctx.note("unmap all")
                await client.dma_unmap(0, 0, vfu.DMA_UNMAP_FLAG_ALL)
                session.windows = []
            elif roll < 0.5:
                with contextlib.suppress(VfioUserError):
                    await session.map_memory()
            elif roll < 0.6:
                count = rng.choice((8, 64, 200))
                ctx.note(f"{count} small maps")
                fd = ctx.memfd(count * PAGE)
                for i in range(count):
                    with contextlib.suppress(VfioUserError):
                        await client.dma_map(NEVER_MAPPED + i * PAGE, PAGE, fd=fd, offset=i * PAGE)
                        session.windows.append((NEVER_MAPPED + i * PAGE, PAGE))
            elif roll < 0.7 and session.blk and session.queues:
                await shrinking_region(session)
            elif roll < 0.85:
                payload, fds = templates(session)[Command.DMA_MAP]()
                await session.send(Command.DMA_MAP, payload, fds)
                await session.settle(1.0)
            else:
                with contextlib.suppress(VfioUserError):
                    await session.exercise()
            await trio.sleep(rng.choice((0, 0.002)))
        await session.settle(1.0)
    if rng.random() < 0.3:
        await check_serves(ctx, guest, "a fresh session after DMA map churn")


async def shrinking_region(session: Session) -> None:
    """Buffers in a region of its own whose memfd is truncated once mapped."""
    rng, ctx = session.rng, session.ctx
    base = NEVER_MAPPED + 0x1000_0000
    size = rng.choice((PAGE, 65536, MiB))
    fd = ctx.memfd(size)
    with contextlib.suppress(VfioUserError):
        await session.c.dma_map(base, size, fd=fd)
    os.ftruncate(fd, rng.choice((0, PAGE if size > PAGE else 0)))
    ctx.note(f"region {base:#x}+{size:#x} mapped, then truncated")
    for queue in session.queues:
        header, status = session.guest.buffer(16), session.guest.buffer(1)
        kind = rng.choice((RequestType.IN, RequestType.OUT))
        session.ram.write(header, struct.pack("<IIQ", kind, 0, 0))
        data = (base + rng.randrange(0, size, 512), 512)
        readable = [(header, 16)] + ([data] if kind == RequestType.OUT else [])
        writable = ([data] if kind == RequestType.IN else []) + [(status, 1)]
        with contextlib.suppress(BufferError):
            queue.ring.add(readable, writable, object())
    await session.kick_all()
    await trio.sleep(0.02)


async def case_disconnect_mid_io(ctx: CaseContext) -> None:
    """Rings full (or a long copy) and the connection gone at once, maybe
    mid-message; a fresh session must then get I/O through."""
    rng = ctx.rng
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    async with session.connected():
        client = session.c
        await client.reset()
        await session.map_memory()
        if rng.random() < 0.3:
            client.dma_mode = rng.choice(("hostile", "never"))
        if session.blk:
            await session.bring_up()
            for queue in session.queues:
                session.post(queue, queue.ring.size)
            await session.kick_all()
        else:
            await session.example_irqs()
            length = rng.choice((4096, MiB))
            await session.example_copy(guest.buffer(length), guest.buffer(length), length)
        delay = rng.choice((0, 0, 0.001, 0.01, 0.05))
        ctx.note(f"hang up after {delay} s ({client.dma_mode} DMA answers)")
        await trio.sleep(delay)
        if rng.random() < 0.3:
            await client._send(client.sock, vfu.encode(0, Command.REGION_WRITE, bytes(20))[:20])
    await check_serves(ctx, guest, "a fresh session after a hang-up mid-I/O")


async def case_random_bytes(ctx: CaseContext) -> None:
    """Valid headers with random commands, flags and payloads; or garbage
    before VERSION."""
    rng = ctx.rng
    if rng.random() < 0.2:
        sock = await ctx.connect()
        garbage = rng.randbytes(rng.choice((1, 15, 16, 100, 4096)))
        ctx.note(f"{len(garbage)} bytes of garbage before VERSION")
        await sock.send(garbage)
        with contextlib.suppress(trio.TooSlowError, OSError, ConnectionClosed, FramingError):
            with trio.fail_after(0.5):
                reply = await vfu.read_message(sock, 1 << 20)
                reply.close_fds()
        return
    session = Session(ctx, new_guest(ctx))
    async with session.connected():
        await session.setup(rng.randint(0, 3))
        session.desynced = True
        for _ in range(rng.randint(1, 8)):
            command = rng.choice((*COMMANDS, rng.getrandbits(16)))
            size = rng.choice((0, 4, 8, 16, 24, 32, 4096, rng.randint(0, 300)))
            flags = rng.choice((0, 0, 0, vfu.FLAG_NO_REPLY, rng.getrandbits(32)))
            fds = [ctx.eventfd() for _ in range(rng.choice((0, 0, 0, 1, 2, 17)))]
            ctx.note(f"command {command} size {size} flags {flags:#x} fds {len(fds)}")
            await session.send(command, rng.randbytes(size), fds, flags=flags)
        if rng.random() < 0.3:
            tail = rng.randbytes(rng.randint(1, 64))
            ctx.note(f"{len(tail)} bytes of garbage")
            await session.c._send(session.c.sock, tail)
        await session.settle(1.0)


# --- what the harness calls -------------------------------------------------------------


async def handshake(socket_path: str) -> None:
    """VERSION on a fresh connection; raises unless it is answered."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(socket_path)
        caps = {"max_msg_fds": 16, "max_data_xfer_size": MiB, "pgsizes": PAGE}
        payload = vfu.VersionHead.build({"major": 0, "minor": 1}) + vfu.encode_version_data(caps)
        await vfu.write_message(sock, vfu.encode(1, Command.VERSION, payload))
        reply = await vfu.read_message(sock, MiB)
        reply.close_fds()
        if reply.kind != vfu.TYPE_REPLY or reply.command != Command.VERSION or reply.is_error:
            raise RuntimeError(f"bad VERSION reply: {reply}")
    finally:
        sock.close()


async def warm_up(ctx: CaseContext) -> None:
    """One correct session: I/O on every queue (blk), every register and a
    copy with its interrupt (example)."""
    guest = new_guest(ctx)
    session = Session(ctx, guest)
    async with session.connected():
        client = session.c
        await client.reset()
        await session.map_memory(with_fd=True)
        if session.blk:
            queues = await session.bring_up(queue_count=64, queue_size=64)
            for queue in queues:
                await session.serves(queue, f"warm-up queue {queue.index}")
            return
        if struct.unpack("<I", await client.region_read(EXAMPLE_BAR, 0, 4))[0] != 0x56460001:
            ctx.violation("the example device's ID register is wrong")
        await client.region_write(EXAMPLE_BAR, 0x08, struct.pack("<I", 10))
        if struct.unpack("<I", await client.region_read(EXAMPLE_BAR, 0x08, 4))[0] != 3628800:
            ctx.violation("the example device computes 10! wrong")
        fd = await session.example_irqs()
        if await session.example_serves("warm-up copy"):
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(fd)  # the interrupt comes after the CRC
            crc = struct.unpack("<I", await client.region_read(EXAMPLE_BAR, 0x28, 4))[0]
            if crc != zlib.crc32(session.last_copy):
                ctx.violation(f"the example device latched CRC {crc:#x} for its copy")


CASES = CaseSet(
    kinds={
        "mutate": (25, case_mutate),
        "version": (4, case_version),
        "config-space": (10, case_config_space),
        "hostile-ring": (14, case_hostile_ring),
        "remote-dma": (12, case_remote_dma),
        "pipeline": (3, case_pipeline),
        "reset-mid-io": (8, case_reset_mid_io),
        "migration": (8, case_migration),
        "dma-logging": (5, case_dma_logging),
        "irqs": (5, case_irqs),
        "dma-map": (6, case_dma_map),
        "disconnect-mid-io": (6, case_disconnect_mid_io),
        "random-bytes": (6, case_random_bytes),
    },
    handshake=handshake,
    warm_up=warm_up,
)
