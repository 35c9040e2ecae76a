"""The jail's waiter (sandbox/waiter.c): what the daemon's parent becomes
outside the jail, a small static program instead of a copy of the Python
heap. Run with a stand-in daemon to check each of its duties (signals,
readiness, notifications with fds, socket files, the exit status), and
under the real daemon for what it is: small, confined, still there after a
stop and a continue."""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from daemon import Daemon
from test_sandbox_jail import assert_confined

from vfiouserd.handover import LISTENER
from vfiouserd.sandbox import jail

WAITER_NAME = os.path.basename(jail.WAITER)

# Plays the daemon's parent up to the exec: the stop signals held, a stand-in
# daemon forked (its code from the spec, given the readiness pipe's and the
# relay's fds), then the jail's own hand-over to the waiter.
HARNESS = """
import json, os, signal, socket, sys
from vfiouserd.sandbox import jail
from vfiouserd.sockets import SocketFile

spec = json.loads(sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.connect(spec["notify"])
files = [SocketFile.created_at(path) for path in spec["sockets"]]
ready_read, ready_write = os.pipe()
alive_read, alive_write = os.pipe()
relay_parent, relay_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
child = os.fork()
if child == 0:
    fds = [ready_write, relay_child.detach()]
    for fd in fds:
        os.set_inheritable(fd, True)
    os.execv(sys.executable, [sys.executable, "-c", spec["daemon"], *map(str, fds)])
os.close(ready_write)
relay_child.close()
options = jail.JailOptions(mode="strict", notify_fd=notify.detach(), socket_files=files)
waiter = os.open(jail.WAITER, os.O_PATH | os.O_CLOEXEC)
jail._become_waiter(
    child, waiter, ready_read, alive_write, relay_parent.detach(), os.getuid(), options
)
"""

# The stand-in daemon's start: stop signals printed as they come.
DAEMON = """
import array, os, signal, socket, sys, time
ready, relay = int(sys.argv[1]), socket.socket(fileno=int(sys.argv[2]))
got = []
def note(signum, frame):
    got.append(signum)
    print(signal.Signals(signum).name, flush=True)
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, note)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def store(name, text):
    r, w = os.pipe()
    os.write(w, text)
    relay.sendmsg([f"FDSTORE=1\\nFDNAME={name}\\n".encode()],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    os.close(r)
    os.close(w)
"""


