"""The seccomp allowlist: every system call a jailed daemon may make, and why.

The filter is built with libseccomp (pyseccomp) and loaded on all threads
(TSYNC). Anything not listed takes the default action, which kills the
process unless ``--seccomp`` says otherwise. A few calls that Python makes
on its own initiative and that are harmless to refuse (looking up files,
for instance to print a traceback) fail with an errno instead of killing.

``tests/test_sandbox_syscalls.py`` records the calls the jailed daemon
really makes under the device tests and checks that this list holds no
entry outside that record except those marked ``RARE`` with their reason.
"""

from __future__ import annotations

import errno
import os
import socket
import termios
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyseccomp as sc

from vfiouserd._native import lib

AT_EMPTY_PATH = 0x1000
PROT_EXEC = 0x4
PR_SET_NAME = 15
KCMP_FILE = 0

# name: why the daemon needs it after jailing
BASE: dict[str, str] = {
    "read": "eventfds, sockets, entropy files",
    "pread64": "the session state an upgrade's predecessor hands over (a memfd)",
    "write": "logs on stderr, eventfds, sockets",
    "close": "fds the VMM sent and the daemon releases",
    "fcntl": "non-blocking eventfds and sockets",
    "newfstatat": "fstat of fds (with AT_EMPTY_PATH): memory and eventfd checks",
    "mmap": "guest memory and Python's allocator (never executable)",
    "munmap": "guest memory and Python's allocator",
    "mprotect": "thread stacks (never executable)",
    "rt_sigaction": "trio's signal handling",
    "rt_sigprocmask": "threads and signal delivery",
    "rt_sigreturn": "returning from signal handlers",
    "futex": "locks between threads",
    "clone": "worker threads only (CLONE_THREAD), never processes",
    "set_robust_list": "new threads",
    "rseq": "new threads",
    "gettid": "logging and threads",
    "getpid": "trio and logging",
    "getuid": "the upgrade command checking its peer is the daemon's own user",
    "prctl": "PR_SET_NAME only: trio names its worker threads",
    "exit_group": "the daemon ending",
    "epoll_create1": "trio's event loop",
    "epoll_ctl": "trio's event loop",
    "epoll_wait": "trio's event loop",
    "poll": "the native fast path waiting on a ring's kick and stop eventfds",
    "eventfd2": "the native fast path's stop eventfd, one per ring",
    "socketpair": "trio's wake-up pair, the vfio-user twin socket (AF_UNIX only)",
    "recvmsg": "messages and fds from the VMM",
    "sendmsg": "replies and fds to the VMM",
    "recvfrom": "trio's wake-up pair",
    "sendto": "trio's wake-up pair, sd_notify",
    "accept4": "the next VMM connection",
    "getsockname": "trio checks the family of each socket it wraps",
    "getsockopt": "trio checks that the listening socket listens",
    "setsockopt": "trio sizes the buffers of its wake-up pair",
    "ioctl": "FIONBIO only: making sockets non-blocking",
    "getrandom": "entropy for the rng device and Python's hashing",
    "memfd_create": "the inflight region handed to the front end (GET_INFLIGHT_FD)",
    "kcmp": "KCMP_FILE only: fds sharing one open file, stored once in systemd's fd store",
    "ftruncate": "sizing that region",
}

# Allowed, but the device tests do not reach them; each says when it is used.
RARE: dict[str, str] = {
    "mremap": "glibc's realloc of a block above 128 KiB (a large message buffer growing)",
    "exit": "a worker thread ending after 10 s idle in trio's thread cache",
    "restart_syscall": "the kernel resuming a timed wait that a signal interrupted",
    "clock_gettime": "time, where the clock source has no vDSO (the tests' machine has one)",
    "gettimeofday": "time, where the clock source has no vDSO",
    "time": "time, where the clock source has no vDSO",
    "lseek": "the size of an image that is a block device (the tests use files)",
    "brk": "glibc's malloc growing its main heap under a larger load",
    "madvise": "glibc's malloc returning freed memory under a larger load",
    "getpeername": "the repr of a socket object, which Python builds even for an ignored "
    "ResourceWarning (a socket left to the garbage collector)",
    "sched_getaffinity": "of the daemon itself (pid 0): glibc's malloc sizing its arenas "
    "once many threads allocate (a 64-queue device in use)",
}

# Refused with an errno rather than a kill: Python looks files up by itself
# (tracebacks, time zones); failing is harmless, killing is not.
SOFT_DENY: dict[str, int] = {
    "openat": errno.EACCES,
    "open": errno.EACCES,
    "stat": errno.EACCES,
    "lstat": errno.EACCES,
    "statx": errno.EACCES,
    "access": errno.EACCES,
    "faccessat": errno.EACCES,
    "faccessat2": errno.EACCES,
    "readlink": errno.EACCES,
    "readlinkat": errno.EACCES,
    "getcwd": errno.EACCES,
    "clone3": errno.ENOSYS,  # glibc then falls back to clone, whose flags we can check
}

ACTIONS = {"kill": sc.KILL_PROCESS, "log": sc.LOG, "trap": sc.TRAP}

