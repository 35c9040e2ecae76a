"""``vfiouserd stats|top|trace|inject``: the device lab, on live daemons
through their control sockets (see vfiouserd.control)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from vfiouserd.client.control import (
    DEFAULT_DIRECTORY,
    ControlClient,
    ControlError,
    connect,
    control_sockets,
)
from vfiouserd.faults import KINDS as FAULT_KINDS
from vfiouserd.stats import percentile
from vfiouserd.trace import KINDS as EVENT_KINDS
from vfiouserd.trace import render

TARGET_HELP = "a control socket, a VMM socket, a PID or a systemd unit (NAME or NAME.service)"


def add_commands(commands: Any) -> None:
    stats = commands.add_parser("stats", help="a live daemon's counters, per queue")
    stats.add_argument("target", help=TARGET_HELP)
    stats.add_argument("--json", action="store_true", help="the raw counters and rates")
    stats.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the two samples of a rate"
    )
    stats.add_argument("--prometheus", action="store_true", help="the metrics command's text")
    stats.set_defaults(run=_stats)

    top = commands.add_parser("top", help="every daemon's rates, refreshed")
    top.add_argument("directory", nargs="?", default=DEFAULT_DIRECTORY, help="%(default)s")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--iterations", type=int, default=0, help="stop after N (0: never)")
    top.set_defaults(run=_top)

    trace = commands.add_parser("trace", help="stream what a guest and the VMM do to a device")
    trace.add_argument("target", nargs="?", help=TARGET_HELP)
    trace.add_argument("--json", action="store_true", help="JSON lines, not text")
    trace.add_argument(
        "--events", default=",".join(EVENT_KINDS), help="comma-separated: %(default)s"
    )
    trace.add_argument("--queue", type=int, action="append", default=[], help="only queue N")
    trace.add_argument(
        "--region", action="append", default=[], help="PCI region, NAME or NAME:START-END"
    )
    trace.add_argument(
        "--address", action="append", default=[], help="guest addresses START-END or START+LEN"
    )
    trace.add_argument("--rate", type=float, help="at most this many events a second")
    trace.add_argument("--data-bytes", type=int, default=0, help="of DMA data to show (max 64)")
    trace.add_argument("--count", type=int, default=0, help="stop after N events")
    trace.add_argument("--duration", type=float, default=0, help="stop after S seconds")
    trace.add_argument("--output", type=argparse.FileType("w"), help="record events to FILE")
    trace.add_argument("--replay", type=argparse.FileType("r"), help="print a recorded FILE")
    trace.set_defaults(run=_trace)

    inject = commands.add_parser(
        "inject",
        help="add, list or remove fault rules (the daemon needs --allow-fault-injection)",
        description="RULE is KIND KEY=VALUE...; kinds: "
        + ", ".join(FAULT_KINDS)
        + ". For example: inject disk0 ioerr sectors=2048+8; inject disk0 delay ms=50 "
        "queue=0; inject dev register region=bar0 offset=0x10 value=0xdead",
    )
    inject.add_argument("target", help=TARGET_HELP)
    inject.add_argument("rule", nargs="*", help="KIND KEY=VALUE...")
    inject.add_argument("--list", action="store_true", help="the rules in force")
    inject.add_argument("--remove", type=int, metavar="ID", help="remove rule ID")
    inject.add_argument("--clear", action="store_true", help="remove every rule")
    inject.set_defaults(run=_inject)


def _fail(error: Exception) -> int:
    print(f"vfiouserd: {error}", file=sys.stderr)
    return 1


# -- stats and top -------------------------------------------------------------------------


def rates(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Per queue: the counters of ``after`` with rates since ``before``."""
    elapsed = max(after["time"] - before["time"], 1e-6)
    previous = {q["queue"]: q for q in before["queues"]}
    rows = []
    for queue in after["queues"]:
        old = previous.get(queue["queue"], {})
        row = dict(queue)
        for name in ("requests", "bytes", "notified", "suppressed", "errors"):
            row[f"{name}_per_s"] = (queue[name] - old.get(name, 0)) / elapsed
        lifetime = old.get("latency_log2_ns") or [0] * len(queue["latency_log2_ns"])
        window = [n - m for n, m in zip(queue["latency_log2_ns"], lifetime, strict=True)]
        row["window_p50_ns"] = percentile(window, 0.5)
        row["window_p99_ns"] = percentile(window, 0.99)
        rows.append(row)
    return rows


def _ns(value: int | None) -> str:
    if value is None:
        return "-"
    if value < 10_000:
        return f"{value}ns"
    if value < 10_000_000:
        return f"{value / 1000:.0f}us"
    return f"{value / 1e6:.0f}ms"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


HEADER = (
    f"{'queue':>5} {'req/s':>9} {'bytes/s':>10} {'requests':>11} {'inflight':>8} "
    f"{'p50':>7} {'p99':>7} {'max':>7} {'irq/s':>8} {'supp/s':>8} {'errors':>7} path"
)


