"""Record the system calls a jailed daemon makes once its seccomp filter is on.

The daemon runs under ``strace -f`` with ``--seccomp=log`` (nothing is
killed while recording). A thread that loaded a filter, and every thread or
process it creates afterwards, is jailed; their calls from then on are
counted, split between the parent left outside the PID namespace (the
process that executes the waiter by fd, ``execveat``: the first process
traced, or the one an upgrade's reload command forked) and the daemon
proper. Each jailed process loads its filter
while it has a single thread, so following clone results is enough.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# "PID name(args) = result", "PID name(args <unfinished ...>",
# "PID <... name resumed>args) = result"
START = re.compile(r"^(\d+) +(\w+)\((.*)$")
RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>(.*)$")
RESULT = re.compile(r"\) += (-?\d+|\?)")

STRACE = shutil.which("strace")
CLONES = ("clone", "clone3", "fork", "vfork")


@dataclass
class Record:
    daemon: set[str] = field(default_factory=set)
    reaper: set[str] = field(default_factory=set)

    def update(self, other: Record) -> None:
        self.daemon |= other.daemon
        self.reaper |= other.reaper


def _is_filter_load(name: str, args: str) -> bool:
    # libseccomp probes the kernel with NULL filters first; only a real
    # program (``{len=..., filter=...}``) that returns 0 jails the thread.
    return name == "seccomp" and args.startswith("SECCOMP_SET_MODE_FILTER") and "filter=" in args


def _result(text: str) -> int | None:
    match = RESULT.search(text)
    if match is None or match.group(1) == "?":
        return None
    return int(match.group(1))


def parse(trace: Path) -> Record:
    record = Record()
    jailed: set[int] = set()
    unfinished: dict[int, tuple[str, str]] = {}  # pid -> (name, args) of a call in progress
    reapers: set[int] = set()
    seen: set[int] = set()
    # Inside the daemon's PID namespace a clone returns the new thread's id
    # there, not the one strace prints: such a thread is jailed when it first
    # shows up, whether before its creator's clone returns or after.
    adopted_early = 0  # threads first seen while a jailed clone was under way
    awaited = 0  # jailed clones returned, their threads not seen yet

    def finished(pid: int, name: str, args: str, rest: str) -> None:
        nonlocal adopted_early, awaited
        result = _result(rest)
        if _is_filter_load(name, args) and result == 0:
            jailed.add(pid)
        elif name in CLONES and pid in jailed and result is not None and result > 0:
            jailed.add(result)
            if result not in seen:  # an id in the daemon's namespace
                if adopted_early:
                    adopted_early -= 1
                else:
                    awaited += 1

    for line in trace.read_text(errors="replace").splitlines():
        resumed = RESUMED.match(line)
        if resumed:
            pid, name, rest = int(resumed.group(1)), resumed.group(2), resumed.group(3)
            _, args = unfinished.pop(pid, (name, ""))
            finished(pid, name, args, rest)
            continue
        start = START.match(line)
        if not start:
            continue  # signals, exits
        pid, name, rest = int(start.group(1)), start.group(2), start.group(3)
        if name == "execveat":
            reapers.add(pid)
        if pid not in seen:
            seen.add(pid)
            if any(p in jailed and n in CLONES for p, (n, _) in unfinished.items()):
                jailed.add(pid)
                adopted_early += 1
            elif awaited:
                jailed.add(pid)
                awaited -= 1
        if pid in jailed:
            (record.reaper if pid in reapers else record.daemon).add(name)
        if rest.endswith("<unfinished ...>"):
            unfinished[pid] = (name, rest)
        else:
            finished(pid, name, rest, rest)
    return record


def command(trace: Path, argv: list[str]) -> list[str]:
    """``argv`` wrapped for recording (the caller adds ``--seccomp log``)."""
    assert STRACE is not None, "strace is not installed"
    return [STRACE, "-f", "-qq", "-o", str(trace), *argv]
