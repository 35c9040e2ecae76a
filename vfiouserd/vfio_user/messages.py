"""What every vfio-user command handler shares: how it reads its request,
how it refuses one, and what it answers."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from construct import Construct, Container

from vfiouserd.protocol.vfio_user import Message


class RequestError(Exception):
    """Refuse the request with ``errno``."""

    def __init__(self, error: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = error


class ProtocolViolation(Exception):
    """Close the connection."""


@dataclass
class Reply:
    payload: bytes = b""
    fds: list[int] | None = None


Handler = Callable[[Message], Awaitable[Reply]]


def parse(message: Message, layout: Construct, what: str) -> Container:
    """The fixed structure at the start of the payload."""
    size = layout.sizeof()
    if len(message.payload) < size:
        raise RequestError(errno.EINVAL, f"{what} payload of {len(message.payload)} bytes")
    return layout.parse(message.payload[:size])


def parse_data(data: bytes, layout: Construct, what: str) -> Container:
    """A structure in the data after a request's header."""
    if len(data) < layout.sizeof():
        raise RequestError(errno.EINVAL, f"{what}: {len(data)} bytes of data")
    return layout.parse(data)
