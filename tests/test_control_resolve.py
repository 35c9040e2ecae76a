"""Finding a daemon's control socket by PID where no /proc/X/net/unix shows
it: bound in a network namespace that no process is in any more, as under a
systemd unit with PrivateNetwork= once the daemon has jailed itself (parent
and all) into namespaces of its own (tests/test_real_systemd.py has the
unit itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vfiouserd.client.control import ControlError, _unix_sockets, socket_of_pid

# Binds a listening socket at argv[1] in the network namespace it starts in,
# then goes on, socket and all, in a new one (the first is left to the socket).
ORPHAN = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
sock.listen()
os.set_inheritable(sock.fileno(), True)
os.execvp("unshare", ["unshare", "--net", "sleep", "60"])
"""


def orphaned(path: str) -> subprocess.Popen:
    process = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", ORPHAN, path], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 10
    while not os.readlink(f"/proc/{process.pid}/exe").endswith("/sleep"):
        if process.poll() is not None:
            pytest.skip(f"no network namespace here: {process.communicate()[1]!r}")
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return process


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --net needs root")
def test_a_control_socket_bound_in_a_namespace_no_process_is_in(tmp_path):
    path = str(tmp_path / "dev.control.sock")
    process = orphaned(path)
    try:
        # No process's view of the namespaces has it ...
        assert path not in _unix_sockets(process.pid).values()
        assert path not in _unix_sockets(os.getpid()).values()
        # ... the socket itself knows.
        assert socket_of_pid(process.pid) == path
    finally:
        process.kill()
        process.communicate()  # and its stderr pipe closed


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --net needs root")
def test_a_listening_socket_that_is_no_control_socket_is_not_taken_for_one(tmp_path):
    process = orphaned(str(tmp_path / "vhost-user.sock"))
    try:
        with pytest.raises(ControlError, match="holds no vfiouserd control socket"):
            socket_of_pid(process.pid)
    finally:
        process.kill()
        process.communicate()  # and its stderr pipe closed
