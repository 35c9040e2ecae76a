"""The control socket: a live daemon's statistics, trace and fault rules,
for ``vfiouserd stats|top|trace|inject`` or any program.

Protocol 1: line-delimited JSON (one object per line, UTF-8), in the manner
of QMP. The daemon greets first::

    {"vfiouserd": {"version": "0.4", "protocol": 1, "device": "blk",
                   "transport": "vhost-user", "pid": 42, "commands": [...]}}

then answers each command, in order::

    -> {"execute": "stats", "arguments": {}, "id": 7}
    <- {"return": {...}, "id": 7}
    <- {"error": {"class": "CommandNotFound", "desc": "..."}, "id": 7}

and sends events whenever they happen::

    <- {"event": "TRACE", "data": {...}, "timestamp": {"seconds": s, "microseconds": us}}

Isolation: the control path runs in tasks of its own and never blocks the
device. Each client has a bounded queue: events it does not read in time
are dropped (oldest first) and counted in a TRACE_LOST event; a client that
does not read its replies is disconnected. Lines are at most MAX_LINE
bytes, and at most MAX_CLIENTS clients are served at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from vfiouserd import faults, stats, upgrade
from vfiouserd.log import get_logger
from vfiouserd.sockets import listen_on_path
from vfiouserd.trace import Filter, RateLimit, Subscription, tracer

log = get_logger("control")

PROTOCOL = 1
CONTROL_SUFFIX = ".control.sock"
MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
MAX_QUEUED = 4096  # events and replies waiting for one client
MAX_REPLIES = 256  # replies a client leaves unread before it is dropped
MAX_DATA_BYTES = 64  # bytes of DMA data a trace event may show
MAX_WRITE = 64 * 1024  # bytes of lines sent to a client at once
COMMANDS_PER_SECOND = 200  # a client's sustained rate (bursts as large): more waits
STALLED_TRACE = 10.0  # seconds a tracer may lose events without a break before it ends


def socket_path(explicit: str | None, vmm_address: object) -> str | None:
    """Where the control socket goes: as given; beside a VMM socket at a
    path (``NAME.sock`` -> ``NAME.control.sock``) in a directory the daemon
    may write; else ``control.sock`` in systemd's RUNTIME_DIRECTORY."""
    if explicit is not None:
        return explicit
    address = vmm_address  # the VMM socket's (its getsockname(), or a path)
    if isinstance(address, str) and address.startswith("/"):
        directory, name = os.path.split(address)
        if os.access(directory, os.W_OK):
            return os.path.join(directory, name.removesuffix(".sock") + CONTROL_SUFFIX)
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, "control.sock")
    return None


def listen(path: str) -> socket.socket:
    """The control socket at ``path``, for its owner only (mode 0600)."""
    old = os.umask(0o177)
    try:
        return listen_on_path(path)
    finally:
        os.umask(old)


class CommandError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class


