#!/usr/bin/env python3
"""Footprint: how soon a device serves, what it holds and burns idle, its CPU per I/O, a restart.

Issue 16's targets, each measured for vfiouserd and, in the same runs
(interleaved), for qemu-storage-daemon with one vhost-user-blk export
(cache.direct=off, --qsd-aio): the reference.

- Ready: from exec to the first request answered (vhost-user GET_FEATURES,
  vfio-user VERSION: what a VMM sends first), polled every millisecond.
  vfiouserd listens before it jails itself and serves only once jailed, so
  a connection may be accepted early ("accepting") but is served with the
  jail in place ("served", the figure judged; the log's sandbox.entered is
  checked). Devices: vhost-user-blk, vfio-user-blk, vfio-user-nvme,
  vhost-user-rng, vhost-user-console.
- PSS of one idle device: all its processes (the process tree: the waiter
  outside the jail and the jailed child), /proc/PID/smaps_rollup, once it
  has served; then with a client connected and a ring set up; then with
  --devices vhost-user-blk daemons (and as many qemu-storage-daemons)
  running at once, the total over them / --devices.
- CPU when idle: utime + stime (/proc/PID/stat, every thread of every
  process) over --idle-seconds, with a client connected and a ring set up
  but no I/O, all back ends at once; and the wake-ups (context switches of
  their threads) per second, which show polling below a clock tick.
- CPU per I/O: the back end's user+sys over a run of bench/blk.py's C
  driver (4 KiB random reads, one queue, QD1 and QD32) / requests completed.
- Restart through the fd store with the stand-in systemd, from SIGTERM to
  the first request served by the next daemon, and an upgrade in place
  (systemctl reload: ExecReload= runs vfiouserd --upgrade), the longest a
  read waited while the guest read back to back across it (bench/downtime.py's
  measurements); with --real-systemd, systemctl restart and reload of the
  shipped unit under a real systemd too. The reference restarts
  qemu-storage-daemon, and the front end reconnects and sets the device up
  again.

Each figure is min/median/max over --runs; a ratio is the median of each
run's figure over the same run's reference figure. --measure picks some of
the measures (start-up, many at once, idle, per I/O, restart).

The daemons are those of vfiouserd installed as a user installs it (and as
the real-systemd tests do): a venv of Debian's Python with the package, not
editable (tests/installation.py; made once for the sources, cached outside
the clone); --tree measures the development venv's instead (the tree,
editable, in the venv's Python). Their modules must come from up-to-date
.pyc files (pip compiles them; ``make venv`` does for the venv and the
tree): a module compiled from its source at every start costs time and
memory, which the environment's PYTHONDONTWRITEBYTECODE makes every daemon
pay again. So each device is started once with ``python -v`` first, which
names the modules loaded from source; those are compiled (--no-compile:
left so, to measure a tree as it is), and the second line printed says
which. The code libraries generate as they are imported is compiled into
its file first too (``python -m vfiouserd.generated_code``, as ``make
bytecode`` and an installation do).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import blk
import downtime
import nvme
import trio
from blk import NVME, VFIO, VHOST, WORKLOADS, qsd_command, start_backend
from common import (
    CLOCK_TICKS,
    connect,
    context_switches,
    cpu_ticks,
    daemon_program,
    process_tree,
    pss_bytes,
    stop,
    use_installed_daemons,
)

from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.protocol.vhost_user import FrontendRequest

MiB = 1 << 20
RNG, CONSOLE = "vhost-user-rng", "vhost-user-console"
BLOCK = (VHOST, VFIO, NVME)  # the devices measured idle and per I/O
DEVICES = (*BLOCK, RNG, CONSOLE)  # the devices measured at start-up
SETTLE = 0.5  # seconds after start-up or set-up before memory or CPU is read

# Issue 16's targets.
READY_MS, PSS_MIB, RESTART_MS = 150, 20, 50
MEASURES = ("start", "many", "idle", "io", "restart")


@dataclass
class Figures:
    """Each measure's value per run, by back end (or scenario)."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)


