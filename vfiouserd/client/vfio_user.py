"""The project's vfio-user client: plays the VMM against any vfio-user server.

Used by the tests, by ``vfiouserd probe`` and as the VMM half of the
simulated guest. It follows docs/interop/vfio-user.rst rather than this
server's reading of it: VERSION first with capabilities, argsz asked twice
where a reply can be larger than the fixed structure, SET_IRQS chunked to
the server's max_msg_fds, data transfers chunked to its max_data_xfer_size,
and server-to-client DMA_READ/DMA_WRITE answered from the client's own
memory while its own requests are outstanding (twin socket when asked for).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from vfiouserd.client.guest import GuestRam
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError, close_fds
from vfiouserd.protocol.vfio_user import Command, Message

CLIENT_MAX_DATA_XFER = 1 << 20
CLIENT_MAX_MSG_FDS = 16
DEFAULT_TIMEOUT = 10.0


class VfioUserError(Exception):
    """The server answered a command with an error."""

    def __init__(self, command: int, error: int) -> None:
        name = errno.errorcode.get(error, str(error))
        super().__init__(f"{Command(command).name} failed: {name}")
        self.errno = error


@dataclass
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    sparse_areas: list[tuple[int, int]] = field(default_factory=list)
    fd: int | None = None

    @property
    def mappable(self) -> bool:
        return bool(self.flags & vfu.RegionFlag.MMAP)


@dataclass
class DmaWindow:
    address: int
    size: int
    with_fd: bool


class VfioUserClient:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        ram: GuestRam | None = None,
        *,
        qemu_dma_layout: bool = False,
    ) -> None:
        # qemu_dma_layout: answer DMA requests the way QEMU's client parses
        # them (u32 count, data at offset 12) rather than the spec's layout.
        self.qemu_dma_layout = qemu_dma_layout
        self.sock = sock
        self.twin: trio.socket.SocketType | None = None
        self.ram = ram
        self.server = vfu.Capabilities()
        self.version = (0, 0)
        self.windows: list[DmaWindow] = []
        self.dma_requests = 0  # DMA_READ/DMA_WRITE served, for tests
        self.dma_reply_delay = 0.0  # seconds, to play a slow VMM in tests
        # Called with each DMA request from the server once its answer is
        # ready, before it goes out (what a VMM does meanwhile, in tests).
        self.before_dma_reply: Callable[[Message], Awaitable[None]] | None = None
        self._next_id = 0
        self._pending: dict[int, trio.MemorySendChannel[Message]] = {}
        self._send_locks: dict[int, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._server_requests, self._server_requests_queue = trio.open_memory_channel[
            tuple[trio.socket.SocketType, Message]
        ](math.inf)

    # -- connection ------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str, **options: Any) -> AsyncIterator[VfioUserClient]:
        """Connect to ``path``; ``options`` as for ``over``."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        async with cls.over(sock, **options) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over(
        cls,
        sock: trio.socket.SocketType,
        *,
        ram: GuestRam | None = None,
        twin_socket: bool = False,
        capabilities: dict[str, Any] | None = None,
        minor: int = vfu.MINOR,
        qemu_dma_layout: bool = False,
    ) -> AsyncIterator[VfioUserClient]:
        """Negotiate on a connected socket and serve the server's requests
        in the background while the caller uses the client."""
        client = cls(sock, ram, qemu_dma_layout=qemu_dma_layout)
        try:
            await client.negotiate(twin_socket=twin_socket, capabilities=capabilities, minor=minor)
            async with trio.open_nursery() as nursery:
                client.start_serving(nursery)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            client.close()

    def start_serving(self, nursery: trio.Nursery) -> None:
        """Route replies and answer the server's requests from tasks of
        ``nursery`` (after negotiation, which may bring a twin socket)."""
        self._nursery = nursery
        nursery.start_soon(self._serve_server_requests)
        nursery.start_soon(self._receive, self.sock)
        if self.twin is not None:
            nursery.start_soon(self._receive, self.twin)

    def close(self) -> None:
        self.sock.close()
        if self.twin is not None:
            self.twin.close()

    def default_capabilities(self, twin_socket: bool) -> dict[str, Any]:
        caps: dict[str, Any] = {
            "max_msg_fds": CLIENT_MAX_MSG_FDS,
            "max_data_xfer_size": CLIENT_MAX_DATA_XFER,
            "max_dma_maps": 65535,
            "pgsizes": vfu.PAGE_SIZE,
            "write_multiple": True,
        }
        if twin_socket:
            caps["twin_socket"] = {"supported": True}
        return caps

    async def negotiate(
        self,
        *,
        twin_socket: bool = False,
        capabilities: dict[str, Any] | None = None,
        minor: int = vfu.MINOR,
    ) -> None:
        caps = self.default_capabilities(twin_socket) if capabilities is None else capabilities
        payload = vfu.VersionHead.build(
            {"major": vfu.MAJOR, "minor": minor}
        ) + vfu.encode_version_data(caps)
        await vfu.write_message(self.sock, vfu.encode(self._msg_id(), Command.VERSION, payload))
        reply = await vfu.read_message(self.sock, CLIENT_MAX_DATA_XFER + vfu.MAX_MESSAGE_SLACK)
        try:
            if reply.kind != vfu.TYPE_REPLY or reply.command != Command.VERSION:
                raise FramingError("the server did not answer VERSION")
            if reply.is_error:
                raise VfioUserError(Command.VERSION, reply.error)
            head = vfu.VersionHead.parse(reply.payload)
            if head.major != vfu.MAJOR or head.minor > minor:
                raise FramingError(f"server answered version {head.major}.{head.minor}")
            self.version = (head.major, head.minor)
            self.server = vfu.parse_version_data(reply.payload[vfu.VersionHead.sizeof() :])
            unknown = set(self.server.present) - set(caps) - {"twin_socket"}
            if unknown:
                raise FramingError(f"server replied with capabilities never offered: {unknown}")
            if twin_socket and self.server.twin_socket:
                index = self.server.twin_socket_fd_index
                if index is None or index >= len(reply.fds):
                    raise FramingError("twin socket accepted without a usable fd")
                self.twin = trio.socket.from_stdlib_socket(
                    socket.socket(fileno=reply.fds.pop(index))
                )
        finally:
            reply.close_fds()

    def _msg_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    async def _send(
        self, sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None
    ) -> None:
        lock = self._send_locks.setdefault(id(sock), trio.Lock())
        async with lock:
            await vfu.write_message(sock, data, fds)

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        try:
            while True:
                message = await vfu.read_message(sock, CLIENT_MAX_DATA_XFER + vfu.MAX_MESSAGE_SLACK)
                if message.kind == vfu.TYPE_REPLY:
                    waiter = self._pending.pop(message.msg_id, None)
                    if waiter is None:
                        message.close_fds()
                        continue
                    waiter.send_nowait(message)
                else:  # served in order on their own task, as QEMU does
                    self._server_requests.send_nowait((sock, message))
        except (ConnectionClosed, FramingError, OSError):
            for waiter in self._pending.values():
                waiter.close()
            self._pending.clear()

    async def _serve_server_requests(self) -> None:
        async for sock, message in self._server_requests_queue:
            with contextlib.suppress(ConnectionClosed, OSError):
                await self._serve_server_request(sock, message)

    async def _serve_server_request(self, sock: trio.socket.SocketType, message: Message) -> None:
        """DMA_READ / DMA_WRITE from the server, answered from our memory
        (in QEMU's layout with ``qemu_dma_layout``, see protocol/vfio_user.py)."""
        message.close_fds()
        if self.dma_reply_delay:
            await trio.sleep(self.dma_reply_delay)
        error = None
        payload = b""
        # QEMU's struct ends in padding: its messages are 4 bytes longer.
        layout, pad = vfu.dma_access_layout(self.qemu_dma_layout)
        try:
            request = layout.parse(message.payload)
            if request.count > CLIENT_MAX_DATA_XFER:
                error = errno.E2BIG
            elif not self._dma_allowed(request.address, request.count):
                error = errno.EFAULT
            elif message.command == Command.DMA_READ and self.ram is not None:
                data = self.ram.read(request.address, request.count)
                payload = layout.build(dict(request)) + data + bytes(pad)
            elif message.command == Command.DMA_WRITE and self.ram is not None:
                data = message.payload[layout.sizeof() : layout.sizeof() + request.count]
                room = len(message.payload) - layout.sizeof() - pad
                if self.qemu_dma_layout and request.count > room:
                    error = errno.E2BIG  # QEMU's own check, padding included
                elif not self.qemu_dma_layout and room != request.count:
                    error = errno.EINVAL
                else:
                    self.ram.write(request.address, data)
                    if not self.qemu_dma_layout:  # QEMU answers with the header alone
                        payload = vfu.DmaWriteReply.build(
                            {"address": request.address, "count": request.count}
                        )
            else:
                error = errno.EINVAL
        except Exception:  # any bad request is refused, not fatal
            error = errno.EINVAL
        self.dma_requests += 1
        if self.before_dma_reply is not None:
            await self.before_dma_reply(message)
        await self._send(
            sock, vfu.encode(message.msg_id, message.command, payload, reply=True, error=error)
        )

    def _dma_allowed(self, address: int, count: int) -> bool:
        return any(
            w.address <= address and address + count <= w.address + w.size for w in self.windows
        )

    async def call(
        self,
        command: Command,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        no_reply: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Message:
        """Send a command and wait for its reply (returned; its fds are the
        caller's). Error replies raise VfioUserError."""
        msg_id = self._msg_id()
        send, receive = trio.open_memory_channel[Message](1)
        if not no_reply:
            self._pending[msg_id] = send
        await self._send(self.sock, vfu.encode(msg_id, command, payload, no_reply=no_reply), fds)
        if no_reply:
            return Message(msg_id, command, vfu.TYPE_REPLY, 0, b"")
        with trio.fail_after(timeout):
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise ConnectionClosed("server closed the connection") from None
        if reply.command != command:
            reply.close_fds()
            raise FramingError(f"reply to {command.name} carries command {reply.command}")
        if reply.is_error:
            reply.close_fds()
            raise VfioUserError(command, reply.error)
        return reply

    # -- DMA ------------------------------------------------------------------------------

    async def dma_map(
        self,
        address: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        flags: int = vfu.DmaFlag.READ | vfu.DmaFlag.WRITE,
    ) -> None:
        payload = vfu.DmaMap.build(
            {
                "argsz": vfu.DmaMap.sizeof(),
                "flags": flags,
                "offset": offset if fd is not None else 0,
                "address": address,
                "size": size,
            }
        )
        (await self.call(Command.DMA_MAP, payload, [fd] if fd is not None else None)).close_fds()
        self.windows.append(DmaWindow(address, size, fd is not None))

    async def map_ram(self, *, with_fd: bool = True, pieces: int = 1) -> None:
        """Share every region of the guest RAM, as QEMU does at start-up. With
        ``pieces``, each region goes in that many maps of the same fd, as QEMU
        shares RAM split by its memory map (each map's fd a dup of one file)."""
        assert self.ram is not None
        for region in self.ram.regions:
            step = region.size // pieces // vfu.PAGE_SIZE * vfu.PAGE_SIZE
            for start in range(0, region.size, step):
                length = min(step, region.size - start)
                fd = region.fd if with_fd else None
                await self.dma_map(region.guest_address + start, length, fd=fd, offset=start)

    async def dma_unmap(self, address: int, size: int, flags: int = 0) -> bytes:
        payload = vfu.DmaUnmap.build(
            {"argsz": vfu.DmaUnmap.sizeof(), "flags": flags, "address": address, "size": size}
        )
        reply = await self.call(Command.DMA_UNMAP, payload)
        if flags & vfu.DMA_UNMAP_FLAG_ALL:
            self.windows.clear()
        else:
            self.windows = [w for w in self.windows if (w.address, w.size) != (address, size)]
        return reply.payload

    # -- device information ---------------------------------------------------------------

    async def device_info(self) -> Any:
        payload = vfu.DeviceInfo.build(
            {"argsz": vfu.DeviceInfo.sizeof(), "flags": 0, "num_regions": 0, "num_irqs": 0}
        )
        return vfu.DeviceInfo.parse((await self.call(Command.DEVICE_GET_INFO, payload)).payload)

    async def _region_info_once(self, index: int, argsz: int) -> tuple[Any, Message]:
        payload = vfu.RegionInfo.build(
            {"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0, "offset": 0}
        )
        reply = await self.call(Command.DEVICE_GET_REGION_INFO, payload)
        return vfu.RegionInfo.parse(reply.payload), reply

    async def region_info(self, index: int) -> RegionInfo:
        """Ask once with the bare structure, again if the reply needs more room."""
        info, reply = await self._region_info_once(index, vfu.RegionInfo.sizeof())
        if info.argsz > vfu.RegionInfo.sizeof():
            reply.close_fds()
            info, reply = await self._region_info_once(index, info.argsz)
        result = RegionInfo(index, info.flags, info.size, info.offset)
        if info.flags & vfu.RegionFlag.CAPS and info.cap_offset:
            next_offset = info.cap_offset
            seen = 0
            while next_offset and seen < 16:
                header = vfu.CapHeader.parse(reply.payload[next_offset:])
                if header.id == vfu.REGION_CAP_SPARSE_MMAP:
                    cap = vfu.SparseMmapCap.parse(reply.payload[next_offset:])
                    result.sparse_areas = [(a.offset, a.size) for a in cap.areas]
                next_offset = header.next
                seen += 1
        if reply.fds:
            result.fd = reply.fds.pop(0)
        reply.close_fds()
        return result

    async def irq_info(self, index: int) -> Any:
        payload = vfu.IrqInfo.build(
            {"argsz": vfu.IrqInfo.sizeof(), "flags": 0, "index": index, "count": 0}
        )
        return vfu.IrqInfo.parse((await self.call(Command.DEVICE_GET_IRQ_INFO, payload)).payload)

    async def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        *,
        fds: list[int] | None = None,
        data: bytes = b"",
    ) -> None:
        """SET_IRQS, split into messages of at most the server's max_msg_fds."""
        fds = fds or []
        chunk = max(1, self.server.max_msg_fds) if fds else max(count, 1)
        offset = 0
        while True:
            part = min(chunk, count - offset) if count else 0
            part_fds = fds[offset : offset + part] if fds else []
            part_data = data[offset : offset + part] if data else b""
            payload = (
                vfu.IrqSetHead.build(
                    {
                        "argsz": vfu.IrqSetHead.sizeof() + len(part_data),
                        "flags": flags,
                        "index": index,
                        "start": start + offset,
                        "count": part,
                    }
                )
                + part_data
            )
            (await self.call(Command.DEVICE_SET_IRQS, payload, part_fds or None)).close_fds()
            offset += part
            if offset >= count:
                return

    async def region_io_fds(self, index: int) -> tuple[list[Any], list[int]]:
        payload = vfu.RegionIoFds.build(
            {"argsz": vfu.RegionIoFds.sizeof(), "flags": 0, "index": index, "count": 0}
        )
        reply = await self.call(Command.DEVICE_GET_REGION_IO_FDS, payload)
        head = vfu.RegionIoFds.parse(reply.payload)
        reply.close_fds()
        if head.argsz > vfu.RegionIoFds.sizeof():
            payload = vfu.RegionIoFds.build(
                {"argsz": head.argsz, "flags": 0, "index": index, "count": 0}
            )
            reply = await self.call(Command.DEVICE_GET_REGION_IO_FDS, payload)
            head = vfu.RegionIoFds.parse(reply.payload)
        entry_size = (head.argsz - vfu.RegionIoFds.sizeof()) // head.count if head.count else 0
        entries = (
            [
                vfu.SubRegionIoFd.parse(reply.payload[16 + i * entry_size :])
                for i in range(head.count)
            ]
            if entry_size
            else []
        )
        fds, reply.fds = reply.fds, []
        return entries, fds

    # -- region access ---------------------------------------------------------------------

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        chunks = []
        limit = self.server.max_data_xfer_size
        for start in range(0, count, limit):
            part = min(limit, count - start)
            payload = vfu.RegionAccess.build(
                {"offset": offset + start, "region": index, "count": part}
            )
            reply = await self.call(Command.REGION_READ, payload)
            data = reply.payload[vfu.RegionAccess.sizeof() :]
            if len(data) != part:
                raise FramingError(f"REGION_READ returned {len(data)} of {part} bytes")
            chunks.append(data)
        return b"".join(chunks)

    async def region_write(
        self, index: int, offset: int, data: bytes, *, no_reply: bool = False
    ) -> None:
        limit = self.server.max_data_xfer_size
        for start in range(0, len(data), limit):
            part = data[start : start + limit]
            payload = (
                vfu.RegionAccess.build(
                    {"offset": offset + start, "region": index, "count": len(part)}
                )
                + part
            )
            await self.call(Command.REGION_WRITE, payload, no_reply=no_reply)

    async def write_multi(self, writes: list[tuple[int, int, bytes]]) -> int:
        entries = b"".join(
            vfu.WriteMultiEntry.build(
                {
                    "offset": offset,
                    "region": region,
                    "count": len(data),
                    "data": data.ljust(8, b"\0"),
                }
            )
            for region, offset, data in writes
        )
        reply = await self.call(
            Command.REGION_WRITE_MULTI, vfu.WriteMultiHead.build({"wr_cnt": len(writes)}) + entries
        )
        return int(vfu.WriteMultiHead.parse(reply.payload).wr_cnt)

    async def reset(self) -> None:
        await self.call(Command.DEVICE_RESET)

    # -- migration (what a VMM does to move the device) ---------------------------------------

    async def device_feature(
        self, index: int, flags: int, data: bytes = b"", room: int = 0
    ) -> bytes:
        """DEVICE_FEATURE; returns the data of the reply. ``room``: bytes of
        reply data the client has space for (argsz covers them)."""
        head = vfu.DeviceFeatureHead.sizeof()
        argsz = head + max(len(data), room)
        payload = vfu.DeviceFeatureHead.build({"argsz": argsz, "flags": index | flags}) + data
        reply = await self.call(Command.DEVICE_FEATURE, payload)
        return reply.payload[head:]

    async def migration_flags(self) -> int:
        data = await self.device_feature(
            vfu.DeviceFeature.MIGRATION, vfu.FEATURE_GET, room=vfu.MigrationInfo.sizeof()
        )
        return int(vfu.MigrationInfo.parse(data).flags)

    async def migration_state(self) -> vfu.MigrationState:
        data = await self.device_feature(
            vfu.DeviceFeature.MIG_DEVICE_STATE, vfu.FEATURE_GET, room=vfu.MigDeviceState.sizeof()
        )
        return vfu.MigrationState(vfu.MigDeviceState.parse(data).device_state)

    async def set_migration_state(self, target: vfu.MigrationState) -> None:
        data = vfu.MigDeviceState.build({"device_state": target, "data_fd": 0})
        await self.device_feature(vfu.DeviceFeature.MIG_DEVICE_STATE, vfu.FEATURE_SET, data)

    async def migration_read(self, size: int) -> bytes:
        head = vfu.MigDataHead.sizeof()
        request = vfu.MigDataHead.build({"argsz": head + size, "size": size})
        reply = await self.call(Command.MIG_DATA_READ, request)
        answer = vfu.MigDataHead.parse(reply.payload)
        return reply.payload[head : head + answer.size]  # trust size, not the length

    async def migration_write(self, data: bytes) -> None:
        head = vfu.MigDataHead.sizeof()
        request = vfu.MigDataHead.build({"argsz": head + len(data), "size": len(data)})
        await self.call(Command.MIG_DATA_WRITE, request + data)

    async def save_device(self, *, pre_copy: bool = True) -> bytes:
        """Source side: (PRE_COPY,) STOP_COPY, read to the end, STOP."""
        data = b""
        if pre_copy:
            await self.set_migration_state(vfu.MigrationState.PRE_COPY)
            data += await self._read_all()
        await self.set_migration_state(vfu.MigrationState.STOP_COPY)
        data += await self._read_all()
        await self.set_migration_state(vfu.MigrationState.STOP)
        return data

    async def _read_all(self) -> bytes:
        chunks = []
        while chunk := await self.migration_read(CLIENT_MAX_DATA_XFER):
            chunks.append(chunk)
        return b"".join(chunks)

    async def load_device(self, data: bytes, *, run: bool = True) -> None:
        """Destination side: RESUMING, write the data, then RUNNING (the data
        is checked on the way, through STOP), or only STOP with ``run=False``,
        leaving the VMM to set up interrupts before the device runs."""
        await self.set_migration_state(vfu.MigrationState.RESUMING)
        step = self.server.max_data_xfer_size
        for offset in range(0, len(data), step):
            await self.migration_write(data[offset : offset + step])
        await self.set_migration_state(
            vfu.MigrationState.RUNNING if run else vfu.MigrationState.STOP
        )

    async def dma_logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        data = vfu.DmaLoggingControl.build({"page_size": page_size, "num_ranges": len(ranges)})
        data += b"".join(vfu.DmaLoggingRange.build({"iova": a, "length": n}) for a, n in ranges)
        await self.device_feature(vfu.DeviceFeature.DMA_LOGGING_START, vfu.FEATURE_SET, data)

    async def dma_logging_stop(self) -> None:
        await self.device_feature(vfu.DeviceFeature.DMA_LOGGING_STOP, vfu.FEATURE_SET)

    async def dma_logging_report(self, iova: int, length: int, page_size: int) -> set[int]:
        """The pages (numbered from ``iova``) written since the last report."""
        pages = (length + page_size - 1) // page_size
        bitmap_size = (pages + 63) // 64 * 8
        request = vfu.DmaLoggingReport.build(
            {"iova": iova, "length": length, "page_size": page_size}
        )
        data = await self.device_feature(
            vfu.DeviceFeature.DMA_LOGGING_REPORT,
            vfu.FEATURE_GET,
            request,
            room=len(request) + bitmap_size,
        )
        bitmap = data[len(request) :]
        return {p for p in range(pages) if bitmap[p // 8] >> (p % 8) & 1}

    # -- PCI config space helpers -------------------------------------------------------------

    async def config_read(self, offset: int, size: int) -> int:
        data = await self.region_read(vfu.PciRegion.CONFIG, offset, size)
        return int.from_bytes(data, "little")

    async def config_write(self, offset: int, size: int, value: int) -> None:
        await self.region_write(vfu.PciRegion.CONFIG, offset, value.to_bytes(size, "little"))

    async def capabilities(self) -> list[tuple[int, int]]:
        """(capability ID, offset) of the standard capability list."""
        found: list[tuple[int, int]] = []
        if not await self.config_read(0x06, 2) & 0x10:
            return found
        offset = await self.config_read(0x34, 1) & 0xFC
        while offset and len(found) < 48:
            cap_id = await self.config_read(offset, 1)
            found.append((cap_id, offset))
            offset = await self.config_read(offset + 1, 1) & 0xFC
        return found

    async def bar_size(self, index: int) -> tuple[int, int]:
        """Size a BAR the way firmware does: write all ones, read back."""
        register = 0x10 + 4 * index
        original = await self.config_read(register, 4)
        await self.config_write(register, 4, 0xFFFFFFFF)
        mask = await self.config_read(register, 4)
        await self.config_write(register, 4, original)
        if original & 1:
            return (~(mask & ~0x3) + 1) & 0xFFFF, original & 0x3
        size_mask = mask & ~0xF
        if original & 0x4:  # 64-bit: the next register holds the high half
            await self.config_write(register + 4, 4, 0xFFFFFFFF)
            high = await self.config_read(register + 4, 4)
            await self.config_write(register + 4, 4, 0)
            size_mask |= high << 32
            return (~size_mask + 1) & ((1 << 64) - 1), original & 0xF
        return (~size_mask + 1) & 0xFFFFFFFF, original & 0xF


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


__all__ = ["VfioUserClient", "VfioUserError", "close_fds", "eventfd"]
