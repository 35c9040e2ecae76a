"""Fault injection: rules a tester adds to a live daemon (``vfiouserd
inject``) to see how a guest driver copes, and removes again.

Only a daemon started with ``--allow-fault-injection`` accepts rules. Each
rule is logged when added, when it first takes effect and when removed;
each hit is a ``fault`` trace event. While a rule acts on requests, the
rings leave the native fast path (Python applies the rules).

Kinds (fields in brackets are optional):
  delay     ms [queue] [sectors] [type]   complete matching requests late
  hang      ms [queue]                    take no request for ms from now
  ioerr     sectors [type] [queue]        fail them (virtio-blk: IOERR)
  corrupt   sectors [queue]               flip the bits of the data read
  irq-drop  [queue | vector]              send no interrupt
  irq-delay ms [queue | vector]           send it ms later
  register  region offset value [size]    reads of it return value
``count`` on any rule: apply it that many times, then remove it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vfiouserd.log import get_logger
from vfiouserd.trace import parse_range, tracer

log = get_logger("faults")

KINDS = ("delay", "hang", "ioerr", "corrupt", "irq-drop", "irq-delay", "register")
# Rules the rings apply (with their interrupts): the native loop leaves them to Python.
REQUEST_KINDS = frozenset({"delay", "hang", "ioerr", "corrupt", "irq-drop", "irq-delay"})
SECTOR_KINDS = frozenset({"ioerr", "corrupt"})  # only devices with sectors take them
REGIONS = ("bar0", "bar1", "bar2", "bar3", "bar4", "bar5", "rom", "config")
MAX_RULES = 64
MAX_MS = 600_000
_FIELDS = {
    "delay": ({"ms"}, {"queue", "sectors", "type", "count"}),
    "hang": ({"ms"}, {"queue", "count"}),
    "ioerr": ({"sectors"}, {"queue", "type", "count"}),
    "corrupt": ({"sectors"}, {"queue", "count"}),
    "irq-drop": (set(), {"queue", "vector", "count"}),
    "irq-delay": ({"ms"}, {"queue", "vector", "count"}),
    "register": ({"region", "offset", "value"}, {"size", "count"}),
}


class RuleError(ValueError):
    """A rule that cannot be added; the message says why."""


@dataclass
class Rule:
    id: int
    kind: str
    ms: int = 0
    queue: int | None = None
    vector: int | None = None
    sectors: tuple[int, int] | None = None
    type: str | None = None
    region: str | None = None
    offset: int = 0
    value: int = 0
    size: int = 4
    count: int | None = None  # hits left; None: until removed
    hits: int = 0
    until: float | None = None  # a hang's end (time.monotonic)
    created: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"id": self.id, "kind": self.kind, "hits": self.hits}
        for name in ("ms", "queue", "vector", "type", "region", "count"):
            value = getattr(self, name)
            if value not in (None, 0) or (name == "queue" and value == 0):
                shown[name] = value
        if self.sectors is not None:
            shown["sectors"] = f"{self.sectors[0]}-{self.sectors[1]}"
        if self.kind == "register":
            shown.update(offset=self.offset, value=self.value, size=self.size)
        if self.until is not None:
            shown["remaining_ms"] = max(0, round((self.until - time.monotonic()) * 1000))
        return shown


def _integer(arguments: dict[str, Any], name: str, low: int, high: int) -> int:
    value = arguments[name]
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise RuleError(f"{name}={value!r} is not a number") from None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RuleError(f"{name} must be a number from {low} to {high}")
    return value


class Rules:
    def __init__(self) -> None:
        self.allowed = False
        self.sector_kinds = False  # the device has sectors (ioerr, corrupt)
        self._rules: dict[int, Rule] = {}
        self._next_id = 1
        self._lock = threading.Lock()  # ring walks on worker threads apply rules too
        self.steering = False  # a rule acts on requests: the rings stay in Python
        self._on_change: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._on_change.append(callback)
        return lambda: self._on_change.remove(callback)

    @property
    def has_rules(self) -> bool:
        return bool(self._rules)

    def _changed(self) -> bool:
        """Under the lock: whether the rings must look at the rules anew
        (the caller tells them, with ``_tell``, once the lock is released)."""
        steering = any(r.kind in REQUEST_KINDS for r in self._rules.values())
        changed = steering != self.steering
        self.steering = steering
        return changed

    def _tell(self, changed: bool) -> None:
        if changed:
            for callback in list(self._on_change):
                callback()

    # -- managing ---------------------------------------------------------------------

    def add(self, arguments: dict[str, Any]) -> Rule:
        if not self.allowed:
            raise RuleError("fault injection is off: start the daemon with --allow-fault-injection")
        kind = arguments.get("kind")
        if kind not in _FIELDS:
            raise RuleError(f"kind must be one of {', '.join(KINDS)}")
        required, optional = _FIELDS[kind]
        given = set(arguments) - {"kind"}
        if missing := required - given:
            raise RuleError(f"{kind} needs {', '.join(sorted(missing))}")
        if unknown := given - required - optional:
            raise RuleError(f"{kind} takes no {', '.join(sorted(unknown))}")
        if kind in SECTOR_KINDS and not self.sector_kinds:
            raise RuleError(f"{kind} needs a device with sectors (virtio-blk)")
        rule = Rule(0, kind)
        if "ms" in given:
            rule.ms = _integer(arguments, "ms", 1, MAX_MS)
        if "queue" in given:
            rule.queue = _integer(arguments, "queue", 0, 0xFFFF)
        if "vector" in given:
            rule.vector = _integer(arguments, "vector", 0, 2047)
        if "queue" in given and "vector" in given:
            raise RuleError("give queue or vector, not both")
        if "count" in given:
            rule.count = _integer(arguments, "count", 1, 1 << 32)
        if "sectors" in given:
            if not isinstance(arguments["sectors"], str):
                raise RuleError("sectors must be START-END (end excluded) or START+COUNT")
            try:
                rule.sectors = parse_range(arguments["sectors"])
            except ValueError as exc:
                raise RuleError(str(exc)) from None
        if "type" in given:
            if arguments["type"] not in ("read", "write", "flush", "discard", "write-zeroes"):
                raise RuleError("type must be read, write, flush, discard or write-zeroes")
            rule.type = arguments["type"]
        if kind == "register":
            if arguments["region"] not in REGIONS:
                raise RuleError(f"region must be one of {', '.join(REGIONS)}")
            rule.region = arguments["region"]
            rule.size = _integer(arguments, "size", 1, 8) if "size" in given else 4
            if rule.size not in (1, 2, 4, 8):
                raise RuleError("size must be 1, 2, 4 or 8")
            rule.offset = _integer(arguments, "offset", 0, 1 << 40)
            rule.value = _integer(arguments, "value", 0, (1 << 8 * rule.size) - 1)
        if kind == "hang":
            rule.until = time.monotonic() + rule.ms / 1000
        with self._lock:
            if len(self._rules) >= MAX_RULES:
                raise RuleError(f"{MAX_RULES} rules already")
            rule.id = self._next_id
            self._next_id += 1
            self._rules[rule.id] = rule
            changed = self._changed()
        self._tell(changed)
        log.warning("fault.added", **rule.describe())
        return rule

    def remove(self, rule_id: int) -> Rule:
        with self._lock:
            rule = self._rules.pop(rule_id, None)
            if rule is None:
                raise RuleError(f"no rule {rule_id}")
            changed = self._changed()
        self._tell(changed)
        log.warning("fault.removed", **rule.describe())
        return rule

    def clear(self) -> None:
        for rule_id in list(self._rules):
            self.remove(rule_id)

    def in_force(self) -> list[Rule]:
        self._expire()
        return sorted(self._rules.values(), key=lambda r: r.id)

    def _expire(self) -> None:
        now = time.monotonic()
        for rule in list(self._rules.values()):
            if rule.until is not None and now >= rule.until:
                with self._lock:
                    if self._rules.pop(rule.id, None) is None:
                        continue
                    changed = self._changed()
                self._tell(changed)
                log.warning("fault.expired", **rule.describe())

    def _hit(self, rule: Rule, **fields: Any) -> None:
        """Count a rule's effect; a rule with a count goes when it is used up."""
        changed = False
        with self._lock:
            rule.hits += 1
            used_up = rule.count is not None and rule.hits >= rule.count
            if used_up and self._rules.pop(rule.id, None) is not None:
                changed = self._changed()
        if rule.hits == 1:
            log.warning("fault.applied", id=rule.id, kind=rule.kind, **fields)
        self._tell(changed)
        if tracer.wants("fault"):
            tracer.emit("fault", rule.kind, rule=rule.id, **fields)

    def _matching(self, kinds: frozenset[str] | set[str], queue: int | None = None) -> list[Rule]:
        if not self._rules:
            return []
        return [
            r
            for r in list(self._rules.values())
            if r.kind in kinds and (r.queue is None or r.queue == queue)
        ]

    # -- applying: requests ----------------------------------------------------------------

    def hang_until(self, queue: int) -> float | None:
        """While a hang rule runs: when it ends (time.monotonic)."""
        now = time.monotonic()
        for rule in self._matching({"hang"}, queue):
            assert rule.until is not None
            if now < rule.until:
                if rule.hits == 0:
                    self._hit(rule, queue=queue)
                return rule.until
        self._expire()
        return None

    def request_delay(self, queue: int, kind: str | None, sectors: tuple[int, int] | None) -> float:
        """Seconds to hold a served request's completion back."""
        delay = 0.0
        for rule in self._matching({"delay"}, queue):
            if _covers(rule, kind, sectors):
                delay = max(delay, rule.ms / 1000)
                self._hit(rule, queue=queue)
        return delay

    def sector_fault(
        self, fault: str, queue: int, kind: str, sectors: tuple[int, int]
    ) -> tuple[int, int] | None:
        """The part of ``sectors`` an ioerr or corrupt rule covers."""
        for rule in self._matching({fault}, queue):
            assert rule.sectors is not None
            if _covers(rule, kind, sectors):
                self._hit(rule, queue=queue, sector=sectors[0], sectors=sectors[1] - sectors[0])
                return max(rule.sectors[0], sectors[0]), min(rule.sectors[1], sectors[1])
        return None

    # -- applying: interrupts and registers ---------------------------------------------------

    def interrupt(
        self, queue: int | None = None, vector: int | None = None, catch_all: bool = True
    ) -> float | None:
        """None: send the interrupt now; else drop it (inf) or delay it
        (seconds). A rule naming neither queue nor vector applies where
        ``catch_all`` (once per interrupt: virtio queues' interrupts are
        ruled by queue before they reach a PCI vector)."""
        if not self._rules:
            return None
        for rule in list(self._rules.values()):
            if rule.kind not in ("irq-drop", "irq-delay"):
                continue
            if rule.queue is not None:
                matched = rule.queue == queue
            elif rule.vector is not None:
                matched = rule.vector == vector
            else:
                matched = catch_all
            if not matched:
                continue
            where = {"queue": queue} if queue is not None else {"vector": vector}
            self._hit(rule, **where)
            return float("inf") if rule.kind == "irq-drop" else rule.ms / 1000
        return None

    def register_read(self, region: str, offset: int, data: bytes) -> bytes:
        """``data`` read at ``offset`` with any forced register's bytes in it."""
        for rule in self._matching({"register"}):
            if rule.region != region:
                continue
            start, end = max(offset, rule.offset), min(offset + len(data), rule.offset + rule.size)
            if start >= end:
                continue
            forced = rule.value.to_bytes(rule.size, "little")
            patched = bytearray(data)
            patched[start - offset : end - offset] = forced[start - rule.offset : end - rule.offset]
            self._hit(rule, region=region, offset=rule.offset, value=rule.value)
            data = bytes(patched)
        return data


def _covers(rule: Rule, kind: str | None, sectors: tuple[int, int] | None) -> bool:
    if rule.type is not None and rule.type != kind:
        return False
    if rule.sectors is not None:
        if sectors is None:
            return False
        return sectors[0] < rule.sectors[1] and rule.sectors[0] < sectors[1]
    return True


rules = Rules()
