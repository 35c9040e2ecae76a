"""vhost-user cases: a hostile front end (QEMU's part) and a hostile guest driver.

Every case opens its own connections and guest RAM (memfds shared with the
daemon, as QEMU's memory-backend-memfd,share=on), starts from a correct
set-up cut at a random depth, and then misbehaves in one way per kind:

- ``mutate``: mutated messages of every request type (fields, flags,
  header sizes, fd counts and types, truncation) amid guest I/O;
- ``hostile-ring``: descriptor tables, indexes, loops, indirect tables and
  buffer addresses a guest can write, kicked while being rewritten;
- lifecycle kinds: the set-up shuffled, resets and memory changes under
  I/O, kick fd swaps, a reconnect with a scribbled inflight region,
  pipelined requests never read, device-state and dirty-log misuse;
- ``random-bytes``: valid headers followed by random payloads.

All randomness comes from ``ctx.rng`` and never depends on timing, so a
case sends the same bytes each time it is replayed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable

import trio

from fuzz.harness import (
    DISK_SECTORS,
    HOLE,
    LAYOUT,
    SCRATCH,
    CaseContext,
    CaseSet,
    MiB,
    drain,
    mutate_bytes,
    mutate_fields,
    mutate_int,
)
from vfiouserd.client.guest import (
    USER_ADDRESS_OFFSET,
    DriverPackedRing,
    DriverRing,
    GuestRam,
)
from vfiouserd.client.vhost_user import (
    BackendError,
    InflightRegion,
    QueueHandle,
    VhostUserFrontend,
)
from vfiouserd.devices.blk import RequestType
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol import vhost_user_inflight as vui
from vfiouserd.protocol.framing import ConnectionClosed
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.protocol.vhost_user import ProtocolFeature
from vfiouserd.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
)

Raw = tuple[int, int, bytes, list[int]]  # request, flags, payload, fds


class Session:
    """One front-end connection: the correct set-up, then what a case does."""

    def __init__(self, ctx: CaseContext, ram: GuestRam, scratch: int) -> None:
        self.ctx = ctx
        self.rng = ctx.rng
        self.ram = ram
        self.scratch = scratch
        self.cursor = 0
        self.frontend: VhostUserFrontend | None = None
        self.offered = 0
        self.offered_protocol = 0
        self.queue_count = 1
        self.ring_size = 64
        self.queues: list[QueueHandle] = []
        self.inflight: InflightRegion | None = None
        self.replies = 0  # messages the drain saw, raw mode

    @property
    def blk(self) -> bool:
        return self.ctx.spec.model == "blk"

    @property
    def packed(self) -> bool:
        assert self.frontend is not None
        return bool(self.frontend.features & bit(Feature.RING_PACKED))

    @property
    def sock(self) -> trio.socket.SocketType:
        assert self.frontend is not None
        return self.frontend.sock

    async def open(self) -> None:
        self.frontend = VhostUserFrontend(await self.ctx.connect())

    def close(self) -> None:
        """Hang up (the case's context closes the rest)."""
        if self.frontend is not None:
            for queue in self.queues:
                with contextlib.suppress(OSError):
                    queue.close()
            self.queues.clear()
            self.frontend.sock.close()

    # -- the correct set-up, as QEMU does it ----------------------------------------------

    async def negotiate(self, *, inflight: bool | None = None) -> None:
        frontend = self.frontend
        assert frontend is not None
        rng = self.rng
        self.offered = await frontend.call_u64(R.GET_FEATURES) or 0
        self.offered_protocol = await frontend.call_u64(R.GET_PROTOCOL_FEATURES) or 0
        protocol = self.offered_protocol
        if rng.random() < 0.2:  # a front end that knows fewer features
            protocol &= rng.getrandbits(64) | bit(ProtocolFeature.REPLY_ACK)
        if inflight is False:
            protocol &= ~bit(ProtocolFeature.INFLIGHT_SHMFD)
        await frontend.call_u64(R.SET_PROTOCOL_FEATURES, protocol)
        frontend.protocol_features = protocol
        await frontend.call(R.SET_OWNER)
        features = self.offered & ~bit(vu.VHOST_F_LOG_ALL)
        if rng.random() < 0.5:
            features &= ~bit(Feature.RING_PACKED)
        for feature in (Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC):
            if rng.random() < 0.2:
                features &= ~bit(feature)
        frontend.features = features
        self.ring_size = rng.choice((1, 2, 4, 8, 16, 32, 64, 128, 256))
        if protocol & bit(ProtocolFeature.MQ):
            self.queue_count = await frontend.queue_count()
        await frontend.set_features()
        self.ctx.note(f"negotiated features={features:#x} protocol={protocol:#x}")

    def has(self, feature: ProtocolFeature) -> bool:
        assert self.frontend is not None
        return bool(self.frontend.protocol_features & bit(feature))

    async def setup(self, depth: int = 5) -> None:
        """Negotiate (1), inflight region (2), memory (3), rings (4), I/O (5)."""
        await self.open()
        if depth < 1:
            return
        await self.negotiate()
        if depth < 2:
            return
        frontend = self.frontend
        assert frontend is not None
        started = self.rng.randint(1, self.queue_count)
        if self.has(ProtocolFeature.INFLIGHT_SHMFD) and self.rng.random() < 0.4:
            self.inflight = await frontend.get_inflight(started, self.ring_size)
            self.ctx.fd(self.inflight.fd)
            await frontend.set_inflight(self.inflight)
        if depth < 3:
            return
        await frontend.share_memory(self.ram)
        if depth < 4:
            return
        for index in range(started):
            await self.start_queue(index)
        if depth < 5:
            return
        for queue in self.queues:
            self.post(queue, self.rng.randint(1, 8))
            queue.kick_now()
        await trio.sleep(0.01)

    async def start_queue(self, index: int, base: int | None = None) -> QueueHandle:
        assert self.frontend is not None
        ring = self.frontend.make_ring(self.ram, self.ring_size)
        queue = await self.frontend.start_queue(index, ring, base)
        self.queues.append(queue)
        self.ctx.note(f"queue {index} started: size {self.ring_size} packed={ring.packed}")
        return queue

    # -- guest requests ----------------------------------------------------------------------

    def buffer(self, size: int) -> int:
        if self.cursor + size > SCRATCH:
            self.cursor = 0
        address = self.scratch + self.cursor
        self.cursor += (size + 63) & ~63
        return address

    def request(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """A device request, mostly well formed (readable, writable buffers)."""
        rng = self.rng
        if not self.blk:  # virtio-rng: writable buffers only
            sizes = [rng.choice((1, 16, 4096, 65536, 70000, rng.randint(1, 9000)))]
            sizes += [rng.randint(1, 4096) for _ in range(rng.choice((0, 0, 1, 3)))]
            writable = [(self.buffer(n), n) for n in sizes]
            if rng.random() < 0.05:  # a readable buffer the device has no use for
                return [(self.buffer(16), 16)], writable
            return [], writable
        kind = rng.choices([*RequestType, rng.getrandbits(32)], [30, 30, 5, 5, 2, 5, 5, 2, 3])[0]
        sector = rng.choice(
            (rng.randrange(DISK_SECTORS), DISK_SECTORS - 1, DISK_SECTORS, rng.getrandbits(64))
        )
        size = rng.choice((512, 4096, 8192, 65536, rng.randint(1, 70000)))
        header = self.buffer(16)
        self.ram.write(header, struct.pack("<IIQ", kind, 0, sector))
        readable = [(header, 16)]
        writable: list[tuple[int, int]] = []
        if kind in (RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES):
            data = self.buffer(size)
            if kind != RequestType.OUT:  # segments: sector u64, num_sectors u32, flags u32
                segments = [
                    (rng.randrange(DISK_SECTORS), rng.choice((1, 8, 1 << 20)), rng.choice((0, 1)))
                    for _ in range(rng.randint(1, 4))
                ]
                blob = b"".join(struct.pack("<QII", *s) for s in segments)
                self.ram.write(data, blob)
                size = len(blob) if rng.random() < 0.9 else size
            readable.append((data, size))
        elif kind in (RequestType.IN, RequestType.GET_ID, RequestType.GET_LIFETIME):
            writable.append((self.buffer(size), size))
        status = self.buffer(1)
        if rng.random() < 0.95:
            writable.append((status, 1))
        if rng.random() < 0.05:  # readable after writable
            readable, writable = writable, readable
        return readable, writable

    def post(self, queue: QueueHandle, count: int) -> int:
        """Make ``count`` requests available (fewer if the ring fills up).
        All are drawn first: how many fit depends on the daemon's progress,
        and the random draws must not."""
        assert self.frontend is not None
        negotiated = bool(self.frontend.features & bit(Feature.RING_INDIRECT_DESC))
        # Mostly what the driver may do; now and then an indirect table
        # that was never negotiated.
        drawn = [
            (*self.request(), self.rng.random() < (0.2 if negotiated else 0.01))
            for _ in range(count)
        ]
        posted = 0
        for readable, writable, indirect in drawn:
            if not readable and not writable:
                continue
            try:
                queue.ring.add(readable, writable, object(), indirect=indirect)
            except (BufferError, MemoryError):
                break
            posted += 1
        return posted

    def reap(self, queue: QueueHandle) -> int:
        """Take completions back where the used ring makes sense to us."""
        try:
            return len(queue.ring.collect())
        except (KeyError, IndexError):  # after hostile messages, it may not
            return 0

    def kick_all(self) -> None:
        for queue in self.queues:
            with contextlib.suppress(OSError):
                queue.kick_now()

    # -- raw messages ------------------------------------------------------------------------

    async def send_raw(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        header = vu.Header.build({"request": request, "flags": flags, "size": len(payload)})
        await vu.write_message(self.sock, header + payload, fds)

    def drained(self, data: bytes) -> None:
        self.replies += 1

    # -- message templates -------------------------------------------------------------------

    def queue_index(self) -> int:
        roll = self.rng.random()
        if roll < 0.8:
            return self.rng.randrange(self.queue_count)
        if roll < 0.9:
            return self.queue_count
        return mutate_int(self.rng, 0, 32)

    def ring_areas(self) -> tuple[int, int, int]:
        """User addresses of a started ring, or of fresh ring memory."""
        if self.queues and self.rng.random() < 0.7:
            desc, driver, device = self.rng.choice(self.queues).ring.areas
        else:
            desc, driver, device = self.buffer(4096), self.buffer(4096), self.buffer(4096)
        return (
            desc + USER_ADDRESS_OFFSET,
            driver + USER_ADDRESS_OFFSET,
            device + USER_ADDRESS_OFFSET,
        )

    def region_fields(self) -> tuple[int, int, int, int, int]:
        """(guest, size, user, mmap_offset, fd) of a RAM region, maybe bent."""
        rng = self.rng
        region = rng.choice(self.ram.regions)
        fields = [region.guest_address, region.size, region.user_address, 0]
        if rng.random() < 0.5:
            i = rng.randrange(4)
            fields[i] = mutate_int(rng, fields[i], 64)
        if rng.random() < 0.3:
            fields[rng.randrange(4)] = rng.choice((0, 4096, region.size, region.size // 2))
        return (*fields, region.fd)

    def junk_or(self, fd: int, chance: float = 0.15) -> list[int]:
        """``[fd]``, or sometimes no fd, two, or one of another type."""
        roll = self.rng.random()
        if roll < chance:
            kind, junk = self.ctx.junk_fd()
            self.ctx.note(f"  fd: {kind}")
            return [junk]
        if roll < chance + 0.05:
            return []
        if roll < chance + 0.08:
            return [fd, self.ctx.eventfd()]
        return [fd]

    def templates(self) -> dict[int, Callable[[], tuple[bytes, list[int]]]]:
        rng = self.rng
        ctx = self.ctx

        def empty() -> tuple[bytes, list[int]]:
            return b"", []

        def u64(value: int) -> Callable[[], tuple[bytes, list[int]]]:
            return lambda: (struct.pack("=Q", value), [])

        def vring_state() -> tuple[bytes, list[int]]:
            num = rng.choice((self.ring_size, 0, 1, 2, 3, 256, 1024, 32768, 32769))
            return struct.pack("=II", self.queue_index(), mutate_int(rng, num, 32)), []

        def vring_addr() -> tuple[bytes, list[int]]:
            desc, avail, used = self.ring_areas()
            flags = rng.choice((0, 0, 0, vu.VRING_FLAG_LOG, rng.getrandbits(32)))
            payload = struct.pack("=IIQQQQ", self.queue_index(), flags, desc, used, avail, 0)
            if rng.random() < 0.5:
                payload = mutate_fields(rng, payload, "=IIQQQQ", rng.randint(1, 3))
            return payload, []

        def vring_fd() -> tuple[bytes, list[int]]:
            value = self.queue_index() & 0xFFFF_FFFF
            fds = self.junk_or(ctx.eventfd())
            if not fds or rng.random() < 0.05:
                value |= vu.VRING_NOFD_FLAG
            if rng.random() < 0.1:
                value = mutate_int(rng, value, 64)
            return struct.pack("=Q", value), fds

        def mem_table() -> tuple[bytes, list[int]]:
            count = rng.randint(0, len(self.ram.regions))
            entries, fds = [], []
            for _ in range(count):
                guest, size, user, offset, fd = self.region_fields()
                entries.append(struct.pack("=QQQQ", guest, size, user, offset))
                fds.append(fd)
            if rng.random() < 0.2:
                fds = fds[:-1] if fds and rng.random() < 0.5 else [*fds, ctx.eventfd()]
            if rng.random() < 0.15 and fds:
                kind, fds[0] = ctx.junk_fd()
                ctx.note(f"  fd: {kind}")
            header_count = count if rng.random() < 0.85 else mutate_int(rng, count, 32)
            payload = struct.pack("=II", header_count, 0) + b"".join(entries)
            if rng.random() < 0.2:  # QEMU pads the table to 8 regions
                payload = payload.ljust(8 + 32 * vu.MAX_TABLE_REGIONS, b"\0")
            return payload, fds

        def one_region() -> tuple[bytes, list[int]]:
            guest, size, user, offset, fd = self.region_fields()
            if rng.random() < 0.2:  # a region of its own, maybe smaller than it says
                fd = ctx.memfd(rng.choice((0, 4096, MiB)))
            payload = bytes(8) + struct.pack("=QQQQ", guest, size, user, offset)
            return payload, self.junk_or(fd)

        def config() -> tuple[bytes, list[int]]:
            size = rng.choice((0, 1, 4, 8, 60, 256, 257, rng.randint(0, 300)))
            offset = rng.choice((0, 0, 4, 20, 32, 255, rng.getrandbits(32)))
            flags = rng.choice((0, 0, vu.CONFIG_FLAG_MIGRATION, rng.getrandbits(32)))
            data = rng.randbytes(size if rng.random() < 0.8 else rng.randint(0, 300))
            return struct.pack("=III", offset, size, flags) + data, []

        def inflight() -> tuple[bytes, list[int]]:
            queues = rng.choice((1, self.queue_count, self.queue_count + 1, 0, 0xFFFF))
            size = rng.choice((self.ring_size, 1, 0, 32768, rng.getrandbits(16)))
            packed = self.frontend is not None and self.packed
            per_queue = vui.inflight_region_size(max(size, 1), packed)
            mmap_size = rng.choice((per_queue * queues, 0, 4096, rng.getrandbits(20)))
            payload = struct.pack("=QQHH4x", mmap_size, rng.choice((0, 0, 4096)), queues, size)
            fd = ctx.memfd(
                min(mmap_size, 4 * MiB),
                rng.randbytes(min(mmap_size, 8192)) if rng.random() < 0.5 else b"",
            )
            return payload, self.junk_or(fd)

        def log_base() -> tuple[bytes, list[int]]:
            size = rng.choice((4096, 1, 0, MiB, rng.getrandbits(24), 1 << 40))
            offset = rng.choice((0, 0, 4096, rng.getrandbits(32)))
            fd = ctx.memfd(min(size, 4 * MiB) if rng.random() < 0.8 else 0)
            return struct.pack("=QQ", size, offset), self.junk_or(fd)

        def backend_channel() -> tuple[bytes, list[int]]:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ctx.on_close(ours.close)
            ctx.on_close(theirs.close)
            return b"", self.junk_or(theirs.fileno(), 0.3)

        def device_state() -> tuple[bytes, list[int]]:
            read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            ctx.fd(read_end)
            ctx.fd(write_end)
            direction = rng.choice((0, 1, 1, 2, rng.getrandbits(32)))
            phase = rng.choice((0, 0, 0, 1, rng.getrandbits(32)))
            if direction == 1:  # load: garbage state, then maybe EOF
                with contextlib.suppress(OSError):
                    os.write(write_end, rng.randbytes(rng.choice((0, 16, 200, 4096))))
                return struct.pack("=II", direction, phase), self.junk_or(read_end)
            return struct.pack("=II", direction, phase), self.junk_or(write_end)

        def sized(layout_size: int) -> Callable[[], tuple[bytes, list[int]]]:
            return lambda: (rng.randbytes(layout_size), [])

        protocol = self.offered_protocol or rng.getrandbits(64)
        features = self.offered or rng.getrandbits(64)
        return {
            R.GET_FEATURES: empty,
            R.SET_FEATURES: u64(features & (rng.getrandbits(64) | rng.getrandbits(64))),
            R.SET_OWNER: empty,
            R.RESET_OWNER: empty,
            R.SET_MEM_TABLE: mem_table,
            R.SET_LOG_BASE: log_base,
            R.SET_LOG_FD: lambda: (b"", self.junk_or(ctx.eventfd())),
            R.SET_VRING_NUM: vring_state,
            R.SET_VRING_ADDR: vring_addr,
            R.SET_VRING_BASE: vring_state,
            R.GET_VRING_BASE: vring_state,
            R.SET_VRING_KICK: vring_fd,
            R.SET_VRING_CALL: vring_fd,
            R.SET_VRING_ERR: vring_fd,
            R.GET_PROTOCOL_FEATURES: empty,
            R.SET_PROTOCOL_FEATURES: u64(protocol & rng.getrandbits(64)),
            R.GET_QUEUE_NUM: empty,
            R.SET_VRING_ENABLE: vring_state,
            R.SEND_RARP: sized(8),
            R.NET_SET_MTU: sized(8),
            R.SET_BACKEND_REQ_FD: backend_channel,
            R.IOTLB_MSG: sized(vu.IotlbMessage.sizeof()),
            R.SET_VRING_ENDIAN: vring_state,
            R.GET_CONFIG: config,
            R.SET_CONFIG: config,
            R.CREATE_CRYPTO_SESSION: sized(rng.randint(0, 64)),
            R.POSTCOPY_ADVISE: empty,
            R.GET_INFLIGHT_FD: inflight,
            R.SET_INFLIGHT_FD: inflight,
            R.RESET_DEVICE: empty,
            R.VRING_KICK: vring_state,
            R.GET_MAX_MEM_SLOTS: empty,
            R.ADD_MEM_REG: one_region,
            R.REM_MEM_REG: one_region,
            R.SET_STATUS: u64(rng.choice((0, 1, 3, 7, 15, 0x40, 0x80, 0xFF, 0x100))),
            R.GET_STATUS: empty,
            R.GET_SHARED_OBJECT: sized(16),
            R.SET_DEVICE_STATE_FD: device_state,
            R.CHECK_DEVICE_STATE: empty,
        }

    def mutated_message(self) -> Raw:
        rng = self.rng
        templates = self.templates()
        if rng.random() < 0.05:
            request = rng.choice((0, 44, 99, 0xFFFF, 0xFFFF_FFFF, rng.getrandbits(32)))
            payload, fds = rng.randbytes(rng.choice((0, 8, 40))), []
        else:
            request = rng.choice(list(templates))
            payload, fds = templates[request]()
        if rng.random() < 0.2:
            payload = mutate_bytes(rng, payload)
        flags = vu.VERSION | (vu.NEED_REPLY_FLAG if rng.random() < 0.5 else 0)
        roll = rng.random()
        if roll < 0.04:
            flags |= vu.REPLY_FLAG
        elif roll < 0.06:
            flags = rng.choice((0, 2, 3)) | (flags & ~vu.VERSION_MASK)
        elif roll < 0.08:
            flags = rng.getrandbits(32)
        return request, flags, payload, fds

    async def send_mutated(self) -> None:
        request, flags, payload, fds = self.mutated_message()
        try:
            name = R(request).name
        except ValueError:
            name = str(request)
        self.ctx.note(f"send {name} flags={flags:#x} size={len(payload)} fds={len(fds)}")
        roll = self.rng.random()
        if roll < 0.03:  # the header claims more than comes: the stream desyncs
            size = len(payload) + self.rng.choice((1, 8, 100))
            header = vu.Header.build({"request": request, "flags": flags, "size": size})
            self.ctx.note(f"  header size {size}")
            await vu.write_message(self.sock, header + payload, fds)
        elif roll < 0.05:  # a size no message may have: the connection must close
            size = self.rng.choice((vu.MAX_PAYLOAD_SIZE + 1, 1 << 20, 0xFFFF_FFFF))
            header = vu.Header.build({"request": request, "flags": flags, "size": size})
            self.ctx.note(f"  oversized header {size}")
            await vu.write_message(self.sock, header + payload, fds)
        else:
            await self.send_raw(request, flags, payload, fds)


# --- hostile guest rings ---------------------------------------------------------------------


def ring_scribble(session: Session, ring: DriverRing) -> None:
    """Write what a hostile guest may into ``ring``'s memory."""
    rng = session.rng
    ram = session.ram
    desc_address, driver_address, device_address = ring.areas
    size = ring.size
    region_end = LAYOUT[0][0] + LAYOUT[0][1]

    def address() -> int:
        return rng.choice(
            (
                session.buffer(64),
                0,
                region_end - rng.choice((1, 16, 512)),
                region_end,
                HOLE,
                LAYOUT[1][0] + LAYOUT[1][1] - 1,
                (1 << 64) - rng.choice((1, 4096)),
                rng.getrandbits(64),
                desc_address,
                driver_address,
                desc_address + USER_ADDRESS_OFFSET,
            )
        )

    def length() -> int:
        return rng.choice(
            (0, 1, 16, 512, 4096, 65536, MiB, 1 << 31, 0xFFFF_FFFF, rng.randint(0, 9000))
        )

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

    def table(entries: int) -> tuple[int, int]:
        """An indirect table of garbage (or of the ring itself)."""
        if rng.random() < 0.2:
            return desc_address, rng.choice((16 * size, 16, 15, 0))
        at = session.buffer(16 * max(entries, 1))
        for i in range(entries):
            ram.write(
                at + 16 * i,
                struct.pack("<QIHH", address(), length(), flags(), rng.randrange(entries + 2)),
            )
        return at, rng.choice((16 * entries, 16 * entries + 8, 0, 16 * 1025, 0xFFFF_FFF0))

    tricks = ["descriptors", "indirect", "loop", "buffers", "self-write", "events"]
    if ring.packed:
        tricks += ["packed-available", "packed-chain"]
    else:
        tricks += ["avail-jump", "avail-heads", "used-index"]
    trick = rng.choice(tricks)
    session.ctx.note(f"  ring trick {trick}")
    desc_view = ram.view(desc_address, 16 * size)
    if trick == "descriptors":
        for _ in range(rng.randint(1, size)):
            i = rng.randrange(size)
            struct.pack_into(
                "<QIHH", desc_view, 16 * i, address(), length(), flags(), rng.getrandbits(16)
            )
    elif trick == "indirect":
        at, table_length = table(rng.choice((1, 2, 16, 64)))
        i = rng.randrange(size)
        struct.pack_into("<QIHH", desc_view, 16 * i, at, table_length, DESC_F_INDIRECT, 0)
        if ring.packed:
            struct.pack_into(
                "<QIHH", desc_view, 16 * i, at, table_length, i, DESC_F_INDIRECT | _avail_bits(ring)
            )
    elif trick == "loop":
        for i in range(size):
            target = (i + rng.choice((0, 1))) % size if rng.random() < 0.8 else rng.randrange(size)
            if ring.packed:
                struct.pack_into(
                    "<QIHH",
                    desc_view,
                    16 * i,
                    session.buffer(16),
                    16,
                    i,
                    DESC_F_NEXT | _avail_bits(ring),
                )
            else:
                struct.pack_into(
                    "<QIHH", desc_view, 16 * i, session.buffer(16), 16, DESC_F_NEXT, target
                )
    elif trick == "buffers":  # well-formed chains, buffers at the edges of memory
        for i in range(size):
            struct.pack_into("<QI", desc_view, 16 * i, address(), length())
    elif trick == "self-write":  # the device writes its data over the ring itself
        for i in range(size):
            target = rng.choice((desc_address, driver_address, device_address))
            struct.pack_into("<QI", desc_view, 16 * i, target, rng.choice((16, 512, 4096)))
            if not ring.packed:
                flags_now = struct.unpack_from("<H", desc_view, 16 * i + 12)[0]
                struct.pack_into("<H", desc_view, 16 * i + 12, flags_now | DESC_F_WRITE)
    elif trick == "events":
        ram.write(driver_address, rng.randbytes(4))
        ram.write(device_address, rng.randbytes(4))
        if not ring.packed:  # used_event and avail flags
            ram.write(driver_address + 4 + 2 * size, rng.randbytes(2))
            ram.write(driver_address, rng.randbytes(2))
    elif trick == "avail-jump":
        ram.write(driver_address + 2, struct.pack("<H", rng.getrandbits(16)))
    elif trick == "avail-heads":
        count = rng.randint(1, size)
        assert not ring.packed
        for k in range(count):
            slot = (ring.avail_idx + k) % size
            head = rng.choice((rng.randrange(size), size, 0xFFFF, rng.getrandbits(16)))
            ram.write(driver_address + 4 + 2 * slot, struct.pack("<H", head))
        ring.avail_idx = (ring.avail_idx + count) & 0xFFFF
        ram.write(driver_address + 2, struct.pack("<H", ring.avail_idx))
    elif trick == "used-index":
        ram.write(device_address + 2, struct.pack("<H", rng.getrandbits(16)))
    elif trick == "packed-available":
        for _ in range(rng.randint(1, size)):
            i = rng.randrange(size)
            bits = _avail_bits(ring) if rng.random() < 0.8 else rng.getrandbits(16)
            struct.pack_into(
                "<QIHH", desc_view, 16 * i, address(), length(), rng.getrandbits(16), flags() | bits
            )
    else:  # packed-chain: every slot available and chained, forever
        for i in range(size):
            struct.pack_into(
                "<QIHH",
                desc_view,
                16 * i,
                session.buffer(16),
                16,
                i,
                DESC_F_NEXT | _avail_bits(ring),
            )


def _avail_bits(ring: DriverRing) -> int:
    """Flags that make a packed descriptor available in the driver's current lap."""
    assert isinstance(ring, DriverPackedRing)
    return PACKED_DESC_F_AVAIL if ring.avail_wrap else PACKED_DESC_F_USED


# --- the cases ------------------------------------------------------------------------------


async def _new_session(ctx: CaseContext, ram: GuestRam | None = None) -> Session:
    ram = ram or ctx.guest_ram(LAYOUT)
    scratch = ram.alloc(SCRATCH, 4096)
    return Session(ctx, ram, scratch)


async def raw_phase(session: Session, body: Callable[[], object]) -> None:
    """Run ``body`` (an async callable) while a task drains the daemon's replies."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, session.sock, session.drained)
        try:
            await body()  # type: ignore[misc]
            await trio.sleep(0.02)  # let the last messages be answered
        finally:
            nursery.cancel_scope.cancel()


async def case_mutate(ctx: CaseContext) -> None:
    """A correct set-up cut anywhere, then mutated messages amid guest I/O."""
    session = await _new_session(ctx)
    await session.setup(ctx.rng.randint(0, 5))
    rng = ctx.rng

    async def body() -> None:
        for _ in range(rng.randint(1, 12)):
            await session.send_mutated()
            if rng.random() < 0.4:
                for queue in session.queues:
                    session.reap(queue)
                    session.post(queue, rng.randint(1, 4))
                session.kick_all()
            if rng.random() < 0.3:
                await trio.sleep(0.005)

    await raw_phase(session, body)
    session.close()


async def case_hostile_ring(ctx: CaseContext) -> None:
    """Correct rings, then garbage the guest writes into them, kicked while
    being rewritten; a ring restarted afterwards must serve again."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(5)
    if not session.queues:
        return
    victim = rng.choice(session.queues)
    for _ in range(rng.randint(1, 4)):
        session.post(victim, rng.randint(0, 4))
        ring_scribble(session, victim.ring)
        for _ in range(rng.randint(1, 3)):
            victim.kick_now()
            await trio.sleep(0.002)
    await trio.sleep(0.02)
    if rng.random() < 0.5:
        return  # hang up on the broken ring
    frontend = session.frontend
    assert frontend is not None
    # As QEMU after a guest reset: rings stopped (GET_VRING_BASE), a new
    # inflight region (the old one tracks the old rings), the ring anew.
    stopped = session.queues if session.inflight is not None else [victim]
    for queue in stopped:
        await frontend.stop_queue(queue.index)
    if session.inflight is not None:
        session.inflight = await frontend.get_inflight(len(session.queues), session.ring_size)
        ctx.fd(session.inflight.fd)
        await frontend.set_inflight(session.inflight)
    session.queues.remove(victim)
    queue = await session.start_queue(victim.index)
    await serves_again(session, queue, "a ring restarted after a hostile one")


async def serves_again(session: Session, queue: QueueHandle, what: str) -> None:
    """A well-formed request on ``queue`` completes within 5 s (a console's,
    vsock's or the network's receive queues wait for the host: nothing to
    expect there)."""
    if session.blk:
        header, status = session.buffer(16), session.buffer(1)
        session.ram.write(header, struct.pack("<IIQ", RequestType.IN, 0, 0))
        readable, writable = [(header, 16)], [(session.buffer(512), 512), (status, 1)]
    elif session.ctx.spec.model == "console":
        if queue.index % 2 == 0:
            return
        message = session.buffer(8)  # data on a transmit queue, PORT_OPEN on the control one
        session.ram.write(message, struct.pack("<IHH", 1, 6, 1))
        readable, writable = [(message, 8)], []
    elif session.ctx.spec.model == "net":
        if queue.index % 2 == 0:
            return  # receive queues wait for the peer
        packet = session.buffer(12 + 60)  # a header, then a broadcast frame
        session.ram.write(packet, bytes(12) + b"\xff" * 6 + bytes(54))
        readable, writable = [(packet, 72)], []
    elif session.ctx.spec.model == "vsock":
        if queue.index != 1:
            return  # the receive and event queues wait for the host
        packet = session.buffer(44)  # a reset of no connection: nothing to answer
        session.ram.write(packet, struct.pack("<QQIIIHHIII", 3, 2, 1, 1, 0, 1, 3, 0, 0, 0))
        readable, writable = [(packet, 44)], []
    else:
        readable, writable = [], [(session.buffer(64), 64)]
    token = object()
    queue.ring.add(readable, writable, token)
    queue.kick_now()
    with trio.move_on_after(5):
        while True:
            if any(done.token is token for done in queue.ring.collect()):
                return
            await trio.sleep(0.005)
    session.ctx.violation(f"{what}: a valid request did not complete within 5 s")


def setup_messages(session: Session) -> list[tuple[str, Raw]]:
    """The messages of a full correct set-up, unsent (to be shuffled)."""
    rng = session.rng
    ctx = session.ctx
    frontend = session.frontend
    assert frontend is not None
    need = vu.VERSION | vu.NEED_REPLY_FLAG
    messages: list[tuple[str, Raw]] = [
        ("features", (R.SET_FEATURES, need, struct.pack("=Q", frontend.features), [])),
        ("owner", (R.SET_OWNER, need, b"", [])),
    ]
    regions = session.ram.regions
    table = struct.pack("=II", len(regions), 0) + b"".join(
        struct.pack("=QQQQ", r.guest_address, r.size, r.user_address, 0) for r in regions
    )
    messages.append(("memory", (R.SET_MEM_TABLE, need, table, [r.fd for r in regions])))
    for index in range(rng.randint(1, session.queue_count)):
        ring = frontend.make_ring(session.ram, session.ring_size)
        kick, call = ctx.eventfd(), ctx.eventfd()
        session.queues.append(QueueHandle(index, ring, kick, call, ctx.eventfd()))
        desc, driver, device = (a + USER_ADDRESS_OFFSET for a in ring.areas)
        state = struct.pack("=II", index, session.ring_size)
        messages += [
            (f"num{index}", (R.SET_VRING_NUM, need, state, [])),
            (f"base{index}", (R.SET_VRING_BASE, need, struct.pack("=II", index, ring.base()), [])),
            (
                f"addr{index}",
                (
                    R.SET_VRING_ADDR,
                    need,
                    struct.pack("=IIQQQQ", index, 0, desc, device, driver, 0),
                    [],
                ),
            ),
            (f"kick{index}", (R.SET_VRING_KICK, need, struct.pack("=Q", index), [kick])),
            (f"call{index}", (R.SET_VRING_CALL, need, struct.pack("=Q", index), [call])),
            (f"enable{index}", (R.SET_VRING_ENABLE, need, struct.pack("=II", index, 1), [])),
        ]
    return messages


async def case_shuffled_setup(ctx: CaseContext) -> None:
    """The set-up messages out of order, some dropped or repeated, I/O between."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.open()
    await session.negotiate(inflight=False)
    messages = setup_messages(session)
    rng.shuffle(messages)
    if rng.random() < 0.5:
        del messages[rng.randrange(len(messages))]
    if rng.random() < 0.5:
        messages.insert(rng.randrange(len(messages)), rng.choice(messages))

    async def body() -> None:
        for name, (request, flags, payload, fds) in messages:
            ctx.note(f"send {name}")
            await session.send_raw(request, flags, payload, fds)
            if rng.random() < 0.3:
                for queue in session.queues:
                    session.post(queue, rng.randint(1, 3))
                session.kick_all()
        for queue in session.queues:
            session.post(queue, rng.randint(1, 3))
        session.kick_all()

    await raw_phase(session, body)
    session.close()


async def case_reset_mid_io(ctx: CaseContext) -> None:
    """A reset (device, owner, status, ring stop) while requests are in flight,
    then the rings used again, with or without a new set-up."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(4)
    reset = rng.choice(("RESET_DEVICE", "RESET_OWNER", "SET_STATUS", "GET_VRING_BASE"))
    ctx.note(f"reset by {reset}")

    async def body() -> None:
        for _ in range(rng.randint(1, 3)):
            for queue in session.queues:
                session.post(queue, session.ring_size)
            session.kick_all()
            if reset == "RESET_DEVICE":
                await session.send_raw(R.RESET_DEVICE, vu.VERSION | vu.NEED_REPLY_FLAG, b"", [])
            elif reset == "RESET_OWNER":
                await session.send_raw(R.RESET_OWNER, vu.VERSION, b"", [])
            elif reset == "SET_STATUS":
                await session.send_raw(R.SET_STATUS, vu.VERSION, struct.pack("=Q", 0), [])
            else:
                for queue in session.queues:
                    state = struct.pack("=II", queue.index, 0)
                    await session.send_raw(R.GET_VRING_BASE, vu.VERSION, state, [])
            session.kick_all()
            if rng.random() < 0.5:  # the rest of a re-initialisation, in a random order
                messages = setup_messages(session)
                rng.shuffle(messages)
                for name, (request, flags, payload, fds) in messages[
                    : rng.randint(0, len(messages))
                ]:
                    ctx.note(f"send {name}")
                    await session.send_raw(request, flags, payload, fds)
            session.kick_all()
            await trio.sleep(0.005)

    await raw_phase(session, body)
    session.close()


async def case_memory_swap(ctx: CaseContext) -> None:
    """Memory replaced or removed under running rings (ring.unmapped), then
    kicks, resets and the memory back."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(5)
    ram = session.ram
    need = vu.VERSION | vu.NEED_REPLY_FLAG
    slots = session.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)

    def table(regions: list[int]) -> Raw:
        chosen = [ram.regions[i] for i in regions]
        payload = struct.pack("=II", len(chosen), 0) + b"".join(
            struct.pack("=QQQQ", r.guest_address, r.size, r.user_address, 0) for r in chosen
        )
        return R.SET_MEM_TABLE, need, payload, [r.fd for r in chosen]

    def region(request: int, i: int) -> Raw:
        r = ram.regions[i]
        payload = bytes(8) + struct.pack("=QQQQ", r.guest_address, r.size, r.user_address, 0)
        return request, need, payload, [r.fd] if request == R.ADD_MEM_REG else []

    steps: list[tuple[str, Raw | None]] = []
    for _ in range(rng.randint(2, 8)):
        roll = rng.random()
        if roll < 0.25:
            keep = rng.choice(([1], [], [0], [0, 1], [1, 0]))
            steps.append((f"table {keep}", table(keep)))
        elif roll < 0.45 and slots:
            i = rng.randrange(len(ram.regions))
            request = rng.choice((R.REM_MEM_REG, R.ADD_MEM_REG))
            steps.append((f"{R(request).name} {i}", region(request, i)))
        elif roll < 0.6:
            steps.append(("reset", (R.RESET_DEVICE, need, b"", [])))
        elif roll < 0.7:
            index = rng.randrange(session.queue_count)
            steps.append(
                (f"stop {index}", (R.GET_VRING_BASE, vu.VERSION, struct.pack("=II", index, 0), []))
            )
        else:
            steps.append(("kick", None))

    async def body() -> None:
        for name, message in steps:
            ctx.note(name)
            for queue in session.queues:
                session.post(queue, rng.randint(0, 4))
            session.kick_all()
            if message is not None:
                await session.send_raw(*message)
            await trio.sleep(0.003)
        session.kick_all()

    await raw_phase(session, body)
    session.close()


async def case_disconnect_mid_io(ctx: CaseContext) -> None:
    """Rings full of large requests, kicked, and the connection gone at once."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(4)
    for queue in session.queues:
        session.post(queue, session.ring_size)
    session.kick_all()
    delay = rng.choice((0, 0, 0.001, 0.01))
    ctx.note(f"hang up after {delay} s")
    if delay:
        await trio.sleep(delay)
    if rng.random() < 0.3:  # mid-message too
        await session.sock.send(vu.Header.build({"request": R.SET_FEATURES, "flags": 1, "size": 8}))
    session.close()


async def case_kick_swap(ctx: CaseContext) -> None:
    """Kick, call and error fds replaced while rings run; old fds closed or
    kept and kicked; polling mode (no fd) and back."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(5)
    if not session.queues:
        return

    async def body() -> None:
        for _ in range(rng.randint(1, 8)):
            queue = rng.choice(session.queues)
            request = rng.choice(
                (R.SET_VRING_KICK, R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR)
            )
            polling = rng.random() < 0.2
            value = queue.index | (vu.VRING_NOFD_FLAG if polling else 0)
            new = ctx.eventfd()
            old = queue.kick
            ctx.note(f"{request.name} queue {queue.index} polling={polling}")
            flags = vu.VERSION | (vu.NEED_REPLY_FLAG if rng.random() < 0.5 else 0)
            session.post(queue, rng.randint(0, 3))
            with contextlib.suppress(OSError):
                os.eventfd_write(old, 1)
            await session.send_raw(
                request, flags, struct.pack("=Q", value), [] if polling else [new]
            )
            if request == R.SET_VRING_KICK and not polling:
                queue.kick = new
                if rng.random() < 0.5:  # keep kicking the old one for a while
                    with contextlib.suppress(OSError):
                        os.eventfd_write(old, 1)
            session.kick_all()
            await trio.sleep(rng.choice((0, 0.001, 0.005)))

    await raw_phase(session, body)
    session.close()


async def case_reconnect_inflight(ctx: CaseContext) -> None:
    """A session with an inflight region hangs up mid-I/O; the region is
    maybe scribbled on; a second session hands it back (SET_INFLIGHT_FD)."""
    rng = ctx.rng
    ram = ctx.guest_ram(LAYOUT)
    first = await _new_session(ctx, ram)
    await first.open()
    await first.negotiate()
    if not first.has(ProtocolFeature.INFLIGHT_SHMFD):
        return
    frontend = first.frontend
    assert frontend is not None
    queues = rng.randint(1, first.queue_count)
    region = await frontend.get_inflight(queues, first.ring_size)
    ctx.fd(region.fd)
    await frontend.set_inflight(region)
    await frontend.share_memory(ram)
    for index in range(queues):
        await first.start_queue(index)
    for queue in first.queues:
        first.post(queue, first.ring_size)
    first.kick_all()
    await trio.sleep(rng.choice((0, 0.001, 0.01)))
    rings = [queue.ring for queue in first.queues]
    first.close()
    if rng.random() < 0.6:
        for _ in range(rng.randint(1, 16)):
            offset = rng.randrange(max(region.size, 1))
            os.pwrite(region.fd, rng.randbytes(rng.choice((1, 2, 8, 16, 64))), offset)
        ctx.note("inflight region scribbled")
    # The second session: what QEMU sends after a back-end restart.
    second = Session(ctx, ram, first.scratch)
    second.cursor = first.cursor
    await second.open()
    await second.negotiate()
    frontend = second.frontend
    assert frontend is not None
    if rng.random() < 0.3:
        region.size = mutate_int(rng, region.size, 64)
        region.num_queues = mutate_int(rng, region.num_queues, 16)
        ctx.note(f"inflight description bent: size {region.size} queues {region.num_queues}")
    await frontend.set_inflight(region)
    await frontend.share_memory(ram)
    for index, ring in enumerate(rings):
        if ring.packed != second.packed or ring.size != second.ring_size:
            continue  # the second negotiation chose another layout
        base = ring.base() if ring.packed else ring.used16[1]
        queue = await frontend.start_queue(index, ring, base)
        second.queues.append(queue)
    second.kick_all()
    await trio.sleep(0.02)
    second.close()


async def case_pipeline(ctx: CaseContext) -> None:
    """Many requests sent without reading one reply, then a hang-up."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(rng.randint(1, 5))
    count = rng.choice((100, 500, 2000, 5000))
    request = rng.choice((R.GET_FEATURES, R.GET_CONFIG, R.SET_VRING_ENABLE, R.GET_STATUS))
    payloads = {
        R.GET_FEATURES: b"",
        R.GET_STATUS: b"",
        R.GET_CONFIG: struct.pack("=III", 0, 60, 0) + bytes(60),
        R.SET_VRING_ENABLE: struct.pack("=II", 0, 1),
    }
    ctx.note(f"{count} x {request.name} unread")
    message = vu.encode(request, payloads[request], need_reply=True)
    batch = message * 50
    with trio.move_on_after(2):  # the daemon stops reading once we never do
        for _ in range(count // 50):
            await session.sock.send(batch)
            session.kick_all()
    session.close()


async def case_state_transfer(ctx: CaseContext) -> None:
    """SET_DEVICE_STATE_FD with saved, damaged or foreign state, pipes kept
    open or closed early, CHECK_DEVICE_STATE at any point."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(rng.choice((1, 3, 4)))
    if not session.has(ProtocolFeature.DEVICE_STATE):
        return
    frontend = session.frontend
    assert frontend is not None
    blob = b""
    if rng.random() < 0.5 and not session.queues:
        with contextlib.suppress(BackendError):
            blob = await frontend.save_device_state()
    for _ in range(rng.randint(1, 4)):
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ctx.fd(read_end)
        ctx.fd(write_end)
        load = rng.random() < 0.6
        payload = struct.pack("=II", 1 if load else 0, 0)
        ctx.note(f"transfer load={load} blob={len(blob)}")
        fd = read_end if load else write_end
        await session.send_raw(R.SET_DEVICE_STATE_FD, vu.VERSION, payload, [fd])
        if load:
            data = mutate_bytes(rng, blob) if blob and rng.random() < 0.7 else rng.randbytes(64)
            with contextlib.suppress(OSError):
                os.write(write_end, data[:60000])
        if rng.random() < 0.7:
            ctx.close_fd(write_end if load else read_end)
        await session.send_raw(R.CHECK_DEVICE_STATE, vu.VERSION, b"", [])
    async with trio.open_nursery() as nursery:  # replies, whatever they are
        nursery.start_soon(drain, session.sock, session.drained)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    session.close()


async def case_dirty_log(ctx: CaseContext) -> None:
    """Logging (LOG_ALL, SET_LOG_BASE) with logs too small, moved, dropped,
    ring logging at bad addresses, while the guest writes."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(5)
    if not session.has(ProtocolFeature.LOG_SHMFD):
        return
    frontend = session.frontend
    assert frontend is not None

    async def body() -> None:
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            if roll < 0.35:
                size = rng.choice((0, 1, 4096, 65536, 4 * MiB, rng.getrandbits(20)))
                fd = ctx.memfd(min(size, 4 * MiB))
                ctx.note(f"log base size {size}")
                await session.send_raw(
                    R.SET_LOG_BASE, vu.VERSION, struct.pack("=QQ", size, 0), [fd]
                )
            elif roll < 0.6:
                features = frontend.features | (
                    bit(vu.VHOST_F_LOG_ALL) if rng.random() < 0.8 else 0
                )
                ctx.note(f"features {features:#x}")
                await session.send_raw(R.SET_FEATURES, vu.VERSION, struct.pack("=Q", features), [])
            elif roll < 0.75 and session.queues:
                queue = rng.choice(session.queues)
                desc, driver, device = (a + USER_ADDRESS_OFFSET for a in queue.ring.areas)
                log_address = rng.choice((0, 4096, rng.getrandbits(64)))
                payload = struct.pack(
                    "=IIQQQQ", queue.index, vu.VRING_FLAG_LOG, desc, device, driver, log_address
                )
                ctx.note(f"ring {queue.index} logged at {log_address:#x}")
                await session.send_raw(R.SET_VRING_ADDR, vu.VERSION, payload, [])
            else:
                await session.send_raw(R.SET_LOG_FD, vu.VERSION, b"", [ctx.eventfd()])
            for queue in session.queues:
                session.reap(queue)
                session.post(queue, rng.randint(1, 6))
            session.kick_all()
            await trio.sleep(0.003)

    await raw_phase(session, body)
    session.close()


async def case_truncated_region(ctx: CaseContext) -> None:
    """A region added from a memfd that then shrinks; guest buffers point into it."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(4)
    if not session.queues or not session.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
        return
    base = 0x2_0000_0000
    size = rng.choice((4096, 65536, MiB))
    fd = ctx.memfd(size)
    payload = bytes(8) + struct.pack("=QQQQ", base, size, base + USER_ADDRESS_OFFSET, 0)
    frontend = session.frontend
    assert frontend is not None
    await frontend.call(R.ADD_MEM_REG, payload, [fd])
    os.ftruncate(fd, rng.choice((0, 4096 if size > 4096 else 0)))
    ctx.note(f"region {base:#x}+{size:#x} truncated")
    for queue in session.queues:
        for _ in range(rng.randint(1, 4)):
            readable: list[tuple[int, int]] = []
            writable = [(base + rng.randrange(0, size, 512), 512)]
            if session.blk:
                header = session.buffer(16)
                kind = rng.choice((RequestType.IN, RequestType.OUT))
                session.ram.write(header, struct.pack("<IIQ", kind, 0, 0))
                readable = [(header, 16)]
                if kind == RequestType.OUT:
                    readable.append(writable.pop())
                writable.append((session.buffer(1), 1))
            with contextlib.suppress(BufferError):
                queue.ring.add(readable, writable, object())
    session.kick_all()
    with contextlib.suppress(ConnectionClosed):
        await frontend.call_u64(R.GET_FEATURES)  # the daemon ends the session or answers
    await trio.sleep(0.02)
    session.close()


async def case_backend_channel(ctx: CaseContext) -> None:
    """SET_BACKEND_REQ_FD with a socket or anything else, config writes after."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(rng.randint(1, 5))

    async def body() -> None:
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                kind, fd = ctx.junk_fd()
            else:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ctx.on_close(ours.close)
                ctx.on_close(theirs.close)
                kind, fd = "socket", theirs.fileno()
                if rng.random() < 0.5:
                    ours.close()  # a channel whose other end is gone
            ctx.note(f"backend channel: {kind}")
            flags = vu.VERSION | (vu.NEED_REPLY_FLAG if rng.random() < 0.5 else 0)
            await session.send_raw(R.SET_BACKEND_REQ_FD, flags, b"", [fd])
            if session.blk:  # writeback toggle: a config write the device accepts
                data = bytes([rng.getrandbits(8)])
                header = struct.pack("=III", 20, 1, 0)
                await session.send_raw(
                    R.SET_CONFIG, vu.VERSION | vu.NEED_REPLY_FLAG, header + data, []
                )

    await raw_phase(session, body)
    session.close()


async def case_random_bytes(ctx: CaseContext) -> None:
    """A valid header, then random payload bytes (and maybe more of them)."""
    rng = ctx.rng
    session = await _new_session(ctx)
    await session.setup(rng.randint(0, 5))

    async def body() -> None:
        for _ in range(rng.randint(1, 6)):
            request = rng.choice((*R, rng.getrandbits(32)))
            size = rng.choice((0, 8, 12, 40, 264, 4096, rng.randint(0, 4096)))
            flags = vu.VERSION | (vu.NEED_REPLY_FLAG if rng.random() < 0.5 else 0)
            header = vu.Header.build({"request": request, "flags": flags, "size": size})
            body_bytes = rng.randbytes(size)
            fds = [ctx.eventfd() for _ in range(rng.choice((0, 0, 1, 2, 9)))]
            ctx.note(f"header {int(request)} size {size} fds {len(fds)}")
            await vu.write_message(session.sock, header + body_bytes, fds)
        if rng.random() < 0.3:
            tail = rng.randbytes(rng.randint(1, 64))
            ctx.note(f"{len(tail)} bytes of garbage")
            await session.sock.send(tail)

    await raw_phase(session, body)
    session.close()


async def handshake(socket_path: str) -> None:
    """GET_FEATURES on a fresh connection; raises unless it is answered."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(socket_path)
        await vu.write_message(sock, vu.encode(R.GET_FEATURES))
        reply = await vu.read_message(sock)
        reply.close_fds()
        if reply.request != R.GET_FEATURES or len(reply.payload) != 8:
            raise RuntimeError(f"bad GET_FEATURES reply: {reply}")
    finally:
        sock.close()


async def warm_up(ctx: CaseContext) -> None:
    """A correct session with I/O on every ring, each request completed."""
    session = await _new_session(ctx)
    await session.open()
    frontend = session.frontend
    assert frontend is not None
    await frontend.negotiate()
    await frontend.set_features()
    session.queue_count = await frontend.queue_count()
    await frontend.share_memory(session.ram)
    session.ring_size = 64
    for index in range(session.queue_count):
        queue = await session.start_queue(index)
        await serves_again(session, queue, f"warm-up queue {index}")
    session.close()


CASES = CaseSet(
    kinds={
        "mutate": (25, case_mutate),
        "hostile-ring": (20, case_hostile_ring),
        "shuffled-setup": (10, case_shuffled_setup),
        "reset-mid-io": (6, case_reset_mid_io),
        "memory-swap": (6, case_memory_swap),
        "disconnect-mid-io": (5, case_disconnect_mid_io),
        "kick-swap": (6, case_kick_swap),
        "reconnect-inflight": (6, case_reconnect_inflight),
        "pipeline": (3, case_pipeline),
        "state-transfer": (4, case_state_transfer),
        "dirty-log": (4, case_dirty_log),
        "truncated-region": (3, case_truncated_region),
        "backend-channel": (3, case_backend_channel),
        "random-bytes": (8, case_random_bytes),
    },
    handshake=handshake,
    warm_up=warm_up,
)
