"""Waiting for a condition on state that a few places change, without polling."""

from __future__ import annotations

from collections.abc import Callable

import trio


class Changes:
    """Whoever changes the state calls ``notify``; a waiter re-checks its
    condition then (and only then)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()
