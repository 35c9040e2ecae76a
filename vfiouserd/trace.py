"""Live tracing: what the guest's driver and the VMM do to the device, as
events, for whoever subscribes (a ``vfiouserd trace`` client on the control
socket, the log at ``--log-level=trace``).

Call sites ask ``tracer.wants(kind)`` before they build an event, so a
daemon nobody traces pays one attribute test per site. While anybody traces
requests, the rings leave the native fast path and Python serves (and
reports) every request: the C loop never builds events.

Event kinds:
  message  a protocol message, decoded, either direction
  request  a virtqueue request: its chain, the device's reading of it, its
           completion and latency
  pci      a config-space or BAR access, with its value
  dma      a device's DMA read or write through the vfio-user DMA map
  irq      an interrupt raised (or held back: masked, dropped, delayed)
  session  a connection starting or ending, a device reset
  fault    an injected fault taking effect
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("message", "request", "pci", "dma", "irq", "session", "fault")
Event = dict[str, Any]


@dataclass
class Filter:
    """Which events a subscriber gets. Empty sets match everything; an
    address range matches events with an ``address`` (DMA, a request's
    descriptors) inside it; ``regions`` narrows PCI accesses, optionally to
    an offset range of one region."""

    kinds: frozenset[str] = frozenset(KINDS)
    queues: frozenset[int] = frozenset()
    regions: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    addresses: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any]) -> Filter:
        """From a ``trace-start`` command; ValueError says what is wrong."""
        kinds = arguments.get("events") or list(KINDS)
        if not isinstance(kinds, list) or not all(k in KINDS for k in kinds):
            raise ValueError(f"events must be a list of {', '.join(KINDS)}")
        queues = arguments.get("queues") or []
        if not isinstance(queues, list) or not all(
            isinstance(q, int) and 0 <= q < 1 << 16 for q in queues
        ):
            raise ValueError("queues must be a list of queue numbers")
        regions: dict[str, tuple[int, int] | None] = {}
        for text in arguments.get("regions") or []:
            if not isinstance(text, str):
                raise ValueError("regions must be strings: NAME or NAME:START-END")
            name, _, span = text.partition(":")
            regions[name] = parse_range(span) if span else None
        addresses = []
        for text in arguments.get("addresses") or []:
            if not isinstance(text, str):
                raise ValueError("addresses must be strings: START-END")
            addresses.append(parse_range(text))
        return cls(frozenset(kinds), frozenset(queues), regions, tuple(addresses))

    def matches(self, event: Event) -> bool:
        if event["kind"] not in self.kinds:
            return False
        queue = event.get("queue")
        if self.queues and queue is not None and queue not in self.queues:
            return False
        if self.regions and event["kind"] == "pci":
            if event.get("region") not in self.regions:
                return False
            span = self.regions[event["region"]]
            if span is not None and not span[0] <= event.get("offset", -1) < span[1]:
                return False
        if self.addresses:
            addresses = event.get("addresses") or (
                [event["address"]] if "address" in event else None
            )
            if addresses is not None and not any(
                lo <= a < hi for a in addresses for lo, hi in self.addresses
            ):
                return False
        return True


def parse_range(text: str) -> tuple[int, int]:
    """``START-END`` (end excluded) or ``START+LENGTH``, numbers in any base."""
    try:
        if "+" in text:
            start, length = (int(part, 0) for part in text.split("+", 1))
            end = start + length
        else:
            start, end = (int(part, 0) for part in text.split("-", 1))
    except ValueError:
        raise ValueError(f"{text!r} is not START-END or START+LENGTH") from None
    if not 0 <= start < end:
        raise ValueError(f"empty or negative range {text!r}")
    return start, end


class RateLimit:
    """A token bucket: ``rate`` events a second, bursts of as many."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Subscription:
    """One subscriber: its filter, its rate limit and where events go.
    ``deliver`` must not block (a control client queues and drops)."""

    def __init__(
        self,
        deliver: Callable[[Event], None],
        filter: Filter,
        rate: float | None = None,
        data_bytes: int = 0,
    ) -> None:
        self.deliver = deliver
        self.data_bytes = data_bytes  # of DMA data to show (the most any subscriber asks)
        self.filter = filter
        self.limit = RateLimit(rate) if rate else None
        self.over_rate = 0  # events the rate limit held back

    def offer(self, event: Event) -> None:
        if not self.filter.matches(event):
            return
        if self.limit is not None and not self.limit.take():
            self.over_rate += 1
            return
        self.deliver(event)


class Tracer:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self._kinds: frozenset[str] = frozenset()
        self.data_bytes = 0
        self._lock = threading.Lock()  # events come from ring worker threads too
        # Called when tracing of requests starts or stops: the rings leave
        # (or may go back to) the native fast path.
        self._on_change: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return bool(self._kinds)

    def wants(self, kind: str) -> bool:
        return kind in self._kinds

    def subscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions = [*self._subscriptions, subscription]
            self._update()

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if s is not subscription]
            self._update()

    def _update(self) -> None:
        before = "request" in self._kinds
        self._kinds = frozenset(k for s in self._subscriptions for k in s.filter.kinds)
        self.data_bytes = max((s.data_bytes for s in self._subscriptions), default=0)
        if ("request" in self._kinds) != before:
            for callback in list(self._on_change):
                callback()

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever request tracing starts or stops; returns
        the way to stop that."""
        self._on_change.append(callback)
        return lambda: self._on_change.remove(callback)

    def emit(self, kind: str, event: str, **fields: Any) -> None:
        """One event; ``event`` names what happened within its kind."""
        record: Event = {"kind": kind, "event": event, "time": time.time(), **fields}
        for subscription in self._subscriptions:  # a copy-on-write list
            subscription.offer(record)


tracer = Tracer()


# -- rendering --------------------------------------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:#x}" if value > 9 else str(value)
    if isinstance(value, list):
        return "[" + " ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + " ".join(f"{k}={_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if text and " " not in text else repr(text)


_HEAD = ("kind", "event", "time")


def render(event: Event) -> str:
    """One human-readable line: time, kind, what happened, then the fields."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    micros = int(event.get("time", 0) * 1e6) % 1_000_000
    rest = " ".join(f"{k}={_value(v)}" for k, v in event.items() if k not in _HEAD)
    return f"{stamp}.{micros:06d} {event.get('kind', '?'):<8} {event.get('event', '?'):<16} {rest}"
