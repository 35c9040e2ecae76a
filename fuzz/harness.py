"""The daemon under fuzzing, the context a case runs in, and the checks after it.

A ``Harness`` starts the real daemon (``python -m vfiouserd <device>``, jailed
as in production), warms it up with one valid session and records its idle
baseline: the jailed process's open fds and resident memory. Each case then
runs on fresh connections with its own ``random.Random`` (seeded from device,
seed and case index, so ``--seed N --case K`` sends the same bytes again),
and once its connections are closed the harness checks, against the
process itself:

1. a fresh connection is served a handshake in time (the daemon serves one
   connection at a time, so this also proves it noticed the case's end);
2. the jailed process's fd count comes back to the baseline;
3. its RSS stays under baseline + a bound;
4. it is alive and its log has no crash marker since the case started.

Any failure is a ``Finding``; the daemon is then restarted so the run goes on.
"""

from __future__ import annotations

import array
import contextlib
import importlib
import os
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from construct import ConstructError

from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserError
from vfiouserd.client.vhost_user import BackendError
from vfiouserd.protocol.framing import ConnectionClosed, FramingError

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent

# Log text that only a bug of the daemon writes (logfmt events, or Python's
# own output for an exception nobody caught).
CRASH_MARKERS = (
    "event=session.crashed",
    "event=device.failed",
    "event=ring.crashed",
    "event=daemon.killed",
    "Traceback",
    "Exception ignored",
    "Fatal Python error",
    "exception=",
)

# What a client legitimately meets when it is hostile: the daemon refuses,
# closes the connection, or stops answering a broken queue.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionClosed,
    FramingError,
    OSError,
    BackendError,
    VfioUserError,
    ConstructError,
    BufferError,  # a driver ring full of requests the device never took
    MemoryError,  # the case's guest RAM allocator ran out (GuestRam.alloc)
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.EndOfChannel,
)


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0  # more than the daemon's own 10 s DMA reply timeout
    settle: float = 3.0  # for the fd count to come back after a session
    rss_bound: int = 64 * MiB
    case_timeout: float = 30.0


@dataclass(frozen=True)
class DeviceSpec:
    name: str  # the subcommand
    protocol: str  # "vhost-user" or "vfio-user"
    model: str  # "blk", "rng", "console", "vsock", "net" or "example"
    options: tuple[str, ...] = ()  # "{workdir}" is replaced

    def arguments(self, workdir: Path) -> list[str]:
        return [option.replace("{workdir}", str(workdir)) for option in self.options]


DISK = ("--blk-file", "{workdir}/disk.img", "--size", "16M")
DISK_SECTORS = 16 * MiB // 512
CONSOLE = ("--console", "{workdir}/hvc0.sock", "--port", "agent={workdir}/agent.sock")

# The guest every case builds: two RAM regions with a hole between them.
LAYOUT = [(0x0, 8 * MiB), (0x1_0000_0000, 4 * MiB)]
HOLE = 0x8000_0000
SCRATCH = 2 * MiB  # request buffers, carved round-robin
DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        # Few queues: a fuzzed index then often names one that is set up.
        DeviceSpec("vhost-user-blk", "vhost-user", "blk", (*DISK, "--num-queues", "4")),
        DeviceSpec("vhost-user-rng", "vhost-user", "rng"),
        # Packed rings offered: the fuzzer drives both layouts.
        DeviceSpec(
            "vfio-user-blk", "vfio-user", "blk", (*DISK, "--num-queues", "2", "--packed-ring")
        ),
        DeviceSpec("vfio-user-example", "vfio-user", "example"),
        # Host-fed queues: receive buffers wait, transmit ones wait for room.
        DeviceSpec("vhost-user-console", "vhost-user", "console", CONSOLE),
        # Packets from the guest answered at once, its receive buffers held.
        DeviceSpec("vhost-user-vsock", "vhost-user", "vsock", ("--uds-path", "{workdir}/v.sock")),
        # Receive queues merge buffers; no peer on the wire: frames are lost.
        DeviceSpec(
            "vhost-user-net", "vhost-user", "net", ("--stream-listen", "{workdir}/wire.sock")
        ),
    )
}


