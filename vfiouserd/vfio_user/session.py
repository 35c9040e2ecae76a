"""A vfio-user server session: one client connection to one PCI device.

Negotiation first (VERSION, or the connection closes), then commands are
processed strictly in the order they arrive while the channel's readers
keep the sockets drained, so a server-to-client DMA_READ/DMA_WRITE waiting
for its reply never deadlocks with the client's own requests.

Every field is checked: a bad request gets a header-only error reply with an
errno (or, with No_reply, a log line); a header that cannot be trusted closes
the connection. Extra fds are closed.

The session keeps the connection, the command table and the lifecycle
(serve, pause for a handover, close); the commands are handled in
dma.py, regions.py, irq_commands.py and migration_commands.py, the
sockets are channel.py's, and handover.py writes and reads the record.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from typing import Any

import trio
from construct import ConstructError

from vfiouserd import handover
from vfiouserd.changes import Changes, Watched
from vfiouserd.devices.pci import DeviceAccessError, PciDevice
from vfiouserd.handover import FdNames, Received
from vfiouserd.log import get_logger
from vfiouserd.memory import memory_faults
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError, close_fds
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.trace import tracer
from vfiouserd.vfio_user import handover as session_handover
from vfiouserd.vfio_user.backlog import CommandBacklog
from vfiouserd.vfio_user.channel import Channel, trace_received
from vfiouserd.vfio_user.dma import Dma, ThreadedRemote
from vfiouserd.vfio_user.interrupts import Interrupts
from vfiouserd.vfio_user.irq_commands import IrqCommands
from vfiouserd.vfio_user.messages import Handler, ProtocolViolation, Reply, RequestError
from vfiouserd.vfio_user.migration import Migration
from vfiouserd.vfio_user.migration_commands import MigrationCommands
from vfiouserd.vfio_user.negotiation import ServerConfig, Terms
from vfiouserd.vfio_user.regions import Regions

__all__ = [
    "ProtocolViolation",
    "Reply",
    "RequestError",
    "ServerConfig",
    "ThreadedRemote",
    "VfioUserSession",
]

log = get_logger("vfio_user")

NEGOTIATION_TIMEOUT = 10.0  # an idle peer must not hold the device from its VMM


class VfioUserSession:
    # What a handover's pause waits on: each assignment wakes it.
    _processing = Watched[bool]()
    _ahead = Watched["Message | None"]()
    ending = Watched[bool]()

    def __init__(
        self, device: PciDevice, sock: trio.socket.SocketType, config: ServerConfig | None = None
    ) -> None:
        self.device = device
        self.terms = Terms(config or ServerConfig())
        # Handover: readers park between messages once nothing is under way.
        self.restored = False
        # What a pause waits for (``_quiescent``) changed: each change wakes it.
        self._changes = Changes()
        self._processing = False
        self._ahead = None  # taken from the queue, not yet processed
        self._parked = False
        self.ending = False
        self._finished = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.channel = Channel(sock, self.terms.max_payload, self._changes, lambda: self.ending)
        self.device.memory.max_regions = self.terms.config.max_dma_maps
        self.migration = Migration.of(device)
        self.irqs = Interrupts.of(device)
        self.dma = Dma(device, self.terms, self.channel)
        self.regions = Regions(device, self.terms)
        self.irq_commands = IrqCommands(self.irqs, self.terms, lambda: self._parked)
        self.migration_commands = MigrationCommands(device, self.migration, self.terms)
        regions, migration = self.regions, self.migration_commands
        self._handlers: dict[int, tuple[Handler, int | None]] = {
            # command: (handler, most fds it may carry; None: what VERSION allowed)
            Command.DMA_MAP: (self.dma.map, 1),
            Command.DMA_UNMAP: (self.dma.unmap, 0),
            Command.DEVICE_GET_INFO: (regions.get_info, 0),
            Command.DEVICE_GET_REGION_INFO: (regions.get_region_info, 0),
            Command.DEVICE_GET_REGION_IO_FDS: (regions.get_io_fds, 0),
            Command.DEVICE_GET_IRQ_INFO: (self.irq_commands.get_info, 0),
            Command.DEVICE_SET_IRQS: (self.irq_commands.set_irqs, None),
            Command.REGION_READ: (regions.read, 0),
            Command.REGION_WRITE: (regions.write, 0),
            Command.DEVICE_RESET: (self._reset, 0),
            Command.REGION_WRITE_MULTI: (regions.write_multi, 0),
            Command.DEVICE_FEATURE: (migration.device_feature, 0),
            Command.MIG_DATA_READ: (migration.mig_data, 0),
            Command.MIG_DATA_WRITE: (migration.mig_data, 0),
        }

    # -- connection -------------------------------------------------------------

    async def serve(self) -> None:
        channel = self.channel
        try:
            if not self.restored:
                try:
                    with trio.fail_after(NEGOTIATION_TIMEOUT):
                        await self._negotiate()
                except trio.TooSlowError:
                    raise ProtocolViolation(
                        f"no VERSION within {NEGOTIATION_TIMEOUT:g} s of connecting"
                    ) from None
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.device.remote_dma = self.dma
                self.device.memory.remote = ThreadedRemote(self.dma)
                self.device.attach(nursery)
                self.irq_commands.start(nursery)
                commands = channel.commands
                nursery.start_soon(self._read_loop, channel.sock, commands, nursery.cancel_scope)
                if channel.twin is not None:
                    nursery.start_soon(self._read_loop, channel.twin, None, nursery.cancel_scope)
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
            channel.commands.discard()
            self.ending = self.ending or not self._parked
            self._finished.set()
            if self.ending:
                self.close()

    def close(self) -> None:
        self.device.memory.dirty = None  # the logging was this client's
        self.channel.close()
        self.irq_commands.close()
        self.device.detach()  # unmap client memory, close IRQ fds; device state stays
        self.device.remote_dma = None
        self.device.memory.remote = None

    async def _negotiate(self) -> None:
        message = await vfu.read_message(self.channel.sock, self.terms.max_payload)
        if tracer.wants("message"):
            trace_received(message)
        try:
            minor = self.terms.accept_version(message)
        except (ProtocolViolation, vfu.VersionError):
            # Say why before closing, when the client sent a command at all.
            if message.kind == vfu.TYPE_COMMAND and not message.no_reply:
                with contextlib.suppress(ConnectionClosed, OSError):
                    await self.channel.send(
                        vfu.encode(message.msg_id, message.command, reply=True, error=errno.EINVAL)
                    )
            raise
        finally:
            message.close_fds()
        await self._reply_version(message, minor)

    async def _reply_version(self, message: Message, minor: int) -> None:
        """Answer with what ``Terms.reply_capabilities`` offers, and a twin
        socket if asked."""
        reply_caps = self.terms.reply_capabilities()
        client = self.terms.client
        channel = self.channel
        fds: list[int] = []
        if client.twin_socket:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            channel.twin = trio.socket.from_stdlib_socket(ours)
            fds = [theirs.detach()]
            reply_caps["twin_socket"] = {"supported": True, "fd_index": 0}
        payload = vfu.VersionHead.build(
            {"major": vfu.MAJOR, "minor": minor}
        ) + vfu.encode_version_data(reply_caps)
        try:
            await channel.send(
                vfu.encode(message.msg_id, Command.VERSION, payload, reply=True), fds
            )
        finally:
            close_fds(fds)
        log.info(
            "negotiated",
            minor=minor,
            twin_socket=channel.twin is not None,
            page_size=self.terms.page_size,
            max_data_xfer=self.terms.config.max_data_xfer_size,
            client_max_fds=client.max_msg_fds,
            ignored=",".join(sorted(client.unknown)) or "-",
        )

    # -- handover (restart without disconnect) ------------------------------------------

    def _quiescent(self) -> bool:
        """Between messages everywhere: readers waiting, nothing queued or
        being processed, no request of ours waiting for its reply."""
        return self.channel.idle and not self._processing and self._ahead is None

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
        return session_handover.snapshot(self, names)

    @classmethod
    def restore(
        cls, device: PciDevice, document: dict[str, Any], received: Received
    ) -> VfioUserSession:
        """The session a previous daemon handed over (the device state is
        loaded already); HandoverError if it cannot be set up again."""
        return handover.restore(lambda sock: cls(device, sock), document, received, "vfio-user")

    def take_over(self, document: dict[str, Any], fd: handover.FdByName) -> None:
        """Set up what ``document`` describes, on the fds ``fd`` gives by name."""
        session_handover.take_over(self, document, fd)

    # -- commands -----------------------------------------------------------------------

    async def _read_loop(
        self,
        sock: trio.socket.SocketType,
        commands: CommandBacklog | None,
        scope: trio.CancelScope,
    ) -> None:
        if await self.channel.read_loop(sock, commands, lambda: self._parked):
            self.ending = True
            scope.cancel()

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
                await self.channel.send(
                    vfu.encode(message.msg_id, message.command, reply=True, error=error)
                )
            return
        except BaseException:
            message.close_fds()
            raise
        try:
            if not message.no_reply:
                await self.channel.send(
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
            max_fds = self.terms.max_fds_in
        if message.fds_truncated or len(message.fds) > max_fds:
            raise RequestError(errno.EINVAL, f"{len(message.fds)} fds, at most {max_fds}")
        try:
            return await handler(message)
        except (ConstructError, struct.error) as exc:
            raise RequestError(errno.EINVAL, f"malformed payload: {exc}") from exc

    async def _reset(self, message: Message) -> Reply:
        if message.payload:
            raise RequestError(errno.EINVAL, "DEVICE_RESET takes no payload")
        self.device.reset()
        self.migration.reset()
        log.info("device.reset")
        return Reply()