class Waiter:
    """The harness run as a subprocess, with a notify socket to listen on."""

    def __init__(self, tmp_path: Path, daemon: str, sockets: Sequence[str] = ()) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.notify.settimeout(10)
        self.stderr = tmp_path / "stderr"
        spec = {"notify": str(tmp_path / "notify"), "sockets": list(sockets), "daemon": daemon}
        with open(self.stderr, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", HARNESS, json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def receive(self) -> tuple[bytes, list[int]]:
        message, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        fds = array.array("i")
        for _, _, data in ancillary:
            fds.frombytes(data)
        return message, list(fds)

    def signal_and_see(self, signum: int) -> None:
        self.process.send_signal(signum)
        assert self.process.stdout.readline().strip() == signal.Signals(signum).name

    def log(self) -> str:
        return self.stderr.read_text()

    def close(self) -> int:
        status = self.process.wait(10)
        self.notify.close()
        self.process.stdout.close()
        return status


def socket_file(path: Path) -> str:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()
    return str(path)


def test_it_relays_signals_readiness_notifications_and_the_exit_status(tmp_path):
    path = socket_file(tmp_path / "device.sock")
    daemon = DAEMON + (
        "os.write(ready, b'1')\n"
        "store('some-session', b'kept open')\n"
        "while signal.SIGTERM not in got:\n"
        "    time.sleep(0.01)\n"
        "sys.exit(3)\n"
    )
    waiter = Waiter(tmp_path, daemon, [path])
    assert waiter.receive() == (f"READY=1\nMAINPID={waiter.process.pid}".encode(), [])
    message, (fd,) = waiter.receive()
    assert message == b"FDSTORE=1\nFDNAME=some-session\n"
    assert os.read(fd, 64) == b"kept open"  # the very pipe the daemon sent
    os.close(fd)
    # It is the waiter now: the program, its filter, nothing of Python.
    pid = waiter.process.pid
    assert Path(f"/proc/{pid}/exe").resolve().name == WAITER_NAME
    assert_confined(pid)
    assert "python" not in Path(f"/proc/{pid}/maps").read_text()
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        waiter.signal_and_see(signum)
    assert waiter.close() == 3
    assert not os.path.exists(path)  # not in the fd store: removed


def test_a_stored_listener_keeps_its_socket_file(tmp_path):
    path = socket_file(tmp_path / "device.sock")
    daemon = DAEMON + f"os.write(ready, b'1')\nstore({LISTENER!r}, b'x')\n"
    waiter = Waiter(tmp_path, daemon, [path])
    assert waiter.receive()[0].startswith(b"READY=1")
    _, fds = waiter.receive()
    for fd in fds:
        os.close(fd)
    assert waiter.close() == 0
    assert os.path.exists(path)  # the next daemon listens there


def test_a_successors_socket_file_is_left_alone(tmp_path):
    path = socket_file(tmp_path / "device.sock")
    # (made before the old one goes, so that it cannot reuse its inode)
    daemon = (
        DAEMON + f"open({path!r} + '.new', 'w').close()\nos.rename({path!r} + '.new', {path!r})\n"
    )
    waiter = Waiter(tmp_path, daemon, [path])
    assert waiter.close() == 0
    assert os.path.exists(path)


def test_a_killed_daemon_is_reported_without_readiness(tmp_path):
    daemon = DAEMON + "os.close(ready)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    waiter = Waiter(tmp_path, daemon)
    before = time.time()
    assert waiter.process.wait(10) == 128 + signal.SIGKILL
    waiter.notify.setblocking(False)
    with pytest.raises(BlockingIOError):
        waiter.notify.recv(256)  # never READY=1
    waiter.close()
    (line,) = waiter.log().splitlines()
    # A line as vfiouserd.log writes it, in local time.
    match = re.fullmatch(r"ts=(\S+)\.\d{3} level=error event=daemon\.killed signal=SIGKILL", line)
    assert match, line
    logged = time.mktime(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    assert before - 2 <= logged <= time.time() + 1


def test_bad_arguments_are_refused_without_a_traceback(tmp_path):
    done = subprocess.run(
        [jail.WAITER, "child=1", "ready=0", "surprise=1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 1
    assert "event=sandbox.failed" in done.stderr and "waiter arguments" in done.stderr


def smaps_rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)  # kB
    return fields


def program_code_kib(pid: int) -> int:
    """Resident KiB of the process's own program's code (its executable mapping)."""
    program = os.path.realpath(f"/proc/{pid}/exe")
    resident = 0
    mapping: list[str] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
            mapping = fields
        elif fields[0] == "Rss:" and mapping[-1] == program and "x" in mapping[1]:
            resident += int(fields[1])
    return resident


def test_the_daemons_parent_is_the_small_waiter_and_survives_a_stop(tmp_path):
    image = tmp_path / "disk.img"
    with Daemon("vhost-user-blk", "--blk-file", str(image), "--size", "8M", workdir=tmp_path) as d:
        parent = d.pid
        assert Path(f"/proc/{parent}/exe").resolve().name == WAITER_NAME
        assert Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0] == b"vfiouserd-waiter"
        # No interpreter heap outside the jail: a few hundred KiB, not 30 MiB.
        assert smaps_rollup(parent)["Rss"] < 2048
        # Waiting, it keeps none of its code's pages but those of the wait
        # itself (statically linked, its 0.2 MiB of C library would count
        # against the device).
        assert 0 < program_code_kib(parent) <= 8
        # Stopped and continued (SIGSTOP, a frozen cgroup), its poll is
        # resumed through restart_syscall, which its filter must allow.
        jailed = d.jailed_pid()
        os.kill(parent, signal.SIGSTOP)
        time.sleep(0.1)
        os.kill(parent, signal.SIGCONT)
        time.sleep(0.2)
        assert d.process.poll() is None and os.path.exists(f"/proc/{jailed}")
        assert d.stop() == 0
    assert not os.path.exists(d.socket_path)


def test_a_daemon_started_with_stdin_closed_still_gets_its_waiter(tmp_path):
    """Started as root, the waiter's C library checks its standard fds (the
    exec keeps root's effective uid, a secure exec) and would open
    /dev/null itself, where the empty root has none."""
    closing_stdin = ["sh", "-c", 'exec "$@" 0<&-', "sh"]
    daemon = Daemon("vhost-user-rng", workdir=tmp_path, wrap=closing_stdin, wrap_forks=False)
    with daemon:
        assert Path(f"/proc/{daemon.pid}/exe").resolve().name == WAITER_NAME
        assert daemon.stop() == 0
