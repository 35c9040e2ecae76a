"""The jail every daemon enters once it has opened what it needs.

Order (the caller's part first): parse the configuration, import every
plugin, open the image, sockets and files the device needs; then ``enter``:

1. a user namespace (the daemon then holds capabilities only inside it),
2. mount, network, IPC, UTS and PID namespaces,
3. the file system becomes an empty read-only tmpfs (pivot_root),
4. fork: the child is PID 1 of the new PID namespace and serves; the parent
   stays outside it and becomes the waiter (``waiter.c``, executed by fd):
   it waits, relays signals and the exit status, tells systemd when the
   daemon is ready and removes the socket at the end,
5. in the child: every capability and the bounding set dropped (and root
   given up), no-new-privileges, not dumpable, rlimits (no core files,
   bounded fds and threads), then the seccomp allowlist on all threads.

Nothing after that needs a new file, socket or import. A step the machine
cannot do stops the daemon with a message naming the step and the switch
that skips it; the daemon never silently runs unjailed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import prctl

from vfiouserd.handover import CONTROL, LISTENER
from vfiouserd.log import get_logger
from vfiouserd.sandbox.namespaces import (
    StepFailed,
    enter_other_namespaces,
    enter_user_namespace,
    forbid_new_namespaces,
    pivot_to_empty_root,
)
from vfiouserd.sandbox.seccomp import daemon_policy, reaper_policy
from vfiouserd.sockets import SocketFile
from vfiouserd.systemd import FdStore, send_notification

log = get_logger("sandbox")

MODES = ("strict", "namespace", "none")
SECCOMP_ACTIONS = ("kill", "log", "trap", "none")
# Sockets whose files stay once the daemon put them in the fd store: the next
# daemon listens on them. (A socket unit's listener is systemd's, so under
# socket activation only the control socket goes there.)
KEPT = (LISTENER, CONTROL)
MAX_FDS = 4096
# The event loop, a fast-path thread per ring (64 queues at most), trio's
# worker threads (40 at most), and some slack.
MAX_THREADS = 160
# What the parent becomes (sandbox/waiter.c, built with the package): a
# small static program rather than a copy of this interpreter's heap, which
# would turn into private memory as the daemon writes its own.
WAITER = os.path.join(os.path.dirname(__file__), "vfiouserd-waiter")

# Modules imported lazily by the standard library or trio at run time: load
# them now, while there is a file system to load them from. (Not the idna
# codec of host names: the jail's network namespace has no network.)
_LIBRARIES: list[ctypes.CDLL] = []  # loaded before the jail, kept loaded
PRELOAD = (
    "trio._core._io_epoll",
    "trio._threads",
    "trio.to_thread",
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
    # Host directories the device reaches by path once jailed (a vsock
    # device's socket directory): bound into the empty root, read-write.
    directories: Iterable[str] = ()
    # A connected sd_notify socket: whoever is the main process tells
    # systemd READY=1 once the daemon serves (the parent when jailed).
    notify_fd: int | None = None
    # The socket files to remove at the end (the VMM's, the control
    # socket): by the parent when jailed, since the jailed daemon no longer
    # sees their paths.
    socket_files: list[SocketFile] = field(default_factory=list)
    # Set by ``enter`` when there is a notify socket: the daemon's way to
    # systemd's fd store (through the parent when jailed).
    store: FdStore | None = None
    # READY=1 once jailed; not for an upgrade's successor: the daemon it
    # succeeds names it the main process (MAINPID=) when it takes over, and
    # the socket files are that daemon's until then. The successor calls
    # ``ready`` once it took over.
    announce_ready: bool = True
    ready: Callable[[], None] = lambda: None


@contextlib.contextmanager
def _step(name: str, way_out: str = "--sandbox=none") -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, RuntimeError) as exc:
        raise JailError(
            f"cannot finish the jail: step '{name}' failed: {exc}; "
            f"{way_out} runs the daemon without it (not recommended)"
        ) from exc


def close_inherited_fds(keep: Iterable[int]) -> None:
    """Close every fd above stderr that the daemon was not given on purpose
    (a directory fd inherited by accident would be a way out of the jail)."""
    _close_all_except(set(keep))


def _preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # glibc loads libgcc_s the first time a thread exits through
    # pthread_exit (Python ends daemon threads that way at exit); in the
    # empty root it could not, and aborts. Loaded now, it is found by name.
    with contextlib.suppress(OSError):
        _LIBRARIES.append(ctypes.CDLL("libgcc_s.so.1"))
    sys.dont_write_bytecode = True  # nothing to write to any more


def enter(options: JailOptions) -> None:
    """Enter the jail. Returns in the jailed daemon; the parent never returns."""
    if options.mode not in MODES:
        raise JailError(f"unknown --sandbox mode {options.mode!r}")
    if options.seccomp not in SECCOMP_ACTIONS:
        raise JailError(f"unknown --seccomp action {options.seccomp!r}")
    if options.mode == "none":
        log.warning("sandbox.disabled", reason="--sandbox=none: the daemon runs unjailed")
        if options.announce_ready:
            _notify_ready(options)
        notify_fd = options.notify_fd
        if notify_fd is not None:
            options.store = FdStore(lambda message, fds: send_notification(notify_fd, message, fds))
        return
    waiter = _open_waiter()  # while it can be found: the root is about to go
    _fill_standard_fds()
    _preload()
    try:
        uid, gid = enter_user_namespace()
        enter_other_namespaces()
        forbid_new_namespaces()
        pivot_to_empty_root(directories=options.directories)
    except StepFailed as exc:
        raise JailError(
            f"cannot jail the daemon: this machine refuses the step '{exc}'; "
            "--sandbox=none runs the daemon without a jail (not recommended)"
        ) from exc
    ready_read, ready_write = os.pipe()
    # Only the parent holds the write end: end of file means it is gone.
    alive_read, alive_write = os.pipe()
    # Notifications the daemon has for systemd (its fd store) go through the
    # parent: systemd listens to the main process (and ExecReload='s) only.
    relay_parent = relay_child = None
    if options.notify_fd is not None:
        relay_parent, relay_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    child = os.fork()
    if child == 0:
        os.close(waiter)
        os.close(ready_read)
        os.close(alive_write)
        _close_parent_only(options)
        if relay_parent is not None and relay_child is not None:
            relay_parent.close()
            # A bare fd: a socket object left to the collector at exit would
            # describe itself with getpeername, outside the allowlist.
            relay_fd = relay_child.detach()
            options.store = FdStore(lambda message, fds: send_notification(relay_fd, message, fds))
        try:
            _confine(uid, gid, options, alive_read)
        except JailError as exc:  # the parent sees no readiness byte and reports the exit
            os.write(2, f"vfiouserd: {exc}\n".encode())
            os._exit(1)
        except BaseException as exc:
            os.write(2, f"vfiouserd: cannot finish the jail: {exc!r}\n".encode())
            os._exit(1)

        def ready(byte: bytes) -> None:
            os.write(ready_write, byte)
            os.close(ready_write)

        if options.announce_ready:
            ready(b"1")
        else:  # "0": the waiter tells systemd nothing (see announce_ready)
            options.ready = lambda: ready(b"0")
        log.info("sandbox.entered", mode=options.mode, seccomp=options.seccomp, uid=uid)
        return
    os.close(ready_write)
    os.close(alive_read)
    relay = None
    if relay_parent is not None and relay_child is not None:
        relay_child.close()
        relay = relay_parent.detach()
    _become_waiter(child, waiter, ready_read, alive_write, relay, uid, options)


def _open_waiter() -> int:
    try:
        return os.open(WAITER, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise JailError(
            f"cannot jail the daemon: its waiter program is missing ({exc}); reinstall "
            "vfiouserd, or --sandbox=none runs the daemon without a jail (not recommended)"
        ) from exc


def _fill_standard_fds() -> None:
    """A closed stdin, stdout or stderr becomes /dev/null, and all three stay
    open through the exec: the waiter's C library, started as root keeping
    its effective uid (a secure exec), would open /dev/null itself where
    none is left, and crash."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one
        os.set_inheritable(fd, True)


