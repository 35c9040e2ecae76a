"""Asynchronous events: the Asynchronous Event Requests a driver leaves with
the controller (up to AERL + 1 of them), the events waiting for one, and the
event types already reported, masked until the host reads their log page.

Events come from the queues (invalid doorbell writes) and from Set Features
(a temperature threshold crossed); the queue task completes an AER with
each (``deliverable``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from vfiouserd.devices.nvme.formats import Specific, specific

AERL = 3  # 0-based: four outstanding Asynchronous Event Requests
HELD = -1  # an Asynchronous Event Request completes later: no completion now
MAX_PENDING = 16  # events kept while no request is there to report them


class AsyncEvents:
    def __init__(self, wake: Callable[[], None]) -> None:
        """``wake``: the queue task has something to deliver."""
        self._wake = wake
        self.clear()

    def clear(self) -> None:
        """A controller reset: requests and events go."""
        self.requests: list[int] = []  # CIDs of the AERs held
        self.pending: list[int] = []  # events (their completion's DW0) not reported yet
        self.masked = 0  # event types reported and not yet read in their log

    def report(self, dw0: int) -> None:
        if len(self.pending) < MAX_PENDING and dw0 not in self.pending:
            self.pending.append(dw0)
        self._wake()

    def hold(self, cid: int) -> int:
        """An Asynchronous Event Request: held until an event comes (HELD)."""
        if len(self.requests) > AERL:
            raise specific(Specific.ASYNC_EVENT_LIMIT_EXCEEDED, "too many AERs")
        self.requests.append(cid)
        return HELD

    def log_read(self, kind: int) -> None:
        """The host read the log page of ``kind``: its events may come again."""
        self.masked &= ~(1 << kind)

    def deliverable(self) -> Iterator[tuple[int, int]]:
        """(AER CID, event) to complete, one at a time, while requests last
        and for event types not masked; each taken masks its type."""
        for event in list(self.pending):
            kind = event & 7
            if not self.requests or self.masked & 1 << kind:
                continue
            self.pending.remove(event)
            self.masked |= 1 << kind
            yield self.requests.pop(0), event

    # -- state -------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {
            "async_requests": [{"cid": cid} for cid in self.requests],
            "async_events": [{"dw0": dw0} for dw0 in self.pending],
            "async_masked": self.masked,
        }

    def load(self, values: dict[str, Any]) -> None:
        self.requests = [r["cid"] for r in values["async_requests"]]
        self.pending = [e["dw0"] for e in values["async_events"]]
        self.masked = values["async_masked"]
