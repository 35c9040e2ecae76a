"""The jail every daemon enters once it has opened what it needs.

Order (the caller's part first): parse the configuration, import every
plugin, open the image, sockets and files the device needs; then ``enter``:

1. a user namespace (the daemon then holds capabilities only inside it),
2. mount, network, IPC, UTS and PID namespaces,
3. the file system becomes an empty read-only tmpfs (pivot_root),
4. fork: the child is PID 1 of the new PID namespace and serves; the parent
   stays outside it, waits, relays signals and the exit status, tells
   systemd when the daemon is ready and removes the socket at the end,
5. in the child: every capability and the bounding set dropped (and root
   given up), no-new-privileges, not dumpable, rlimits (no core files,
   bounded fds and threads), then the seccomp allowlist on all threads.

Nothing after that needs a new file, socket or import. A step the machine
cannot do stops the daemon with a message naming the step and the switch
that skips it; the daemon never silently runs unjailed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import resource
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import prctl

from vfiouserd.log import get_logger
from vfiouserd.sandbox.namespaces import (
    StepFailed,
    enter_other_namespaces,
    enter_user_namespace,
    pivot_to_empty_root,
)
from vfiouserd.sandbox.seccomp import daemon_policy, reaper_policy
from vfiouserd.server import STOP_SIGNALS, release_stop_signals

log = get_logger("sandbox")

MODES = ("strict", "namespace", "none")
SECCOMP_ACTIONS = ("kill", "log", "trap", "none")
MAX_FDS = 4096
MAX_THREADS = 64  # the event loop, trio's worker threads, and some slack

# Modules imported lazily by the standard library or trio at run time: load
# them now, while there is a file system to load them from.
PRELOAD = (
    "trio._core._io_epoll",
    "trio._threads",
    "trio.to_thread",
    "encodings.idna",
    "concurrent.futures",
    "selectors",
    "traceback",
    "linecache",
    "tokenize",
    "zlib",
    "math",
)


class JailError(Exception):
    """The jail could not be entered; the message names the step and the way out."""


@dataclass
class JailOptions:
    mode: str = "strict"
    seccomp: str = "kill"
    device_syscalls: Iterable[str] = ()
    # A connected sd_notify socket: whoever is the main process tells
    # systemd READY=1 once the daemon serves (the parent when jailed).
    notify_fd: int | None = None
    # (directory fd, socket name): the parent removes the socket at the end,
    # since the jailed daemon no longer sees the path.
    socket_cleanup: tuple[int, str] | None = None


def _preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    sys.dont_write_bytecode = True  # nothing to write to any more


def enter(options: JailOptions) -> None:
    """Enter the jail. Returns in the jailed daemon; the parent never returns."""
    if options.mode not in MODES:
        raise JailError(f"unknown --sandbox mode {options.mode!r}")
    if options.seccomp not in SECCOMP_ACTIONS:
        raise JailError(f"unknown --seccomp action {options.seccomp!r}")
    if options.mode == "none":
        log.warning("sandbox.disabled", reason="--sandbox=none: the daemon runs unjailed")
        _notify_ready(options)
        _close_parent_only(options)
        return
    _preload()
    try:
        uid, gid = enter_user_namespace()
        enter_other_namespaces()
        pivot_to_empty_root()
    except StepFailed as exc:
        raise JailError(
            f"cannot jail the daemon: this machine refuses the step '{exc}'; "
            "--sandbox=none runs the daemon without a jail (not recommended)"
        ) from exc
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_read)
        _close_parent_only(options)
        try:
            _confine(uid, gid, options)
        except Exception as exc:  # tell the parent (it waits for a byte that never comes)
            os.write(2, f"vfiouserd: cannot finish the jail: {exc}\n".encode())
            os._exit(1)
        os.write(ready_write, b"1")
        os.close(ready_write)
        log.info(
            "sandbox.entered",
            mode=options.mode,
            seccomp=options.seccomp,
            uid=uid,
        )
        return
    os.close(ready_write)
    _reap(child, ready_read, uid, options)


def _close_parent_only(options: JailOptions) -> None:
    for fd in (options.notify_fd, options.socket_cleanup and options.socket_cleanup[0]):
        if fd is not None:
            os.close(fd)
    options.notify_fd = None
    options.socket_cleanup = None


def _notify_ready(options: JailOptions) -> None:
    if options.notify_fd is not None:
        try:
            os.write(options.notify_fd, b"READY=1\nMAINPID=%d" % os.getpid())
        except OSError as exc:
            log.warning("sd_notify.failed", error=str(exc))


def _drop_capabilities() -> None:
    for cap in prctl.ALL_CAPS:
        with contextlib.suppress(OSError):  # a capability this kernel does not know
            prctl.capbset_drop(cap)
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.cap_inheritable.limit()


def _close_all_except(keep: set[int]) -> None:
    previous = 2
    for fd in sorted(k for k in keep if k > 2):
        os.closerange(previous + 1, fd)
        previous = fd
    os.closerange(previous + 1, MAX_FDS * 16)


def _confine(uid: int, gid: int, options: JailOptions) -> None:
    prctl.set_pdeathsig(signal.SIGKILL)  # no daemon outlives its parent
    if os.getuid() != uid:  # started as root: become nobody inside the jail
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        for cap in prctl.ALL_CAPS:  # the bounding set needs CAP_SETPCAP: drop it first
            with contextlib.suppress(OSError):
                prctl.capbset_drop(cap)
        os.setresuid(uid, uid, uid)
    _drop_capabilities()
    prctl.set_no_new_privs(True)
    prctl.set_dumpable(False)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))
    resource.setrlimit(resource.RLIMIT_NPROC, (MAX_THREADS, MAX_THREADS))
    if options.mode == "strict" and options.seccomp != "none":
        daemon_policy(options.device_syscalls, options.seccomp).load()


def _reap(child: int, ready: int, uid: int, options: JailOptions) -> None:
    """The parent: close what only the daemon needs, wait, relay, exit."""
    keep = {ready}
    if options.notify_fd is not None:
        keep.add(options.notify_fd)
    if options.socket_cleanup is not None:
        keep.add(options.socket_cleanup[0])
    _close_all_except(keep)

    def relay(signum: int, frame: object) -> None:
        try:
            os.kill(child, signum)
        except OSError as exc:  # the daemon is gone already, or refuses us
            log.warning("signal.relay_failed", signal=signal.Signals(signum).name, error=str(exc))

    for signum in STOP_SIGNALS:
        signal.signal(signum, relay)
    release_stop_signals()  # held since start-up; pending ones are relayed now
    if os.getuid() != uid:
        # Started as root: share the daemon's real uid so signals reach it
        # without CAP_KILL, and keep root only as the owner of the socket's
        # directory entry, which it removes at the end.
        os.setresuid(uid, 0, 0)
    _drop_capabilities()
    prctl.set_no_new_privs(True)
    prctl.set_dumpable(False)
    if options.mode == "strict" and options.seccomp != "none":
        directory = options.socket_cleanup[0] if options.socket_cleanup else None
        reaper_policy(child, directory, options.seccomp).load()
    became_ready = os.read(ready, 1) == b"1"
    os.close(ready)
    if became_ready:
        _notify_ready(options)
    _, status = os.waitpid(child, 0)
    if options.socket_cleanup is not None:
        directory, name = options.socket_cleanup
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        log.error("daemon.killed", signal=signal.Signals(signum).name)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status))
