"""What the benchmark scripts share."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import trio
from cffi import FFI

from vfiouserd._native import ffi as native_ffi
from vfiouserd.client.guest import DriverSplitRing, GuestRam

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"

# The program that runs the daemons: the development venv's Python with the
# tree (editable) until a benchmark asks for an installed one.
_daemon_program = [sys.executable, "-m", "vfiouserd"]


def daemon_program() -> list[str]:
    return list(_daemon_program)


def use_installed_daemons() -> str:
    """From now on, daemons are those of vfiouserd installed as a user
    installs it (tests/installation.py: Debian's Python, not editable, made
    once for these sources); its program."""
    global _daemon_program
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from installation import installed_venv

    _daemon_program = [str(installed_venv() / "bin" / "vfiouserd")]
    return _daemon_program[0]


def compile_driver(module: str, source: str, declarations: str) -> ModuleType:
    """A C half of a benchmark (``source``, next to this file) compiled with
    cffi in API mode into .cache/bench, and imported as ``module``."""
    builder = FFI()
    builder.cdef(declarations)
    code = (Path(__file__).parent / source).read_text()
    here = str(Path(__file__).parent)
    builder.set_source(module, code, include_dirs=[here], extra_compile_args=["-O2"])
    CACHE.mkdir(parents=True, exist_ok=True)
    builder.compile(tmpdir=str(CACHE), verbose=False)
    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    return importlib.import_module(module)


async def connect(
    path: str,
    interval: float = 0.02,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 20,
) -> trio.socket.SocketType:
    """A UNIX stream connection to ``path``, once something listens there
    (tried every ``interval`` seconds: a start-up timing wants it short;
    given up at once if ``process``, meant to listen there, has exited)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with trio.fail_after(timeout):
        while True:
            try:
                await sock.connect(path)
                return sock
            except OSError:
                if process is not None and process.poll() is not None:
                    sock.close()
                    message = f"exited ({process.returncode}) before {path} served"
                    raise RuntimeError(message) from None
                await trio.sleep(interval)


def stop(process: subprocess.Popen[bytes], name: str, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``: a back
    end that hangs at exit must not hang the benchmark (it is reported)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"warning: {name} did not exit {timeout:g} s after SIGTERM: killed", file=sys.stderr)
        process.kill()
        process.wait()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (the children of each of its threads, as
    the kernel lists them), parents first: all the processes of a daemon,
    the jailed child in its PID namespace included."""
    tree = [pid]
    for parent in tree:  # grows as it is walked
        for listing in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # a thread that just ended
                tree += map(int, listing.read_text().split())
    return tree


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, all their threads (those that
    ended too), in clock ticks: /proc/PID/stat's fields 14 and 15."""
    total = 0
    for pid in pids:
        # The command name may hold blanks and parentheses: split after its ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total


def context_switches(pids: list[int]) -> int:
    """Voluntary and involuntary switches of every live thread of these
    processes: each wake-up of a sleeping thread counts one."""
    total = 0
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
    return total


def pss_bytes(pids: list[int]) -> int:
    """The proportional set size of these processes together (smaps_rollup):
    a page that N processes map counts 1/N to each of them."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def ram_base(ram: GuestRam) -> int:
    """Where our mapping of the guest RAM's first region (guest address 0) starts."""
    mapping = ram.memory.regions[0].mapping
    assert mapping is not None  # GuestRam maps every region
    return int(native_ffi.cast("uintptr_t", mapping.base))


def ring_args(
    driver: ModuleType, ram: GuestRam, ring: DriverSplitRing, kick: int, call: int
) -> Any:
    """driver.c's ``struct bench_args`` for a started split ring (the
    workload's fields: ``request_args``)."""
    base = ram_base(ram)
    args = driver.ffi.new("struct bench_args *")
    desc, avail, used = ring.areas
    args.desc = driver.ffi.cast("void *", base + desc)
    args.avail = driver.ffi.cast("void *", base + avail)
    args.used = driver.ffi.cast("void *", base + used)
    args.queue_size = ring.size
    args.kick_fd, args.call_fd = kick, call
    args.ram = driver.ffi.cast("uint8_t *", base)
    args.ram_gpa = 0
    return args


@dataclass(frozen=True)
class Workload:
    name: str
    block_size: int
    write: bool
    sequential: bool


MAX_LATENCIES = 4_000_000


def request_args(
    driver: ModuleType,
    args: Any,
    ram: GuestRam,
    workload: Workload,
    *,
    depth: int,
    seconds: float,
    seed: int,
    capacity_sectors: int,
    first_block: int = 0,
) -> Any:
    """The workload's fields, named alike in driver.c's and nvme_driver.c's
    arguments: buffers of ``depth`` slots in ``ram`` (a page, then the
    data), what to read or write, for how long. Returns the latency
    buffer, which must outlive the run."""
    slot_bytes = 4096 + workload.block_size
    latencies = driver.ffi.new("uint64_t[]", MAX_LATENCIES)
    args.slots_gpa = ram.alloc(slot_bytes * depth, 4096)
    args.slot_bytes = slot_bytes
    args.capacity_sectors = capacity_sectors
    args.block_size = workload.block_size
    args.write, args.sequential = int(workload.write), int(workload.sequential)
    args.next_block = first_block
    args.depth = depth
    args.duration_ns = int(seconds * 1e9)
    args.seed = seed
    args.latencies = latencies
    args.max_latencies = MAX_LATENCIES
    return latencies


def percentiles(latencies: list[int]) -> tuple[float, float]:
    """(p50, p99) in microseconds of latencies in nanoseconds."""
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2] / 1000, ordered[
        min(len(ordered) - 1, int(len(ordered) * 0.99))
    ] / 1000