# Calls allowed only with these arguments (any one condition suffices).
CONDITIONS: dict[str, list[sc.Arg]] = {
    "clone": [sc.Arg(0, sc.MASKED_EQ, lib.CLONE_THREAD, lib.CLONE_THREAD)],
    "ioctl": [sc.Arg(1, sc.EQ, termios.FIONBIO)],
    "prctl": [sc.Arg(0, sc.EQ, PR_SET_NAME)],
    "socketpair": [sc.Arg(0, sc.EQ, socket.AF_UNIX)],
    "mmap": [sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, 0)],
    "mprotect": [sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, 0)],
    # fstat of an fd. AT_EMPTY_PATH does not force an empty path, so this
    # also admits lookups relative to a directory fd: the jailed daemon holds
    # none (inherited fds are closed, memory fds must be regular files).
    "newfstatat": [sc.Arg(3, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH)],
    "kcmp": [sc.Arg(2, sc.EQ, KCMP_FILE)],
    "sched_getaffinity": [sc.Arg(0, sc.EQ, 0)],
}


@dataclass(frozen=True)
class Policy:
    allowed: dict[str, str]
    action: str = "kill"
    # name: (argument index, the only values allowed there)
    argument_is: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)

    def build(self) -> sc.SyscallFilter:
        f = sc.SyscallFilter(defaction=ACTIONS[self.action])
        for name in self.allowed:
            if name in self.argument_is:
                index, values = self.argument_is[name]
                for value in values:
                    f.add_rule(sc.ALLOW, name, sc.Arg(index, sc.EQ, value))
            elif name in CONDITIONS:
                for condition in CONDITIONS[name]:
                    f.add_rule(sc.ALLOW, name, condition)
            else:
                f.add_rule(sc.ALLOW, name)
        if "newfstatat" in self.allowed and "newfstatat" not in self.argument_is:
            # a path lookup (no AT_EMPTY_PATH): refused softly, like openat
            f.add_rule(
                sc.ERRNO(errno.EACCES), "newfstatat", sc.Arg(3, sc.MASKED_EQ, AT_EMPTY_PATH, 0)
            )
        for name, error in SOFT_DENY.items():
            f.add_rule(sc.ERRNO(error), name)
        f.set_attr(sc.Attr.CTL_TSYNC, 1)
        return f

    def load(self) -> None:
        self.build().load()

    def export(self) -> int:
        """The filter as a BPF program in a memfd (close-on-exec), for a
        program to load itself (the jail's waiter, sandbox/waiter.c)."""
        fd = os.memfd_create("vfiouserd-seccomp", os.MFD_CLOEXEC)
        try:
            with os.fdopen(fd, "wb", closefd=False) as program:
                self.build().export_bpf(program)
        except BaseException:
            os.close(fd)
            raise
        return fd


def daemon_policy(device_syscalls: Iterable[str] = (), action: str = "kill") -> Policy:
    """The daemon's allowlist: the base, the rare paths, and the device's own."""
    allowed = dict(BASE)
    allowed.update(RARE)
    for name in device_syscalls:
        allowed.setdefault(name, "declared by the device plugin")
    return Policy(allowed, action)


# The jail's waiter (sandbox/waiter.c), left outside the PID namespace,
# only waits, relays signals, tells systemd the daemon is ready, passes its
# notifications on and removes the socket at the end. It never allocates.
REAPER: dict[str, str] = {
    "poll": "waiting for the daemon: readiness, notifications, its exit",
    "recvmsg": "notifications (fd store) from the daemon (its relay socket only)",
    "sendmsg": "passing them on to systemd (the notify socket only)",
    "wait4": "reaping the daemon",
    "rt_sigprocmask": "holding signals while reaping",
    "newfstatat": "checking that the socket file is still the daemon's (socket directory only)",
    "kill": "relaying SIGTERM/SIGINT/SIGHUP to the daemon",
    "rt_sigreturn": "returning from the relaying signal handler",
    "read": "the daemon's readiness pipe",
    "write": "READY=1 to systemd, log lines",
    "close": "the readiness pipe, fds passed on to systemd",
    "unlinkat": "removing the socket the daemon listened on (socket directory only)",
    "exit_group": "exiting with the daemon's status",
    "getpid": "MAINPID= in READY=1",
    "madvise": "dropping its own read-only pages between events (MADV_DONTNEED)",
}

# Allowed to the waiter, not reached by the tests.
REAPER_RARE: dict[str, str] = {
    "clock_gettime": "a log line's time, where the clock source has no vDSO",
    # without it a stopped and continued waiter dies, and the daemon with it
    # (tests/test_sandbox_waiter.py stops one)
    "restart_syscall": "the kernel resuming poll after the waiter was stopped or frozen "
    "(SIGSTOP and SIGCONT, the cgroup freezer)",
}


def reaper_policy(
    child: int,
    directories: list[int],
    relay: int | None = None,
    notify: int | None = None,
    action: str = "kill",
) -> Policy:
    """Signals go to the daemon only; files are looked at and unlinked only
    relative to the directory fds of the daemon's sockets (seccomp cannot
    read the name: the parent only ever passes the sockets' own); messages
    come from the daemon's relay and go to systemd's notify socket only."""
    allowed = {**REAPER, **REAPER_RARE}
    constraints = {"kill": (0, (child,))}
    for name, fds in (
        ("unlinkat", tuple(directories)),
        ("newfstatat", tuple(directories)),
        ("recvmsg", (relay,) if relay is not None else ()),
        ("sendmsg", (notify,) if notify is not None else ()),
    ):
        if not fds:
            del allowed[name]
        else:
            constraints[name] = (0, fds)
    return Policy(allowed, action, constraints)
