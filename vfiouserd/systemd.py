"""systemd: its protocols without libsystemd (sd_notify, socket activation)
and transient units confined like the template unit."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

from vfiouserd.protocol.framing import rights

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


@dataclass(frozen=True)
class PassedFd:
    fd: int
    name: str  # FileDescriptorName= of a socket unit, FDNAME= of the fd store


def listen_fds() -> list[PassedFd]:
    """Fds passed by systemd (LISTEN_FDS): a socket unit's, then the fd
    store's, each with its name (LISTEN_FDNAMES); for this process only."""
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if pid != os.getpid() or count <= 0:
        return []
    passed = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        passed.append(PassedFd(fd, names[index] if index < len(names) else "unknown"))
    return passed


FDNAME_MAX = 255


class FdStore:
    """systemd's file descriptor store (sd_notify FDSTORE=1): fds kept for
    the next process of the service (FileDescriptorStoreMax= in the unit).
    ``send`` delivers one notification with its fds: straight to systemd, or
    through the jail's parent, the only process systemd listens to."""

    def __init__(self, send: Callable[[bytes, list[int]], None]) -> None:
        self._send = send

    @staticmethod
    def _check(name: str) -> None:
        if not name or len(name) > FDNAME_MAX or ":" in name or not name.isprintable():
            raise ValueError(f"invalid fd store name {name!r}")

    def put(self, name: str, fd: int, *, poll: bool = True) -> None:
        """Keep ``fd`` under ``name``; without ``poll`` systemd does not drop
        it when it hangs up (a connection whose peer is only idle stays)."""
        self._check(name)
        message = f"FDSTORE=1\nFDNAME={name}\n" + ("" if poll else "FDPOLL=0\n")
        self._send(message.encode(), [fd])

    def remove(self, name: str) -> None:
        self._check(name)
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}\n".encode(), [])

    def notify(self, message: str) -> None:
        """Any other notification (MAINPID= when a successor takes over)."""
        self._send(message.encode(), [])


def send_notification(notify_fd: int, message: bytes, fds: list[int]) -> None:
    """One sd_notify datagram on a connected notify socket."""
    sock = socket.socket(fileno=notify_fd)
    try:
        sock.sendmsg([message], rights(fds), socket.MSG_NOSIGNAL)
    finally:
        sock.detach()  # the fd stays the caller's


# -- transient units ---------------------------------------------------------------

TEMPLATE = "vfiouserd@.service"
# [Service] settings that say how the template unit starts the daemon rather
# than how it is confined; a transient unit gets its command line directly.
NOT_FOR_TRANSIENT = {"ExecStart", "ExecReload"}
INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# ProtectHome= hides these from the service: a daemon installed there cannot start.
HIDDEN_BY_PROTECT_HOME = ("/home/", "/root/", "/run/user/")


def template_unit() -> str:
    from importlib.resources import files  # for systemd-run only: no daemon loads it

    return files("vfiouserd.units").joinpath(TEMPLATE).read_text()


def service_settings(unit_text: str) -> list[tuple[str, str]]:
    """The [Service] section's settings in order (repeated keys kept)."""
    settings: list[tuple[str, str]] = []
    section = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def transient_command(instance: str, daemon_argv: list[str], unit_text: str) -> list[str]:
    """A systemd-run command line giving ``daemon_argv`` the template unit's
    confinement in a transient unit named vfiouserd-INSTANCE."""
    if not INSTANCE_NAME.match(instance):
        raise ValueError(f"instance name {instance!r}: use letters, digits, '_', '.', '-'")
    properties = [
        f"--property={key}={value.replace('%i', instance)}"
        for key, value in service_settings(unit_text)
        if key not in NOT_FOR_TRANSIENT
    ]
    return [
        "systemd-run",
        f"--unit=vfiouserd-{instance}",
        f"--description=vfiouserd device back end {instance}",
        *properties,
        "--",
        *daemon_argv,
    ]
