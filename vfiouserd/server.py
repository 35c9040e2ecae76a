"""The listening side: sockets, accept loop, signals.

One daemon serves one device. Connections are served one at a time (a
vhost-user device has one front end); when the VMM disconnects the daemon
listens again, so a reconnecting QEMU gets a fresh session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from vfiouserd.log import get_logger

log = get_logger("server")

Session = Callable[[trio.socket.SocketType], Awaitable[None]]


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


async def serve(sock: socket.socket, session: Session) -> None:
    """Serve connections one after another; a connected socket is served once."""
    tsock = trio.socket.from_stdlib_socket(sock)
    if not is_listening(sock):
        log.info("session.start", kind="inherited connection")
        with tsock:
            await session(tsock)
        return
    log.info("listening", address=sock.getsockname() or f"fd {sock.fileno()}")
    while True:
        conn, _ = await tsock.accept()
        log.info("session.start")
        with conn:
            try:
                await session(conn)
            except Exception:  # a bug in one session must not end the service
                log.exception("session.crashed")
        log.info("session.end")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def hold_stop_signals() -> None:
    """Keep SIGTERM/SIGINT/SIGHUP pending until a handler is in place, so a
    signal sent while the daemon starts (or jails itself) is not lost and
    does not kill it half set up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


async def run_until_signalled(
    main: Callable[[], Awaitable[None]], on_reload: Callable[[], None] | None = None
) -> None:
    """Run ``main``; SIGTERM or SIGINT cancels it promptly and cleanly, SIGHUP
    calls ``on_reload``."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
                release_stop_signals()
                async for signum in signals:
                    log.info("signal", signal=signal.Signals(signum).name)
                    if signum == signal.SIGHUP:
                        if on_reload is not None:
                            on_reload()
                        continue
                    nursery.cancel_scope.cancel()
                    return

        async def run_main() -> None:
            await main()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        nursery.start_soon(run_main)
