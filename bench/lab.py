#!/usr/bin/env python3
"""The device lab's cost to I/O: virtio-blk fast-path IOPS with control clients attached.

The daemon is ``vfiouserd vhost-user-blk``, jailed, serving the page-cached
raw image bench/blk.py uses, driven by the same native front end (driver.c:
vhost-user set-up in Python, the request loop in C), 4 KiB random reads on
one queue at queue depth 1 and 32. What changes from one condition to the
next is who is attached to the daemon's control socket (each client is a
process of its own, as ``vfiouserd stats``/``trace`` would be):

  none         nobody: the reference
  stats        a client asking for ``stats`` once a second
  metrics      a client asking for ``metrics`` (Prometheus text) once a second
  trace        a client tracing every kind of event, reading them as fast as
               it can (whole buffers, lines counted, not parsed)
  misbehaving  a client that starts the same trace and never reads (the
               daemon drops its events), and one that floods garbage lines
               and unknown commands, reconnecting whenever it is dropped
  stuck        the never-reading tracer alone
  flood        the flooder alone
  elsewhere    the flooder, at another daemon beside the measured one
  python       nobody, the daemon started with --no-fast-path: what leaving
               the fast path costs by itself

A fresh daemon serves each condition of each run; the conditions are
interleaved run by run (in an order rotated each run), so that drift on a
shared machine falls on all alike. Each figure comes with its ratio to the
reference of the same run, min/median/max over the runs, and the CPU the
daemon and the clients used during the measurement (percent of one core;
with a bystander daemon, its CPU counts with the clients'). The
"elsewhere" condition is the control for the flood: what the CPU it burns
costs a machine this size, whichever daemon burns it. The "fast path"
column says whether the native loop served the queue at the end of the
measurement (from ``stats``, asked after the timing ended).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO

import trio
from blk import QUEUE_SIZE, RAM_SIZE, WORKLOADS, load_driver, prepare_image, wait_for_socket
from common import percentiles, request_args, ring_args, stop

from vfiouserd.client.control import ControlClient
from vfiouserd.client.guest import DriverSplitRing, GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.trace import KINDS

MiB = 1 << 20
WORKLOAD = WORKLOADS["randread"]
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Condition:
    label: str  # what the table calls it
    clients: tuple[str, ...] = ()  # the control clients attached, each a process
    daemon_args: tuple[str, ...] = ()
    elsewhere: bool = False  # the clients attach to another daemon (a bystander)


CONDITIONS = {
    "none": Condition("no control client (reference)"),
    "stats": Condition("stats, once a second", ("stats",)),
    "metrics": Condition("metrics, once a second", ("metrics",)),
    "trace": Condition("full trace, read at full speed", ("trace",)),
    "misbehaving": Condition("trace never read + garbage flood", ("stuck", "flood")),
    "stuck": Condition("trace never read, alone", ("stuck",)),
    "flood": Condition("garbage flood, alone", ("flood",)),
    "elsewhere": Condition("garbage flood at another daemon", ("flood",), elsewhere=True),
    "python": Condition("no client, --no-fast-path", daemon_args=("--no-fast-path",)),
}
REFERENCE = "none"


# -- the clients (each a process: bench/lab.py --client KIND CONTROL_SOCKET) --------------


class Stop(Exception):
    """SIGTERM: the bench is done with this client."""


def _stop(signum: int, frame: object) -> None:
    raise Stop


def poll_client(path: str, command: str, counts: dict[str, float]) -> None:
    """One command a second, its answer read in full."""
    with ControlClient(path) as client:
        ready()
        while True:
            started = time.monotonic()
            client.execute(command)
            took = time.monotonic() - started
            counts["polls"] += 1
            counts["slowest_ms"] = max(counts["slowest_ms"], took * 1000)
            time.sleep(max(0.0, 1.0 - took))


def trace_client(path: str, counts: dict[str, float]) -> None:
    """Every kind of event, read in whole buffers as fast as they come."""
    with ControlClient(path, timeout=None) as client:
        client.execute("trace-start", events=list(KINDS))
        ready()
        while True:
            data = client.reader.read1(1 << 20)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            counts["events"] += data.count(b"\n")
            counts["bytes"] += len(data)
            if b"TRACE_LOST" in data:  # (a line cut in two at the edge is missed)
                for line in data.split(b"\n"):
                    if b'"TRACE_LOST"' in line:
                        with contextlib.suppress(ValueError, KeyError):
                            counts["lost"] += json.loads(line)["data"]["count"]


def stuck_client(path: str, counts: dict[str, float]) -> None:
    """Starts a trace of everything, then never reads again."""
    with ControlClient(path) as client:
        client.execute("trace-start", events=list(KINDS))
        ready()
        while True:
            time.sleep(3600)


FLOOD = b"".join(
    line
    for n in range(64)
    for line in (
        b"garbage garbage garbage\n",
        b"{not json\n",
        b"[1, 2, 3]\n",
        b'{"execute": 42}\n',
        b'{"execute": "no-such-command", "arguments": {}, "id": %d}\n' % n,
        b"\xff\xfe\n",
    )
)
FLOOD_LINES = FLOOD.count(b"\n")


def flood_client(path: str, counts: dict[str, float]) -> None:
    """Garbage lines and unknown commands, as fast as the daemon takes them,
    replies read (and thrown away) on a thread of their own; a new
    connection whenever the daemon drops this one."""
    first = True
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:  # the listen backlog full
            counts["refused"] += 1
            sock.close()
            time.sleep(0.001)
            continue
        counts["connections"] += 1
        if first:
            ready()
            first = False
        drain = threading.Thread(target=_drain, args=(sock, counts), daemon=True)
        drain.start()
        try:
            while True:
                sock.sendall(FLOOD)
                counts["sent"] += FLOOD_LINES
        except OSError:  # dropped
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            drain.join()
            sock.close()


def _drain(sock: socket.socket, counts: dict[str, float]) -> None:
    with contextlib.suppress(OSError):
        while data := sock.recv(1 << 20):
            counts["replies"] += data.count(b"\n")


started = time.monotonic()


def ready() -> None:
    global started
    started = time.monotonic()
    print("ready", flush=True)


def client_main(kind: str, path: str) -> int:
    signal.signal(signal.SIGTERM, _stop)
    counts: dict[str, float] = {
        "polls": 0,
        "slowest_ms": 0.0,
        "events": 0,
        "bytes": 0,
        "lost": 0,
        "connections": 0,
        "refused": 0,
        "sent": 0,
        "replies": 0,
    }
    try:
        if kind in ("stats", "metrics"):
            poll_client(path, kind, counts)
        elif kind == "trace":
            trace_client(path, counts)
        elif kind == "stuck":
            stuck_client(path, counts)
        elif kind == "flood":
            flood_client(path, counts)
        else:
            raise ValueError(f"no client {kind!r}")
    except Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    counts["seconds"] = time.monotonic() - started
    print(json.dumps({k: v for k, v in counts.items() if v}), flush=True)
    return 0


@dataclass
class ClientProcess:
    kind: str
    process: subprocess.Popen[bytes]
    counts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, kind: str, path: str) -> ClientProcess:
        process = subprocess.Popen(
            [sys.executable, __file__, "--client", kind, path], stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        line = _readline(process.stdout, 20)
        if line.strip() != b"ready":
            process.kill()
            process.wait()
            raise RuntimeError(f"control client {kind} did not start: {line!r}")
        return cls(kind, process)

    def finish(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.stdout is not None
        line = _readline(self.process.stdout, 10)
        stop(self.process, f"control client {self.kind}")
        try:
            self.counts = json.loads(line)
        except ValueError:
            print(f"warning: control client {self.kind} said {line!r}", file=sys.stderr)


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    ready_to_read, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready_to_read else b""


# -- CPU time, from /proc -----------------------------------------------------------------


def _tree(pid: int) -> Iterator[int]:
    """``pid`` and its descendants (the jailed daemon is the launched one's child)."""
    yield pid
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from _tree(int(child))


def cpu_seconds(pids: list[int]) -> float:
    """User and system time of these processes and their descendants (all threads)."""
    ticks = 0
    for root in pids:
        for pid in _tree(root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICK


# -- the measurement ------------------------------------------------------------------------


@dataclass
class Sample:
    iops: float
    p50_us: float
    p99_us: float
    native: bool | None  # the fast path served the queue (None: stats unanswered)
    daemon_cpu: float  # percent of one core
    clients_cpu: float
    counts: dict[str, float]  # what the clients did, a second (slowest_ms, seconds: as is)


async def measure(
    driver: ModuleType,
    sock: str,
    control: str,
    capacity_sectors: int,
    depth: int,
    seconds: float,
    seed: int,
    daemon_pid: int,
    client_pids: list[int],
) -> Sample:
    """One queue, as bench/blk.py drives it; then whether the fast path served it."""
    ram = GuestRam([(0, RAM_SIZE)])
    frontend = await VhostUserFrontend.connect(sock)
    try:
        await frontend.negotiate(want_features=bit(Feature.VERSION_1))
        await frontend.set_features()
        await frontend.share_memory(ram)
        ring = DriverSplitRing(ram, QUEUE_SIZE)
        queue = await frontend.start_queue(0, ring)
        args = ring_args(driver, ram, ring, queue.kick, queue.call)
        latencies = request_args(
            driver,
            args,
            ram,
            WORKLOAD,
            depth=depth,
            seconds=seconds,
            seed=seed,
            capacity_sectors=capacity_sectors,
        )
        daemon_before, clients_before = cpu_seconds([daemon_pid]), cpu_seconds(client_pids)
        status = await trio.to_thread.run_sync(driver.lib.run_reads, args)
        daemon_cpu = cpu_seconds([daemon_pid]) - daemon_before
        clients_cpu = cpu_seconds(client_pids) - clients_before
        if status != 0:
            raise OSError(-status, os.strerror(-status))
        if args.errors:
            raise RuntimeError(f"{args.errors} requests failed")
        elapsed = args.elapsed_ns / 1e9
        native = await trio.to_thread.run_sync(fast_path_on, control)
        p50_us, p99_us = percentiles(list(latencies[0 : min(args.completed, args.max_latencies)]))
        return Sample(
            iops=args.completed / elapsed,
            p50_us=p50_us,
            p99_us=p99_us,
            native=native,
            daemon_cpu=100 * daemon_cpu / elapsed,
            clients_cpu=100 * clients_cpu / elapsed,
            counts={},
        )
    finally:
        await frontend.aclose()
        ram.close()


def fast_path_on(control: str) -> bool | None:
    """Whether the native loop serves queue 0 (None: the daemon did not say,
    e.g. every client slot taken)."""
    for _ in range(50):
        try:
            with ControlClient(control, timeout=5) as client:
                queues = client.execute("stats")["queues"]
                return bool(queues and queues[0]["native"])
        except Exception:  # TooManyClients, a dropped connection: try again
            time.sleep(0.1)
    return None


def start_daemon(image: Path, sock: str, log: IO[bytes], *extra: str) -> subprocess.Popen[bytes]:
    """Jailed (the default), as bench/blk.py starts it; warnings to ``log``."""
    command = [
        *(sys.executable, "-m", "vfiouserd", "vhost-user-blk"),
        *("--socket-path", sock, "--blk-file", str(image)),
        *("--num-queues", "1", "--log-level", "warning", *extra),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    wait_for_socket(sock, process)
    return process


def summarize(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def activity(condition: Condition, counts: list[dict[str, float]]) -> str:
    """What the condition's clients did, medians of their rates."""

    def med(key: str) -> float:
        return statistics.median(c.get(key, 0) for c in counts)

    done = []
    if {"stats", "metrics"} & set(condition.clients):
        done.append(f"{med('polls'):.1f} polls/s, slowest {med('slowest_ms'):.1f} ms")
    if "trace" in condition.clients:
        done.append(f"{med('events'):.0f} events/s read, {med('lost'):.0f}/s lost")
    if "flood" in condition.clients:
        done.append(
            f"{med('sent'):.0f} lines/s sent, {med('replies'):.0f}/s answered, "
            f"{med('connections') * med('seconds'):.0f} connections"
        )
    return "; ".join(done)


def run_condition(
    driver: ModuleType,
    image: Path,
    tmp: str,
    log: IO[bytes],
    name: str,
    depths: list[int],
    seconds: float,
    seed: int,
) -> dict[int, Sample]:
    """A fresh daemon; for each depth, the condition's clients started,
    attached, the measurement, the clients stopped."""
    condition = CONDITIONS[name]
    sock, control = f"{tmp}/{seed}-{name}.sock", f"{tmp}/{seed}-{name}.control.sock"
    daemon = start_daemon(image, sock, log, *condition.daemon_args)
    bystander = None
    samples = {}
    try:
        wait_for_socket(control, daemon)
        target = control
        if condition.elsewhere:
            bystander = start_daemon(image, f"{tmp}/{seed}-{name}-other.sock", log)
            target = f"{tmp}/{seed}-{name}-other.control.sock"
            wait_for_socket(target, bystander)
        capacity = image.stat().st_size // 512
        for depth in depths:
            clients = [ClientProcess.start(kind, target) for kind in condition.clients]
            try:
                sample = trio.run(
                    measure,
                    driver,
                    sock,
                    control,
                    capacity,
                    depth,
                    seconds,
                    seed + depth,
                    daemon.pid,
                    [c.process.pid for c in clients] + ([bystander.pid] if bystander else []),
                )
            finally:
                for client in clients:
                    client.finish()
            for client in clients:  # rates over each client's life
                life = client.counts.get("seconds", 1.0)
                for key, value in client.counts.items():
                    rate = value if key in ("slowest_ms", "seconds") else value / life
                    sample.counts[key] = sample.counts.get(key, 0) + rate
            samples[depth] = sample
    finally:
        stop(daemon, "vfiouserd")
        if bystander is not None:
            stop(bystander, "vfiouserd (bystander)")
    if daemon.returncode not in (0, -signal.SIGTERM):
        print(f"warning: the daemon ({name}) exited with {daemon.returncode}", file=sys.stderr)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--depths", default="1,32")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="(none always runs)")
    parser.add_argument("--image-size", type=int, default=1024, help="MiB")
    parser.add_argument("--client", nargs=2, metavar=("KIND", "SOCKET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:  # one of the control clients, started by the bench
        return client_main(*args.client)
    names = [REFERENCE] + [n for n in args.conditions.split(",") if n != REFERENCE]
    for name in names:
        if name not in CONDITIONS:
            parser.error(f"no condition {name!r} (there are {', '.join(CONDITIONS)})")
    depths = [int(d) for d in args.depths.split(",")]
    driver = load_driver()
    image = prepare_image(args.image_size * MiB)
    results: dict[tuple[str, int], list[Sample]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vfiouserd-bench-lab-") as tmp:
        log_path = Path(tmp) / "daemons.log"
        with open(log_path, "wb") as log:
            for run in range(args.runs):
                shift = run % len(names)  # rotated: no condition always goes first
                this_run: dict[str, dict[int, Sample]] = {}
                for name in names[shift:] + names[:shift]:
                    this_run[name] = run_condition(
                        driver, image, tmp, log, name, depths, args.seconds, run * 7919
                    )
                for name, by_depth in this_run.items():
                    for depth, sample in by_depth.items():
                        results.setdefault((name, depth), []).append(sample)
                        reference = this_run[REFERENCE][depth].iops
                        ratios.setdefault((name, depth), []).append(sample.iops / reference)
    print(
        f"{args.runs} runs x {args.seconds:g} s, {WORKLOAD.name}, one queue, jailed "
        f"vhost-user-blk, page-cached {args.image_size} MiB image; x: IOPS / the same run's "
        "reference; CPU: median % of one core during the run"
    )
    print(
        f"{'condition':<34}{'QD':>3}{'IOPS (min/med/max)':>27}{'x (min/med/max)':>17}"
        f"{'p50 us':>8}{'p99 us':>9}{'fast path':>10}{'daemon%':>8}{'clients%':>9}  clients did"
    )
    for depth in depths:
        for name in names:
            samples = results[(name, depth)]
            low, median, high = summarize([s.iops for s in samples])
            x_low, x_median, x_high = summarize(ratios[(name, depth)])
            natives = {s.native for s in samples}
            fast = "/".join(
                {True: "yes", False: "no", None: "?"}[n] for n in sorted(natives, key=str)
            )
            row = (
                f"{CONDITIONS[name].label:<34}{depth:>3}"
                f"{f'{low:.0f}/{median:.0f}/{high:.0f}':>27}"
                f"{f'{x_low:.2f}/{x_median:.2f}/{x_high:.2f}':>17}"
                f"{statistics.median(s.p50_us for s in samples):>8.1f}"
                f"{statistics.median(s.p99_us for s in samples):>9.1f}{fast:>10}"
                f"{statistics.median(s.daemon_cpu for s in samples):>8.0f}"
                f"{statistics.median(s.clients_cpu for s in samples):>9.0f}  "
                + activity(CONDITIONS[name], [s.counts for s in samples])
            )
            print(row.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
