"""Byte-stream framing over AF_UNIX stream sockets with SCM_RIGHTS fd passing.

Both vhost-user and vfio-user send a fixed header followed by a payload, with
file descriptors attached as ancillary data to the first bytes of a message.
This module reads exact byte counts and collects every fd that arrives with
them, so the protocol layers can check the fd count of each message and close
any that were not expected.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from dataclasses import dataclass, field

import trio

# The most fds one message may legitimately carry is 8 (vhost-user memory
# table) or max_msg_fds for vfio-user; anything above this is refused, and the
# kernel closes what does not fit in the control buffer.
MAX_FDS_PER_READ = 64
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)


class ConnectionClosed(Exception):
    """The peer closed the socket (possibly in the middle of a message)."""


class FramingError(Exception):
    """The byte stream cannot be trusted any more; the connection must close."""


@dataclass
class Received:
    data: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            usable = len(payload) - len(payload) % ints.itemsize
            ints.frombytes(payload[:usable])
            fds.extend(ints)
    return fds


async def receive_exactly(sock: trio.socket.SocketType, size: int) -> Received:
    """Read exactly ``size`` bytes, gathering every fd that arrives with them.

    Raises ConnectionClosed on EOF. Received fds are the caller's to close.
    """
    chunks: list[bytes] = []
    got = 0
    result = Received(b"")
    try:
        while got < size:
            try:
                data, ancdata, msg_flags, _ = await sock.recvmsg(
                    size - got, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError as exc:
                raise ConnectionClosed(str(exc)) from exc
            result.fds.extend(fds_from_ancillary(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                result.fds_truncated = True
            if not data:
                raise ConnectionClosed(f"peer closed the connection after {got} of {size} bytes")
            chunks.append(data)
            got += len(data)
    except BaseException:
        close_fds(result.fds)
        raise
    result.data = b"".join(chunks)
    return result


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing ``fds`` (none if the list is empty)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


async def send_all(sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None) -> None:
    """Send ``data`` with ``fds`` attached to its first byte."""
    ancillary = rights(fds or [])
    view = memoryview(data)
    while view:
        try:
            sent = await sock.sendmsg([view], ancillary)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosed(str(exc)) from exc
        ancillary = []
        view = view[sent:]
