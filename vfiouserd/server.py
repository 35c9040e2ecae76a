"""The listening side: the accept loop, one session at a time, and the
handover of a live session to the next daemon.

One daemon serves one device. Connections are served one at a time (a
vhost-user device has one front end); when the VMM disconnects the daemon
listens again, so a reconnecting QEMU gets a fresh session.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

import trio

from vfiouserd import handover
from vfiouserd.handover import FdNames
from vfiouserd.log import get_logger
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

    async def run(self, restored: LiveSession | None = None) -> None:
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
            conn, _ = await tsock.accept()
            log.info("session.start")
            await self._serve_one(self.new_session(conn))
            log.info("session.end")
        await self._until_stopped()

    async def _until_stopped(self) -> None:
        """A handover is under way (or the only connection ended): the
        signal handler ends the service."""
        if self._stopping:
            await trio.sleep_forever()

    async def _serve_one(self, session: LiveSession) -> None:
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

    async def hand_over(self) -> bool:
        """Put the listener, the live session and its state in the fd store;
        False (and nothing stored) if the session cannot be paused."""
        if self.store is None:
            return False
        self._stopping = True
        session = self.session
        if session is not None and session.ending:
            session = None
        if session is not None and not await session.pause(PAUSE_TIMEOUT):
            if not session.ending:
                log.error("handover.failed", reason=f"no pause within {PAUSE_TIMEOUT:g} s")
                return False
            session = None  # it ended meanwhile: the listener alone goes on
        names = FdNames()
        if self.store_listener and is_listening(self.sock):
            names.name(self.sock.fileno(), handover.LISTENER)
        if self.control is not None:
            names.name(self.control.fileno(), handover.CONTROL)
        state_fd = None
        state_bytes = 0
        if session is not None:
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
                return False
            record = handover.Handover(self.protocol, document, blob, host_fds).encode()
            state_bytes = len(record)
            state_fd = handover.write_state(record)
            names.name(state_fd, handover.STATE)
        try:
            # Not polled: systemd would drop a connection the VMM hangs up on
            # mid-restart; the next daemon finds that out by itself.
            for name, fd in names.named.items():
                self.store.put(name, fd, poll=False)
        except OSError as exc:  # what did reach the store is useless without its state
            log.error("handover.failed", reason=f"fd store: {exc}")
            if session is not None:
                session.close()
            return False
        finally:
            if state_fd is not None:
                os.close(state_fd)
        self.handed_over = True
        log.info(
            "handover.stored",
            fds=len(names.named),
            session=session is not None,
            state_bytes=state_bytes,
        )
        if session is not None:
            session.close()  # our copies: the store holds its own
        return True
