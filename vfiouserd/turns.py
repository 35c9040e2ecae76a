"""Turns on a device's state between the VMM's commands and ring walks.

A ring walk over memory the VMM shares without an fd (vfio-user DMA_MAP
without one) runs on a worker thread and reaches every byte through
DMA_READ/DMA_WRITE messages. QEMU answers those from its main loop, and not
while one of its threads waits, holding its big lock, for our reply to a
command (a config read, a DMA_MAP during a memory transaction): a walk that
made such a command wait would wait for QEMU, which waits for us. So a walk
holds its turn only while it works on the daemon's own state and gives it up
for each round trip to the VMM; commands take their turn in between.

A walk that comes back from a round trip to a queue that was reset, stopped
or re-configured meanwhile is abandoned: ``WalkAbandoned``, and the request
in hand is dropped, as a device reset drops it. A chain that meets a
memory layout changed meanwhile is taken back and tried again (see
``Virtqueue.process``). What must not happen under a walk at all waits in
``quiet``, which lets the walks under way (and device work started on the
event loop) finish and starts no new one until it ends: a pause (a
handover, a migration stopping the device), and the unmap of memory the
daemon has mapped, so no view a walk holds outlives its mapping.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from vfiouserd.changes import Changes

T = TypeVar("T")


class WalkAbandoned(Exception):
    """The walk's queue changed while the walk waited for the VMM."""


class Turns:
    def __init__(self) -> None:
        self._turn = trio.Semaphore(1)  # whoever works on device state now
        self._walks = 0  # walks under way, in or out of their turn
        self._quiet = 0  # pauses waiting for, or holding, a time without walks
        self._changed = Changes()
        self._local = threading.local()  # per worker thread: its walk's check

    # -- the event loop's side ---------------------------------------------------------

    @asynccontextmanager
    async def command(self) -> AsyncIterator[None]:
        """A command's turn: no walk works on device state meanwhile."""
        async with self._turn:
            yield

    @asynccontextmanager
    async def walk(self) -> AsyncIterator[None]:
        """A walk's turn (given up for round trips, see ``round_trip``);
        waits while a pause wants the walks to stop."""
        await self._changed.until(lambda: not self._quiet)
        self._walks += 1
        try:
            async with self._turn:
                yield
        finally:
            self._walks -= 1
            self._changed.notify()

    def work_started(self) -> None:
        """Device work on the event loop began (a DMA transfer a register
        write asked for): it takes no turn, as it runs between commands
        anyway, but a pause waits for it as for a walk."""
        self._walks += 1

    def work_done(self) -> None:
        self._walks -= 1
        self._changed.notify()

    @asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        """No walk under way: those running finish (commands go on being
        served meanwhile, as their round trips need), no new one starts."""
        self._quiet += 1
        try:
            await self._changed.until(lambda: not self._walks)
            async with self._turn:
                yield
        finally:
            self._quiet -= 1
            self._changed.notify()

    @property
    def walking(self) -> bool:
        return self._walks > 0

    # -- a walk's worker thread ------------------------------------------------------------

    def run_walk(self, check: Callable[[], bool], walk: Callable[[], None]) -> None:
        """Run ``walk`` on this worker thread; after each round trip
        ``check`` says whether its queue is still the one it walked."""
        self._local.check = check
        try:
            walk()
        finally:
            self._local.check = None

    def round_trip(self, call: Callable[..., Awaitable[T]], *args: object) -> T:
        """From a walk's worker thread: give the turn up, run ``call`` on the
        event loop, take the turn back; WalkAbandoned if the queue changed."""
        trio.from_thread.run_sync(self._turn.release)
        try:
            return trio.from_thread.run(call, *args)
        finally:
            trio.from_thread.run(self._take_back)
            check = getattr(self._local, "check", None)
            if check is not None and not check():
                raise WalkAbandoned("the queue changed while its walk waited for the VMM")

    async def _take_back(self) -> None:
        # Shielded: a walk cancelled meanwhile still leaves holding its turn,
        # which ``walk`` then gives up.
        with trio.CancelScope(shield=True):
            await self._turn.acquire()
