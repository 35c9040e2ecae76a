"""Waiting for a condition on state that a few places change, without polling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, overload

import trio

T = TypeVar("T")


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


class Watched(Generic[T]):
    """An attribute whose every assignment calls ``notify`` on the owner's
    ``_changes`` (a ``Changes``), so waiters on it need not poll."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_watched_{name}"

    @overload
    def __get__(self, instance: None, owner: type) -> Watched[T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: object | None, owner: type) -> Watched[T] | T:
        if instance is None:
            return self
        value: T = getattr(instance, self.slot)
        return value

    def __set__(self, instance: object, value: T) -> None:
        setattr(instance, self.slot, value)
        changes: Changes = getattr(instance, "_changes")  # noqa: B009 - set by the owner
        changes.notify()
