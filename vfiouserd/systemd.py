"""systemd's protocols, without libsystemd: sd_notify and socket activation."""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify_socket() -> int | None:
    """A datagram socket connected to $NOTIFY_SOCKET, or None without one.

    Connected now, before the jail hides the path; the message goes later.
    """
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if not address:
        return None
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def listen_fds() -> list[int]:
    """Sockets passed by socket activation (LISTEN_FDS), for this process only."""
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds
