"""The listening side: sockets, accept loop, signals.

One daemon serves one device. Connections are served one at a time (a
vhost-user device has one front end); when the VMM disconnects the daemon
listens again, so a reconnecting QEMU gets a fresh session.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from vfiouserd import handover
from vfiouserd.handover import FdNames
from vfiouserd.log import get_logger
from vfiouserd.systemd import FdStore

log = get_logger("server")


def listen_on_path(path: str) -> socket.socket:
    """Bind a listening socket at ``path``, replacing a stale socket file
    (one nobody listens on any more), never a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                pass  # stale
            else:
                raise FileExistsError(f"{path}: another server is listening there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class SocketFile:
    """The socket file a daemon created. It is removed at the end through its
    directory (the jailed daemon no longer sees the path), and only while it
    is still the file this daemon created, not a successor's."""

    directory: int  # an O_PATH fd
    name: str
    device: int
    inode: int

    @classmethod
    def created_at(cls, path: str) -> SocketFile:
        directory = os.open(
            os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        )
        name = os.path.basename(path)
        try:
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except OSError:
            os.close(directory)
            raise
        return cls(directory, name, info.st_dev, info.st_ino)

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # gone already, or not ours to touch
            info = os.stat(self.name, dir_fd=self.directory, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                os.unlink(self.name, dir_fd=self.directory)

    def close(self) -> None:
        os.close(self.directory)


def socket_from_fd(fd: int) -> socket.socket:
    """Adopt an inherited AF_UNIX stream socket (listening or connected)."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"fd {fd} is not an AF_UNIX stream socket")
    os.set_inheritable(fd, False)
    return sock


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


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
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        self.new_session = new_session
        self.device_state = device_state
        self.store = store
        # A socket unit's listener comes back from the unit, not the store.
        self.store_listener = store_listener
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
        try:
            await session.serve()
        except Exception:  # a bug in one session must not end the service
            log.exception("session.crashed")
            session.close()
        finally:
            self.session = None

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
        state_fd = None
        state_bytes = 0
        if session is not None:
            try:
                document = session.snapshot(names)
                blob = self.device_state()
            except Exception as exc:  # the session is lost, the next daemon starts afresh
                log.exception("handover.failed", reason=str(exc))
                session.close()
                return False
            record = handover.Handover(self.protocol, document, blob).encode()
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def hold_stop_signals() -> None:
    """Keep SIGTERM/SIGINT/SIGHUP pending until a handler is in place, so a
    signal sent while the daemon starts (or jails itself) is not lost and
    does not kill it half set up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_received() -> Iterator[trio.MemoryReceiveChannel[int]]:
    """SIGTERM/SIGINT/SIGHUP as a channel, for the rest of the daemon's life.

    Unlike ``trio.open_signal_receiver`` nothing is re-raised when it closes:
    that re-raise is a ``tgkill``, which the jail's filter forbids, and under
    systemd (KillMode=control-group) the jailed daemon gets SIGTERM twice,
    once from systemd and once relayed by its parent. A signal that arrives
    once the run is over is ignored; the handlers are never restored, as the
    daemon is then exiting.
    """
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[int](math.inf)

    def deliver(signum: int) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            send.send_nowait(signum)

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(deliver, signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    release_stop_signals()  # held since start-up: pending ones arrive now
    try:
        yield receive
    finally:
        send.close()


async def run_until_signalled(
    main: Callable[[], Awaitable[None]],
    on_reload: Callable[[], None] | None = None,
    on_stop: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run ``main``; SIGTERM or SIGINT cancels it promptly and cleanly (after
    ``on_stop``: a handover), SIGHUP calls ``on_reload``. Further stop
    signals while stopping change nothing."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with stop_signals_received() as signals:
                async for signum in signals:
                    log.info("signal", signal=signal.Signals(signum).name)
                    if signum == signal.SIGHUP:
                        if on_reload is not None:
                            on_reload()
                        continue
                    if on_stop is not None:
                        await on_stop()
                    nursery.cancel_scope.cancel()
                    return

        async def run_main() -> None:
            await main()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        nursery.start_soon(run_main)