def _close_parent_only(options: JailOptions) -> None:
    if options.notify_fd is not None:
        os.close(options.notify_fd)
    for socket_file in options.socket_files:
        socket_file.close()
    options.notify_fd = None
    options.socket_files = []


def _notify_ready(options: JailOptions) -> None:
    if options.notify_fd is not None:
        try:
            os.write(options.notify_fd, b"READY=1\nMAINPID=%d" % os.getpid())
        except OSError as exc:
            log.warning("sd_notify.failed", error=str(exc))


def _clear_bounding_set() -> None:
    for cap in prctl.ALL_CAPS:
        with contextlib.suppress(OSError):  # a capability this kernel does not know
            prctl.capbset_drop(cap)


def _drop_capabilities() -> None:
    _clear_bounding_set()
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.cap_inheritable.limit()


def _close_all_except(keep: set[int]) -> None:
    previous = 2
    for fd in sorted(k for k in keep if k > 2):
        os.closerange(previous + 1, fd)
        previous = fd
    os.closerange(previous + 1, MAX_FDS * 16)


def _confine(uid: int, gid: int, options: JailOptions, alive: int) -> None:
    if os.getuid() != uid:  # started as root: become nobody inside the jail
        with _step("giving up root"):
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            _clear_bounding_set()  # needs CAP_SETPCAP, which the uid change takes away
            os.setresuid(uid, uid, uid)
    with _step("parent-death signal"):
        # Set after the uid change, which clears it; then make sure the
        # parent did not die before it was set.
        prctl.set_pdeathsig(signal.SIGKILL)
        if select.select([alive], [], [], 0)[0]:
            raise RuntimeError("the parent process is gone")
        os.close(alive)
    with _step("dropping capabilities"):
        _drop_capabilities()
    with _step("no new privileges"):
        prctl.set_no_new_privs(True)
        prctl.set_dumpable(False)
    with _step("resource limits"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_THREADS, MAX_THREADS))
    if options.mode == "strict" and options.seccomp != "none":
        with _step("seccomp filter", "--sandbox=namespace (or --seccomp=none)"):
            daemon_policy(options.device_syscalls, options.seccomp).load()


