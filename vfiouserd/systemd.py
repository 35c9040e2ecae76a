"""systemd: its protocols without libsystemd (sd_notify, socket activation)
and transient units confined like the template unit."""

from __future__ import annotations

import os
import re
import socket
from importlib.resources import files

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


# -- transient units ---------------------------------------------------------------

TEMPLATE = "vfiouserd@.service"
# [Service] settings that say how the template unit starts the daemon rather
# than how it is confined; a transient unit gets its command line directly.
NOT_FOR_TRANSIENT = {"ExecStart", "ExecReload"}
INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# ProtectHome= hides these from the service: a daemon installed there cannot start.
HIDDEN_BY_PROTECT_HOME = ("/home/", "/root/", "/run/user/")


def template_unit() -> str:
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
