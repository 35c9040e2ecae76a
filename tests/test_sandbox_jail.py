"""The jail, tested from outside the way a sandbox is: what /proc shows of a
running daemon, and a hostile device plugin trying to get out."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
from daemon import Daemon

from conftest import MiB, start_device
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.protocol.framing import ConnectionClosed

ESCAPE_PLUGIN = Path(__file__).resolve().parent / "escape_plugin"
NAMESPACES = ("user", "mnt", "net", "ipc", "uts", "pid")


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    lines = Path(path).read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def fd_targets(pid: int) -> dict[int, str]:
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return targets


def assert_confined(pid: int) -> None:
    for tid in threads(pid):
        fields = status(pid, tid)
        assert fields["Seccomp"] == "2", (tid, fields["Seccomp"])
        assert fields["NoNewPrivs"] == "1"
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[cap], 16) == 0, (tid, cap, fields[cap])


async def fd_less_io(daemon: Daemon, check: object) -> None:
    """virtio-blk I/O over DMA messages, which runs on a worker thread; ``check``
    runs while that thread and the session are alive."""
    from vfiouserd.client.virtio_pci import VirtioPciDriver

    ram = GuestRam([(0, 8 * MiB)])
    async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"j" * 4096)
        assert await blk.read(0, 4096) == b"j" * 4096
        check()  # type: ignore[operator]
        driver.close()
    ram.close()


def test_every_thread_is_confined_and_the_root_is_empty(tmp_path):
    image = tmp_path / "disk.img"
    daemon = Daemon("vfio-user-blk", "--blk-file", str(image), "--size", "8M", workdir=tmp_path)
    seen: dict[str, object] = {}

    def check() -> None:
        jailed = daemon.jailed_pid()
        seen["threads"] = len(threads(jailed))
        assert_confined(jailed)
        assert_confined(daemon.pid)  # the parent outside the PID namespace too
        # Its namespaces are not the host's (the parent keeps the host's PID
        # namespace so that it can wait for the daemon).
        for ns in NAMESPACES:
            assert os.readlink(f"/proc/{jailed}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        assert status(jailed)["NSpid"].split()[-1] == "1"  # init of its PID namespace
        if os.getuid() == 0:
            assert status(jailed)["Uid"].split() == ["65534"] * 4  # root given up
        # An empty, read-only root: one tmpfs mount and nothing in it.
        assert os.listdir(f"/proc/{jailed}/root") == []
        (mount,) = Path(f"/proc/{jailed}/mountinfo").read_text().splitlines()
        assert " / / ro," in mount and " - tmpfs " in mount
        # fds: stdio, the listening socket, the image, the connection, the
        # event loop's own, the ones the client sent; nothing else.
        for fd, target in fd_targets(jailed).items():
            if fd <= 2 or target == str(image):
                continue
            assert target.startswith(("socket:", "anon_inode:")), (fd, target)
        parent = fd_targets(daemon.pid)
        # the parent: stdio, the socket's directory, the pipe whose end tells
        # the daemon it is alive, the pidfd that tells the parent the daemon
        # exited (no notify socket here: no relay for the fd store)
        extra = sorted(t.split(":")[0] for fd, t in parent.items() if fd > 2)
        # (the directory twice: the VMM socket's and the control socket's files)
        assert extra == sorted([str(tmp_path), str(tmp_path), "pipe", "anon_inode"]), parent
        assert int(status(jailed)["Seccomp_filters"]) == 1

    with daemon:
        trio.run(fd_less_io, daemon, check)
        assert daemon.stop() == 0
    assert seen["threads"] > 1  # the worker thread was checked too
    assert not os.path.exists(daemon.socket_path)  # removed by the parent


def escape_daemon(tmp_path: Path, *args: str) -> Daemon:
    return Daemon(
        "vfio-user-escape",
        *args,
        workdir=tmp_path,
        name="escape",
        env={"PYTHONPATH": os.pathsep.join([str(ESCAPE_PLUGIN), *sys.path])},
    )


async def attempt(daemon: Daemon, number: int, pid: int) -> int | None:
    """The errno the attempt failed with, 0 if it worked, None if killed."""
    async with VfioUserClient.connect(daemon.socket_path) as client:
        try:
            await client.region_write(0, 0x04, struct.pack("<I", pid))
            with trio.fail_after(10):
                await client.region_write(0, 0x00, struct.pack("<I", number))
                return struct.unpack("<I", await client.region_read(0, 0x08, 4))[0]
        except ConnectionClosed:
            return None


ATTEMPTS = {
    "execve": 1,
    "open-host-file": 2,
    "socket-inet": 3,
    "ptrace": 4,
    "mount": 5,
    "bpf": 6,
    "unshare": 7,
    "new-process": 8,
    "kill-host-pid": 9,
}

# With the full jail, seccomp kills on each, except opening a file: Python
# looks files up by itself, so that one fails softly (EACCES) by design.
STRICT = {name: None for name in ATTEMPTS} | {"open-host-file": errno.EACCES}

# Without seccomp the namespaces and dropped capabilities still refuse what
# they cover. New processes are what only seccomp stops: without it a fork
# works (RLIMIT_NPROC bounds threads and processes together, 160).
NAMESPACE_ONLY = {
    "unshare": errno.ENOSPC,  # no new namespaces of any type in the jail
    "new-process": 0,
    "execve": errno.ENOENT,  # the root is empty
    "open-host-file": errno.ENOENT,
    "socket-inet": errno.ENETUNREACH,  # an empty network namespace
    "ptrace": errno.ESRCH,  # host processes are invisible
    "mount": errno.EPERM,  # no capabilities
    "bpf": errno.EPERM,
    "kill-host-pid": errno.ESRCH,
}


@pytest.fixture
def host_process():
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_escape_attempts_are_denied(tmp_path, host_process, name):
    with escape_daemon(tmp_path) as daemon:
        result = trio.run(attempt, daemon, ATTEMPTS[name], host_process)
        assert result == STRICT[name], daemon.log()[-2000:]
        if result is None:
            assert daemon.process.wait(10) == 128 + signal.SIGSYS
            assert "event=daemon.killed signal=SIGSYS" in daemon.log()
        else:
            assert daemon.stop() == 0
    assert os.waitpid(host_process, os.WNOHANG) == (0, 0)  # the host process lives on


@pytest.mark.parametrize("name", list(NAMESPACE_ONLY))
def test_namespaces_alone_still_refuse_what_they_cover(tmp_path, host_process, name):
    with escape_daemon(tmp_path, "--sandbox", "namespace") as daemon:
        result = trio.run(attempt, daemon, ATTEMPTS[name], host_process)
        assert result == NAMESPACE_ONLY[name], daemon.log()[-2000:]
        assert daemon.stop() == 0


@pytest.mark.parametrize("action", ["log", "trap"])
def test_debugging_actions(tmp_path, host_process, action):
    with escape_daemon(tmp_path, "--seccomp", action) as daemon:
        result = trio.run(attempt, daemon, ATTEMPTS["mount"], host_process)
        if action == "log":  # let through, then refused for want of capabilities
            assert result == errno.EPERM
            assert daemon.stop() == 0
        else:  # SIGSYS as a signal: Python does not catch it, the daemon dies
            assert result is None
            assert daemon.process.wait(10) == 128 + signal.SIGSYS


# Stands in for a machine (or a container runtime) that refuses a step.
REFUSE = textwrap.dedent(
    """
    import errno, os, sys
    import pyseccomp as sc
    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(sc.ERRNO(errno.EPERM), sys.argv[1])
    f.load()
    os.execv(sys.executable, [sys.executable, "-m", "vfiouserd", *sys.argv[2:]])
    """
)


@pytest.mark.parametrize(
    ("refused", "step"),
    [("unshare", "user namespace"), ("mount", "making mounts private"), ("pivot_root", "pivot")],
)
def test_a_refused_step_stops_the_daemon_with_a_clear_message(tmp_path, refused, step):
    socket_path = str(tmp_path / "s.sock")
    args = ["vhost-user-rng", "--socket-path", socket_path]
    done = subprocess.run(
        [sys.executable, "-c", REFUSE, refused, *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert f"step '{step}" in done.stderr and "--sandbox=none" in done.stderr, done.stderr
    assert not os.path.exists(socket_path)
    # The way out it names works.
    with Daemon("vhost-user-rng", "--sandbox", "none", workdir=tmp_path) as daemon:
        assert daemon.stop() == 0
    assert "event=sandbox.disabled" in daemon.log()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
async def test_an_unprivileged_user_is_jailed_the_same_way(tmp_path):
    """As a plain user (uid 1000 of a user namespace, so the files here stay
    readable) the daemon maps only itself and ends up just as confined."""
    image = tmp_path / "disk.img"
    daemon = Daemon(
        "vhost-user-blk",
        "--blk-file",
        str(image),
        "--size",
        "8M",
        workdir=tmp_path,
        wrap=["unshare", "--user", "--map-user=1000", "--map-group=1000", "--"],
        wrap_forks=False,
    )
    with daemon:
        assert "event=sandbox.entered" in daemon.log() and "uid=1000" in daemon.log()
        jailed = daemon.jailed_pid()
        assert_confined(jailed)
        assert_confined(daemon.pid)
        assert os.listdir(f"/proc/{jailed}/root") == []
        ram = GuestRam([(0, 8 * MiB)])
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"u" * 4096)
        assert await blk.read(0, 4096) == b"u" * 4096
        await frontend.aclose()
        ram.close()
        daemon.send(signal.SIGHUP)  # relayed: same user, no capability needed
        # Heard (it fails here otherwise) before the stop is sent: in a CI run
        # under load the two raced and the SIGHUP went unlogged.
        daemon.wait_for_log("event=signal signal=SIGHUP")
        assert daemon.stop() == 0


@pytest.mark.parametrize("target", ["the-daemon", "another-process"])
def test_the_parent_may_signal_only_the_daemon(host_process, target):
    from vfiouserd.sandbox.seccomp import reaper_policy

    daemon_pid = host_process
    other = subprocess.Popen(["sleep", "60"])
    child = os.fork()
    if child == 0:  # stands in for the parent left outside the PID namespace
        try:
            reaper_policy(daemon_pid, []).load()
            os.kill(daemon_pid if target == "the-daemon" else other.pid, 0)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    other.kill()
    other.wait()
    if target == "the-daemon":
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_inherited_fds_do_not_reach_the_jail(tmp_path):
    """A directory fd inherited by accident would let lookups relative to it
    reach host files; the daemon closes what it was not given on purpose."""
    directory = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)
    secret = os.open("/etc/hostname", os.O_RDONLY)
    command = [sys.executable, "-m", "vfiouserd", "vhost-user-rng"]
    socket_path = str(tmp_path / "rng.sock")
    log = open(tmp_path / "log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [*command, "--socket-path", socket_path], pass_fds=[directory, secret], stderr=log
    )
    os.close(directory)
    os.close(secret)
    daemon = Daemon("vhost-user-rng", workdir=tmp_path)  # for its helpers only
    daemon.process, daemon.log_path, daemon._log = process, tmp_path / "log", log
    try:
        daemon.wait_for_log("event=listening")
        jailed = daemon.jailed_pid()
        targets = fd_targets(jailed)
        kinds = sorted(
            "stdio"
            if fd <= 2
            else target.split(":")[0]
            + (":" + target.split(":")[1][:11] if target.startswith("anon_inode") else "")
            for fd, target in targets.items()
        )
        # stdio, the listening socket, the control socket, the event loop's
        # epoll and trio's two wake-up socket pairs: nothing inherited
        assert kinds == ["anon_inode:[eventpoll]", *["socket"] * 6, *["stdio"] * 3], sorted(
            targets.items()
        )
        parent = fd_targets(daemon.pid)
        extra = sorted(t.split(":")[0] for fd, t in parent.items() if fd > 2)
        # directory, liveness pipe, the daemon's pidfd
        # (the directory twice: the VMM socket's and the control socket's files)
        assert extra == sorted([str(tmp_path), str(tmp_path), "pipe", "anon_inode"]), parent
    finally:
        assert daemon.stop() == 0


def test_the_daemon_dies_with_its_parent(tmp_path):
    with Daemon("vhost-user-rng", workdir=tmp_path) as daemon:
        jailed = daemon.jailed_pid()
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.process.wait(10)
        for _ in range(200):
            if not os.path.exists(f"/proc/{jailed}"):
                break
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{jailed}"), "the jailed daemon outlived its parent"


# Drops every capability (and the bounding set) then runs the daemon: what
# root in a unit with an empty CapabilityBoundingSet= would be.
WITHOUT_CAPABILITIES = textwrap.dedent(
    """
    import os, sys
    import prctl
    for cap in prctl.ALL_CAPS:
        prctl.capbset_drop(cap)
    os.execv(sys.executable, [sys.executable, "-m", "vfiouserd", *sys.argv[1:]])
    """
)


@pytest.mark.skipif(os.getuid() != 0, reason="about root")
def test_root_without_capabilities_is_refused_clearly(tmp_path):
    socket_path = str(tmp_path / "s.sock")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_CAPABILITIES,
            "vhost-user-rng",
            "--socket-path",
            socket_path,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "CAP_SETUID" in done.stderr and "--sandbox=none" in done.stderr, done.stderr
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize(
    ("refused", "step"),
    [("prctl", "parent: dropping capabilities"), ("seccomp", "parent: seccomp filter")],
)
def test_a_step_refused_after_the_fork_is_reported_and_cleaned_up(tmp_path, refused, step):
    socket_path = str(tmp_path / "s.sock")
    args = ["vhost-user-rng", "--socket-path", socket_path]
    done = subprocess.run(
        [sys.executable, "-c", REFUSE, refused, *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert f"step '{step}' failed" in done.stderr and "--sandbox=" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(socket_path)


def test_a_live_socket_is_neither_taken_nor_removed(tmp_path):
    path = str(tmp_path / "shared.sock")
    control = str(tmp_path / "control.sock")
    first = Daemon(
        "vhost-user-rng",
        "--control-socket",
        control,
        workdir=tmp_path,
        socket_path=path,
        name="first",
    ).start()
    second = Daemon("vhost-user-rng", workdir=tmp_path, socket_path=path, name="second")
    with pytest.raises(RuntimeError, match=r"shared\.sock: another server is listening"):
        second.start()
    # Nor the control socket of a live daemon.
    other = str(tmp_path / "other.sock")
    fourth = Daemon(
        "vhost-user-rng", "--control-socket", control, workdir=tmp_path, socket_path=other, name="4"
    )
    with pytest.raises(RuntimeError, match=r"control\.sock: another server is listening"):
        fourth.start()
    assert not os.path.exists(other)  # what it made before it failed, it removed
    # Someone removes the first daemon's socket and a successor takes the path:
    # the first one, stopping, must leave the successor's socket alone.
    os.unlink(path)
    with Daemon("vhost-user-rng", "--no-control", workdir=tmp_path, socket_path=path, name="third"):
        assert first.stop() == 0
        assert os.path.exists(path)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)  # still served
        probe.close()


def test_a_vsock_device_sees_its_socket_directory_and_nothing_else(tmp_path):
    """The one host directory a device names (vsock's PATH_<port>) appears
    at its own path, read-write, without devices, set-uid or programs; the
    directories above it are empty, nothing beside it is there."""
    sockets = tmp_path / "run" / "vsock"
    sockets.mkdir(parents=True)
    (tmp_path / "run" / "beside").write_text("a host file next to the directory")
    (sockets / "inside").write_text("a host file in the directory")
    daemon = Daemon("vhost-user-vsock", "--uds-path", str(sockets / "v.sock"), workdir=tmp_path)
    with daemon:
        jailed = daemon.jailed_pid()
        view = Path(f"/proc/{jailed}/root")
        for part in sockets.parts[1:]:
            assert os.listdir(view) == [part]
            view = view / part
        assert sorted(os.listdir(view)) == sorted(os.listdir(sockets)) == ["inside", "v.sock"]
        assert (view / "inside").read_text() == "a host file in the directory"
        root, bound = Path(f"/proc/{jailed}/mountinfo").read_text().splitlines()
        assert " / / ro," in root and " - tmpfs " in root
        fields = bound.split()
        assert fields[4] == str(sockets)
        assert set(fields[5].split(",")) >= {"rw", "nosuid", "nodev", "noexec"}
        assert daemon.stop() == 0
