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

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from vfiouserd import state
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError
from vfiouserd.systemd import PassedFd

log = get_logger("handover")
MAX_STATE = 64 << 20

HANDOVER_TYPE = "handover"
HANDOVER_VERSION = 1
STATE = "vfu-state"
LISTENER = "vfu-listener"
CONNECTION = "vfu-conn"
TWIN = "vfu-twin"
PREFIX = "vfu-"


class HandoverError(Exception):
    """A handed-over session that cannot be taken back; the message says why."""


class FdNames:
    """Store names for the fds a session snapshot refers to."""

    def __init__(self) -> None:
        self.named: dict[str, int] = {}
        self._by_fd: dict[int, str] = {}

    def name(self, fd: int | None, name: str | None = None) -> str | None:
        if fd is None:
            return None
        if fd not in self._by_fd:
            chosen = name or f"{PREFIX}fd-{len(self.named)}"
            self._by_fd[fd] = chosen
            self.named[chosen] = fd
        return self._by_fd[fd]


@dataclass
class Handover:
    protocol: str
    session: dict[str, Any]
    device_blob: bytes

    def encode(self) -> bytes:
        document = json.dumps({"protocol": self.protocol, "session": self.session}).encode()
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
            return cls(document["protocol"], document["session"], blob.sections["device"][1])
        except (state.StateError, KeyError, ValueError) as exc:
            raise HandoverError(f"the handed-over state cannot be read: {exc}") from exc


@dataclass
class Received:
    """What a restarted daemon got back from the fd store."""

    handover: Handover | None  # None: only the listener came back
    fds: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # all that came, for FDSTOREREMOVE

    def fd(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name not in self.fds:
            raise HandoverError(f"the fd store did not give back {name!r}")
        return self.fds.pop(name)  # ours now: what is left over gets closed

    def close_unused(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


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
    except (KeyError, TypeError, ValueError, GuestMemoryError, OSError) as exc:
        session.close()
        raise HandoverError(f"the {protocol} session cannot be set up again: {exc!r}") from exc
    return session


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
            if name != LISTENER:
                os.close(ours.pop(name))
    return Received(session, ours, names), others
