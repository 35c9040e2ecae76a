"""The listening side: sockets, accept loop, signals.

One daemon serves one device. Connections are served one at a time (a
vhost-user device has one front end); when the VMM disconnects the daemon
listens again, so a reconnecting QEMU gets a fresh session.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable

import trio

from vfiouserd.log import get_logger

log = get_logger("server")

Session = Callable[[trio.socket.SocketType], Awaitable[None]]


def listen_on_path(path: str) -> socket.socket:
    """Bind a listening socket at ``path``, replacing a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


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
