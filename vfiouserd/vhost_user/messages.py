"""What every vhost-user request handler shares: how it refuses a request
and what it answers."""

from __future__ import annotations

from dataclasses import dataclass

from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import Message
from vfiouserd.trace import tracer


class RequestFailed(Exception):
    """The request is refused; the front end gets an error reply if it asked."""


class ProtocolViolation(Exception):
    """The front end broke the protocol in a way no reply can express."""


@dataclass
class WithFds:
    """A reply payload that carries fds (closed here once sent)."""

    payload: bytes
    fds: list[int]


def u64(message: Message) -> int:
    return int(message.parse(vu.U64).value)


def u64_reply(value: int) -> bytes:
    data: bytes = vu.U64.build({"value": value})
    return data


def trace_sent(data: bytes, fds: int, backend_channel: bool = False) -> None:
    """A message the back end sends, for whoever traces messages."""
    described = vu.describe(data, fds, backend_channel)
    if backend_channel:
        described["channel"] = "backend"
    tracer.emit("message", "out", protocol="vhost-user", **described)


def trace_received(message: Message, backend_channel: bool = False) -> None:
    header = vu.Header.build(
        {"request": message.request, "flags": message.flags, "size": len(message.payload)}
    )
    described = vu.describe(header + message.payload, len(message.fds), backend_channel)
    if backend_channel:
        described["channel"] = "backend"
    tracer.emit("message", "in", protocol="vhost-user", **described)
