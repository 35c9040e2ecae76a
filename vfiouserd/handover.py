"""Restart without disconnect: a daemon hands its live session to the next.

On a planned stop (SIGTERM with ``--fdstore``) the daemon pauses its session
at a message boundary, stops its rings where they stand, and puts in
systemd's fd store (``vfiouserd.systemd.FdStore``): the listening socket,
the VMM connection, every fd the VMM gave it (memory, eventfds, inflight
region, dirty log...) and a memfd holding the session's state. The next
daemon gets them back through LISTEN_FDS/LISTEN_FDNAMES, rebuilds the
session from that state and carries on reading the same connection: the VMM
sees a pause, never a disconnect.

The state memfd is a ``vfiouserd.state`` blob of type "handover": a
"session" section (what the protocol negotiated and set up, as JSON that
names fds by their store names) and a "device" section (the device's own
state blob).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints

import trio

from vfiouserd import state
from vfiouserd._native import ffi, lib
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError
from vfiouserd.systemd import PassedFd

log = get_logger("handover")
MAX_STATE = 64 << 20

HANDOVER_TYPE = "handover"
HANDOVER_VERSION = 1
STATE = "vfu-state"
LISTENER = "vfu-listener"
CONTROL = "vfu-control"
CONNECTION = "vfu-conn"
TWIN = "vfu-twin"
HOST_FD = "vfu-host-"  # and the device's own name for it
PREFIX = "vfu-"


class HandoverError(Exception):
    """A handed-over session that cannot be taken back; the message says why."""


class FdNames:
    """Store names for the fds a session snapshot refers to.

    systemd keeps one entry per open file: an fd sharing its open file with
    one already stored is dropped (QEMU's vfio-user client sends the guest's
    RAM memfd once per DMA region, each a dup of the same file). Such fds
    get the name of the first, and the next daemon dups it for each use."""

    def __init__(self) -> None:
        self.named: dict[str, int] = {}
        self._by_fd: dict[int, str] = {}

    def name(self, fd: int | None, name: str | None = None) -> str | None:
        if fd is None:
            return None
        if fd not in self._by_fd:
            same = next((n for n, other in self.named.items() if same_file(fd, other)), None)
            chosen = same or name or f"{PREFIX}fd-{len(self.named)}"
            self._by_fd[fd] = chosen
            self.named.setdefault(chosen, fd)
        return self._by_fd[fd]


def same_file(a: int, b: int) -> bool:
    """Whether two fds share one open file (kcmp, as systemd judges)."""
    result = lib.vfu_same_file(a, b)
    if result < 0:
        raise OSError(ffi.errno, f"kcmp: {os.strerror(ffi.errno)}")
    return bool(result)


@dataclass
class Handover:
    protocol: str
    session: dict[str, Any]
    device_blob: bytes
    host_fds: dict[str, str] = field(default_factory=dict)  # the device's name: store name

    def encode(self) -> bytes:
        document = json.dumps(
            {"protocol": self.protocol, "session": self.session, "host_fds": self.host_fds}
        ).encode()
        return state.Blob(
            HANDOVER_TYPE,
            HANDOVER_VERSION,
            {"session": (1, document), "device": (1, self.device_blob)},
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Handover:
        try:
            blob = state.Blob.decode(data, device_type=HANDOVER_TYPE, max_abi=HANDOVER_VERSION)
            blob.expect_only(["session", "device"])
            document = json.loads(blob.sections["session"][1])
            host_fds = document.get("host_fds", {})
            if not isinstance(host_fds, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in host_fds.items()
            ):
                raise ValueError("host_fds is not a map of names")
            return cls(
                document["protocol"], document["session"], blob.sections["device"][1], host_fds
            )
        except (state.StateError, KeyError, ValueError) as exc:
            raise HandoverError(f"the handed-over state cannot be read: {exc}") from exc


@dataclass
class Received:
    """What a restarted daemon got back from the fd store."""

    handover: Handover | None  # None: only the listener came back
    fds: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # all that came, for FDSTOREREMOVE

    # A copy of each fd given out, for a name used again (one open file,
    # several uses); closed with what is left over.
    taken: dict[str, int] = field(default_factory=dict)

    def fd(self, name: str | None) -> int | None:
        """The fd stored under ``name``, the caller's to keep."""
        if name is None:
            return None
        if name in self.taken:
            return os.dup(self.taken[name])
        if name not in self.fds:
            raise HandoverError(f"the fd store did not give back {name!r}")
        fd = self.fds.pop(name)
        self.taken[name] = os.dup(fd)
        return fd

    def close_unused(self) -> None:
        for fd in [*self.fds.values(), *self.taken.values()]:
            os.close(fd)
        self.fds.clear()
        self.taken.clear()


