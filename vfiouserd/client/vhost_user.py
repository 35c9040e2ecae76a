"""The project's vhost-user front end: plays QEMU against any back end.

Used by the tests (against vfiouserd and, for comparison, against
qemu-storage-daemon) and by the benchmark harness. It speaks the protocol
the way QEMU does: negotiate, share guest RAM, set up rings, start them with
SET_VRING_KICK, stop them with GET_VRING_BASE.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

import trio

from vfiouserd.client.guest import (
    USER_ADDRESS_OFFSET,
    DriverPackedRing,
    DriverRing,
    DriverSplitRing,
    GuestRam,
)
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.protocol.vhost_user import Message, ProtocolFeature


class BackendError(Exception):
    """The back end refused a request or answered wrongly."""


@dataclass
class QueueHandle:
    index: int
    ring: DriverRing
    kick: int  # eventfd we write to
    call: int  # eventfd the back end writes to
    err: int
    used_by: list[int] = field(default_factory=list)

    def kick_now(self) -> None:
        os.eventfd_write(self.kick, 1)

    async def kick_async(self) -> None:
        self.kick_now()

    async def wait_call(self) -> None:
        await trio.lowlevel.wait_readable(self.call)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call)

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


@dataclass
class InflightRegion:
    """The inflight region a back end handed out. Like QEMU, the front end
    keeps it across back-end restarts and gives it to every new back end."""

    fd: int
    size: int
    offset: int
    num_queues: int
    queue_size: int

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, self.offset)

    def close(self) -> None:
        os.close(self.fd)


class VhostUserFrontend:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.features = 0
        self.protocol_features = 0
        self.queues: list[QueueHandle] = []

    @classmethod
    async def connect(cls, path: str) -> VhostUserFrontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    async def aclose(self) -> None:
        for queue in self.queues:
            queue.close()
        self.queues.clear()
        self.sock.close()

    # -- raw messages -----------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))

    async def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        need_reply: bool = False,
    ) -> None:
        await vu.write_message(self.sock, vu.encode(request, payload, need_reply=need_reply), fds)

    async def receive_reply(self, request: int) -> Message:
        reply = await vu.read_message(self.sock)
        reply.close_fds()
        if reply.request != request or reply.flags != vu.VERSION | vu.REPLY_FLAG:
            raise BackendError(
                f"bad reply: request {reply.request} flags {reply.flags:#x} to {R(request).name}"
            )
        return reply

    async def call(
        self,
        request: R,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        ack: bool | None = None,
    ) -> bytes | None:
        """Send a request; return its reply payload, checking REPLY_ACK acks."""
        rule = vu.FRONTEND_RULES[request]
        want_ack = self.reply_ack if ack is None else ack
        has_reply = rule.reply is not None
        await self.send(request, payload, fds, need_reply=want_ack and not has_reply)
        if has_reply:
            return (await self.receive_reply(request)).payload
        if want_ack:
            status = vu.U64.parse((await self.receive_reply(request)).payload).value
            if status:
                raise BackendError(f"{request.name} failed with {status}")
        return None

    async def call_u64(self, request: R, value: int | None = None) -> int | None:
        payload = b"" if value is None else vu.U64.build({"value": value})
        reply = await self.call(request, payload)
        return None if reply is None else int(vu.U64.parse(reply).value)

    # -- the QEMU-like sequence ----------------------------------------------------

    async def negotiate(
        self, want_features: int | None = None, want_protocol: int | None = None
    ) -> None:
        offered = await self.call_u64(R.GET_FEATURES)
        assert offered is not None
        if offered & bit(vu.VHOST_USER_F_PROTOCOL_FEATURES):
            protocol = await self.call_u64(R.GET_PROTOCOL_FEATURES)
            assert protocol is not None
            if want_protocol is not None:
                protocol &= want_protocol
            await self.call_u64(R.SET_PROTOCOL_FEATURES, protocol)
            self.protocol_features = protocol
        await self.call(R.SET_OWNER)
        self.features = offered if want_features is None else offered & want_features
        self.features |= offered & bit(vu.VHOST_USER_F_PROTOCOL_FEATURES)
        # Like QEMU: LOG_ALL only while migrating (set_features with it then).
        self.features &= ~bit(vu.VHOST_F_LOG_ALL)

    async def queue_count(self) -> int:
        count = await self.call_u64(R.GET_QUEUE_NUM)
        assert count is not None
        return count

    async def get_config(self, size: int, offset: int = 0) -> bytes:
        header = vu.ConfigHeader.build({"offset": offset, "size": size, "flags": 0})
        reply = await self.call(R.GET_CONFIG, header + bytes(size))
        assert reply is not None
        if len(reply) != len(header) + size:
            raise BackendError(f"GET_CONFIG answered {len(reply)} bytes")
        return reply[len(header) :]

    async def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        header = vu.ConfigHeader.build({"offset": offset, "size": len(data), "flags": flags})
        await self.call(R.SET_CONFIG, header + data)

    async def open_backend_channel(self) -> trio.socket.SocketType:
        """SET_BACKEND_REQ_FD: a socketpair whose other end the back end writes to."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.call(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        return trio.socket.from_stdlib_socket(ours)

    async def answer_backend_request(
        self, channel: trio.socket.SocketType, status: int = 0
    ) -> Message:
        """Read one back-end request and acknowledge it if it asks to be."""
        message = await vu.read_message(channel)
        message.close_fds()
        if message.need_reply:
            await vu.write_message(channel, vu.encode_u64(message.request, status, reply=True))
        return message

    async def get_inflight(self, num_queues: int, queue_size: int) -> InflightRegion:
        payload = vu.InflightDescription.build(
            {"mmap_size": 0, "mmap_offset": 0, "num_queues": num_queues, "queue_size": queue_size}
        )
        await self.send(R.GET_INFLIGHT_FD, payload)
        reply = await vu.read_message(self.sock)
        if (
            reply.request != R.GET_INFLIGHT_FD
            or reply.flags != vu.VERSION | vu.REPLY_FLAG
            or len(reply.fds) != 1
        ):
            reply.close_fds()
            raise BackendError(f"bad GET_INFLIGHT_FD reply ({len(reply.fds)} fds)")
        answer = vu.InflightDescription.parse(reply.payload)
        return InflightRegion(
            reply.fds[0], answer.mmap_size, answer.mmap_offset, num_queues, queue_size
        )

    async def set_inflight(self, region: InflightRegion) -> None:
        payload = vu.InflightDescription.build(
            {
                "mmap_size": region.size,
                "mmap_offset": region.offset,
                "num_queues": region.num_queues,
                "queue_size": region.queue_size,
            }
        )
        await self.call(R.SET_INFLIGHT_FD, payload, [region.fd])

    async def save_device_state(self) -> bytes:
        """SET_DEVICE_STATE_FD (save) with a pipe, read to the end, CHECK."""
        read_end, write_end = os.pipe()
        try:
            await self._start_transfer(vu.TransferDirection.SAVE, write_end)
        finally:
            os.close(write_end)
        chunks = []
        try:
            os.set_blocking(read_end, False)
            while True:
                await trio.lowlevel.wait_readable(read_end)
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            trio.lowlevel.notify_closing(read_end)
            os.close(read_end)
        await self.check_device_state()
        return b"".join(chunks)

    async def load_device_state(self, blob: bytes) -> None:
        """SET_DEVICE_STATE_FD (load), write ``blob``, close, CHECK."""
        read_end, write_end = os.pipe()
        try:
            await self._start_transfer(vu.TransferDirection.LOAD, read_end)
        finally:
            os.close(read_end)
        try:
            os.set_blocking(write_end, False)
            view = memoryview(blob)
            while view:
                await trio.lowlevel.wait_writable(write_end)
                view = view[os.write(write_end, view) :]
        finally:
            trio.lowlevel.notify_closing(write_end)
            os.close(write_end)
        await self.check_device_state()

    async def _start_transfer(self, direction: vu.TransferDirection, fd: int) -> None:
        payload = vu.DeviceStateTransfer.build(
            {"direction": direction, "phase": vu.MigrationPhase.STOPPED}
        )
        reply = await self.call(R.SET_DEVICE_STATE_FD, payload, [fd])
        assert reply is not None
        flags = vu.U64.parse(reply).value
        if flags & 0xFF:
            raise BackendError(f"SET_DEVICE_STATE_FD failed ({flags:#x})")
        if not flags & vu.DEVICE_STATE_NOFD_FLAG:
            raise BackendError("the back end returned an fd of its own (not supported here)")

    async def check_device_state(self) -> None:
        result = await self.call_u64(R.CHECK_DEVICE_STATE)
        if result:
            raise BackendError(f"CHECK_DEVICE_STATE failed ({result})")

    async def set_features(self, features: int | None = None) -> None:
        if features is not None:
            self.features = features
        await self.call_u64(R.SET_FEATURES, self.features)

    async def share_memory(self, ram: GuestRam) -> None:
        """SET_MEM_TABLE, or ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS."""
        regions = [
            {
                "guest_address": r.guest_address,
                "size": r.size,
                "user_address": r.user_address,
                "mmap_offset": 0,
            }
            for r in ram.regions
        ]
        if self.protocol_features & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            for region, ram_region in zip(regions, ram.regions, strict=True):
                await self.call(
                    R.ADD_MEM_REG, vu.SingleMemoryRegion.build({"region": region}), [ram_region.fd]
                )
        else:
            table = vu.MemoryTable.build({"num_regions": len(regions), "regions": regions})
            await self.call(R.SET_MEM_TABLE, table, [r.fd for r in ram.regions])

    def make_ring(self, ram: GuestRam, size: int, region: int = 0) -> DriverRing:
        event_idx = bool(self.features & bit(Feature.RING_EVENT_IDX))
        if self.features & bit(Feature.RING_PACKED):
            return DriverPackedRing(ram, size, event_idx=event_idx, region=region)
        return DriverSplitRing(ram, size, event_idx=event_idx, region=region)

    async def start_queue(
        self, index: int, ring: DriverRing, base: int | None = None
    ) -> QueueHandle:
        """NUM, BASE, ADDR, KICK, CALL, ERR, ENABLE: what QEMU sends per ring."""
        await self.call(R.SET_VRING_NUM, vu.VringState.build({"index": index, "num": ring.size}))
        base = ring.base() if base is None else base
        await self.call(R.SET_VRING_BASE, vu.VringState.build({"index": index, "num": base}))
        desc, driver, device = ring.areas
        await self.call(
            R.SET_VRING_ADDR,
            vu.VringAddr.build(
                {
                    "index": index,
                    "flags": 0,
                    "descriptor": desc + USER_ADDRESS_OFFSET,
                    "used": device + USER_ADDRESS_OFFSET,
                    "available": driver + USER_ADDRESS_OFFSET,
                    "log": 0,
                }
            ),
        )
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await self.call(R.SET_VRING_KICK, vu.U64.build({"value": index}), [kick])
        await self.call(R.SET_VRING_CALL, vu.U64.build({"value": index}), [call])
        await self.call(R.SET_VRING_ERR, vu.U64.build({"value": index}), [err])
        if self.features & bit(vu.VHOST_USER_F_PROTOCOL_FEATURES):
            await self.call(R.SET_VRING_ENABLE, vu.VringState.build({"index": index, "num": 1}))
        handle = QueueHandle(index, ring, kick, call, err)
        self.queues.append(handle)
        return handle

    async def stop_queue(self, index: int) -> int:
        reply = await self.call(R.GET_VRING_BASE, vu.VringState.build({"index": index, "num": 0}))
        assert reply is not None
        state = vu.VringState.parse(reply)
        if state.index != index:
            raise BackendError(f"GET_VRING_BASE answered for vring {state.index}")
        return int(state.num)
