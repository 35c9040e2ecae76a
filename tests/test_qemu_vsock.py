"""virtio-vsock in real guests, the daemon jailed: QEMU 7.2 and QEMU 10.2
over vhost-user (vhost-user-vsock-pci), QEMU 10.2 over vfio-user. The
guest's stock vsock driver talks to host programs through the hybrid-vsock
conventions: guest to host through ``PATH_<port>``, host to guest through
``CONNECT <port>``; 64 MiB each way checksummed, 32 connections at once,
refused ports both ways."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import ServiceManagerThread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

CID = 7
BIG = 64 << 20
SMALL = 1 << 20
ECHO_PORT, BULK_PORT, GUEST_PORT, NOBODY_PORT, HELD_PORT = 5001, 5000, 6000, 5999, 5002
CONNECTIONS = 32
# The guest's whole script (64 MiB each way under TCG takes minutes on a
# loaded machine); the host waits as long for the guest to listen.
GUEST_SECONDS = 400

SCRIPT = f"""
echo "RESULT cid $(cat /sys/bus/virtio/drivers/virtio_vsock/*/../../vsock 2>/dev/null)"
# 32 connections at once to an echo server on the host.
for i in $(seq {CONNECTIONS}); do
    (echo "connection-$i" | relay vsock-connect 2 {ECHO_PORT} > /tmp/echo-$i) &
done
wait
ok=0
for i in $(seq {CONNECTIONS}); do
    [ "$(cat /tmp/echo-$i)" = "connection-$i" ] && ok=$((ok + 1))
done
echo "RESULT echoed $ok"
# A port nobody listens on: the host resets the connection.
relay vsock-connect 2 {NOBODY_PORT} </dev/null 2>/tmp/refused
echo "RESULT refused $? $(cat /tmp/refused)"
# 64 MiB each way on one connection.
head -c {BIG} /dev/urandom > /tmp/out
echo "RESULT sent $(sha256sum < /tmp/out | cut -d' ' -f1)"
relay vsock-connect 2 {BULK_PORT} < /tmp/out > /tmp/in
echo "RESULT bulk-status $?"
echo "RESULT received $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
rm /tmp/out /tmp/in
# The host connects to a listener here.
relay vsock-listen {GUEST_PORT} </dev/null > /tmp/listened &
listener=$!
usleep 300000
echo "RESULT phase listening"
wait $listener
echo "RESULT listened $? $(sha256sum < /tmp/listened | cut -d' ' -f1) $(wc -c < /tmp/listened)"
"""


def serve(path: str, handler) -> socket.socket:
    """A host program listening on ``path``: one thread per connection. The
    jailed daemon is not root (nobody, when the tests run as root): the
    socket lets it connect."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(64)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


class Bulk:
    """Takes everything the guest sends while sending ``payload`` back."""

    def __init__(self) -> None:
        self.payload = os.urandom(BIG)
        self.digest = hashlib.sha256()
        self.count = 0
        self.error: BaseException | None = None

    def __call__(self, conn: socket.socket) -> None:
        def send() -> None:
            try:
                conn.sendall(self.payload)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.error = exc

        sender = threading.Thread(target=send)
        sender.start()
        with conn:
            while data := conn.recv(1 << 20):
                self.digest.update(data)
                self.count += len(data)
            sender.join()