def device_command(kind: str, workdir: Path, name: str) -> list[str]:
    """``kind`` with default options (jailed, info log) and a sparse 16 MiB
    image of its own where it needs one; ``kind`` "qsd aio=...": the reference."""
    image = workdir / f"{name}.img"
    if kind in (VHOST, VFIO, NVME) or kind.startswith("qsd"):
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
    sock = str(workdir / f"{name}.sock")
    if kind.startswith("qsd"):
        return qsd_command(kind, image, sock, 1)
    device = {
        VHOST: ["--blk-file", str(image)],
        VFIO: ["--blk-file", str(image)],
        NVME: ["--namespace", str(image)],
        RNG: [],
        CONSOLE: ["--console", str(workdir / f"{name}.console.sock")],
    }[kind]
    return [*daemon_program(), kind, "--socket-path", sock, *device]


def launch(kind: str, workdir: Path, name: str) -> tuple[float, subprocess.Popen[bytes]]:
    """The back end started (stderr into NAME.log); when it was exec'd."""
    command = device_command(kind, workdir, name)
    with open(workdir / f"{name}.log", "wb") as log:
        started = time.perf_counter()
        return started, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


async def first_request(
    kind: str, sock: str, interval: float, process: subprocess.Popen[bytes], timeout: float = 20
) -> tuple[float, float]:
    """When (perf_counter) a connection to ``sock`` was accepted, and when
    the first message a VMM sends was answered."""
    conn = await connect(sock, interval, process, timeout)
    accepted = time.perf_counter()
    try:
        if kind.startswith("vfio-user"):
            await VfioUserClient(conn).negotiate()
        else:
            await VhostUserFrontend(conn).call_u64(FrontendRequest.GET_FEATURES)
    finally:
        conn.close()
    return accepted, time.perf_counter()


async def ready_once(kind: str, workdir: Path, name: str, figures: Figures) -> None:
    """One start: ready times, and the PSS of the device idle once it served."""
    started, process = launch(kind, workdir, name)
    try:
        try:
            sock = str(workdir / f"{name}.sock")
            accepted, served = await first_request(kind, sock, 0.001, process)
        except (OSError, RuntimeError, trio.TooSlowError) as exc:
            log = (workdir / f"{name}.log").read_text(errors="replace")
            raise RuntimeError(f"{kind} never served: {exc!r}\n{log}") from exc
        await trio.sleep(SETTLE)
        tree = process_tree(process.pid)
        figures.add(f"pss {kind}", pss_bytes(tree) / MiB)
        figures.add(f"processes {kind}", len(tree))
    finally:
        stop(process, kind)
    figures.add(f"accepting {kind}", (accepted - started) * 1000)
    figures.add(f"ready {kind}", (served - started) * 1000)
    if not kind.startswith("qsd"):
        log = (workdir / f"{name}.log").read_text(errors="replace")
        if "event=sandbox.entered" not in log:
            raise RuntimeError(f"{kind} served without logging sandbox.entered:\n{log}")


async def modules_from_source(kind: str, workdir: Path) -> tuple[list[str], int]:
    """``kind`` started once with ``python -v`` (PYTHONVERBOSE) until it served: the sources
    of the modules it compiled (no up-to-date .pyc file), and how many
    modules it loaded from .pyc files. It imports nothing once jailed."""
    command = device_command(kind, workdir, "bytecode")
    with open(workdir / "bytecode.log", "wb") as log:
        verbose = {**os.environ, "PYTHONVERBOSE": "1"}  # python -v
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=verbose)
    try:
        await first_request(kind, str(workdir / "bytecode.sock"), 0.01, process)
    finally:
        stop(process, kind)
    sources, cached = [], 0
    for line in (workdir / "bytecode.log").read_text(errors="replace").splitlines():
        if line.startswith("# code object from "):  # a .pyc file's path is quoted
            path = line.removeprefix("# code object from ").strip("'")
            if path.endswith(".pyc"):
                cached += 1
            else:
                sources.append(path)
    return sources, cached