def _become_waiter(
    child: int,
    waiter: int,
    ready: int,
    alive: int,
    relay: int | None,
    uid: int,
    options: JailOptions,
) -> NoReturn:
    """The parent: close what only the daemon needs, give up privileges,
    then execute the waiter (the stop signals stay held through the exec:
    it relays those that came meanwhile)."""
    passed = {ready, alive} | ({relay} if relay is not None else set())
    if options.notify_fd is not None:
        passed.add(options.notify_fd)
    passed.update(f.directory for f in options.socket_files)
    try:
        _close_all_except(passed | {waiter})
        if os.getuid() != uid:
            # Started as root: share the daemon's real uid so signals reach it
            # without CAP_KILL, and keep root only as the owner of the socket's
            # directory entry, which it removes at the end.
            with _step("parent: sharing the daemon's uid"):
                os.setresuid(uid, 0, 0)
        with _step("parent: dropping capabilities"):
            # The bounding set needs CAP_SETPCAP, which the exec takes away;
            # no-new-privileges keeps it from granting any back.
            _drop_capabilities()
            prctl.set_no_new_privs(True)
            prctl.set_dumpable(False)  # the waiter sets it again after the exec
        with _step("parent: watching the daemon"):
            exited = os.pidfd_open(child)
        passed.add(exited)
        arguments = [
            os.path.basename(WAITER),
            f"child={child}",
            f"ready={ready}",
            f"pidfd={exited}",
            f"utc_offset={time.localtime().tm_gmtoff}",
        ]
        if relay is not None:
            arguments.append(f"relay={relay}")
        if options.notify_fd is not None:
            arguments.append(f"notify={options.notify_fd}")
        arguments += [
            f"socket={f.directory}:{f.device}:{f.inode}:{f.name}" for f in options.socket_files
        ]
        arguments += [f"keep={name}" for name in KEPT]
        if not options.announce_ready:
            arguments.append("successor=1")
        if options.mode == "strict" and options.seccomp != "none":
            directories = [f.directory for f in options.socket_files]
            notify = options.notify_fd
            with _step("parent: seccomp filter", "--sandbox=namespace (or --seccomp=none)"):
                policy = reaper_policy(child, directories, relay, notify, options.seccomp)
                filter_fd = policy.export()  # loaded by the waiter before it reads a message
            passed.add(filter_fd)
            arguments.append(f"filter={filter_fd}")
        for fd in passed:
            os.set_inheritable(fd, True)
        with _step("parent: starting the waiter"):
            os.execve(waiter, arguments, {})
    except JailError as exc:
        log.error("sandbox.failed", error=str(exc))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        for socket_file in options.socket_files:
            socket_file.remove()
        os._exit(1)
    raise AssertionError("unreachable: execve returns only by raising, and that exits above")