@dataclass
class Finding:
    device: str
    seed: int
    case: int
    first_case: int  # the first case this daemon served (state carries over)
    kind: str
    check: str
    detail: str
    log_path: str
    trace: list[str] = field(default_factory=list)
    log_excerpt: str = ""

    def replay(self) -> str:
        start = f" --from {self.first_case}" if self.first_case < self.case else ""
        return (
            f"python -m fuzz.run --device {self.device} --seed {self.seed} --case {self.case}"
            + start
        )

    def line(self) -> str:
        detail = self.detail.replace("\n", " | ")
        return (
            f"FINDING device={self.device} seed={self.seed} case={self.case} kind={self.kind} "
            f"check={self.check} detail={shlex.quote(detail[:400])} log={self.log_path} "
            f"replay={shlex.quote(self.replay())}"
        )


# --- the daemon process ----------------------------------------------------------------


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class DaemonProcess:
    """``python -m vfiouserd <device>`` as systemd or a user would start it."""

    def __init__(self, spec: DeviceSpec, workdir: Path, incarnation: int) -> None:
        self.spec = spec
        self.workdir = workdir
        self.socket_path = str(workdir / f"{spec.name}.sock")
        self.log_path = workdir / f"{spec.name}-{incarnation}.log"
        self.command = [
            sys.executable,
            "-m",
            "vfiouserd",
            spec.name,
            "--socket-path",
            self.socket_path,
            *spec.arguments(workdir),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.jailed: int | None = None

    def start(self, timeout: float = 15.0) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while "event=listening" not in self.log():  # logged once jailed and serving
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"daemon did not listen within {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        jailed = children.read_text().split()
        if len(jailed) != 1:
            raise RuntimeError(f"expected one jailed child, found {jailed}")
        self.jailed = int(jailed[0])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL for a daemon that does not stop (a wedge)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()  # the jailed child has PDEATHSIG
                self.process.wait(5)
        if self.jailed is not None:
            with contextlib.suppress(ProcessLookupError):  # should be gone already
                os.kill(self.jailed, signal.SIGKILL)
        return self.process.returncode

    def alive(self) -> str | None:
        """None while both processes live, else what happened."""
        assert self.process is not None and self.jailed is not None
        status = self.process.poll()
        if status is not None:
            return f"daemon exited with status {status}"
        try:
            with open(f"/proc/{self.jailed}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return "the jailed daemon is gone"
        if state in ("Z", "X"):
            return "the jailed daemon exited"
        return None

    def log(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def fds(self) -> dict[int, str]:
        assert self.jailed is not None
        targets = {}
        for name in os.listdir(f"/proc/{self.jailed}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                targets[int(name)] = os.readlink(f"/proc/{self.jailed}/fd/{name}")
        return targets

    def rss(self) -> int:
        assert self.jailed is not None
        return _rss_of(self.jailed)


# --- what a case runs in -----------------------------------------------------------------


def own_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


JUNK_FD_KINDS = ("eventfd", "memfd", "pipe-read", "pipe-write", "socket", "null", "file", "dir")


class CaseContext:
    """A case's randomness, the resources it opened (all closed at its end), a
    trace of what it did, and the invariants it saw broken."""

    TRACE_LIMIT = 400

    def __init__(
        self, spec: DeviceSpec, socket_path: str, workdir: Path, rng: random.Random
    ) -> None:
        self.spec = spec
        self.socket_path = socket_path
        self.workdir = workdir
        self.rng = rng
        self.trace: list[str] = []
        self.violations: list[str] = []
        self._closers: list[Callable[[], None]] = []
        self._fds: set[int] = set()
        self._fds_before = own_fds()
        self.swept = 0  # fds the case left open and the sweep closed

    def note(self, text: str) -> None:
        if len(self.trace) < self.TRACE_LIMIT:
            self.trace.append(text)

    def violation(self, text: str) -> None:
        """An invariant of the protocol the daemon broke (a finding)."""
        self.note(f"VIOLATION {text}")
        self.violations.append(text)

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    async def connect(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.on_close(sock.close)
        await sock.connect(self.socket_path)
        return sock

    def guest_ram(self, layout: list[tuple[int, int]]) -> GuestRam:
        ram = GuestRam(layout)
        self.on_close(ram.close)
        return ram

    def fd(self, fd: int) -> int:
        """Close ``fd`` at the end of the case (unless ``close_fd`` did before)."""
        self._fds.add(fd)
        return fd

    def close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def eventfd(self) -> int:
        return self.fd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def memfd(self, size: int, data: bytes = b"") -> int:
        fd = self.fd(os.memfd_create("fuzz", os.MFD_CLOEXEC))
        os.ftruncate(fd, size)
        if data:
            os.pwrite(fd, data[:size], 0)
        return fd

    def junk_fd(self, kind: str | None = None) -> tuple[str, int]:
        """An fd of a random (or the given) type, for messages that want another."""
        kind = kind or self.rng.choice(JUNK_FD_KINDS)
        if kind == "eventfd":
            return kind, self.eventfd()
        if kind == "memfd":
            return kind, self.memfd(self.rng.choice([0, 4096, MiB]))
        if kind in ("pipe-read", "pipe-write"):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            self.fd(read_end)
            self.fd(write_end)
            return kind, read_end if kind == "pipe-read" else write_end
        if kind == "socket":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.on_close(ours.close)
            self.on_close(theirs.close)
            return kind, theirs.fileno()
        if kind == "null":
            return kind, self.fd(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        if kind == "file":
            path = self.workdir / "junk.bin"
            fd = self.fd(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.ftruncate(fd, 8192)
            return kind, fd
        directory = self.workdir / "junk.d"
        directory.mkdir(exist_ok=True)
        return "dir", self.fd(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
        self._fds.clear()
        # Whatever the clients opened on their own (received fds, ring
        # eventfds) goes too, so a long run never runs out of fds.
        for fd in own_fds() - self._fds_before:
            with contextlib.suppress(OSError):
                os.close(fd)
                self.swept += 1


CaseFn = Callable[[CaseContext], Awaitable[None]]


@dataclass(frozen=True)
class CaseSet:
    """What a protocol's case module offers the harness."""

    kinds: dict[str, tuple[int, CaseFn]]  # name: (weight, case)
    handshake: Callable[[str], Awaitable[None]]  # raises if the daemon does not answer
    warm_up: CaseFn  # one valid session that exercises the device

    def pick(self, rng: random.Random, only: str | None = None) -> str:
        names = sorted(self.kinds)
        choice = rng.choices(names, [self.kinds[n][0] for n in names])[0]
        return only or choice  # the draw happens anyway: the rest of the case is the same


def case_set(protocol: str) -> CaseSet:
    module = importlib.import_module(f"fuzz.{protocol.replace('-', '_')}_cases")
    return module.CASES


def case_rng(device: str, seed: int, case: int) -> random.Random:
    # String seeds hash with SHA-512: the same on every run and platform.
    return random.Random(f"{device}/{seed}/{case}")


def is_expected(exc: BaseException) -> bool:
    """Every leaf of ``exc`` (exception groups from nurseries) is something a
    hostile client meets."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_expected(inner) for inner in exc.exceptions)
    return isinstance(exc, EXPECTED_ERRORS)


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


ERROR_LINE = re.compile(r"^\w[\w.]*(Error|Exception|Exit|Interrupt)\b.*")
FILE_LINE = re.compile(r'^File "(.*/)?([^/"]+)", line (\d+), in (\S+)')


def crash_reports(log: str) -> list[str]:
    """One text per crash in ``log``: a logfmt line with a crash marker, or a
    raw traceback Python printed itself (with the lines that follow it)."""
    reports: list[str] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not any(marker in line for marker in CRASH_MARKERS):
            continue
        if line.startswith("ts=") or not line.lstrip().startswith("Traceback"):
            reports.append(line)
        else:
            block = [line]
            for follow in lines[i + 1 : i + 60]:
                if follow.startswith("ts="):
                    break
                block.append(follow)
            reports.append("\\n".join(block))
    return reports


def summarize_crash(report: str) -> str:
    """The event, the last exception and the daemon's own frame it came from
    (frames of the standard library and of trio are skipped)."""
    event = re.search(r"event=(\S+)", report)
    lines = [part.strip(' \t|+"') for part in report.replace('\\"', '"').split("\\n")]
    where, error, error_at = "", "", ""
    for text in lines:
        if match := FILE_LINE.match(text):
            if "/lib/python" not in (match.group(1) or ""):
                where = f"{match.group(2)}:{match.group(3)} in {match.group(4)}"
        elif ERROR_LINE.match(text) and not text.startswith(("ExceptionGroup", "BaseException")):
            error, error_at = text, where
    if not error:
        return report[-300:]
    return f"{event.group(1) if event else 'traceback'}: {error} (at {error_at})"[:400]


@dataclass
class CaseResult:
    index: int
    kind: str
    findings: list[Finding]
    seconds: float
    notes: int


class Harness:
    """Runs cases against one device, one daemon at a time."""

    def __init__(
        self,
        spec: DeviceSpec,
        workdir: Path,
        seed: int,
        *,
        limits: Limits | None = None,
        only_kind: str | None = None,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.seed = seed
        self.limits = limits or Limits()
        self.only_kind = only_kind
        self.cases = case_set(spec.protocol)
        if only_kind is not None and only_kind not in self.cases.kinds:
            raise ValueError(f"no case kind {only_kind!r}; kinds: {sorted(self.cases.kinds)}")
        self.daemon: DaemonProcess | None = None
        self.incarnation = 0
        self.first_case = 0
        self.restarts = 0
        self.swept_fds = 0
        self.baseline_fds: dict[int, str] = {}
        self.baseline_rss = 0

    # -- daemon life cycle ------------------------------------------------------------------

    async def start(self, first_case: int = 0) -> None:
        """A fresh daemon, warmed up, with its idle baseline measured."""
        self.first_case = first_case
        self.incarnation += 1
        # A log of its own: an earlier run's in the same workdir stays.
        while (self.workdir / f"{self.spec.name}-{self.incarnation}.log").exists():
            self.incarnation += 1
        self.daemon = DaemonProcess(self.spec, self.workdir, self.incarnation)
        self.daemon.start()
        ctx = CaseContext(
            self.spec,
            self.daemon.socket_path,
            self.workdir,
            case_rng(self.spec.name, self.seed, -1),
        )
        try:
            with trio.fail_after(self.limits.case_timeout):
                await self.cases.warm_up(ctx)
        finally:
            ctx.close()
        with trio.fail_after(self.limits.handshake_timeout):
            await self.cases.handshake(self.daemon.socket_path)
        self.baseline_fds = await self._stable_fds()
        self.baseline_rss = self.daemon.rss()
        problems = crash_reports(self.daemon.log())
        if problems or ctx.violations:
            raise RuntimeError(f"the warm-up session failed: {problems or ctx.violations}")

    async def _stable_fds(self) -> dict[int, str]:
        """The fd table once the same count was seen for 0.3 s."""
        assert self.daemon is not None
        previous, stable_since = self.daemon.fds(), time.monotonic()
        deadline = time.monotonic() + 5
        while time.monotonic() - stable_since < 0.3 and time.monotonic() < deadline:
            await trio.sleep(0.05)
            current = self.daemon.fds()
            if len(current) != len(previous):
                previous, stable_since = current, time.monotonic()
        return previous

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    async def restart(self, first_case: int) -> None:
        self.stop()
        self.restarts += 1
        await self.start(first_case)

    # -- one case --------------------------------------------------------------------------

    async def run_case(self, index: int) -> CaseResult:
        assert self.daemon is not None
        daemon = self.daemon
        rng = case_rng(self.spec.name, self.seed, index)
        kind = self.cases.pick(rng, self.only_kind)
        log_offset = daemon.log_size()
        ctx = CaseContext(self.spec, daemon.socket_path, self.workdir, rng)
        ctx.note(f"case {index}: {kind}")
        started = time.monotonic()
        fuzzer_error = None
        try:
            with trio.move_on_after(self.limits.case_timeout) as scope:
                await self.cases.kinds[kind][1](ctx)
            if scope.cancelled_caught:
                ctx.note(f"case timed out after {self.limits.case_timeout:g} s")
        except Exception as exc:
            if is_expected(exc):
                ctx.note(f"ended by {describe(exc)}")
            else:  # a bug of the fuzzer, or a reply no daemon may send
                fuzzer_error = "".join(traceback.format_exception(exc)[-6:])
                ctx.note(f"fuzzer error: {fuzzer_error}")
        finally:
            ctx.close()
        self.swept_fds += ctx.swept
        problems = [("invariant", v) for v in ctx.violations]
        if fuzzer_error is not None:
            problems.append(("fuzzer-error", fuzzer_error))
        problems += await self._check(log_offset)
        excerpt = "\n".join(daemon.log(log_offset).splitlines()[-80:]) if problems else ""
        findings = [
            Finding(
                self.spec.name,
                self.seed,
                index,
                self.first_case,
                kind,
                check,
                detail,
                str(daemon.log_path),
                list(ctx.trace),
                excerpt,
            )
            for check, detail in problems
        ]
        self.last_trace = ctx.trace
        return CaseResult(index, kind, findings, time.monotonic() - started, len(ctx.trace))

    async def _check(self, log_offset: int) -> list[tuple[str, str]]:
        daemon = self.daemon
        assert daemon is not None
        problems: list[tuple[str, str]] = []
        dead = daemon.alive()
        if dead is None:
            try:
                with trio.fail_after(self.limits.handshake_timeout):
                    await self.cases.handshake(daemon.socket_path)
            except Exception as exc:
                problems.append(("wedge", f"no handshake on a fresh connection: {exc!r}"))
            else:
                problems += await self._check_resources()
            dead = daemon.alive()
        if dead is not None:
            problems.append(("dead", dead))
        reports = crash_reports(daemon.log(log_offset))
        if reports:
            seen = list(dict.fromkeys(summarize_crash(report) for report in reports))
            problems.append(("log", "; ".join(seen[:3])))
        return problems

    async def _check_resources(self) -> list[tuple[str, str]]:
        daemon = self.daemon
        assert daemon is not None
        baseline = len(self.baseline_fds)
        deadline = time.monotonic() + self.limits.settle
        fds = daemon.fds()
        while len(fds) != baseline and time.monotonic() < deadline:
            await trio.sleep(0.02)
            fds = daemon.fds()
        problems = []
        if len(fds) != baseline:
            before = sorted(self.baseline_fds.values())
            after = sorted(fds.values())
            extra = [t for t in after if t not in before or after.count(t) > before.count(t)]
            missing = [t for t in before if t not in after]
            problems.append(
                (
                    "fds",
                    f"{len(fds)} fds open after the session, {baseline} at idle"
                    f" (new: {sorted(set(extra))[:8]}, gone: {sorted(set(missing))[:8]})",
                )
            )
        rss = daemon.rss()
        if rss > self.baseline_rss + self.limits.rss_bound:
            problems.append(
                (
                    "rss",
                    f"RSS {rss // MiB} MiB after the session, {self.baseline_rss // MiB} MiB"
                    f" at idle (bound +{self.limits.rss_bound // MiB} MiB)",
                )
            )
        return problems


# --- wire helpers the case modules share ---------------------------------------------------

INTERESTING = {
    8: (0, 1, 0x7F, 0x80, 0xFF),
    16: (0, 1, 2, 0x7FFF, 0x8000, 0xFFFF),
    32: (0, 1, 2, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1000, 0x10000),
    64: (0, 1, 2, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x1000, 1 << 47),
}


def mutate_int(rng: random.Random, value: int, bits: int) -> int:
    """A value near ``value`` or one of the widths' edge cases."""
    mask = (1 << bits) - 1
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(INTERESTING[bits])
    if roll < 0.6:
        return (value + rng.choice((-1, 1, -8, 8, 4096, -4096))) & mask
    if roll < 0.75:
        return value ^ (1 << rng.randrange(bits))
    if roll < 0.85:
        return (value + rng.randrange(1 << min(bits, 20))) & mask
    return rng.getrandbits(bits)


def mutate_fields(rng: random.Random, payload: bytes, fmt: str, times: int = 1) -> bytes:
    """Mutate ``times`` of the integer fields of a struct laid out as ``fmt``
    (native order, as both protocols are), leaving the rest as it was."""
    layout = struct.Struct(fmt)
    if len(payload) < layout.size:
        return payload
    values = list(layout.unpack_from(payload))
    codes = [c for c in fmt.lstrip("=<") if c.isalpha() and c != "x"]
    widths = {"B": 8, "H": 16, "I": 32, "Q": 64}
    for _ in range(times):
        i = rng.randrange(len(values))
        values[i] = mutate_int(rng, values[i], widths[codes[i]])
    return layout.pack(*values) + payload[layout.size :]


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage: flip, overwrite, truncate, extend or splice."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.3 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif roll < 0.5 and data:
            at = rng.randrange(len(data))
            data[at : at + 4] = rng.randbytes(min(4, len(data) - at))
        elif roll < 0.65 and data:
            del data[rng.randrange(len(data)) :]
        elif roll < 0.8:
            data += rng.randbytes(rng.choice((1, 4, 8, 16, 100)))
        elif data:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(data)


def replace_field(payload: bytes, offset: int, fmt: str, value: int) -> bytes:
    layout = struct.Struct(fmt)
    if len(payload) < offset + layout.size:
        return payload
    return payload[:offset] + layout.pack(value) + payload[offset + layout.size :]


async def drain(sock: trio.socket.SocketType, on_message: Callable[[bytes], None]) -> None:
    """Read and discard what the daemon sends (closing any fd), so it never
    blocks on a full socket while a case sends raw messages."""
    space = socket.CMSG_SPACE(64 * 4)
    with contextlib.suppress(OSError, trio.ClosedResourceError, trio.BrokenResourceError):
        while True:
            data, ancdata, _, _ = await sock.recvmsg(65536, space)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            if not data:
                return
            on_message(data)
