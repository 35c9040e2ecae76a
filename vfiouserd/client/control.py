"""A client of a daemon's control socket (see vfiouserd.control), and how
a TARGET on the command line leads to one: a control socket, a VMM socket,
a PID or a systemd unit."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vfiouserd.control import CONTROL_SUFFIX

DEFAULT_DIRECTORY = "/run/vfiouserd"


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached."""


class ControlClient:
    """Blocking: one command at a time; events are read in between."""

    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"{path}: {exc.strerror or exc}") from exc
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []  # arrived while waiting for a reply
        self._ids = 0
        greeting = self.read()
        if "vfiouserd" not in greeting:
            self.close()
            error = greeting.get("error", {}).get("desc", greeting)
            raise ControlError(f"{path}: not a vfiouserd control socket ({error})")
        self.greeting: dict[str, Any] = greeting["vfiouserd"]

    def read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ControlError(f"{self.path}: the daemon closed the connection")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ControlError(f"{self.path}: not a JSON object: {line!r}")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        self._ids += 1
        request = {"execute": command, "arguments": arguments, "id": self._ids}
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self.read()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != self._ids:
                continue
            if "error" in message:
                raise ControlError(f"{message['error']['class']}: {message['error']['desc']}")
            return message["return"]

    def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        while True:
            message = self.read()
            if "event" in message:
                return message

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- finding a daemon's control socket ---------------------------------------------------


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def control_sockets(directory: str = DEFAULT_DIRECTORY) -> list[str]:
    """Control sockets under ``directory`` (and one level of subdirectories,
    where the systemd units put theirs)."""
    found = []
    root = Path(directory)
    for pattern in ("*" + CONTROL_SUFFIX, "control.sock", "*/*" + CONTROL_SUFFIX, "*/control.sock"):
        found += [str(p) for p in root.glob(pattern) if _is_socket(str(p))]
    return sorted(set(found))


def _unix_sockets(pid: int) -> dict[int, str]:
    """inode -> path of the bound UNIX sockets in ``pid``'s network namespace."""
    table = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/net/unix") as lines:
        next(lines, None)
        for line in lines:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("/"):
                table[int(fields[6])] = fields[7]
    return table


def _socket_fds(pid: int) -> dict[int, int]:
    """fd -> inode of the sockets ``pid`` holds."""
    fds = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    fds[int(fd)] = int(link[8:-1])
    return fds


def _socket_inodes(pid: int) -> set[int]:
    return set(_socket_fds(pid).values())


_PIDFD_GETFD = 438  # one number on every architecture (Linux >= 5.6)


def _bound_path(pid: int, fd: int) -> str | None:
    """The path a listening AF_UNIX socket that ``pid`` holds at ``fd`` is
    bound to, asked of the socket itself through a copy (pidfd_getfd, which
    needs the right to ptrace ``pid``; None without it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        copy = libc.syscall(_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if copy < 0:
        return None
    with socket.socket(fileno=copy) as sock:
        if sock.family != socket.AF_UNIX or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            return None
        address = sock.getsockname()
    return address if isinstance(address, str) and address.startswith("/") else None


def _is_control_path(path: str) -> bool:
    return path.endswith(CONTROL_SUFFIX) or path.endswith("/control.sock")


def _descendants(pid: int) -> list[int]:
    found, queue = [pid], [pid]
    while queue:
        current = queue.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                    for child in map(int, children):
                        if child not in found:
                            found.append(child)
                            queue.append(child)
    return found


def _parent(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return int(stat_line.rsplit(")", 1)[1].split()[1])
    return None


def socket_of_pid(pid: int) -> str:
    """The control socket a daemon process (or the jail's parent, or a
    unit's main process) holds: its listening socket's inode, looked up in
    the network namespace it was bound in (the jail has a fresh one)."""
    pids = _descendants(pid)
    if not os.path.exists(f"/proc/{pid}"):
        raise ControlError(f"no process {pid}")
    inodes: set[int] = set()
    for each in pids:
        inodes |= _socket_inodes(each)
    views = set(pids) | {p for p in (_parent(x) for x in pids) if p} | {os.getpid()}
    for view in views:
        for inode, path in _unix_sockets(view).items():
            if inode in inodes and _is_control_path(path):
                return path
    # Bound in a network namespace no process is in any more: a systemd
    # unit's (PrivateNetwork=) once the daemon has jailed itself, parent
    # and all, into namespaces of their own. The socket knows its path.
    for each in pids:
        for fd in _socket_fds(each):
            found = _bound_path(each, fd)
            if found is not None and _is_control_path(found):
                return found
    raise ControlError(f"process {pid} holds no vfiouserd control socket (is it one?)")


def _main_pid(unit: str) -> int:
    if "." not in unit:
        unit += ".service"
    try:
        shown = subprocess.run(
            ["systemctl", "show", "--property=MainPID", "--value", unit],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ControlError(f"unit {unit}: {exc}") from exc
    if not shown.isdigit() or shown == "0":
        raise ControlError(f"unit {unit} has no main process (is it running?)")
    return int(shown)


def resolve(target: str) -> str:
    """The control socket's path for TARGET: a control socket, a VMM socket
    (its control socket is beside it, or found through the process that
    listens on it), a PID or a systemd unit name."""
    if target.isdigit():
        return socket_of_pid(int(target))
    if _is_socket(target):
        if _is_control_path(target):
            return target
        beside = target.removesuffix(".sock") + CONTROL_SUFFIX
        if _is_socket(beside):
            return beside
        return _socket_of_vmm_socket(target)
    if "/" in target:
        raise ControlError(f"{target} is not a socket")
    return socket_of_pid(_main_pid(target))


def _socket_of_vmm_socket(path: str) -> str:
    """Through /proc: the process listening at ``path`` (never connects to
    it, which would take the VMM's place)."""
    wanted = os.path.realpath(path)
    for inode, bound in _unix_sockets(os.getpid()).items():
        if bound != wanted:
            continue
        for entry in os.listdir("/proc"):
            # Not PID 1: a socket unit's systemd holds the socket too.
            if entry.isdigit() and entry != "1" and inode in _socket_inodes(int(entry)):
                with contextlib.suppress(ControlError):
                    return socket_of_pid(int(entry))
    raise ControlError(f"no vfiouserd control socket found for {path}")


def connect(target: str, timeout: float | None = 10.0) -> ControlClient:
    return ControlClient(resolve(target), timeout)


def each(directory: str) -> Iterator[tuple[str, ControlClient | ControlError]]:
    for path in control_sockets(directory):
        try:
            yield path, ControlClient(path, timeout=2)
        except ControlError as exc:
            yield path, exc
