"""The sockets of one vfio-user connection: sending, reading, and our own
requests to the client (DMA_READ/DMA_WRITE) waiting for their replies.

A reader per socket keeps it drained and never waits for the device: a
reply a ring walk waits for comes behind whatever the client pipelined.
Replies go to the request waiting for them; commands go to a backlog the
session processes in order. With twin-socket mode our requests and their
replies use their own socket.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from vfiouserd.changes import Changes
from vfiouserd.log import get_logger
from vfiouserd.memory import RemoteAccessError
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.trace import tracer
from vfiouserd.vfio_user.backlog import BacklogOverflow, CommandBacklog
from vfiouserd.vfio_user.messages import ProtocolViolation

log = get_logger("vfio_user")

# Pipelined commands read ahead while one is processed: past the first
# number the reader waits, unless the device waits for a reply from the
# client; past the others the client is broken (see backlog.py).
COMMAND_QUEUE = 256
COMMAND_BACKLOG_LIMIT = 4096
COMMAND_BACKLOG_BYTES = 64 << 20
DMA_REPLY_TIMEOUT = 10.0


class Channel:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        max_payload: int,
        changes: Changes,
        ending: Callable[[], bool],
    ) -> None:
        self.sock = sock
        self.twin: trio.socket.SocketType | None = None
        self.max_payload = max_payload
        self.commands = CommandBacklog(COMMAND_QUEUE, COMMAND_BACKLOG_LIMIT, COMMAND_BACKLOG_BYTES)
        self.next_msg_id = 0
        # The session's: what a handover's pause waits for changed; is it over.
        self._changes = changes
        self._ending = ending
        self._send_lock = trio.Lock()
        self._twin_send_lock = trio.Lock()
        self._waiting: dict[int, trio.MemorySendChannel[Message]] = {}
        self._given_up: set[int] = set()  # our requests whose replies may come late
        self._readers_idle: dict[trio.socket.SocketType, bool] = {}

    @property
    def awaiting_replies(self) -> bool:
        return bool(self._waiting)

    @property
    def idle(self) -> bool:
        """Readers waiting between messages, no command queued, no request
        of ours waiting for its reply."""
        return all(self._readers_idle.values()) and not self._waiting and not self.commands

    async def send(self, data: bytes, fds: list[int] | None = None, *, twin: bool = False) -> None:
        sock = self.twin if twin and self.twin is not None else self.sock
        lock = self._twin_send_lock if sock is self.twin else self._send_lock
        async with lock:
            if tracer.wants("message"):
                trace_message("out", data, len(fds or []))
            await vfu.write_message(sock, data, fds)

    async def read_loop(
        self,
        sock: trio.socket.SocketType,
        commands: CommandBacklog | None,
        parked: Callable[[], bool],
    ) -> bool:
        """Route replies to the requests waiting for them; queue commands
        (none may come when ``commands`` is None). False once ``parked()``
        between messages; True when the connection is over, every request
        still waiting then failed."""
        try:
            while not parked():
                if commands is not None:
                    await commands.wait_for_room(lambda: bool(self._waiting))
                self._readers_idle[sock] = True  # a handover may park the session now
                self._changes.notify()
                await trio.lowlevel.wait_readable(sock)
                if parked():
                    # Parked while this reader's wake-up was on its way: the
                    # message stays in the socket for the next daemon (read
                    # now, it would be lost with the backlog).
                    break
                self._readers_idle[sock] = False
                with trio.CancelScope(shield=True):  # never half a message
                    message = await vfu.read_message(sock, self.max_payload)
                if tracer.wants("message"):
                    trace_received(message)
                self._route(message, commands)
                self._changes.notify()  # a reply came, or a command is queued
            return False  # parked for a handover
        except ConnectionClosed as exc:
            log.info("session.closed", reason=str(exc) or "end of stream")
        except (FramingError, ProtocolViolation, BacklogOverflow) as exc:
            log.error("session.fatal", reason=str(exc))
        for waiter in self._waiting.values():  # no reply can come any more
            waiter.close()
        self._waiting.clear()
        return True

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

    async def request(self, command: Command, payload: bytes, refused_ok: bool = False) -> Message:
        """Send a request of ours and wait for its reply; RemoteAccessError
        if none comes, or an error comes unless ``refused_ok``."""
        self.next_msg_id = (self.next_msg_id + 1) & 0xFFFF
        msg_id = self.next_msg_id
        send, receive = trio.open_memory_channel[Message](1)
        self._waiting[msg_id] = send
        self.commands.poke()  # the reader must not wait for room now
        try:
            try:
                await self.send(vfu.encode(msg_id, command, payload), twin=True)
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
            if self._waiting.pop(msg_id, None) is not None and not self._ending():
                self._given_up.add(msg_id)
            self._changes.notify()
        reply.close_fds()
        if reply.command != command or (reply.is_error and not refused_ok):
            raise RemoteAccessError(f"{command.name} failed: errno {reply.error}")
        return reply

    def close(self) -> None:
        self.sock.close()
        if self.twin is not None:
            self.twin.close()


def trace_message(direction: str, data: bytes, fds: int) -> None:
    tracer.emit("message", direction, protocol="vfio-user", **vfu.describe(data, fds))


def trace_received(message: Message) -> None:
    header = vfu.Header.build(
        {
            "msg_id": message.msg_id,
            "command": message.command,
            "msg_size": vfu.HEADER_SIZE + len(message.payload),
            "flags": message.flags,
            "error": message.error,
        }
    )
    trace_message("in", header + message.payload, len(message.fds))