def check_bytecode(workdir: Path, compile_sources: bool) -> str:
    """Every device started once: whether its modules come from up-to-date
    .pyc files; those that do not are compiled unless ``compile_sources``
    is false. What was found and done, in one line."""
    if compile_sources and daemon_program()[0] == sys.executable:
        # The tree's: what make bytecode and an installation do after pip.
        generated = [sys.executable, "-m", "vfiouserd.generated_code"]
        subprocess.run(generated, check=True, timeout=120)
    found: dict[str, None] = {}
    most = 0
    for kind in DEVICES:
        sources, cached = trio.run(modules_from_source, kind, workdir)
        found.update(dict.fromkeys(sources))
        most = max(most, cached + len(sources))
    if not found:
        return (
            f"bytecode: each device loads its Python modules ({most} at most) from .pyc files"
            + ("" if compile_sources else "; generated code left as it is (--no-compile)")
        )
    names = sorted(str(Path(*Path(source).parts[-2:])) for source in found)
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    stale = (
        f"{len(found)} of the Python modules the devices load (up to {most} each) had "
        f"no up-to-date .pyc file ({listed})"
    )
    if not compile_sources:
        return f"bytecode: {stale}: compiled at every start (--no-compile), not an installed daemon"
    failed = []
    for source in found:
        try:
            py_compile.compile(source, importlib.util.cache_from_source(source), doraise=True)
        except (OSError, py_compile.PyCompileError) as exc:
            failed.append(f"{source}: {exc}")
    for kind in DEVICES:  # and now as an installed daemon
        failed += trio.run(modules_from_source, kind, workdir)[0]
    if failed:
        raise RuntimeError("modules still compiled at every start:\n" + "\n".join(failed))
    return f"bytecode: {stale}: compiled them first, as an install does"


async def many_once(kind: str, workdir: Path, count: int, figures: Figures) -> None:
    """``count`` daemons of ``kind`` started at once: the time until all
    served, then their total PSS / ``count``."""
    started = time.perf_counter()
    processes = [launch(kind, workdir, f"many-{i}")[1] for i in range(count)]
    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                sock = str(workdir / f"many-{index}.sock")
                # Coarser polling, and time: all start at once, on a few cores.
                nursery.start_soon(first_request, kind, sock, 0.01, processes[index], 600)
        figures.add(f"all ready {kind}", time.perf_counter() - started)
        await trio.sleep(SETTLE)
        total = sum(pss_bytes(process_tree(p.pid)) for p in processes)
        figures.add(f"pss many {kind}", total / count / MiB)
    finally:
        async with trio.open_nursery() as nursery:  # stopped together, not one after another
            for process in processes:
                nursery.start_soon(trio.to_thread.run_sync, stop, process, kind)


async def idle_once(
    drivers: blk.Drivers,
    kinds: list[str],
    workdir: Path,
    image: Path,
    seconds: float,
    figures: Figures,
) -> None:
    """Every back end at once, a client connected with one ring set up, no I/O:
    PSS, then CPU ticks and wake-ups over ``seconds``."""
    processes = {}
    release = trio.Event()

    async def hold(kind: str, *, task_status: trio.TaskStatus[None]) -> None:
        ram = GuestRam([(0, blk.RAM_SIZE)])
        try:
            sock = str(workdir / f"idle-{len(processes)}.sock")
            processes[kind] = start_backend(kind, image, sock, 1)
            async with blk.attach(drivers, kind, sock, ram, 1, True):
                task_status.started()
                await release.wait()
        finally:
            ram.close()

    try:
        async with trio.open_nursery() as nursery:
            for kind in kinds:
                await nursery.start(hold, kind)
            await trio.sleep(SETTLE)
            trees = {kind: process_tree(p.pid) for kind, p in processes.items()}
            for kind, tree in trees.items():
                figures.add(f"pss connected {kind}", pss_bytes(tree) / MiB)
                figures.add(f"processes connected {kind}", len(tree))
            before = {kind: (cpu_ticks(t), context_switches(t)) for kind, t in trees.items()}
            await trio.sleep(seconds)
            for kind, tree in trees.items():
                ticks, switches = cpu_ticks(tree), context_switches(tree)
                figures.add(f"idle cpu {kind}", (ticks - before[kind][0]) / CLOCK_TICKS)
                figures.add(f"wakeups {kind}", (switches - before[kind][1]) / seconds)
            release.set()
    finally:
        for kind, process in processes.items():
            stop(process, kind)


