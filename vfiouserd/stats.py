"""Counters of every queue, for ``stats``, ``top`` and Prometheus.

A queue counts in two places: its Python ring (``QueueStats.count``) and,
while the native fast path serves it, the C loop's own counters in its
``struct vfu_split_queue``, folded in when the loop stops and read as they
stand while it runs (plain 64-bit loads: a reader may see a request or two
late, never a torn value). Latencies go in log2 buckets of nanoseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

BUCKETS = 64  # bucket b holds latencies in [2**b, 2**(b+1)) ns


class QueueStats:
    __slots__ = (
        "bytes",
        "errors",
        "in_flight",
        "latency",
        "latency_max",
        "live",
        "native_requests",
        "notified",
        "python_because",
        "queue",
        "requests",
        "suppressed",
    )

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.requests = self.bytes = self.errors = 0
        self.native_requests = 0  # of them, served by the native loop
        self.notified = self.suppressed = 0
        self.latency = [0] * BUCKETS
        self.latency_max = 0
        # What waits in the device (held buffers, delayed completions).
        self.in_flight: Callable[[], int] = lambda: 0
        # The running native loop's counters, or None.
        self.live: Callable[[], Any] = lambda: None
        # Why Python serves the queue (None: the native loop may).
        self.python_because: Callable[[], str | None] = lambda: "not started"

    def count(self, requests: int, size: int, latency_ns: int | None = None) -> None:
        self.requests += requests
        self.bytes += size
        if latency_ns is not None:
            self.latency[min(max(latency_ns, 1).bit_length() - 1, BUCKETS - 1)] += 1
            self.latency_max = max(self.latency_max, latency_ns)

    def fold(self, native: Any) -> None:
        """Add a stopped native loop's counters."""
        self.requests += native.served
        self.native_requests += native.served
        self.bytes += native.bytes
        self.notified += native.notified
        self.suppressed += native.suppressed
        for bucket in range(BUCKETS):
            self.latency[bucket] += native.latency[bucket]
        self.latency_max = max(self.latency_max, native.latency_max)

    def snapshot(self) -> dict[str, Any]:
        total = {
            "queue": self.queue,
            "requests": self.requests,
            "native_requests": self.native_requests,
            "bytes": self.bytes,
            "errors": self.errors,
            "notified": self.notified,
            "suppressed": self.suppressed,
            "in_flight": self.in_flight(),
            "latency_log2_ns": list(self.latency),
            "latency_max_ns": self.latency_max,
        }
        native = self.live()
        if native is not None:
            total["requests"] += native.served
            total["native_requests"] += native.served
            total["bytes"] += native.bytes
            total["notified"] += native.notified
            total["suppressed"] += native.suppressed
            total["latency_log2_ns"] = [a + native.latency[b] for b, a in enumerate(self.latency)]
            total["latency_max_ns"] = max(self.latency_max, native.latency_max)
        total["native"] = native is not None
        total["python_because"] = self.python_because()
        return total


# One device per process: a queue's counters outlive its sessions (the
# device's lifetime figures), whichever Virtqueue object serves it now.
_queues: dict[int, QueueStats] = {}
_started = time.monotonic()


def of_queue(index: int) -> QueueStats:
    stats = _queues.get(index)
    if stats is None:
        stats = _queues[index] = QueueStats(index)
    return stats


def clear() -> None:
    """Forget every queue (tests that run several devices in one process)."""
    _queues.clear()


def percentile(buckets: list[int], fraction: float) -> int | None:
    """The upper bound (ns) of the bucket holding that fraction of the
    samples; None without samples."""
    total = sum(buckets)
    if not total:
        return None
    wanted = fraction * total
    seen = 0
    for bucket, count in enumerate(buckets):
        seen += count
        if seen >= wanted:
            return int(2 ** (bucket + 1))
    return int(2**BUCKETS)


def collect(device: dict[str, Any]) -> dict[str, Any]:
    """Everything ``stats`` returns: the device's own figures and each queue's."""
    queues = sorted((q.snapshot() for q in list(_queues.values())), key=lambda q: q["queue"])
    for entry in queues:
        entry["latency_p50_ns"] = percentile(entry["latency_log2_ns"], 0.5)
        entry["latency_p99_ns"] = percentile(entry["latency_log2_ns"], 0.99)
    totals = {
        name: sum(q[name] for q in queues)
        for name in ("requests", "bytes", "errors", "notified", "suppressed", "in_flight")
    }
    return {
        "time": time.time(),
        "uptime": time.monotonic() - _started,
        "device": {**device, **totals},
        "queues": queues,
    }


_METRICS = (
    ("requests", "counter", "Requests completed"),
    ("bytes", "counter", "Bytes the device read or wrote in the guest's buffers"),
    ("errors", "counter", "Requests completed with an error status"),
    ("notified", "counter", "Interrupts (used-buffer notifications) sent"),
    ("suppressed", "counter", "Notifications the driver asked not to get"),
    ("in_flight", "gauge", "Requests taken and not yet completed"),
)


def prometheus(snapshot: dict[str, Any], labels: dict[str, str]) -> str:
    """The text exposition format (version 0.0.4) of a ``collect`` result."""
    common = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    lines = []
    for name, kind, text in _METRICS:
        metric = f"vfiouserd_queue_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {metric} {text}.", f"# TYPE {metric} {kind}"]
        for queue in snapshot["queues"]:
            lines.append(f'{metric}{{{common},queue="{queue["queue"]}"}} {queue[name]}')
    metric = "vfiouserd_queue_latency_seconds"
    lines += [
        f"# HELP {metric} Time from taking a request to completing it.",
        f"# TYPE {metric} histogram",
    ]
    for queue in snapshot["queues"]:
        where = f'{common},queue="{queue["queue"]}"'
        buckets = queue["latency_log2_ns"]
        last = max((b for b, n in enumerate(buckets) if n), default=0)
        running = 0
        for bucket in range(last + 1):
            running += buckets[bucket]
            bound = 2 ** (bucket + 1) / 1e9
            lines.append(f'{metric}_bucket{{{where},le="{bound:.9g}"}} {running}')
        lines.append(f'{metric}_bucket{{{where},le="+Inf"}} {running}')
        lines.append(f"{metric}_count{{{where}}} {running}")
        # The histogram has no exact sum: the buckets' midpoints stand in.
        estimate = sum(n * 1.5 * 2**b for b, n in enumerate(buckets)) / 1e9
        lines.append(f"{metric}_sum{{{where}}} {estimate:.9g}")
    lines += [
        "# HELP vfiouserd_uptime_seconds Time since the daemon started.",
        "# TYPE vfiouserd_uptime_seconds gauge",
        f"vfiouserd_uptime_seconds{{{common}}} {snapshot['uptime']:.3f}",
    ]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
