"""Commands a vfio-user client pipelined, read ahead of the one in process.

A client may send many commands without waiting for their replies. Reading
them ahead must neither grow without bound nor stop the reader when the
device waits for the client: a ring walk over memory shared without an fd
waits for the reply to its DMA_READ, which comes on the same socket as the
commands. So past ``soft`` commands the reader stops reading (back-pressure)
unless one of our requests waits for its reply; then it goes on, and a
client that pipelines past ``hard`` commands or ``hard_bytes`` of payload
meanwhile is broken: the session ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from vfiouserd.protocol.vfio_user import Message


class BacklogOverflow(Exception):
    """The client pipelined more than the hard limit."""


class CommandBacklog:
    def __init__(self, soft: int, hard: int, hard_bytes: int) -> None:
        self.soft, self.hard, self.hard_bytes = soft, hard, hard_bytes
        self._messages: deque[Message] = deque()
        self._bytes = 0
        self._changed = trio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._messages)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def poke(self) -> None:
        """Something a waiting reader cares about changed (a request of ours
        now waits for its reply)."""
        self._notify()

    def put(self, message: Message) -> None:
        """Queue a command; its fds are ours from here on (closed if it is
        refused)."""
        size = len(message.payload)
        if len(self._messages) >= self.hard or self._bytes + size > self.hard_bytes:
            message.close_fds()
            raise BacklogOverflow(
                f"more than {len(self._messages)} commands ({self._bytes} bytes) pipelined"
                " while the server waited for the client"
            )
        self._messages.append(message)
        self._bytes += size
        self._notify()

    def get_nowait(self) -> Message:
        if not self._messages:
            raise trio.WouldBlock
        message = self._messages.popleft()
        self._bytes -= len(message.payload)
        self._notify()
        return message

    async def get(self) -> Message:
        """The next command; EndOfChannel once closed and empty."""
        while not self._messages:
            if self._closed:
                raise trio.EndOfChannel
            await self._changed.wait()
        return self.get_nowait()

    async def wait_for_room(self, must_read: Callable[[], bool]) -> None:
        """Until the backlog is below ``soft``, or ``must_read()`` says the
        reader must go on anyway."""
        while len(self._messages) >= self.soft and not must_read():
            await self._changed.wait()

    def close(self) -> None:
        """No more commands: ``get`` ends once the backlog is empty."""
        self._closed = True
        self._notify()

    def discard(self) -> None:
        """Close the fds of every command never processed."""
        while self._messages:
            self.get_nowait().close_fds()
