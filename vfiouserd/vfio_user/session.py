"""A vfio-user server session: one client connection to one PCI device.

Negotiation first (VERSION, or the connection closes), then commands are
processed strictly in the order they arrive while a separate reader keeps
the socket drained, so a server-to-client DMA_READ/DMA_WRITE waiting for its
reply never deadlocks with the client's own requests. With twin-socket mode
those requests and their replies use their own socket.

Every field is checked: a bad request gets a header-only error reply with an
errno (or, with No_reply, a log line); a header that cannot be trusted closes
the connection. Extra fds are closed.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import itertools
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import trio
from construct import Construct, ConstructError, Container

from vfiouserd import handover
from vfiouserd.changes import Changes, Watched
from vfiouserd.devices.pci import Bar, DeviceAccessError, IrqKind, PciDevice
from vfiouserd.eventfds import is_eventfd_like
from vfiouserd.handover import CONNECTION, TWIN, FdNames, Received
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError, RegionSpec, RemoteAccessError, memory_faults
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError, close_fds
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.vfio_user import records
from vfiouserd.vfio_user.backlog import BacklogOverflow, CommandBacklog
from vfiouserd.vfio_user.interrupts import Interrupts
from vfiouserd.vfio_user.migration import DirtyBitmaps, Migration, MigrationError, logged_ranges

log = get_logger("vfio_user")
# The client's VERSION capabilities a handover record carries as they are.
CLIENT_VALUES = [f.name for f in dataclasses.fields(records.Client) if f.name != "present"]

# Pipelined commands read ahead while one is processed: past the first
# number the reader waits, unless the device waits for a reply from the
# client; past the others the client is broken (see backlog.py).
COMMAND_QUEUE = 256
COMMAND_BACKLOG_LIMIT = 4096
COMMAND_BACKLOG_BYTES = 64 << 20
DMA_REPLY_TIMEOUT = 10.0
LAYOUT_PROBE_TRIES = 8  # a probe whose memory changed meanwhile is asked again
NEGOTIATION_TIMEOUT = 10.0  # an idle peer must not hold the device from its VMM


class RequestError(Exception):
    """Refuse the request with ``errno``."""

    def __init__(self, error: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = error


class ProtocolViolation(Exception):
    """Close the connection."""


@dataclass
class Reply:
    payload: bytes = b""
    fds: list[int] | None = None


@dataclass
class ServerConfig:
    max_data_xfer_size: int = vfu.DEFAULT_MAX_DATA_XFER
    max_msg_fds: int = 16
    max_dma_maps: int = 1024
    page_sizes: int = os.sysconf("SC_PAGE_SIZE")


Handler = Callable[[Message], Awaitable[Reply]]


class ThreadedRemote:
    """Blocking DMA_READ/DMA_WRITE for a ring walk on a worker thread, which
    gives its turn up while the VMM answers (see vfiouserd.turns)."""

    def __init__(self, session: VfioUserSession) -> None:
        self.session = session

    @staticmethod
    def _check_thread() -> None:
        # Round trips block: only a walk's worker thread may make them. On
        # the event loop this is a bug of ours (the queue breaks, the log
        # says ring.crashed), and the message says which.
        if trio.lowlevel.in_trio_run():
            raise RuntimeError("memory reached through the VMM from the event loop")

    def read(self, address: int, size: int) -> bytes:
        self._check_thread()
        try:
            return self.session.device.turns.round_trip(self.session.dma_read, address, size)
        except trio.RunFinishedError as exc:
            raise RemoteAccessError("the session ended") from exc

    def write(self, address: int, data: bytes) -> None:
        self._check_thread()
        try:
            self.session.device.turns.round_trip(self.session.dma_write, address, data)
        except trio.RunFinishedError as exc:
            raise RemoteAccessError("the session ended") from exc


class VfioUserSession:
    # What a handover's pause waits on: each assignment wakes it.
    _processing = Watched[bool]()
    _ahead = Watched["Message | None"]()
    ending = Watched[bool]()

    def __init__(
        self, device: PciDevice, sock: trio.socket.SocketType, config: ServerConfig | None = None
    ) -> None:
        self.device = device
        self.sock = sock
        self.config = config or ServerConfig()
        self.client = vfu.Capabilities()
        self.page_size = vfu.PAGE_SIZE
        self.twin: trio.socket.SocketType | None = None
        self._send_lock = trio.Lock()
        self._twin_send_lock = trio.Lock()
        self._next_msg_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[Message]] = {}
        self._commands = CommandBacklog(COMMAND_QUEUE, COMMAND_BACKLOG_LIMIT, COMMAND_BACKLOG_BYTES)
        # How the client lays out DMA_READ/DMA_WRITE: asked at the first one.
        self.qemu_dma_layout: bool | None = None
        self._layout_lock = trio.Lock()
        self._given_up: set[int] = set()  # our requests whose replies may come late
        self._nursery: trio.Nursery | None = None
        self._intx_unmask_scope: trio.CancelScope | None = None
        self._intx_unmask_fd: int | None = None
        # Handover: readers park between messages once nothing is under way.
        self._restored = False
        # What a pause waits for (``_quiescent``) changed: each change wakes it.
        self._changes = Changes()
        self._readers_idle: dict[trio.socket.SocketType, bool] = {}
        self._processing = False
        self._ahead = None  # taken from the queue, not yet processed
        self._parked = False
        self.ending = False
        self._finished = trio.Event()
        self.device.memory.max_regions = self.config.max_dma_maps
        self.migration = Migration.of(device)
        self.irqs = Interrupts.of(device)
        self.dirty: DirtyBitmaps | None = None  # DMA logging of this client's memory
        self._handlers: dict[int, tuple[Handler, int | None]] = {
            # command: (handler, most fds it may carry; None: what VERSION allowed)
            Command.DMA_MAP: (self._dma_map, 1),
            Command.DMA_UNMAP: (self._dma_unmap, 0),
            Command.DEVICE_GET_INFO: (self._get_info, 0),
            Command.DEVICE_GET_REGION_INFO: (self._get_region_info, 0),
            Command.DEVICE_GET_REGION_IO_FDS: (self._get_region_io_fds, 0),
            Command.DEVICE_GET_IRQ_INFO: (self._get_irq_info, 0),
            Command.DEVICE_SET_IRQS: (self._set_irqs, None),
            Command.REGION_READ: (self._region_read, 0),
            Command.REGION_WRITE: (self._region_write, 0),
            Command.DEVICE_RESET: (self._reset, 0),
            Command.REGION_WRITE_MULTI: (self._region_write_multi, 0),
            Command.DEVICE_FEATURE: (self._device_feature, 0),
            Command.MIG_DATA_READ: (self._mig_data, 0),
            Command.MIG_DATA_WRITE: (self._mig_data, 0),
        }

    @property
    def max_fds_in(self) -> int:
        """Fds the client may send in one message: what our VERSION reply
        said, which is the spec's default when it said nothing."""
        if "max_msg_fds" in self.client.present:
            return self.config.max_msg_fds
        return vfu.Capabilities().max_msg_fds

    @property
    def max_payload(self) -> int:
        return self.config.max_data_xfer_size + vfu.MAX_MESSAGE_SLACK

    # -- connection -------------------------------------------------------------

    async def serve(self) -> None:
        try:
            if not self._restored:
                try:
                    with trio.fail_after(NEGOTIATION_TIMEOUT):
                        await self._negotiate()
                except trio.TooSlowError:
                    raise ProtocolViolation(
                        f"no VERSION within {NEGOTIATION_TIMEOUT:g} s of connecting"
                    ) from None
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.device.remote_dma = self
                self.device.memory.remote = ThreadedRemote(self)
                self.device.attach(nursery)
                if self._intx_unmask_fd is not None:
                    self._watch_intx_unmask(self._intx_unmask_fd)
                commands = self._commands
                nursery.start_soon(self._read_loop, self.sock, commands, nursery.cancel_scope)
                if self.twin is not None:
                    nursery.start_soon(self._read_loop, self.twin, None, nursery.cancel_scope)
                nursery.start_soon(self._process_loop, commands, nursery.cancel_scope)
        except ConnectionClosed as exc:
            self.ending = True
            log.info("session.closed", reason=str(exc) or "end of stream")
        except (FramingError, ProtocolViolation, vfu.VersionError) as exc:
            self.ending = True
            log.error("session.fatal", reason=str(exc))
        finally:
            # Commands read ahead but never processed still own their fds.
            if self._ahead is not None:
                self._ahead.close_fds()
                self._ahead = None
            self._commands.discard()
            self.ending = self.ending or not self._parked
            self._finished.set()
            if self.ending:
                self.close()

    def close(self) -> None:
        self.device.memory.dirty = None  # the logging was this client's
        self.sock.close()
        if self.twin is not None:
            self.twin.close()
        if self._intx_unmask_fd is not None and (self._parked or self._intx_unmask_scope is None):
            os.close(self._intx_unmask_fd)  # its watcher left it open
        self._intx_unmask_fd = None
        self.device.detach()  # unmap client memory, close IRQ fds; device state stays
        self.device.remote_dma = None
        self.device.memory.remote = None

    # -- handover (restart without disconnect) ------------------------------------------

    def _quiescent(self) -> bool:
        """Between messages everywhere: readers waiting, nothing queued or
        being processed, no request of ours waiting for its reply."""
        return (
            all(self._readers_idle.values())
            and not self._processing
            and not self._waiting
            and self._ahead is None
            and not self._commands
        )

    async def pause(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            # Rings first, while the readers still route the replies a ring
            # walk over unmapped memory waits for; they stay stopped.
            async with self.device.turns.quiet():
                self.device.hold()
            await self._changes.until(lambda: self.ending or self._quiescent())
            if self.ending:
                return False
            self._parked = True
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()  # readers, watchers, ring tasks
            await self._finished.wait()
            if self.ending:  # the client hung up just then: nothing to hand over
                return False
            log.info("session.paused")
            return True
        if not self.ending:
            self.device.release()
        return False

    def snapshot(self, names: FdNames) -> dict[str, Any]:
        device = self.device
        client = self.client
        migration = self.migration
        record = records.Session(
            connection=names.name(self.sock.fileno(), CONNECTION),
            twin=names.name(self.twin.fileno() if self.twin is not None else None, TWIN),
            client=records.Client(
                **{name: getattr(client, name) for name in CLIENT_VALUES},
                present=sorted(client.present),
            ),
            page_size=self.page_size,
            next_msg_id=self._next_msg_id,
            qemu_dma_layout=self.qemu_dma_layout,
            dma=[
                records.DmaRegion(
                    address=region.guest_address,
                    size=region.size,
                    fd=names.name(region.spec.fd),
                    file_offset=region.spec.file_offset,
                    readable=region.readable,
                    writable=region.writable,
                )
                for region in device.memory.regions
            ],
            irqs={
                kind.name: records.IrqIndex(
                    [names.name(fd) for fd in lines.eventfds],
                    list(lines.masked),
                    list(lines.pending),
                )
                for kind, lines in self.irqs.lines.items()
                if lines.count
            },
            intx_unmask=names.name(self._intx_unmask_fd),
            device_fds={key: names.name(fd) for key, fd in device.handover_fds().items()},
            migration=records.Migration(
                state=migration.state.name,
                outgoing=base64.b64encode(migration.outgoing).decode(),
                incoming=base64.b64encode(migration.incoming).decode(),
            ),
            dma_logging=self.dirty.to_document() if self.dirty is not None else None,
        )
        return handover.record_to_document(record)

    @classmethod
    def restore(
        cls, device: PciDevice, document: dict[str, Any], received: Received
    ) -> VfioUserSession:
        """The session a previous daemon handed over (the device state is
        loaded already); HandoverError if it cannot be set up again."""
        return handover.restore(lambda sock: cls(device, sock), document, received, "vfio-user")

    def take_over(self, document: dict[str, Any], fd: handover.FdByName) -> None:
        """Set up what ``document`` describes, on the fds ``fd`` gives by name."""
        record = handover.record_from_document(records.Session, document)
        self._restored = True
        twin = fd(record.twin)
        if twin is not None:
            self.twin = trio.socket.from_stdlib_socket(socket.socket(fileno=twin))
        client = record.client
        self.client = vfu.Capabilities(
            **{name: getattr(client, name) for name in CLIENT_VALUES},
            present=set(client.present),
        )
        self.page_size = record.page_size
        self._next_msg_id = record.next_msg_id
        self.qemu_dma_layout = record.qemu_dma_layout
        device = self.device
        device.adopt_handover_fds({key: fd(name) for key, name in record.device_fds.items()})
        for region in record.dma:
            device.memory.add_region(
                RegionSpec(
                    region.address,
                    region.size,
                    fd(region.fd),
                    file_offset=region.file_offset,
                    readable=region.readable,
                    writable=region.writable,
                )
            )
        for kind_name, saved in record.irqs.items():
            if kind_name not in IrqKind.__members__:
                raise ValueError(f"no interrupt index {kind_name!r}")
            lines = self.irqs.lines[IrqKind[kind_name]]
            if not len(saved.eventfds) == len(saved.masked) == len(saved.pending) == lines.count:
                raise ValueError(f"{kind_name}: {len(saved.eventfds)} vectors")
            for vector, name in enumerate(saved.eventfds):
                lines.set_eventfd(vector, fd(name))
            lines.masked[:] = saved.masked
            lines.pending[:] = saved.pending
        self._intx_unmask_fd = fd(record.intx_unmask)
        migration = record.migration
        if migration.state not in vfu.MigrationState.__members__:
            raise ValueError(f"no migration state {migration.state!r}")
        self.migration.state = vfu.MigrationState[migration.state]
        self.migration.outgoing = memoryview(base64.b64decode(migration.outgoing))
        self.migration.incoming = bytearray(base64.b64decode(migration.incoming))
        if self.migration.state not in (vfu.MigrationState.RUNNING, vfu.MigrationState.PRE_COPY):
            device.quiesce()  # it was stopped for a migration: it stays so
        if record.dma_logging is not None:
            self.dirty = DirtyBitmaps.from_document(record.dma_logging)
            device.memory.dirty = self.dirty

    async def _negotiate(self) -> None:
        message = await vfu.read_message(self.sock, self.max_payload)
        try:
            minor = self._check_version(message)
        except (ProtocolViolation, vfu.VersionError):
            # Say why before closing, when the client sent a command at all.
            if message.kind == vfu.TYPE_COMMAND and not message.no_reply:
                with contextlib.suppress(ConnectionClosed, OSError):
                    await self._send(
                        vfu.encode(message.msg_id, message.command, reply=True, error=errno.EINVAL)
                    )
            raise
        finally:
            message.close_fds()
        await self._reply_version(message, minor)

    def _check_version(self, message: Message) -> int:
        if message.command != Command.VERSION or message.kind != vfu.TYPE_COMMAND:
            raise ProtocolViolation(f"first message is command {message.command}, not VERSION")
        if message.fds:
            raise ProtocolViolation("VERSION carried fds")
        if len(message.payload) < vfu.VersionHead.sizeof():
            raise ProtocolViolation("VERSION payload too short")
        head = vfu.VersionHead.parse(message.payload)
        if head.major != vfu.MAJOR:
            raise ProtocolViolation(f"client speaks major version {head.major}")
        self.client = vfu.parse_version_data(message.payload[vfu.VersionHead.sizeof() :])
        page_sizes = self.client.pgsizes & self.config.page_sizes
        if not page_sizes:
            raise ProtocolViolation(f"no common DMA page size in {self.client.pgsizes:#x}")
        self.page_size = vfu.smallest_page(page_sizes)
        return min(head.minor, vfu.MINOR)

    async def _reply_version(self, message: Message, minor: int) -> None:
        """Answer with a subset of what the client offered: our own limits,
        the common page sizes, write_multiple if asked, twin socket if asked.
        Compact, because QEMU's reply buffer is the size of its request."""
        reply_caps: dict[str, object] = {}
        present = self.client.present
        if "max_msg_fds" in present:
            reply_caps["max_msg_fds"] = self.config.max_msg_fds
        if "max_data_xfer_size" in present:
            # Ours: the most the client may put in one transfer to us. Ours to
            # the client are bounded by its own value.
            reply_caps["max_data_xfer_size"] = self.config.max_data_xfer_size
        if "max_dma_maps" in present:
            reply_caps["max_dma_maps"] = self.config.max_dma_maps
        if "pgsizes" in present:
            reply_caps["pgsizes"] = self.client.pgsizes & self.config.page_sizes
        if "write_multiple" in present:
            reply_caps["write_multiple"] = self.client.write_multiple
        fds: list[int] = []
        if self.client.twin_socket:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.twin = trio.socket.from_stdlib_socket(ours)
            fds = [theirs.detach()]
            reply_caps["twin_socket"] = {"supported": True, "fd_index": 0}
        payload = vfu.VersionHead.build(
            {"major": vfu.MAJOR, "minor": minor}
        ) + vfu.encode_version_data(reply_caps)
        try:
            await self._send(vfu.encode(message.msg_id, Command.VERSION, payload, reply=True), fds)
        finally:
            close_fds(fds)
        log.info(
            "negotiated",
            minor=minor,
            twin_socket=self.twin is not None,
            page_size=self.page_size,
            max_data_xfer=self.config.max_data_xfer_size,
            client_max_fds=self.client.max_msg_fds,
            ignored=",".join(sorted(self.client.unknown)) or "-",
        )

    async def _send(self, data: bytes, fds: list[int] | None = None, *, twin: bool = False) -> None:
        sock = self.twin if twin and self.twin is not None else self.sock
        lock = self._twin_send_lock if sock is self.twin else self._send_lock
        async with lock:
            await vfu.write_message(sock, data, fds)

    async def _read_loop(
        self,
        sock: trio.socket.SocketType,
        commands: CommandBacklog | None,
        scope: trio.CancelScope,
    ) -> None:
        """Route replies to the requests waiting for them; queue commands.

        Reading never waits for the device: a reply a ring walk waits for
        comes on this socket, behind whatever the client pipelined."""
        try:
            while not self._parked:
                if commands is not None:
                    await commands.wait_for_room(lambda: bool(self._waiting))
                self._readers_idle[sock] = True  # a handover may park the session now
                self._changes.notify()
                await trio.lowlevel.wait_readable(sock)
                self._readers_idle[sock] = False
                with trio.CancelScope(shield=True):  # never half a message
                    message = await vfu.read_message(sock, self.max_payload)
                self._route(message, commands)
                self._changes.notify()  # a reply came, or a command is queued
            return  # parked for a handover
        except ConnectionClosed as exc:
            log.info("session.closed", reason=str(exc) or "end of stream")
        except (FramingError, ProtocolViolation, BacklogOverflow) as exc:
            log.error("session.fatal", reason=str(exc))
        self.ending = True
        for waiter in self._waiting.values():  # no reply can come any more
            waiter.close()
        self._waiting.clear()
        scope.cancel()

    def _route(self, message: Message, commands: CommandBacklog | None) -> None:
        if message.kind == vfu.TYPE_REPLY:
            waiter = self._waiting.pop(message.msg_id, None)
            if waiter is not None:
                waiter.send_nowait(message)
                return
            message.close_fds()
            if message.msg_id in self._given_up:
                self._given_up.discard(message.msg_id)  # late, already given up
                return
            # Answering would be worse: message IDs belong to the sender,
            # so an error reply could fail an unrelated request of its own.
            raise ProtocolViolation(f"reply {message.msg_id} to a request never sent")
        if commands is None:
            message.close_fds()
            raise ProtocolViolation("command on the twin socket")
        commands.put(message)

    async def _process_loop(self, commands: CommandBacklog, scope: trio.CancelScope) -> None:
        try:
            await self._process_commands(commands, scope)
        except ConnectionClosed as exc:  # a reply found the client gone
            log.info("session.closed", reason=str(exc) or "end of stream")
            self.ending = True
            scope.cancel()

    async def _process_commands(self, commands: CommandBacklog, scope: trio.CancelScope) -> None:
        faults = memory_faults()
        turns = self.device.turns
        while True:
            if self._ahead is None:
                try:
                    self._ahead = await commands.get()
                except trio.EndOfChannel:
                    return
            message: Message | None = self._ahead
            self._ahead = None
            self._processing = True
            try:
                # Commands and ring walks over unmapped memory (worker threads)
                # take turns (vfiouserd.turns). Commands already queued go in
                # the same turn, so a walk never sees a memory transaction
                # (unmap, then map again) half done.
                assert message is not None
                quiet = self._needs_quiet(message)
                async with turns.quiet() if quiet else turns.command():
                    while message is not None:
                        await self._process(message)
                        message = None
                        if quiet:
                            break
                        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                            self._ahead = commands.get_nowait()
                            if not self._needs_quiet(self._ahead):
                                message, self._ahead = self._ahead, None
            except BaseException:
                if message is not None:
                    message.close_fds()  # e.g. cancelled while waiting for its turn
                raise
            finally:
                self._processing = False
            if memory_faults() != faults:
                log.error("session.fatal", reason="the VMM truncated memory it shared with us")
                scope.cancel()
                return

    def _needs_quiet(self, message: Message) -> bool:
        """Commands that wait until no ring walk is under way: a migration
        step (the device must stop between requests), and an unmap of memory
        the daemon has mapped (the spec: no reference may outlive the reply)."""
        if message.command == Command.DEVICE_FEATURE:
            return True
        return message.command == Command.DMA_UNMAP and any(
            region.mapping is not None for region in self.device.memory.regions
        )

    async def _process(self, message: Message) -> None:
        try:
            name = Command(message.command).name
        except ValueError:
            name = f"unknown({message.command})"
        if log.is_tracing():
            log.trace(
                "request",
                command=name,
                msg_id=message.msg_id,
                size=len(message.payload),
                fds=len(message.fds),
            )
        try:
            reply = await self._handle(message)
        except Exception as exc:
            message.close_fds()
            if isinstance(exc, RequestError | DeviceAccessError):
                error, reason = exc.errno, str(exc)
            else:  # a bug in device code must not end the session
                log.exception("device.failed", command=name)
                error, reason = errno.EIO, f"device error: {exc!r}"
            log.warning(
                "request.failed", command=name, errno=errno.errorcode.get(error), reason=reason
            )
            if not message.no_reply:
                await self._send(
                    vfu.encode(message.msg_id, message.command, reply=True, error=error)
                )
            return
        except BaseException:
            message.close_fds()
            raise
        try:
            if not message.no_reply:
                await self._send(
                    vfu.encode(message.msg_id, message.command, reply.payload, reply=True),
                    reply.fds,
                )
        finally:
            close_fds(reply.fds or [])

    async def _handle(self, message: Message) -> Reply:
        if message.flags & ~vfu.FLAGS_KNOWN or message.is_error:
            raise RequestError(errno.EINVAL, f"flags {message.flags:#x} on a command")
        if message.kind != vfu.TYPE_COMMAND:
            raise RequestError(errno.EINVAL, f"message type {message.kind}")
        if message.command == Command.VERSION:
            raise RequestError(errno.EINVAL, "VERSION after negotiation")
        entry = self._handlers.get(message.command)
        if entry is None:
            raise RequestError(
                errno.EINVAL, f"command {message.command} is not a client-to-server command"
            )
        handler, max_fds = entry
        if max_fds is None:
            max_fds = self.max_fds_in
        if message.fds_truncated or len(message.fds) > max_fds:
            raise RequestError(errno.EINVAL, f"{len(message.fds)} fds, at most {max_fds}")
        try:
            return await handler(message)
        except (ConstructError, struct.error) as exc:
            raise RequestError(errno.EINVAL, f"malformed payload: {exc}") from exc

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _parse(message: Message, layout: object, what: str) -> object:
        size = layout.sizeof()  # type: ignore[attr-defined]
        if len(message.payload) < size:
            raise RequestError(errno.EINVAL, f"{what} payload of {len(message.payload)} bytes")
        return layout.parse(message.payload[:size])  # type: ignore[attr-defined]

    def _check_argsz(self, argsz: int, minimum: int, what: str) -> None:
        """argsz bounds the reply: at least the fixed structure, at most what
        one message may carry."""
        if argsz < minimum:
            raise RequestError(errno.EINVAL, f"{what} argsz {argsz} < {minimum}")
        if argsz > self.max_payload:
            raise RequestError(errno.EINVAL, f"{what} argsz {argsz} exceeds the message limit")

    def _region(self, index: int) -> tuple[int, Bar | None]:
        """(size, BAR) of a region; the config region has no BAR."""
        if index >= vfu.PCI_NUM_REGIONS:
            raise RequestError(errno.EINVAL, f"region {index} does not exist")
        if index == vfu.PciRegion.CONFIG:
            return self.device.config.size, None
        bar = self.device.bars.get(index) if index <= vfu.PciRegion.BAR5 else None
        return (bar.size if bar else 0), bar

    # -- DMA ----------------------------------------------------------------------------

    async def _dma_map(self, message: Message) -> Reply:
        reply = await self._map_dma(message)
        self.device.memory_changed()
        return reply

    async def _dma_unmap(self, message: Message) -> Reply:
        reply = await self._unmap_dma(message)
        self.device.memory_changed()
        return reply

    async def _map_dma(self, message: Message) -> Reply:
        request = self._parse(message, vfu.DmaMap, "DMA_MAP")
        # Here argsz is the size of the request structure itself.
        if request.argsz != vfu.DmaMap.sizeof() or len(message.payload) != request.argsz:
            raise RequestError(
                errno.EINVAL,
                f"DMA_MAP argsz {request.argsz} with a {len(message.payload)}-byte payload",
            )
        if request.flags & ~vfu.DMA_FLAGS_KNOWN:
            raise RequestError(errno.EINVAL, f"DMA_MAP flags {request.flags:#x}")
        if request.size == 0 or (request.address | request.size) % self.page_size:
            raise RequestError(
                errno.EINVAL,
                f"DMA region {request.address:#x}+{request.size:#x} is empty or not page aligned",
            )
        if request.address + request.size > 1 << 64:
            raise RequestError(errno.EINVAL, "DMA region wraps around 2^64")
        fd = message.fds[0] if message.fds else None
        spec = RegionSpec(
            request.address,
            request.size,
            fd,
            file_offset=request.offset if fd is not None else 0,
            readable=bool(request.flags & vfu.DmaFlag.READ),
            writable=bool(request.flags & vfu.DmaFlag.WRITE),
        )
        memory = self.device.memory
        if any(
            r.guest_address < request.address + request.size and request.address < r.guest_end
            for r in memory.regions
        ):
            raise RequestError(
                errno.EEXIST,
                f"DMA region {request.address:#x}+{request.size:#x} overlaps a mapping",
            )
        if len(memory.regions) >= self.config.max_dma_maps:
            raise RequestError(errno.ENOSPC, f"all {self.config.max_dma_maps} DMA maps used")
        try:
            memory.add_region(spec)
        except GuestMemoryError as exc:
            raise RequestError(errno.EINVAL, f"DMA region refused: {exc}") from exc
        message.fds.clear()  # owned by the mapping now
        log.debug(
            "dma.map",
            address=f"{request.address:#x}",
            size=request.size,
            mapped=fd is not None,
            flags=int(request.flags),
        )
        return Reply()

    async def _unmap_dma(self, message: Message) -> Reply:
        request = self._parse(message, vfu.DmaUnmap, "DMA_UNMAP")
        self._check_argsz(request.argsz, vfu.DmaUnmap.sizeof(), "DMA_UNMAP")
        memory = self.device.memory
        if request.flags == vfu.DMA_UNMAP_FLAG_ALL:
            if request.address or request.size:
                raise RequestError(errno.EINVAL, "unmap-all with an address or size")
            memory.clear()
        elif request.flags:
            raise RequestError(errno.EINVAL, f"DMA_UNMAP flags {request.flags:#x}")
        else:
            try:
                region = memory.find_exact(request.address, request.size)
            except GuestMemoryError as exc:
                raise RequestError(errno.ENOENT, str(exc)) from exc
            # Memory the daemon maps is unmapped only once no ring walk or
            # device work is under way (_needs_quiet): nothing of it is in
            # use. Memory reached through messages holds nothing of ours.
            memory.remove(region)
        log.debug(
            "dma.unmap",
            address=f"{request.address:#x}",
            size=request.size,
            flags=int(request.flags),
        )
        return Reply(message.payload[: vfu.DmaUnmap.sizeof()])

    # DMA_READ/DMA_WRITE layout: the spec's or QEMU's (protocol/vfio_user.py
    # says how they differ). Asked once per connection, before the first access.

    async def _learn_dma_layout(self) -> bool:
        # Two walks may ask at once: one probe, whose answer stands (a second
        # one, answered differently, used to overturn it mid-connection).
        async with self._layout_lock:
            memory = self.device.memory
            for _ in range(LAYOUT_PROBE_TRIES):
                if self.qemu_dma_layout is not None:
                    break
                # Asked about memory the client certainly serves: a refusal
                # must mean the layout, never a bad address (the first access
                # may be a guest's, anywhere; our fuzzer: a ring at the end
                # of a region made a QEMU client refuse, read as "spec", and
                # every DMA reply after it was misread).
                remote = [r for r in memory.regions if r.mapping is None]
                if not remote:
                    raise RemoteAccessError("no memory is reached through the client")
                region = next((r for r in remote if r.readable), remote[0])
                generation = memory.generation
                probe = vfu.DmaAccess.build(
                    {"address": region.guest_address, "count": vfu.DMA_LAYOUT_PROBE}
                )
                reply = await self._request(Command.DMA_READ, probe, refused_ok=True)
                if memory.generation != generation:
                    continue  # the region may be gone: its refusal tells nothing
                self.qemu_dma_layout = not reply.is_error
                log.info("dma.layout", layout="qemu" if self.qemu_dma_layout else "spec")
            if self.qemu_dma_layout is None:
                raise RemoteAccessError("client memory changed during every layout probe")
            return self.qemu_dma_layout

    async def dma_read(self, address: int, size: int) -> bytes:
        """Read client memory that has no fd, through DMA_READ requests."""
        layout, pad = vfu.dma_access_layout(await self._learn_dma_layout())
        data_at = layout.sizeof()
        chunks = []
        limit = self._dma_chunk
        for offset in range(0, size, limit):
            count = min(limit, size - offset)
            reply = await self._request(
                Command.DMA_READ, vfu.DmaAccess.build({"address": address + offset, "count": count})
            )
            if len(reply.payload) != data_at + count + pad:
                raise RemoteAccessError(f"DMA_READ reply of {len(reply.payload)} bytes for {count}")
            chunks.append(reply.payload[data_at : data_at + count])
        return b"".join(chunks)

    async def dma_write(self, address: int, data: bytes) -> None:
        layout, pad = vfu.dma_access_layout(await self._learn_dma_layout())
        limit = self._dma_chunk
        for offset in range(0, len(data), limit):
            chunk = data[offset : offset + limit]
            reply = await self._request(
                Command.DMA_WRITE,
                layout.build({"address": address + offset, "count": len(chunk)})
                + chunk
                + bytes(pad),
            )
            if len(reply.payload) > 16:
                raise RemoteAccessError(f"DMA_WRITE reply of {len(reply.payload)} bytes")

    @property
    def _dma_chunk(self) -> int:
        # The client takes at most its max_data_xfer_size per transfer, and a
        # DMA_READ reply must fit in a message we accept.
        return min(self.client.max_data_xfer_size, self.config.max_data_xfer_size)

    async def _request(self, command: Command, payload: bytes, refused_ok: bool = False) -> Message:
        self._next_msg_id = (self._next_msg_id + 1) & 0xFFFF
        msg_id = self._next_msg_id
        send, receive = trio.open_memory_channel[Message](1)
        self._waiting[msg_id] = send
        self._commands.poke()  # the reader must not wait for room now
        try:
            try:
                await self._send(vfu.encode(msg_id, command, payload), twin=True)
            except ConnectionClosed as exc:
                raise RemoteAccessError(f"connection lost before {command.name}") from exc
            with trio.fail_after(DMA_REPLY_TIMEOUT):
                try:
                    reply = await receive.receive()
                except trio.EndOfChannel:
                    raise RemoteAccessError(f"connection lost during {command.name}") from None
        except trio.TooSlowError as exc:
            raise RemoteAccessError(f"{command.name} got no reply") from exc
        finally:
            # Given up (timed out, or the walk was cancelled by a reset or a
            # stop) before the reply came: it may still come, and is dropped.
            if self._waiting.pop(msg_id, None) is not None and not self.ending:
                self._given_up.add(msg_id)
            self._changes.notify()
        reply.close_fds()
        if reply.command != command or (reply.is_error and not refused_ok):
            raise RemoteAccessError(f"{command.name} failed: errno {reply.error}")
        return reply

    # -- device information ---------------------------------------------------------------

    async def _get_info(self, message: Message) -> Reply:
        request = self._parse(message, vfu.DeviceInfo, "GET_INFO")
        self._check_argsz(request.argsz, vfu.DeviceInfo.sizeof(), "GET_INFO")
        return Reply(
            vfu.DeviceInfo.build(
                {
                    "argsz": vfu.DeviceInfo.sizeof(),
                    "flags": vfu.DeviceFlag.RESET | vfu.DeviceFlag.PCI,
                    "num_regions": vfu.PCI_NUM_REGIONS,
                    "num_irqs": vfu.PCI_NUM_IRQS,
                }
            )
        )

    async def _get_region_info(self, message: Message) -> Reply:
        request = self._parse(message, vfu.RegionInfo, "GET_REGION_INFO")
        self._check_argsz(request.argsz, vfu.RegionInfo.sizeof(), "GET_REGION_INFO")
        size, bar = self._region(request.index)
        flags = vfu.RegionFlag.READ | vfu.RegionFlag.WRITE if size else 0
        caps = b""
        fds: list[int] = []
        if bar is not None and bar.fd is not None:
            flags |= vfu.RegionFlag.MMAP
            if bar.mmap_areas is not None:
                flags |= vfu.RegionFlag.CAPS
                caps = vfu.SparseMmapCap.build(
                    {
                        "header": {"id": vfu.REGION_CAP_SPARSE_MMAP, "version": 1, "next": 0},
                        "nr_areas": len(bar.mmap_areas),
                        "areas": [{"offset": o, "size": s} for o, s in bar.mmap_areas],
                    }
                )
        needed = vfu.RegionInfo.sizeof() + len(caps)
        fits = request.argsz >= needed
        if caps and not fits:  # CAPS only with the chain: QEMU checks cap_offset then
            flags &= ~int(vfu.RegionFlag.CAPS)
        if flags & vfu.RegionFlag.MMAP and fits:
            fds = [os.dup(bar.fd)]  # type: ignore[union-attr]
        info = vfu.RegionInfo.build(
            {
                "argsz": needed,
                "flags": flags,
                "index": request.index,
                "cap_offset": vfu.RegionInfo.sizeof() if caps and fits else 0,
                "size": size,
                "offset": 0,
            }
        )
        return Reply(info + (caps if fits else b""), fds)

    async def _get_region_io_fds(self, message: Message) -> Reply:
        request = self._parse(message, vfu.RegionIoFds, "GET_REGION_IO_FDS")
        self._check_argsz(request.argsz, vfu.RegionIoFds.sizeof(), "GET_REGION_IO_FDS")
        if request.flags or request.count:
            raise RequestError(errno.EINVAL, "GET_REGION_IO_FDS flags and count must be 0")
        size, bar = self._region(request.index)
        if bar is None or not size:
            raise RequestError(errno.EINVAL, f"region {request.index} has no I/O fds")
        # As many as one message may carry: the rest of the region stays
        # trapped (REGION_WRITE), which works the same, only slower.
        subregions = self.device.io_eventfds(request.index)[: self.client.max_msg_fds]
        entries = b"".join(
            vfu.SubRegionIoFd.build(
                {
                    "offset": offset,
                    "size": length,
                    "fd_index": i,
                    "type": vfu.IoFdType.IOEVENTFD,
                    "flags": 0,
                    "datamatch": 0,
                }
            )
            for i, (offset, length, _) in enumerate(subregions)
        )
        needed = vfu.RegionIoFds.sizeof() + len(entries)
        fits = request.argsz >= needed
        header = vfu.RegionIoFds.build(
            {"argsz": needed, "flags": 0, "index": request.index, "count": len(subregions)}
        )
        if not fits:
            return Reply(header)
        return Reply(header + entries, [os.dup(fd) for _, _, fd in subregions])

    async def _get_irq_info(self, message: Message) -> Reply:
        request = self._parse(message, vfu.IrqInfo, "GET_IRQ_INFO")
        self._check_argsz(request.argsz, vfu.IrqInfo.sizeof(), "GET_IRQ_INFO")
        if request.index >= vfu.PCI_NUM_IRQS:
            raise RequestError(errno.EINVAL, f"IRQ index {request.index} does not exist")
        kind = IrqKind(request.index)
        flags = vfu.IrqInfoFlag.EVENTFD  # MSI/MSI-X vectors can be set one by one
        if kind is IrqKind.INTX:
            flags |= vfu.IrqInfoFlag.MASKABLE | vfu.IrqInfoFlag.AUTOMASKED
        return Reply(
            vfu.IrqInfo.build(
                {
                    "argsz": vfu.IrqInfo.sizeof(),
                    "flags": flags,
                    "index": request.index,
                    "count": self.irqs.lines[kind].count,
                }
            )
        )

    async def _set_irqs(self, message: Message) -> Reply:
        head = self._parse(message, vfu.IrqSetHead, "SET_IRQS")
        data = message.payload[vfu.IrqSetHead.sizeof() :]
        # argsz covers the request: header and bool data (clients differ on
        # whether eventfds count, as the kernel's int array does).
        size = vfu.IrqSetHead.sizeof() + len(data)
        if not size <= head.argsz <= size + 4 * head.count:
            raise RequestError(
                errno.EINVAL, f"SET_IRQS argsz {head.argsz} for a {size}-byte request"
            )
        kind_flags = head.flags & vfu.IRQ_SET_DATA_MASK
        action = head.flags & vfu.IRQ_SET_ACTION_MASK
        if (
            head.flags & ~(vfu.IRQ_SET_DATA_MASK | vfu.IRQ_SET_ACTION_MASK)
            or kind_flags.bit_count() != 1
            or action.bit_count() != 1
        ):
            raise RequestError(errno.EINVAL, f"SET_IRQS flags {head.flags:#x}")
        if head.index >= vfu.PCI_NUM_IRQS:
            raise RequestError(errno.EINVAL, f"IRQ index {head.index} does not exist")
        if message.fds and kind_flags != vfu.IrqSetFlag.DATA_EVENTFD:
            raise RequestError(errno.EINVAL, "fds without DATA_EVENTFD")
        kind = IrqKind(head.index)
        irqs = self.irqs
        lines = irqs.lines[kind]
        if lines.count == 0:
            raise RequestError(errno.EINVAL, f"device has no {kind.name} interrupts")
        if head.count == 0:
            if not (
                kind_flags == vfu.IrqSetFlag.DATA_NONE
                and action == vfu.IrqSetFlag.ACTION_TRIGGER
                and head.start == 0
            ):
                raise RequestError(errno.EINVAL, "count 0 is only 'disable all'")
            lines.close()
            log.debug("irq.disable", kind=kind.name)
            return Reply()
        if head.start >= lines.count or head.start + head.count > lines.count:
            raise RequestError(
                errno.EINVAL, f"vectors {head.start}+{head.count} beyond {lines.count}"
            )
        vectors = range(head.start, head.start + head.count)
        if kind_flags == vfu.IrqSetFlag.DATA_BOOL:
            if len(data) != head.count or head.argsz < vfu.IrqSetHead.sizeof() + head.count:
                raise RequestError(errno.EINVAL, f"{len(data)} bool bytes for {head.count}")
            selected = [v for v, flag in zip(vectors, data, strict=True) if flag]
        elif data:
            raise RequestError(errno.EINVAL, "data with DATA_NONE or DATA_EVENTFD")
        else:
            selected = list(vectors)
        if kind_flags == vfu.IrqSetFlag.DATA_EVENTFD and action == vfu.IrqSetFlag.ACTION_UNMASK:
            if kind is not IrqKind.INTX or len(message.fds) > 1:
                raise RequestError(errno.EINVAL, "an unmask eventfd is for INTx only")
            if message.fds and not is_eventfd_like(message.fds[0]):
                raise RequestError(errno.EINVAL, "the unmask fd is not an eventfd")
            self._watch_intx_unmask(message.fds.pop() if message.fds else None)
            return Reply()
        if kind_flags == vfu.IrqSetFlag.DATA_EVENTFD:
            if action != vfu.IrqSetFlag.ACTION_TRIGGER:
                raise RequestError(errno.EINVAL, "eventfds are only for TRIGGER and UNMASK")
            if message.fds and len(message.fds) != head.count:
                raise RequestError(errno.EINVAL, f"{len(message.fds)} fds for {head.count} vectors")
            if not all(is_eventfd_like(fd) for fd in message.fds):
                raise RequestError(errno.EINVAL, "an IRQ fd is not an eventfd")
            for fd in message.fds:
                os.set_blocking(fd, False)
            if message.fds:
                others = [
                    other
                    for other, other_lines in irqs.lines.items()
                    if other is not kind and other_lines.enabled
                ]
                if others:
                    raise RequestError(errno.EINVAL, f"{others[0].name} interrupts are in use")
            for vector, fd in zip(vectors, message.fds or [None] * head.count, strict=True):
                lines.set_eventfd(vector, fd)
            message.fds.clear()
            log.debug(
                "irq.eventfds",
                kind=kind.name,
                start=head.start,
                count=head.count,
                assigned=any(fd is not None for fd in lines.eventfds),
            )
            return Reply()
        if action == vfu.IrqSetFlag.ACTION_TRIGGER:
            for vector in selected:
                irqs.fire(kind, vector)  # INTx too: one shot, then automasked
            return Reply()
        if kind is not IrqKind.INTX:
            raise RequestError(errno.EINVAL, f"{kind.name} vectors are masked by the client")
        for vector in selected:
            if action == vfu.IrqSetFlag.ACTION_MASK:
                irqs.mask(kind, vector)
            else:
                irqs.unmask(kind, vector)
        return Reply()

    def _watch_intx_unmask(self, fd: int | None) -> None:
        """The VMM signals ``fd`` when the guest ends the interrupt (KVM's
        resampling irqfd): unmask INTx then. ``None`` stops watching."""
        if self._intx_unmask_scope is not None:
            self._intx_unmask_scope.cancel()
            self._intx_unmask_scope = None
        self._intx_unmask_fd = fd
        if fd is None:
            return
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._intx_unmask_scope = scope

        async def watch() -> None:
            try:
                with scope:
                    while True:
                        await trio.lowlevel.wait_readable(fd)
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(fd)
                        self.irqs.unmask(IrqKind.INTX, 0)
            except OSError as exc:
                log.warning("intx.unmask_fd_failed", error=str(exc))
            finally:
                if not self._parked:  # a parked session hands it over
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)
                    if self._intx_unmask_fd == fd:
                        self._intx_unmask_fd = None

        os.set_blocking(fd, False)
        self._nursery.start_soon(watch)

    # -- region access ------------------------------------------------------------------

    def _check_access(self, index: int, offset: int, count: int) -> Bar | None:
        size, bar = self._region(index)
        if count > self.config.max_data_xfer_size:
            raise RequestError(errno.EINVAL, f"access of {count} bytes exceeds max_data_xfer_size")
        if offset + count > size:
            raise RequestError(
                errno.EINVAL, f"access {offset:#x}+{count} beyond region {index} of {size:#x} bytes"
            )
        return bar

    async def _access(self, index: int, offset: int, data: bytes | None, count: int) -> bytes:
        self._check_access(index, offset, count)
        if count == 0:  # nothing to do (libvfio-user answers it the same way)
            return b""
        if index == vfu.PciRegion.CONFIG:
            if data is None:
                return await self.device.config_read(offset, count)
            await self.device.config_write(offset, data)
            return b""
        if data is None:
            value = await self.device.bar_read(index, offset, count)
            if len(value) != count:
                raise DeviceAccessError(errno.EIO, f"device returned {len(value)} bytes")
            return value
        await self.device.bar_write(index, offset, data)
        return b""

    async def _region_read(self, message: Message) -> Reply:
        request = self._parse(message, vfu.RegionAccess, "REGION_READ")
        if len(message.payload) != vfu.RegionAccess.sizeof():
            raise RequestError(errno.EINVAL, "REGION_READ with data")
        data = await self._access(request.region, request.offset, None, request.count)
        return Reply(message.payload[: vfu.RegionAccess.sizeof()] + data)

    async def _region_write(self, message: Message) -> Reply:
        request = self._parse(message, vfu.RegionAccess, "REGION_WRITE")
        data = message.payload[vfu.RegionAccess.sizeof() :]
        if len(data) != request.count:
            raise RequestError(
                errno.EINVAL, f"REGION_WRITE count {request.count} with {len(data)} bytes of data"
            )
        await self._access(request.region, request.offset, data, request.count)
        return Reply(message.payload[: vfu.RegionAccess.sizeof()])

    async def _region_write_multi(self, message: Message) -> Reply:
        if not self.client.write_multiple:
            raise RequestError(errno.EINVAL, "write_multiple was not negotiated")
        head = self._parse(message, vfu.WriteMultiHead, "REGION_WRITE_MULTI")
        entry_size = vfu.WriteMultiEntry.sizeof()
        if not 1 <= head.wr_cnt <= vfu.WRITE_MULTI_MAX or (
            len(message.payload) != 8 + head.wr_cnt * entry_size
        ):
            raise RequestError(
                errno.EINVAL, f"{head.wr_cnt} writes in {len(message.payload)} bytes"
            )
        entries = [
            vfu.WriteMultiEntry.parse(message.payload[8 + i * entry_size :])
            for i in range(head.wr_cnt)
        ]
        if any(not 1 <= e.count <= 8 for e in entries):
            raise RequestError(errno.EINVAL, "a coalesced write is not 1-8 bytes")
        for entry in entries:  # in order, as separate writes would be
            await self._access(entry.region, entry.offset, entry.data[: entry.count], entry.count)
        return Reply(vfu.WriteMultiHead.build({"wr_cnt": head.wr_cnt}))

    async def _reset(self, message: Message) -> Reply:
        if message.payload:
            raise RequestError(errno.EINVAL, "DEVICE_RESET takes no payload")
        self.device.reset()
        self.migration.reset()
        log.info("device.reset")
        return Reply()

    # -- migration ----------------------------------------------------------------------

    # What each feature allows besides PROBE.
    FEATURE_OPERATIONS: ClassVar[dict[int, int]] = {
        vfu.DeviceFeature.MIGRATION: vfu.FEATURE_GET,
        vfu.DeviceFeature.MIG_DEVICE_STATE: vfu.FEATURE_GET | vfu.FEATURE_SET,
        vfu.DeviceFeature.DMA_LOGGING_START: vfu.FEATURE_SET,
        vfu.DeviceFeature.DMA_LOGGING_STOP: vfu.FEATURE_SET,
        vfu.DeviceFeature.DMA_LOGGING_REPORT: vfu.FEATURE_GET,
    }

    async def _device_feature(self, message: Message) -> Reply:
        head_size = vfu.DeviceFeatureHead.sizeof()
        head = self._parse(message, vfu.DeviceFeatureHead, "DEVICE_FEATURE")
        self._check_argsz(head.argsz, head_size, "DEVICE_FEATURE")
        index = head.flags & vfu.FEATURE_INDEX_MASK
        operations = head.flags & (vfu.FEATURE_GET | vfu.FEATURE_SET | vfu.FEATURE_PROBE)
        if head.flags & ~(vfu.FEATURE_INDEX_MASK | operations):
            raise RequestError(errno.EINVAL, f"unknown DEVICE_FEATURE flags {head.flags:#x}")
        allowed = self.FEATURE_OPERATIONS.get(index)
        if allowed is None:
            # What the kernel answers for a feature it does not have.
            raise RequestError(errno.ENOTTY, f"device feature {index} is not supported")
        wanted = operations & ~vfu.FEATURE_PROBE
        if wanted & ~allowed or (
            wanted == vfu.FEATURE_GET | vfu.FEATURE_SET and not (operations & vfu.FEATURE_PROBE)
        ):
            raise RequestError(errno.EINVAL, f"feature {index} does not allow {operations:#x}")
        if operations & vfu.FEATURE_PROBE:
            return Reply(bytes(message.payload))  # supported: the request comes back
        if wanted == 0:
            raise RequestError(errno.EINVAL, "DEVICE_FEATURE without GET, SET or PROBE")
        data = message.payload[head_size:]
        try:
            if index == vfu.DeviceFeature.MIGRATION:
                flags = vfu.MigrationFlag.STOP_COPY | vfu.MigrationFlag.PRE_COPY
                return self._feature_reply(head, vfu.MigrationInfo.build({"flags": flags}))
            if index == vfu.DeviceFeature.MIG_DEVICE_STATE:
                if wanted == vfu.FEATURE_GET:
                    current = {"device_state": self.migration.state, "data_fd": 0}
                    return self._feature_reply(head, vfu.MigDeviceState.build(current))
                request = self._parse_data(data, vfu.MigDeviceState, "MIG_DEVICE_STATE")
                self.migration.set_state(request.device_state)
                return Reply(bytes(message.payload))
            if index == vfu.DeviceFeature.DMA_LOGGING_START:
                self._dma_logging_start(data)
                return Reply(bytes(message.payload))
            if index == vfu.DeviceFeature.DMA_LOGGING_STOP:
                self.device.memory.dirty = None
                self.dirty = None
                log.info("dma_logging.stop")
                return Reply(bytes(message.payload))
            return self._dma_logging_report(head, data)
        except MigrationError as exc:
            raise RequestError(exc.errno, str(exc)) from exc

    def _feature_reply(self, head: Container, data: bytes) -> Reply:
        size = vfu.DeviceFeatureHead.sizeof() + len(data)
        self._check_argsz(head.argsz, size, "DEVICE_FEATURE")
        return Reply(vfu.DeviceFeatureHead.build({"argsz": size, "flags": head.flags}) + data)

    @staticmethod
    def _parse_data(data: bytes, layout: Construct, what: str) -> Container:
        if len(data) < layout.sizeof():
            raise RequestError(errno.EINVAL, f"{what}: {len(data)} bytes of data")
        return layout.parse(data)

    def _dma_logging_start(self, data: bytes) -> None:
        control = self._parse_data(data, vfu.DmaLoggingControl, "DMA_LOGGING_START")
        page_size = control.page_size
        if page_size < 4096 or page_size & (page_size - 1):
            raise RequestError(errno.EINVAL, f"page size {page_size}")
        table = data[vfu.DmaLoggingControl.sizeof() :]
        entry = vfu.DmaLoggingRange.sizeof()
        if len(table) != control.num_ranges * entry:
            raise RequestError(errno.EINVAL, f"{control.num_ranges} ranges, {len(table)} bytes")
        ranges = [
            (r.iova, r.length)
            for r in (
                vfu.DmaLoggingRange.parse(table[i * entry :]) for i in range(control.num_ranges)
            )
        ]
        for iova, length in ranges:
            if length == 0 or iova % page_size or length % page_size:
                raise RequestError(errno.EINVAL, f"range {iova:#x}+{length:#x}")
        ranges = logged_ranges(self.device.memory, ranges)
        ordered = sorted(ranges)
        for (start_a, size_a), (start_b, _) in itertools.pairwise(ordered):
            if start_a + size_a > start_b:
                raise RequestError(errno.EINVAL, "overlapping ranges")
        if self.dirty is not None and self.dirty.page_size != page_size:
            raise RequestError(errno.EINVAL, "logging already runs with another page size")
        self.dirty = DirtyBitmaps(page_size, ranges)
        self.device.memory.dirty = self.dirty
        log.info("dma_logging.start", page_size=page_size, ranges=len(ranges))

    def _dma_logging_report(self, head: Container, data: bytes) -> Reply:
        request = self._parse_data(data, vfu.DmaLoggingReport, "DMA_LOGGING_REPORT")
        if self.dirty is None:
            raise RequestError(errno.EINVAL, "DMA logging was not started")
        page_size, length = request.page_size, request.length
        if page_size == 0 or page_size & (page_size - 1) or length == 0 or page_size > length:
            raise RequestError(errno.EINVAL, f"report of {length} bytes in pages of {page_size}")
        pages = (length + page_size - 1) // page_size
        bitmap_size = (pages + 63) // 64 * 8
        if bitmap_size > self._dma_chunk:  # the reply must fit a message
            raise RequestError(
                errno.E2BIG, f"a bitmap of {bitmap_size} bytes: report at most {self._dma_chunk}"
            )
        self._check_argsz(
            head.argsz,
            vfu.DeviceFeatureHead.sizeof() + vfu.DmaLoggingReport.sizeof() + bitmap_size,
            "DMA_LOGGING_REPORT",
        )
        bitmap = self.dirty.report(request.iova, length, page_size)
        return self._feature_reply(head, vfu.DmaLoggingReport.build(request) + bitmap)

    async def _mig_data(self, message: Message) -> Reply:
        head = self._parse(message, vfu.MigDataHead, "MIG_DATA")
        size = vfu.MigDataHead.sizeof()
        # Data travels to the client on reads, to us on writes: each side's limit.
        reading = message.command == Command.MIG_DATA_READ
        limit = self.client.max_data_xfer_size if reading else self.config.max_data_xfer_size
        if head.size > limit:
            raise RequestError(errno.EINVAL, f"{head.size} bytes exceed transfers of {limit}")
        self._check_argsz(head.argsz, size + head.size, "MIG_DATA")
        try:
            if message.command == Command.MIG_DATA_READ:
                data = self.migration.read(head.size)
                return Reply(
                    vfu.MigDataHead.build({"argsz": size + len(data), "size": len(data)}) + data
                )
            if len(message.payload) != size + head.size:
                raise RequestError(
                    errno.EINVAL, f"{len(message.payload) - size} bytes for a size of {head.size}"
                )
            self.migration.write(message.payload[size:])
            return Reply()
        except MigrationError as exc:
            raise RequestError(exc.errno, str(exc)) from exc