def _row(row: dict[str, Any]) -> str:
    return (
        f"{row['queue']:>5} {row['requests_per_s']:>9.0f} {_bytes(row['bytes_per_s']):>10} "
        f"{row['requests']:>11} {row['in_flight']:>8} {_ns(row['window_p50_ns']):>7} "
        f"{_ns(row['window_p99_ns']):>7} {_ns(row['latency_max_ns']):>7} "
        f"{row['notified_per_s']:>8.0f} {row['suppressed_per_s']:>8.0f} {row['errors']:>7} "
        f"{'native' if row['native'] else 'python'}"
    )


def _stats(args: argparse.Namespace) -> int:
    try:
        with connect(args.target) as client:
            if args.prometheus:
                sys.stdout.write(client.execute("metrics")["text"])
                return 0
            before = client.execute("stats")
            time.sleep(args.interval)
            after = client.execute("stats")
            greeting = client.greeting
    except (ControlError, OSError) as exc:
        return _fail(exc)
    rows = rates(before, after)
    if args.json:
        print(json.dumps({"daemon": greeting, "stats": after, "queues": rows}, indent=2))
        return 0
    print(
        f"{greeting.get('device')} over {greeting.get('transport')}, pid {greeting.get('pid')}, "
        f"up {after['uptime']:.0f} s"
    )
    print("device: " + " ".join(f"{k}={v}" for k, v in after["device"].items()))
    print(HEADER)
    for row in rows:
        print(_row(row))
    return 0


def _top(args: argparse.Namespace) -> int:
    previous: dict[str, dict[str, Any]] = {}
    iteration = 0
    while True:
        lines = [time.strftime("vfiouserd top  %H:%M:%S") + f"  ({args.directory})", HEADER]
        for path in control_sockets(args.directory):
            try:
                with ControlClient(path, timeout=2) as client:
                    now = client.execute("stats")
                    greeting = client.greeting
            except (ControlError, OSError) as exc:
                lines.append(f"{path}: {exc}")
                continue
            lines.append(f"{path}: {greeting.get('device')} over {greeting.get('transport')}")
            for row in rates(previous.get(path, now), now):
                lines.append(_row(row))
            previous[path] = now
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print("\n".join(lines), flush=True)
        iteration += 1
        if args.iterations and iteration >= args.iterations:
            return 0
        time.sleep(args.interval)


# -- trace ---------------------------------------------------------------------------------


def _printer(as_json: bool, output: IO[str] | None) -> Callable[[dict[str, Any]], None]:
    def show(message: dict[str, Any]) -> None:
        if output is not None:
            output.write(json.dumps(message) + "\n")
            output.flush()
        if message.get("event") == "TRACE_LOST":
            text = f"-- {message['data']['count']} events lost (the client read too slowly)"
            print(json.dumps(message) if as_json else text, flush=True)
        elif as_json:
            print(json.dumps(message["data"]), flush=True)
        else:
            print(render(message["data"]), flush=True)

    return show


def _trace(args: argparse.Namespace) -> int:
    show = _printer(args.json, args.output)
    if args.replay is not None:
        for line in args.replay:
            if line.strip():
                message = json.loads(line)
                if "event" in message:
                    _printer(args.json, None)(message)
        return 0
    if args.target is None:
        return _fail(ValueError("give a TARGET (or --replay FILE)"))
    arguments: dict[str, Any] = {
        "events": [e for e in args.events.split(",") if e],
        "queues": args.queue,
        "regions": args.region,
        "addresses": args.address,
        "data_bytes": args.data_bytes,
    }
    if args.rate:
        arguments["rate"] = args.rate
    seen = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        with connect(args.target, timeout=None) as client:
            client.execute("trace-start", **arguments)
            if args.output is not None:
                args.output.write(json.dumps({"vfiouserd": client.greeting}) + "\n")
                args.output.flush()  # a recording starts with whom it is of, at once
            while not args.count or seen < args.count:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    client.sock.settimeout(left)
                try:
                    message = client.next_event()
                except TimeoutError:
                    break
                if message.get("event") in ("TRACE", "TRACE_LOST"):
                    show(message)
                    seen += message.get("event") == "TRACE"
    except KeyboardInterrupt:
        return 0
    except (ControlError, OSError) as exc:
        return _fail(exc)
    return 0


# -- inject --------------------------------------------------------------------------------


def parse_rule(words: list[str]) -> dict[str, Any]:
    """``KIND KEY=VALUE...`` as a rule's arguments."""
    if not words:
        raise ValueError("give a rule: KIND KEY=VALUE...")
    rule: dict[str, Any] = {"kind": words[0]}
    for word in words[1:]:
        key, equals, value = word.partition("=")
        if not equals:
            raise ValueError(f"{word!r} is not KEY=VALUE")
        rule[key] = value
    return rule


def _inject(args: argparse.Namespace) -> int:
    try:
        with connect(args.target) as client:
            if args.list:
                result = client.execute("inject-list")
            elif args.remove is not None:
                result = client.execute("inject-remove", id=args.remove)
            elif args.clear:
                result = client.execute("inject-clear")
            else:
                result = client.execute("inject-add", **parse_rule(args.rule))
    except (ControlError, OSError, ValueError) as exc:
        return _fail(exc)
    print(json.dumps(result, indent=2))
    return 0