class HostConnects(threading.Thread):
    """Once the guest listens: CONNECT, OK, 1 MiB, the end."""

    def __init__(self, uds: str) -> None:
        super().__init__(daemon=True)
        self.uds = uds
        self.listening = threading.Event()
        self.payload = os.urandom(SMALL)
        self.greeting = b""
        self.refused_reply = b"?"
        self.error: BaseException | None = None

    def on_line(self, line: str) -> None:
        if line.startswith("RESULT phase listening"):
            self.listening.set()

    def run(self) -> None:
        try:
            # A guest port nobody listens on: closed without OK.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(60)
                sock.connect(self.uds)
                sock.sendall(f"CONNECT {NOBODY_PORT}\n".encode())
                self.refused_reply = sock.recv(64)
            # Counted from before the boot, like the guest's own timeout: a
            # shorter wait gave up on a slow guest that then listened in vain.
            if not self.listening.wait(GUEST_SECONDS):
                raise TimeoutError("the guest never listened")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(120)
                sock.connect(self.uds)
                sock.sendall(f"CONNECT {GUEST_PORT}\n".encode())
                while not self.greeting.endswith(b"\n"):
                    data = sock.recv(1)
                    if not data:
                        raise EOFError(f"closed after {self.greeting!r}")
                    self.greeting += data
                sock.sendall(self.payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # the guest sends nothing: until it closes
                    pass
        except BaseException as exc:  # the test reports it
            self.error = exc


CASES = [
    pytest.param("vhost-user", "7.2", id="vhost-user-qemu-7.2"),
    pytest.param("vhost-user", "new", id="vhost-user-qemu-new"),
    pytest.param("vfio-user", "new", id="vfio-user-qemu-new"),
]


@pytest.mark.parametrize(("protocol", "qemu_version"), CASES)
def test_guest_and_host_programs_talk_over_vsock(tmp_path, request, protocol, qemu_version):
    qemu = vm.QEMU if qemu_version == "7.2" else request.getfixturevalue("qemu_new")
    sockets = tmp_path / "vsock"
    sockets.mkdir()
    sockets.chmod(0o755)  # the jailed daemon's user goes through it
    tmp_path.chmod(0o755)
    uds = str(sockets / "v.sock")
    bulk = Bulk()
    listeners = [serve(f"{uds}_{ECHO_PORT}", echo), serve(f"{uds}_{BULK_PORT}", bulk)]
    daemon = Daemon(
        f"{protocol}-vsock",
        "--guest-cid",
        str(CID),
        "--uds-path",
        uds,
        workdir=tmp_path,
        name="vsock",
    )
    with daemon:
        host = HostConnects(uds)
        host.start()
        if protocol == "vhost-user":
            devices = vm.vhost_user_device("vhost-user-vsock-pci", daemon.socket_path, "vsock")
        else:
            devices = vm.vfio_user_device(daemon.socket_path)
        run = vm.boot(
            SCRIPT,
            devices=devices,
            qemu=qemu,
            on_line=host.on_line,
            memory_mb=512,
            timeout=GUEST_SECONDS,
        )
        host.join(timeout=30)
        assert daemon.stop() == 0
        log = daemon.log()
    for listener in listeners:
        listener.close()
    assert host.error is None, repr(host.error)
    assert bulk.error is None, repr(bulk.error)
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("echoed") == str(CONNECTIONS)
    status, *message = run.result("refused").split(maxsplit=1)
    assert status == "1" and "reset" in " ".join(message).lower(), run.result("refused")
    assert host.refused_reply == b""
    assert run.result("bulk-status") == "0"
    assert (bulk.digest.hexdigest(), bulk.count) == (run.result("sent"), BIG)
    digest, count = run.result("received").split()
    assert (digest, int(count)) == (hashlib.sha256(bulk.payload).hexdigest(), BIG)
    assert host.greeting.startswith(b"OK ") and host.greeting[3:-1].isdigit()
    status, digest, count = run.result("listened").split()
    assert (status, digest, int(count)) == ("0", hashlib.sha256(host.payload).hexdigest(), SMALL)
    assert "event=ring.broken" not in log and "device.failed" not in log


RESTART_SCRIPT = f"""
relay vsock-connect 2 {HELD_PORT} </dev/null > /tmp/held 2>/tmp/held-error &
relay=$!
while [ ! -s /tmp/held ]; do usleep 100000; done
echo "RESULT phase connected"
wait $relay
echo "RESULT held $? $(cat /tmp/held-error)"
echo "after the restart" | relay vsock-connect 2 {ECHO_PORT} > /tmp/again
echo "RESULT again $? $(cat /tmp/again)"
"""


@pytest.mark.parametrize(
    ("protocol", "qemu_version"),
    [
        pytest.param("vhost-user", "7.2", id="vhost-user-qemu-7.2"),
        pytest.param("vfio-user", "new", id="vfio-user-qemu-new"),
    ],
)
def test_a_restart_through_the_fd_store_resets_open_connections(
    tmp_path, request, protocol, qemu_version
):
    """Connections do not outlive the daemon (their host ends were its
    sockets): after a restart through the fd store the guest's open
    connection is reset, not left hanging, and new ones work at once."""
    qemu = vm.QEMU if qemu_version == "7.2" else request.getfixturevalue("qemu_new")
    sockets = tmp_path / "vsock"
    sockets.mkdir()
    sockets.chmod(0o755)
    uds = str(sockets / "v.sock")
    held: list[socket.socket] = []

    def hold(conn: socket.socket) -> None:
        conn.sendall(b"before the restart\n")
        held.append(conn)  # open until the daemon goes

    listeners = [serve(f"{uds}_{ECHO_PORT}", echo), serve(f"{uds}_{HELD_PORT}", hold)]
    socket_path = str(tmp_path / "vsock.sock")
    command = [
        sys.executable,
        *("-m", "vfiouserd", f"{protocol}-vsock", "--fdstore", "--socket-path", socket_path),
        *("--guest-cid", str(CID), "--uds-path", uds),
    ]
    if protocol == "vhost-user":
        devices = vm.vhost_user_device("vhost-user-vsock-pci", socket_path, "vsock")
    else:
        devices = vm.vfio_user_device(socket_path)
    service = ServiceManagerThread(tmp_path, command)
    manager = service.manager
    assert manager is not None
    restarted = []

    def on_line(line: str) -> None:
        if line.startswith("RESULT phase connected"):
            service.run(manager.restart)
            restarted.append(line)

    try:
        service.run(manager.start)
        run = vm.boot(RESTART_SCRIPT, devices=devices, qemu=qemu, on_line=on_line, timeout=300)
        assert service.run(manager.stop) == 0
    finally:
        service.close()
        for listener in listeners:
            listener.close()
    log = manager.log()
    assert restarted
    assert run.exit_statuses == [0], run.output[-3000:]
    # Linux ends a connection that gets RST as if the peer closed it (reads
    # return 0); after a transport reset (vfio-user: the device has the
    # event queue) reads fail with ENOTCONN. Either way: an end, not a hang.
    ended = run.result("held")
    assert ended == "0" or (
        ended.startswith("1 ") and ("reset" in ended or "not connected" in ended)
    ), ended
    assert run.result("again") == "0 after the restart"
    assert "event=handover.restored" in log, log[-3000:]
    assert log.count("event=session.start") == 2, log[-3000:]  # one connection, taken over