Handler = Callable[["Client", dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    handler: Handler
    help: str


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "event": name,
        "data": data,
        "timestamp": {"seconds": int(now), "microseconds": int(now * 1e6) % 1_000_000},
    }


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


class Client:
    """One connection: reads commands, writes replies and events."""

    def __init__(self, server: ControlServer, sock: trio.socket.SocketType, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        self.replies: deque[bytes] = deque()
        self.events: deque[bytes] = deque()
        self.lost = 0  # events dropped since the last TRACE_LOST
        self.subscription: Subscription | None = None
        self._wakeup = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._closed = False
        self._sending = False  # lines taken from the queues, not all sent yet
        # Since when events have been lost without the client catching up.
        self._losing_since: float | None = None
        self._commands = RateLimit(COMMANDS_PER_SECOND)

    # -- outgoing -------------------------------------------------------------------

    def _wake(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._wakeup.set()
        else:  # an event from a ring's worker thread
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wakeup.set)

    def send_event(self, event: dict[str, Any]) -> None:
        """Queue an event; never blocks, drops the oldest event when full."""
        if self._closed:
            return
        line = _encode(event)
        with self._lock:
            if len(self.events) >= MAX_QUEUED:
                self.events.popleft()
                self.lost += 1
                if self._losing_since is None:
                    self._losing_since = time.monotonic()
            self.events.append(line)
        self._wake()

    def send_reply(self, reply: dict[str, Any]) -> None:
        self.replies.append(_encode(reply))
        self._wake()

    def _next_line(self) -> bytes | None:
        """Replies first, then events (a TRACE_LOST where some were dropped)."""
        if self.replies:
            return self.replies.popleft()
        with self._lock:
            if self.lost:
                lost, self.lost = self.lost, 0
                self._losing_since = None  # it reads again
                return _encode(_event("TRACE_LOST", {"count": lost}))
            return self.events.popleft() if self.events else None

    def _next_lines(self) -> bytes:
        """What waits, in order, up to about MAX_WRITE bytes: one send for
        many lines. (A line a send: a tracer reading as fast as it could
        would get one event per turn of the event loop, and lose the rest.)"""
        lines: list[bytes] = []
        size = 0
        while size < MAX_WRITE and (line := self._next_line()) is not None:
            lines.append(line)
            size += len(line)
        return b"".join(lines)

    async def _write_all(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while lines := self._next_lines():
                view = memoryview(lines)
                self._sending = True
                while view:
                    sent = await self.sock.send(view)
                    view = view[sent:]
                self._sending = False

    async def flushed(self) -> None:
        """Until every reply and event queued so far is sent."""
        while self.replies or self.events or self._sending:
            await trio.sleep(0.001)

    # -- incoming -------------------------------------------------------------------

    async def serve(self) -> None:
        greeting = {"vfiouserd": {**self.server.info, "commands": sorted(self.server.commands)}}
        self.send_reply(greeting)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._write_all, nursery.cancel_scope)
                nursery.start_soon(self._end_stalled_trace)
                await self._guarded(self._read_all, nursery.cancel_scope)
                # Let the last replies go out; a client that does not read
                # them does not hold the task.
                with trio.move_on_after(1):
                    while self.replies or self._sending:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self.stop_trace()
            self.sock.close()

    async def _end_stalled_trace(self) -> None:
        """A tracer that has lost every event for STALLED_TRACE seconds (it
        stopped reading, or cannot keep up at all) is detached: while it is
        attached the rings stay off the native fast path."""
        while True:
            await trio.sleep(1)
            since = self._losing_since
            if self.subscription is None or since is None:
                continue
            if time.monotonic() - since >= STALLED_TRACE:
                self.stop_trace()
                self._losing_since = None
                log.warning("control.trace_stalled", client=self.number, seconds=STALLED_TRACE)
                self.send_event(_event("TRACE_STOPPED", {"reason": "events lost for too long"}))

    async def _guarded(self, part: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Reading or writing: a connection error ends this client only."""
        try:
            await part()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(
                "control.client_lost", client=self.number, reason=str(exc) or type(exc).__name__
            )
            scope.cancel()

    async def _read_all(self) -> None:
        buffer = bytearray()
        while True:
            data = await self.sock.recv(MAX_LINE)
            if not data:
                return
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if line.strip():
                    await self._execute(line)
                    await trio.lowlevel.checkpoint()  # a flood of commands takes turns
                    while not self._commands.take():  # ... and its rate is bounded
                        await trio.sleep(1 / COMMANDS_PER_SECOND)
                if len(self.replies) > MAX_REPLIES:
                    log.warning("control.client_dropped", client=self.number, reason="unread")
                    return
            if len(buffer) > MAX_LINE:
                self.send_reply(
                    {"error": {"class": "LineTooLong", "desc": f"a line over {MAX_LINE} bytes"}}
                )
                log.warning("control.client_dropped", client=self.number, reason="line too long")
                return
            await trio.lowlevel.checkpoint()  # a flooding client takes its turn only

    async def _execute(self, line: bytes) -> None:
        reply: dict[str, Any]
        request_id = None
        try:
            try:
                message = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CommandError("ParseError", f"not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise CommandError("GenericError", "a command is a JSON object")
            request_id = message.get("id")
            name = message.get("execute")
            arguments = message.get("arguments", {})
            if not isinstance(name, str):
                raise CommandError("GenericError", 'a command needs "execute": NAME')
            if not isinstance(arguments, dict):
                raise CommandError("GenericError", '"arguments" must be an object')
            command = self.server.commands.get(name)
            if command is None:
                raise CommandError("CommandNotFound", f"no command {name!r}")
            result = await command.handler(self, arguments)
            reply = {"return": result if result is not None else {}}
        except CommandError as exc:
            reply = {"error": {"class": exc.error_class, "desc": str(exc)}}
        except (faults.RuleError, ValueError, TypeError, KeyError) as exc:
            reply = {"error": {"class": "InvalidArgument", "desc": str(exc)}}
        if request_id is not None:
            reply["id"] = request_id
        self.send_reply(reply)

    # -- tracing --------------------------------------------------------------------

    def start_trace(self, arguments: dict[str, Any]) -> None:
        trace_filter = Filter.from_arguments(arguments)
        rate = arguments.get("rate")
        if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
            raise CommandError("InvalidArgument", "rate must be a positive number of events/s")
        data_bytes = arguments.get("data_bytes", 0)
        if not isinstance(data_bytes, int) or not 0 <= data_bytes <= MAX_DATA_BYTES:
            raise CommandError("InvalidArgument", f"data_bytes must be 0-{MAX_DATA_BYTES}")
        self.stop_trace()
        self.subscription = Subscription(
            lambda event: self.send_event(_event("TRACE", event)), trace_filter, rate, data_bytes
        )
        tracer.subscribe(self.subscription)
        log.info("control.trace_start", client=self.number, events=",".join(trace_filter.kinds))

    def stop_trace(self) -> int:
        """End this client's trace; the events its rate limit held back."""
        if self.subscription is None:
            return 0
        tracer.unsubscribe(self.subscription)
        held_back = self.subscription.over_rate
        self.subscription = None
        log.info("control.trace_stop", client=self.number)
        return held_back


class ControlServer:
    """Accepts clients on the control socket, each in tasks of its own."""

    def __init__(
        self, sock: socket.socket, info: dict[str, Any], device_stats: Callable[[], dict[str, Any]]
    ) -> None:
        self.sock = sock
        self.info = {**info, "protocol": PROTOCOL}
        self.device_stats = device_stats
        self.clients: set[Client] = set()
        self._numbers = itertools.count(1)
        self.commands: dict[str, Command] = {
            "query-commands": Command(self._query_commands, "the commands and what they do"),
            "query-device": Command(self._query_device, "what the greeting says"),
            "stats": Command(self._stats, "counters of the device and each queue"),
            "metrics": Command(self._metrics, "the counters as Prometheus text"),
            "trace-start": Command(
                self._trace_start,
                "stream TRACE events: events, queues, regions, addresses, rate, data_bytes",
            ),
            "trace-stop": Command(self._trace_stop, "end this client's trace"),
            "inject-add": Command(self._inject_add, "add a fault rule (see vfiouserd.faults)"),
            "inject-list": Command(self._inject_list, "the fault rules in force"),
            "inject-remove": Command(self._inject_remove, "remove a fault rule: id"),
            "inject-clear": Command(self._inject_clear, "remove every fault rule"),
        }

    def enable_upgrade(
        self, hand_over: Callable[[trio.socket.SocketType, int], Awaitable[dict[str, Any]]]
    ) -> None:
        """The ``upgrade`` command (vfiouserd.upgrade): the connection is
        lent to ``hand_over``, which sends the session's fds on it."""

        async def command(client: Client, arguments: dict[str, Any]) -> Any:
            successor = upgrade.successor_pid(arguments)
            _, uid, _ = struct.unpack(
                "3i", client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
            # The guest's memory goes with the session: to the daemon's own
            # user (or root, as seen from inside the jail's user namespace).
            if uid not in (os.getuid(), 0):
                raise CommandError("PermissionDenied", "only the daemon's own user may upgrade it")
            await client.flushed()
            log.info("upgrade.requested", client=client.number, successor=successor)
            return await hand_over(client.sock, successor)

        self.commands[upgrade.COMMAND] = Command(
            command, "hand the live session to a successor daemon (vfiouserd --upgrade): pid"
        )

    async def run(self) -> None:
        listener = trio.socket.from_stdlib_socket(self.sock)
        log.info("control.listening", address=self.sock.getsockname() or f"fd {self.sock.fileno()}")
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as exc:  # EMFILE and friends: try again a little later
                    log.warning("control.accept_failed", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                if len(self.clients) >= MAX_CLIENTS:
                    nursery.start_soon(self._refuse, conn)
                    continue
                client = Client(self, conn, next(self._numbers))
                self.clients.add(client)
                nursery.start_soon(self._serve, client)

    async def _serve(self, client: Client) -> None:
        log.info("control.client", client=client.number)
        try:
            await client.serve()
        except Exception:  # a bug on the control path must not end the daemon
            log.exception("control.client_failed", client=client.number)
        finally:
            self.clients.discard(client)
            log.info("control.client_end", client=client.number)

    @staticmethod
    async def _refuse(conn: trio.socket.SocketType) -> None:
        log.warning("control.refused", reason=f"{MAX_CLIENTS} clients connected")
        line = _encode({"error": {"class": "TooManyClients", "desc": f"{MAX_CLIENTS} connected"}})
        with contextlib.suppress(OSError), trio.move_on_after(1):
            await conn.send(line)
        conn.close()

    # -- commands -------------------------------------------------------------------

    async def _query_commands(self, client: Client, arguments: dict[str, Any]) -> Any:
        return {name: command.help for name, command in sorted(self.commands.items())}

    async def _query_device(self, client: Client, arguments: dict[str, Any]) -> Any:
        return self.info

    async def _stats(self, client: Client, arguments: dict[str, Any]) -> Any:
        return stats.collect(self.device_stats())

    async def _metrics(self, client: Client, arguments: dict[str, Any]) -> Any:
        labels = {"device": str(self.info.get("device")), "name": str(self.info.get("name"))}
        return {"text": stats.prometheus(stats.collect(self.device_stats()), labels)}

    async def _trace_start(self, client: Client, arguments: dict[str, Any]) -> Any:
        client.start_trace(arguments)
        return {}

    async def _trace_stop(self, client: Client, arguments: dict[str, Any]) -> Any:
        return {"rate_limited": client.stop_trace()}

    async def _inject_add(self, client: Client, arguments: dict[str, Any]) -> Any:
        return faults.rules.add(arguments).describe()

    async def _inject_list(self, client: Client, arguments: dict[str, Any]) -> Any:
        rules = [rule.describe() for rule in faults.rules.in_force()]
        return {"allowed": faults.rules.allowed, "rules": rules}

    async def _inject_remove(self, client: Client, arguments: dict[str, Any]) -> Any:
        rule_id = arguments.get("id")
        if not isinstance(rule_id, int):
            raise CommandError("InvalidArgument", "id must be a rule's number")
        return faults.rules.remove(rule_id).describe()

    async def _inject_clear(self, client: Client, arguments: dict[str, Any]) -> Any:
        removed = len(faults.rules.in_force())
        faults.rules.clear()
        return {"removed": removed}
