"""Linux namespaces and the empty root the daemon lives in once jailed."""

from __future__ import annotations

import os
from collections.abc import Iterable

import prctl

from vfiouserd._native import ffi, lib

# What the unprivileged uid/gid inside the jail is when the daemon starts as
# root: it gives up root entirely (and RLIMIT_NPROC applies to it).
JAIL_ID = 65534


class StepFailed(Exception):
    """One jail step the machine refused; ``step`` names it."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step


def _check(result: int, step: str) -> None:
    if result != 0:
        err = ffi.errno
        raise StepFailed(step, os.strerror(err))


def _write(path: str, text: str, step: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise StepFailed(step, exc.strerror or str(exc)) from exc


def enter_user_namespace() -> tuple[int, int]:
    """A new user namespace; returns the (uid, gid) to become inside it.

    Anybody may map their own ids, and that is what an unprivileged daemon
    does. Root with the capabilities to do so also maps JAIL_ID so it can
    give up root inside; a map of more than one id must be written from the
    parent namespace, so a helper process forked beforehand writes it (as
    newuidmap would). Root without those capabilities (an empty
    CapabilityBoundingSet= in a unit, say) could neither map nor give up
    root, so it is refused: such a daemon should run as a plain user.
    """
    uid, gid = os.getuid(), os.getgid()
    if uid == 0 and not all(
        getattr(prctl.cap_effective, cap) for cap in ("setuid", "setgid", "setfcap")
    ):
        raise StepFailed(
            "user namespace",
            "started as root without CAP_SETUID, CAP_SETGID and CAP_SETFCAP, the daemon "
            "cannot give root up; run it as an unprivileged user (User= or DynamicUser= "
            "in a unit)",
        )
    if uid != 0:
        _check(lib.unshare(lib.CLONE_NEWUSER), "user namespace")
        _write("/proc/self/setgroups", "deny", "user namespace setgroups")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n", "user namespace uid map")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n", "user namespace gid map")
        return uid, gid
    target = os.getpid()
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    helper = os.fork()
    if helper == 0:  # still in the host's user namespace
        try:
            os.close(go_write)
            os.close(done_read)
            status = b"?"
            if os.read(go_read, 1) == b"1":
                mapping = f"0 0 1\n{JAIL_ID} {JAIL_ID} 1\n"
                try:
                    for name in ("uid_map", "gid_map"):
                        with open(f"/proc/{target}/{name}", "w") as f:
                            f.write(mapping)
                    status = b"1"
                except OSError as exc:
                    status = (exc.strerror or "failed").encode()
            os.write(done_write, status)
        finally:
            os._exit(0)  # whatever happened, never run the daemon's code twice
    os.close(go_read)
    os.close(done_write)
    try:
        _check(lib.unshare(lib.CLONE_NEWUSER), "user namespace")
        os.write(go_write, b"1")
        result = os.read(done_read, 256)
    finally:
        os.close(go_write)
        os.close(done_read)
        os.waitpid(helper, 0)
    if result != b"1":
        raise StepFailed("user namespace uid map", result.decode(errors="replace"))
    return JAIL_ID, JAIL_ID


def enter_other_namespaces() -> None:
    """Mount, network, IPC, UTS and PID (the PID one applies to children)."""
    flags = (
        lib.CLONE_NEWNS | lib.CLONE_NEWNET | lib.CLONE_NEWIPC | lib.CLONE_NEWUTS | lib.CLONE_NEWPID
    )
    _check(lib.unshare(flags), "mount/network/IPC/UTS/PID namespaces")


def forbid_new_namespaces() -> None:
    """No namespace of any type may be created from now on in the daemon's
    user namespace (its own already exist): a nested user namespace would
    hand back capabilities, even without seccomp (--sandbox=namespace)."""
    for kind in ("user", "mnt", "net", "ipc", "uts", "pid", "cgroup", "time"):
        path = f"/proc/sys/user/max_{kind}_namespaces"
        if os.path.exists(path):  # the time namespace is newer than some kernels
            _write(path, "0", f"limiting {kind} namespaces")


def pivot_to_empty_root(mount_point: str = "/tmp", directories: Iterable[str] = ()) -> None:
    """Replace the file system view with an empty read-only tmpfs.

    ``mount_point`` only hosts the new root during the switch; in this
    mount namespace the host's tree is then detached entirely. Each of
    ``directories`` (absolute, existing) appears at its own path in the new
    root, read-write, and nothing else of the host does: ".." at its top
    leads into the empty root, not to the host's parent directory.
    """
    none = ffi.NULL
    # Opened first: the tmpfs about to cover ``mount_point`` may hide them.
    sources = []
    for directory in directories:
        if not os.path.isabs(directory):
            raise StepFailed(f"binding {directory}", "not an absolute path")
        try:
            sources.append((directory, os.open(directory, os.O_PATH | os.O_DIRECTORY)))
        except OSError as exc:
            raise StepFailed(f"binding {directory}", exc.strerror or str(exc)) from exc
    _check(lib.mount(none, b"/", none, lib.MS_REC | lib.MS_PRIVATE, none), "making mounts private")
    _check(
        lib.mount(
            b"vfiouserd",
            mount_point.encode(),
            b"tmpfs",
            lib.MS_NOSUID | lib.MS_NODEV | lib.MS_NOEXEC,
            b"size=16k,mode=0555",
        ),
        "mounting the empty root",
    )
    for directory, fd in sources:
        target = os.path.join(mount_point, directory.lstrip("/"))
        try:
            os.makedirs(target, exist_ok=True)
        except OSError as exc:
            raise StepFailed(f"binding {directory}", exc.strerror or str(exc)) from exc
        try:
            # The fd's own path in /proc, which the host's /proc still shows.
            _check(
                lib.mount(
                    f"/proc/self/fd/{fd}".encode(),
                    target.encode(),
                    none,
                    lib.MS_BIND | lib.MS_REC,
                    none,
                ),
                f"binding {directory}",
            )
            # Read-only where the host has it so (a unit's ProtectSystem=):
            # a user namespace may not lift that, and need not.
            read_only = lib.MS_RDONLY if os.fstatvfs(fd).f_flag & os.ST_RDONLY else 0
            _check(
                lib.mount(
                    none,
                    target.encode(),
                    none,
                    lib.MS_REMOUNT
                    | lib.MS_BIND
                    | lib.MS_NOSUID
                    | lib.MS_NODEV
                    | lib.MS_NOEXEC
                    | read_only,
                    none,
                ),
                f"binding {directory} without devices, set-uid or programs",
            )
        finally:
            os.close(fd)
    os.chdir(mount_point)
    # pivot_root(".", ".") stacks the old root on top of the new one; the
    # detach then drops it (see pivot_root(2)).
    _check(lib.vfu_pivot_root(b".", b"."), "pivot_root")
    _check(lib.umount2(b".", lib.MNT_DETACH), "detaching the host root")
    os.chdir("/")
    _check(
        lib.mount(
            none,
            b"/",
            none,
            lib.MS_REMOUNT
            | lib.MS_BIND
            | lib.MS_RDONLY
            | lib.MS_NOSUID
            | lib.MS_NODEV
            | lib.MS_NOEXEC,
            none,
        ),
        "making the root read-only",
    )