FdByName = Callable[[str | None], int | None]


class TakesOver(Protocol):
    def take_over(self, document: dict[str, Any], fd: FdByName) -> None: ...

    def close(self) -> None: ...


Session = TypeVar("Session", bound=TakesOver)


def restore(
    make: Callable[[trio.socket.SocketType], Session],
    document: dict[str, Any],
    received: Received,
    protocol: str,
) -> Session:
    """A handed-over session, set up again on its own connection from the
    fds the store gave back; HandoverError (and nothing left open of it) if
    that cannot be done."""
    connection = received.fd(document.get("connection"))
    if connection is None:
        raise HandoverError("the handed-over session names no connection")
    session = make(trio.socket.from_stdlib_socket(socket.socket(fileno=connection)))
    try:
        session.take_over(document, received.fd)
    except HandoverError:
        session.close()  # never left to the garbage collector (see sandbox/seccomp.py)
        raise
    except (KeyError, TypeError, ValueError, GuestMemoryError, OSError) as exc:
        session.close()
        raise HandoverError(f"the {protocol} session cannot be set up again: {exc!r}") from exc
    return session


R = TypeVar("R")


def record_from_document(cls: type[R], data: Any, where: str = "") -> R:
    """A handover record (a dataclass of ints, bools, strings, lists, maps,
    optional values and other records) from its JSON form, every field
    checked: a document another daemon wrote is input like any other."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not an object")
    hints = get_type_hints(cls)
    values = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name not in data:
            raise ValueError(f"{where}: no {item.name}")
        values[item.name] = _checked(hints[item.name], data[item.name], f"{where}.{item.name}")
    return cls(**values)


def _checked(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:  # a part whose owner checks it (dirty bitmaps, say)
        return value
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _checked(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: not a list")
        return [_checked(args[0], item, f"{where}[{n}]") for n, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{where}: not a map")
        return {k: _checked(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return record_from_document(hint, value, where)  # type: ignore[arg-type]
    # bool is an int in Python, not in a record
    if hint in (int, bool, str) and type(value) is hint:
        return value
    raise ValueError(f"{where}: {value!r} is not {getattr(hint, '__name__', hint)}")


def record_to_document(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def write_state(data: bytes) -> int:
    fd = os.memfd_create("vfiouserd-handover", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd


def take(passed: list[PassedFd]) -> tuple[Received | None, list[PassedFd]]:
    """Split what systemd passed: what a previous daemon handed over (None if
    nothing), and the rest (a socket unit's listening socket)."""
    ours: dict[str, int] = {}
    for p in passed:
        if p.name.startswith(PREFIX):
            if p.name in ours:  # a name stored twice: the later one wins
                os.close(ours[p.name])
            ours[p.name] = p.fd
    others = [p for p in passed if not p.name.startswith(PREFIX)]
    names = sorted(ours)
    if not names:
        return None, others
    state_fd = ours.pop(STATE, None)
    if state_fd is None:  # only the listener (no session), or nothing of ours
        session = None
    else:
        try:
            data = os.pread(state_fd, MAX_STATE, 0)
        finally:
            os.close(state_fd)
        try:
            session = Handover.decode(data)
        except HandoverError as exc:
            log.error("handover.refused", reason=str(exc))
            session = None
    if session is None:
        for name in list(ours):  # fds without a state to make sense of them
            if name not in (LISTENER, CONTROL):
                os.close(ours.pop(name))
    return Received(session, ours, names), others
