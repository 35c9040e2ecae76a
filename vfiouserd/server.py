"""The listening side: the accept loop, one session at a time, and the
handover of a live session to the next daemon.

One daemon serves one device. Connections are served one at a time (a
vhost-user device has one front end); when the VMM disconnects the daemon
listens again, so a reconnecting QEMU gets a fresh session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from vfiouserd import handover, upgrade
from vfiouserd.handover import FdNames
from vfiouserd.log import get_logger
from vfiouserd.protocol.framing import ConnectionClosed, send_all
from vfiouserd.sockets import is_listening
from vfiouserd.systemd import FdStore
from vfiouserd.trace import tracer

log = get_logger("server")


class LiveSession(Protocol):
    """A protocol session as the service sees it."""

    async def serve(self) -> None: ...

    async def pause(self, timeout: float) -> bool:
        """Stop at a message boundary with the rings stopped where they stand
        and every fd kept (for a handover); False if that took too long."""
        ...

    def snapshot(self, names: FdNames) -> dict[str, Any]:
        """The paused session as JSON, fds by their store names."""
        ...

    def close(self) -> None: ...

    @property
    def ending(self) -> bool:
        """The connection is over (closed, or broken): nothing to hand over."""
        ...


NewSession = Callable[[trio.socket.SocketType], LiveSession]
PAUSE_TIMEOUT = 5.0  # a VMM that never leaves a gap between messages


class Service:
    """Serves connections one after another on a listening socket (a
    connected one is served once). On a planned stop with an fd store it
    hands the live session over to the next daemon instead of ending it."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: str,
        new_session: NewSession,
        device_state: Callable[[], bytes],
        store: FdStore | None = None,
        store_listener: bool = True,
        host_fds: Callable[[], dict[str, int]] = dict,
        control: socket.socket | None = None,
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        self.new_session = new_session
        self.device_state = device_state
        self.host_fds = host_fds  # the host fds of the device that outlive a restart
        self.store = store
        # A socket unit's listener comes back from the unit, not the store.
        self.store_listener = store_listener
        self.control = control  # the control socket's listener goes on with the next daemon
        self.session: LiveSession | None = None
        self.handed_over = False
        self._stopping = False
        # Upgrades in place (vfiouserd.upgrade): systemd learns the new main
        # process through ``notify``; a session the successor refused is set
        # up again by ``take_back`` and served on.
        self.notify: Callable[[str], None] | None = None
        self.take_back: TakeBack | None = None
        self._upgrading: trio.Event | None = None
        self._taken_back: LiveSession | None = None
        self._accepting: trio.CancelScope | None = None
        self._running = trio.CancelScope()

    async def run(self, restored: LiveSession | None = None) -> None:
        with self._running:  # cancelled once a successor took over
            await self._run(restored)

    async def _run(self, restored: LiveSession | None) -> None:
        tsock = trio.socket.from_stdlib_socket(self.sock)
        listening = is_listening(self.sock)
        if restored is not None:
            log.info("session.start", kind="handed over")
            await self._serve_one(restored)
        elif not listening:
            log.info("session.start", kind="inherited connection")
            await self._serve_one(self.new_session(tsock))
        if not listening:
            await self._until_stopped()
            return
        log.info("listening", address=self.sock.getsockname() or f"fd {self.sock.fileno()}")
        while not self._stopping:
            if self._upgrading is not None:  # the listener is being handed over
                await self._upgrading.wait()
                continue
            conn = None
            with trio.CancelScope() as self._accepting:  # cancelled by an upgrade
                conn, _ = await tsock.accept()
            self._accepting = None
            if conn is None:
                continue
            if self._upgrading is not None:  # accepted as the listener was handed over
                await self._upgrading.wait()
                if self.handed_over:  # the VMM sees a close, and may reconnect
                    conn.close()
                    break
            log.info("session.start")
            await self._serve_one(self.new_session(conn))
            log.info("session.end")
        await self._until_stopped()

    async def _until_stopped(self) -> None:
        """A handover is under way (or the only connection ended): the
        signal handler ends the service."""
        if self._stopping:
            await trio.sleep_forever()

    async def _serve_one(self, session: LiveSession | None) -> None:
        while session is not None:
            self.session = session
            if tracer.wants("session"):
                tracer.emit("session", "start", protocol=self.protocol)
            try:
                await session.serve()
            except Exception:  # a bug in one session must not end the service
                log.exception("session.crashed")
                session.close()
            finally:
                self.session = None
                if tracer.wants("session"):
                    tracer.emit("session", "end", protocol=self.protocol)
            session = await self._taken_back_session()

    async def _taken_back_session(self) -> LiveSession | None:
        """After a session paused for an upgrade: the session set up again
        if the successor refused it (None once it took it, or if none was
        under way)."""
        if self._upgrading is not None:
            await self._upgrading.wait()
        session, self._taken_back = self._taken_back, None
        if session is not None:
            log.info("session.start", kind="taken back")
        return session

    async def hand_over(self) -> bool:
        """Put the listener, the live session and its state in the fd store;
        False (and nothing stored) if the session cannot be paused."""
        if self._upgrading is not None:  # its outcome first: the session may be gone
            await self._upgrading.wait()
        while self._taken_back is not None:  # a session taken back: once it serves again
            await trio.sleep(0.001)
        if self.handed_over:
            return True
        if self.store is None:
            return False
        self._stopping = True
        try:
            session = await self._pause()
            packed = self._pack(session, self.store_listener)
        except HandoverFailed as exc:
            log.error("handover.failed", reason=str(exc))
            return False
        try:
            # Not polled: systemd would drop a connection the VMM hangs up on
            # mid-restart; the next daemon finds that out by itself.
            for name, fd in packed.names.named.items():
                self.store.put(name, fd, poll=False)
        except OSError as exc:  # what did reach the store is useless without its state
            log.error("handover.failed", reason=f"fd store: {exc}")
            if session is not None:
                session.close()
            return False
        finally:
            packed.close()
        self.handed_over = True
        log.info(
            "handover.stored",
            fds=len(packed.names.named),
            session=session is not None,
            state_bytes=len(packed.record),
        )
        if session is not None:
            session.close()  # our copies: the store holds its own
        return True

    async def _pause(self) -> LiveSession | None:
        """The live session paused for a handover (None if there is none);
        HandoverFailed if it does not pause."""
        session = self.session
        if session is not None and session.ending:
            session = None
        if session is not None and not await session.pause(PAUSE_TIMEOUT):
            if not session.ending:
                raise HandoverFailed(f"no pause within {PAUSE_TIMEOUT:g} s")
            session = None  # it ended meanwhile: the listener alone goes on
        return session

    def _pack(self, session: LiveSession | None, with_listener: bool) -> Packed:
        """The fds and the state a successor needs, by name; HandoverFailed
        (and the session closed) if the state cannot be taken."""
        names = FdNames()
        if with_listener and is_listening(self.sock):
            names.name(self.sock.fileno(), handover.LISTENER)
        if self.control is not None:
            names.name(self.control.fileno(), handover.CONTROL)
        if session is None:
            return Packed(names, b"", None)
        try:
            document = session.snapshot(names)  # stops the rings and the device's run()
            blob = self.device_state()
            host_fds: dict[str, str] = {}
            for name, fd in self.host_fds().items():
                stored = names.name(fd, handover.HOST_FD + name)
                assert stored is not None
                host_fds[name] = stored
        except Exception as exc:  # the session is lost, the next daemon starts afresh
            log.exception("handover.failed", reason=str(exc))
            session.close()
            raise HandoverFailed(str(exc)) from exc
        record = handover.Handover(self.protocol, document, blob, host_fds).encode()
        state_fd = handover.write_state(record)
        names.name(state_fd, handover.STATE)
        return Packed(names, record, state_fd)

    # -- upgrade in place ----------------------------------------------------------

    async def upgrade(self, conn: trio.socket.SocketType, successor: int) -> dict[str, Any]:
        """Hand the listener, the session and its state to a successor
        daemon over ``conn`` (vfiouserd.upgrade); take the session back and
        serve on if the successor refuses it."""
        if self._upgrading is not None or self._stopping or self.handed_over:
            raise ValueError("a stop or another upgrade is under way")
        if not is_listening(self.sock):
            raise ValueError("a daemon serving one inherited connection cannot be upgraded")
        self._upgrading = trio.Event()
        if self._accepting is not None:
            self._accepting.cancel()
        try:
            return await self._upgrade(conn, successor)
        finally:
            upgrading, self._upgrading = self._upgrading, None
            upgrading.set()

    async def _upgrade(self, conn: trio.socket.SocketType, successor: int) -> dict[str, Any]:
        started = time.monotonic()
        try:
            session = await self._pause()
            packed = self._pack(session, with_listener=True)
        except HandoverFailed as exc:
            log.error("upgrade.failed", reason=str(exc))
            raise ValueError(f"the session cannot be handed over: {exc}") from exc
        named = packed.names.named
        try:
            for line, fds in upgrade.fd_batches(named):
                await send_all(conn, line, fds)
            await send_all(
                conn, upgrade.end_line(len(named), socket_activated=not self.store_listener)
            )
            with trio.fail_after(upgrade.VERDICT_TIMEOUT):
                reason = upgrade.parse_verdict(await _read_line(conn))
        except (
            OSError,
            ConnectionClosed,
            trio.TooSlowError,
            trio.BrokenResourceError,
            ValueError,
        ) as exc:
            reason = f"no verdict from the successor: {exc!r}"
        finally:
            if packed.state_fd is not None:
                os.close(packed.state_fd)
        if reason is None:
            self.handed_over = True
            self._stopping = True
            if self.notify is not None:  # the successor's waiter is systemd's to watch now
                self.notify(f"MAINPID={successor}\n")
            if session is not None:
                session.close()
            log.info(
                "upgrade.handed_over",
                successor=successor,
                fds=len(named),
                session=session is not None,
                paused_ms=round((time.monotonic() - started) * 1000, 1),
            )
            with contextlib.suppress(
                OSError, ConnectionClosed
            ):  # here: the reply would be cancelled
                await send_all(conn, upgrade.released_line(True))
            self._running.cancel()
            return {"released": True}
        log.error("upgrade.refused", reason=reason)
        if session is not None:
            copies = {name: os.dup(fd) for name, fd in named.items() if name != handover.STATE}
            session.close()
            assert self.take_back is not None
            self._taken_back = self.take_back(packed.record, copies)
        with contextlib.suppress(OSError, ConnectionClosed):
            await send_all(conn, upgrade.released_line(False))
        return {"released": False, "reason": reason}


class HandoverFailed(Exception):
    pass


@dataclass
class Packed:
    """What goes to the next daemon: fds by name (the state among them)."""

    names: FdNames
    record: bytes
    state_fd: int | None

    def close(self) -> None:
        if self.state_fd is not None:
            os.close(self.state_fd)
            self.state_fd = None


# Set up a session again from its handover record and (copies of) its fds.
TakeBack = Callable[[bytes, dict[str, int]], LiveSession | None]


async def _read_line(conn: trio.socket.SocketType) -> bytes:
    """One line, read a byte at a time: nothing after it is taken from the
    connection (the control client reads on)."""
    line = bytearray()
    while len(line) <= upgrade.MAX_LINE:
        byte = await conn.recv(1)
        if not byte:
            raise ValueError("the successor closed the connection")
        if byte == b"\n":
            return bytes(line)
        line += byte
    raise ValueError("a line too long from the successor")