async def restart_qsd(workdir: Path, kind: str) -> float:
    """The reference for a restart: qemu-storage-daemon has no fd store. A
    write; SIGTERM; it starts again; the front end reconnects, sets the
    device up again as QEMU's reconnect does, and reads."""
    command = device_command(kind, workdir, "restart")
    sock = str(workdir / "restart.sock")
    ram = GuestRam([(0, 16 * MiB)])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        frontend, disk = await downtime.vhost_user_device(sock, ram)
        await disk.write(0, b"q" * 512)
        started = trio.current_time()
        stop(process, kind)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        await frontend.aclose()
        frontend, disk = await downtime.vhost_user_device(sock, ram)
        if await disk.read(0, 512) != b"q" * 512:
            raise RuntimeError(f"{kind} read back other bytes after its restart")
        took = trio.current_time() - started
        await frontend.aclose()
    finally:
        stop(process, kind)
        ram.close()
    return took


def spread(values: list[float], digits: int) -> str:
    return "/".join(
        f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values))
    )


def ratio(ours: list[float], theirs: list[float]) -> str:
    """The median of each run's figure over the same run's reference."""
    pairs = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    return f"{statistics.median(pairs):.2f}" if pairs else "-"


class Table:
    """Printed with two or more blanks between columns (what the test splits on)."""

    def __init__(self, title: str, *header: str) -> None:
        self.title = title
        self.rows = [list(header)]

    def row(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def judged(
        self,
        cells: list[str],
        values: list[float],
        reference: list[float],
        limit: float,
        digits: int = 1,
    ) -> None:
        """A row of ``cells``, then min/med/max of ``values``, their ratio to
        the reference's, the target (at most ``limit``) and the verdict on
        the median (none for the reference itself)."""
        met = verdict(statistics.median(values) <= limit)
        self.row(
            *cells,
            spread(values, digits),
            ratio(values, reference),
            f"<= {limit}",
            "reference" if values is reference else met,
        )

    def print(self) -> None:
        """Nothing when there is no row (that measure was not taken)."""
        if len(self.rows) == 1:
            return
        widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
        print()
        print(self.title)
        for cells in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(figures: Figures, args: argparse.Namespace, qsd: str, io_kinds: list[str]) -> None:
    v = figures.values
    print(
        f"{args.runs} runs, interleaved; the reference: qemu-storage-daemon, one vhost-user-blk "
        f"export, {qsd.removeprefix('qsd ')}; x qsd: the median of the per-run ratios"
    )
    table = Table(
        f"ready, exec to the first request answered with the jail in place: <= {READY_MS} ms",
        *("back end", "accepting ms", "served ms (min/med/max)", "x qsd", "target", "verdict"),
    )
    for kind in (*DEVICES, qsd) if f"ready {qsd}" in v else ():
        accepting = f"{statistics.median(v[f'accepting {kind}']):.1f}"
        table.judged([kind, accepting], v[f"ready {kind}"], v[f"ready {qsd}"], READY_MS)
    table.print()

    table = Table(
        f"PSS of one idle device, all its processes: <= {PSS_MIB} MiB",
        *("back end", "state", "processes", "PSS MiB (min/med/max)", "x qsd", "target", "verdict"),
    )
    states = [("", "served once, no client"), (" connected", "client, ring set up")]
    for key, state in states:
        for kind in (*DEVICES, qsd):
            if f"pss{key} {kind}" not in v:
                continue
            processes = f"{max(v[f'processes{key} {kind}']):.0f}"
            pss, reference = v[f"pss{key} {kind}"], v[f"pss{key} {qsd}"]
            table.judged([kind, state, processes], pss, reference, PSS_MIB)
    table.print()

    table = Table(
        f"PSS per device, {args.devices} running at once (total / {args.devices}): "
        f"<= {PSS_MIB} MiB",
        *("back end", "all served s", "PSS MiB (min/med/max)", "x qsd", "target", "verdict"),
    )
    for kind in (VHOST, qsd) if f"pss many {qsd}" in v else ():
        all_ready = f"{statistics.median(v[f'all ready {kind}']):.2f}"
        pss, reference = v[f"pss many {kind}"], v[f"pss many {qsd}"]
        table.judged([kind, all_ready], pss, reference, PSS_MIB, digits=2)
    table.print()

    tick_ms = 1000 / CLOCK_TICKS
    table = Table(
        f"CPU when idle over {args.idle_seconds:g} s, client connected, ring set up: 0 % "
        f"(met: the median run used no {tick_ms:g} ms clock tick)",
        *("back end", "CPU ms (min/med/max)", "CPU %", "wake-ups/s (min/med/max)", "target"),
        "verdict",
    )
    for kind in (*BLOCK, qsd) if f"idle cpu {qsd}" in v else ():
        cpu = [seconds * 1000 for seconds in v[f"idle cpu {kind}"]]
        table.row(
            kind,
            spread(cpu, 0),
            f"{statistics.median(cpu) / 10 / args.idle_seconds:.3f}",
            spread(v[f"wakeups {kind}"], 1),
            "0 %",
            "reference" if kind == qsd else verdict(statistics.median(cpu) == 0),
        )
    table.print()

    table = Table(
        "CPU per request (user+sys of the back end's processes), 4 KiB random read, one "
        "queue: no target, next to the reference",
        *("back end", "QD", "us/request (min/med/max)", "x qsd", "IOPS (med)", "target"),
        "verdict",
    )
    for depth in (1, 32) if f"cpu/io {qsd} 1" in v else ():
        for kind in io_kinds:
            cpu, iops = v[f"cpu/io {kind} {depth}"], v[f"iops {kind} {depth}"]
            table.row(
                kind,
                str(depth),
                spread(cpu, 1),
                ratio(cpu, v[f"cpu/io {qsd} {depth}"]),
                f"{statistics.median(iops):.0f}",
                "-",
                "reference" if kind == qsd else "-",
            )
    table.print()

    table = Table(
        f"restart, guest-visible downtime: <= {RESTART_MS} ms (fd store: from SIGTERM to the "
        "first request served after it; reload: the longest read across it)",
        *("scenario", "downtime ms (min/med/max)", "x qsd", "target", "verdict"),
    )
    for name in v:
        if name.startswith("restart "):
            reference = v[f"restart {qsd}, reconnect"]
            table.judged([name.removeprefix("restart ")], v[name], reference, RESTART_MS)
    table.print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--devices", type=int, default=50, help="running at once, for PSS")
    parser.add_argument(
        "--real-systemd",
        action="store_true",
        help="restarts under a real systemd too (root; see tests/real_systemd.py)",
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="per run")
    parser.add_argument("--seconds", type=float, default=3.0, help="per I/O run")
    parser.add_argument("--image-size", type=int, default=1024, help="MiB, for the I/O runs")
    parser.add_argument("--qsd-aio", default="io_uring", help="the reference's aio= mode")
    parser.add_argument(
        "--measure",
        type=lambda text: text.split(","),
        default=list(MEASURES),
        help=f"some of {','.join(MEASURES)} (default: all)",
    )
    parser.add_argument(
        "--tree",
        action="store_true",
        help="the development venv's daemons (this tree, editable), not an installed one's",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="measure the daemons' modules as they are, even those without an up-to-date "
        ".pyc file (compiled at every start)",
    )
    args = parser.parse_args()
    if not set(args.measure) <= set(MEASURES):
        parser.error(f"--measure: some of {','.join(MEASURES)}")
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon not found (Debian package qemu-system-common)")
        return 1
    qsd = f"qsd aio={args.qsd_aio}"
    io_kinds = [*BLOCK, qsd]
    if {"idle", "io"} & set(args.measure):
        drivers = blk.Drivers(blk.load_driver(), nvme.load_driver())
        image = blk.prepare_image(args.image_size * MiB)
        capacity = image.stat().st_size // 512
    randread = WORKLOADS["randread"]
    figures = Figures()
    if args.tree:
        print(f"daemons: this tree, editable, in the development venv ({sys.executable})")
    else:
        print(f"daemons: installed as a user installs them ({use_installed_daemons()})")
    with tempfile.TemporaryDirectory(prefix="vfiouserd-footprint-") as tmp:
        print(check_bytecode(Path(tmp), not args.no_compile))
        for run in range(args.runs):
            workdir = Path(tmp) / str(run)
            workdir.mkdir()
            for index, kind in enumerate((*DEVICES, qsd) if "start" in args.measure else ()):
                trio.run(ready_once, kind, workdir, f"ready-{index}", figures)
            for kind in (VHOST, qsd) if "many" in args.measure else ():
                trio.run(many_once, kind, workdir, args.devices, figures)
            if "idle" in args.measure:
                trio.run(idle_once, drivers, io_kinds, workdir, image, args.idle_seconds, figures)
            for index, kind in enumerate(io_kinds if "io" in args.measure else []):
                sock = str(workdir / f"io-{index}.sock")
                process = start_backend(kind, image, sock, 1)
                try:
                    for depth in (1, 32):
                        sample = trio.run(
                            functools.partial(
                                blk.measure,
                                *(drivers, kind, sock, capacity, randread, 1, depth),
                                args.seconds,
                                run * 7919 + depth,
                                daemon=process.pid,
                            )
                        )
                        assert sample.cpu_us is not None
                        figures.add(f"cpu/io {kind} {depth}", sample.cpu_us)
                        figures.add(f"iops {kind} {depth}", sample.iops)
                finally:
                    stop(process, kind)
            for protocol in ("vhost-user", "vfio-user") if "restart" in args.measure else ():
                rundir = workdir / f"restart-{protocol}"
                rundir.mkdir()
                took = trio.run(downtime.restart_fdstore, rundir, protocol)
                figures.add(f"restart fd store, {protocol}-blk (stand-in systemd)", took * 1000)
                rundir = workdir / f"upgrade-{protocol}"
                rundir.mkdir()
                took = trio.run(downtime.upgrade_in_place, rundir, protocol)
                figures.add(f"restart reload (upgrade), {protocol}-blk (stand-in)", took * 1000)
            if "restart" in args.measure and args.real_systemd:
                for action in ("restart", "reload"):
                    rundir = workdir / f"real-{action}"
                    rundir.mkdir()
                    took = trio.run(downtime.under_real_systemd, rundir, action)
                    name = f"restart systemctl {action}, vhost-user-blk (real systemd)"
                    figures.add(name, took * 1000)
                    shutil.rmtree(rundir, ignore_errors=True)
            if "restart" in args.measure:
                took = trio.run(restart_qsd, workdir, qsd)
                figures.add(f"restart {qsd}, reconnect", took * 1000)
    report(figures, args, qsd, io_kinds)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
