"""virtio-net in real guests, the daemon jailed: a guest whose network device
is the daemon (QEMU 7.2 and 10.2 over vhost-user, QEMU 10.2 over
vfio-user) talks to a second guest whose QEMU 7.2 is wired to the daemon's
stream socket with its own ``-netdev stream``: link, MAC, MTU, ping, and
16 MiB each way over one TCP connection, checksummed."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import kill_hard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

MAC = "52:54:00:be:ef:01"
SIZE = 16 << 20
OURS, PEER = "198.51.100.1", "198.51.100.2"  # documentation addresses: a private link

SETUP = """
ip link set eth0 up
ip addr add {address}/24 dev eth0
echo "RESULT mac $(cat /sys/class/net/eth0/address)"
echo "RESULT mtu $(cat /sys/class/net/eth0/mtu)"
echo "RESULT carrier $(cat /sys/class/net/eth0/carrier)"
echo "RESULT queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
head -c {size} /dev/urandom > /tmp/out
echo "RESULT sent $(sha256sum < /tmp/out | cut -d' ' -f1)"
"""

OUR_GUEST = (
    SETUP
    + f"""
for i in $(seq 120); do ping -c 1 -W 1 {PEER} > /dev/null 2>&1 && break; done
echo "RESULT ping $(ping -c 3 -W 2 {PEER} | grep -c 'bytes from')"
for i in $(seq 60); do
    relay tcp-connect {PEER} 5000 < /tmp/out > /tmp/in 2>/dev/null && break
    sleep 1
done
echo "RESULT received $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
"""
)

# Bounded: should the other guest fail, this one still powers off (its QEMU
# must not outlive a test run that gave up on it).
PEER_GUEST = (
    SETUP
    + """
timeout 300 relay tcp-listen 5000 < /tmp/out > /tmp/in
echo "RESULT received $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
"""
)


class PeerGuest(threading.Thread):
    """The second guest: QEMU 7.2's own virtio-net on -netdev stream."""

    def __init__(self, path: str, server: bool, script: str = PEER_GUEST) -> None:
        super().__init__(daemon=True)
        self.path, self.server, self.script = path, server, script
        self.run_result: vm.GuestRun | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.run_result = vm.boot(
                self.script.format(address=PEER, size=SIZE),
                devices=[
                    "-netdev",
                    f"stream,id=n0,server={'on' if self.server else 'off'},"
                    f"addr.type=unix,addr.path={self.path}",
                    "-device",
                    "virtio-net-pci,netdev=n0,mac=52:54:00:be:ef:02",
                ],
                memory_mb=512,
                timeout=400,
            )
        except BaseException as exc:  # the test reports it
            self.error = exc


CASES = [
    pytest.param("vhost-user", "7.2", "listen", 1, id="vhost-user-qemu-7.2"),
    pytest.param("vhost-user", "7.2", "connect", 1, id="vhost-user-qemu-7.2-connecting"),
    pytest.param("vhost-user", "new", "listen", 2, id="vhost-user-qemu-new-2-pairs"),
    pytest.param("vfio-user", "new", "connect", 1, id="vfio-user-qemu-new-connecting"),
    pytest.param("vfio-user", "new", "listen", 2, id="vfio-user-qemu-new-2-pairs"),
]


def allow_the_daemon(path: Path) -> None:
    """The peer QEMU made its socket as root; the jailed daemon is nobody."""
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    path.chmod(0o777)


@pytest.mark.parametrize(("protocol", "qemu_version", "wiring", "pairs"), CASES)
def test_two_guests_talk_through_the_daemon(
    tmp_path, request, protocol, qemu_version, wiring, pairs
):
    """``listen``: the daemon listens, the other QEMU connects; ``connect``:
    the other QEMU listens, the daemon connects from its jail (the socket's
    directory bound in), trying again until it is there. With two queue
    pairs the guest has two vCPUs and uses both pairs (QEMU enables them over
    vhost-user; over vfio-user the driver's VQ_PAIRS_SET reaches the device)."""
    qemu = vm.QEMU if qemu_version == "7.2" else request.getfixturevalue("qemu_new")
    wires = tmp_path / "wire"
    wires.mkdir(mode=0o755)
    wires.chmod(0o755)
    wire = wires / "wire.sock"
    daemon = Daemon(
        f"{protocol}-net",
        "--stream-listen" if wiring == "listen" else "--stream-socket",
        str(wire),
        "--mac",
        MAC,
        "--queue-pairs",
        str(pairs),
        workdir=tmp_path,
        name="net",
    )
    with daemon:
        peer = PeerGuest(str(wire), server=wiring == "connect")
        peer.start()
        if wiring == "connect":
            allow_the_daemon(wire)
        if protocol == "vhost-user":
            # QEMU 7.2 under TCG crashes in its own MSI-X code when a
            # vhost-user network device starts (SIGSEGV in
            # msix_set_vector_notifiers from vhost_net_start): INTx there.
            vectors = ",vectors=0" if qemu_version == "7.2" else ""
            queues = f",queues={pairs}" if pairs > 1 else ""
            mq = f",mq=on,vectors={2 * pairs + 2}" if pairs > 1 else vectors
            devices = [
                "-chardev",
                f"socket,id=c0,path={daemon.socket_path}",
                "-netdev",
                f"vhost-user,id=n0,chardev=c0{queues}",
                "-device",
                f"virtio-net-pci,netdev=n0,mac={MAC}{mq}",
            ]
        else:
            devices = vm.vfio_user_device(daemon.socket_path)
        ours = vm.boot(
            OUR_GUEST.format(address=OURS, size=SIZE),
            devices=devices,
            qemu=qemu,
            memory_mb=512,
            smp=pairs,
            timeout=400,
        )
        peer.join(timeout=120)
        assert daemon.stop() == 0
        log = daemon.log()
    assert peer.error is None, repr(peer.error)
    theirs = peer.run_result
    assert theirs is not None
    assert ours.exit_statuses == [0], ours.output[-3000:]
    assert theirs.exit_statuses == [0], theirs.output[-3000:]
    assert ours.result("mac") == MAC
    assert ours.result("mtu") == "1500"
    assert sorted(ours.result("queues").split()) == sorted(
        [f"rx-{n}" for n in range(pairs)] + [f"tx-{n}" for n in range(pairs)]
    )
    assert ours.result("ping") == "3", ours.output[-3000:]
    digest, count = ours.result("received").split()
    assert (digest, int(count)) == (theirs.result("sent"), SIZE)
    digest, count = theirs.result("received").split()
    assert (digest, int(count)) == (ours.result("sent"), SIZE)
    assert "event=ring.broken" not in log and "device.failed" not in log
    if protocol == "vfio-user" and pairs > 1:
        assert f"event=net.queue_pairs pairs={pairs}" in log
    if protocol == "vhost-user" and pairs > 1:  # QEMU started the second pair
        assert "event=ring.start queue=3" in log


KILL_SCRIPT = (
    SETUP
    + f"""
for i in $(seq 120); do ping -c 1 -W 1 {PEER} > /dev/null 2>&1 && break; done
echo "RESULT before $(ping -c 2 -W 2 {PEER} | grep -c 'bytes from')"
echo "RESULT phase kill"
sleep 2
for i in $(seq 60); do ping -c 1 -W 1 {PEER} > /dev/null 2>&1 && break; done
echo "RESULT after $(ping -c 3 -W 2 {PEER} | grep -c 'bytes from')"
for i in $(seq 60); do
    relay tcp-connect {PEER} 5000 < /tmp/out > /tmp/in 2>/dev/null && break
    sleep 1
done
echo "RESULT received $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
"""
)


@pytest.mark.parametrize("qemu_version", ["7.2", "new"])
def test_a_killed_daemon_is_replaced_and_the_network_comes_back(tmp_path, request, qemu_version):
    """SIGKILL under a guest that pings; a new daemon on the same socket:
    QEMU reconnects (reconnect=1 / reconnect-ms), the new daemon connects to
    the same peer again (a QEMU -netdev stream server), pings resume and a
    16 MiB exchange each way completes. Frames in flight when it died are
    lost, as on a link that flapped; TCP sends them again."""
    qemu = vm.QEMU if qemu_version == "7.2" else request.getfixturevalue("qemu_new")
    wires = tmp_path / "wire"
    wires.mkdir(mode=0o755)
    wires.chmod(0o755)
    wire = wires / "wire.sock"
    args = ("--stream-socket", str(wire), "--mac", MAC)
    peer = PeerGuest(str(wire), server=True)
    peer.start()
    allow_the_daemon(wire)
    first = Daemon("vhost-user-net", *args, workdir=tmp_path, name="first").start()
    second: list[Daemon] = []

    def on_line(line: str) -> None:
        if line.startswith("RESULT phase kill"):
            kill_hard(first)
            second.append(
                Daemon(
                    "vhost-user-net",
                    *args,
                    workdir=tmp_path,
                    name="second",
                    socket_path=first.socket_path,
                ).start()
            )

    vectors = ",vectors=0" if qemu_version == "7.2" else ""
    devices = [
        "-chardev",
        f"socket,id=c0,path={first.socket_path},{vm.reconnect_option(qemu)}",
        "-netdev",
        "vhost-user,id=n0,chardev=c0",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={MAC}{vectors}",
    ]
    try:
        ours = vm.boot(
            KILL_SCRIPT.format(address=OURS, size=SIZE),
            devices=devices,
            qemu=qemu,
            on_line=on_line,
            memory_mb=512,
            timeout=400,
        )
        peer.join(timeout=120)
    finally:
        for daemon in [first, *second]:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.stop()
    assert second, "the guest never got to the kill"
    assert peer.error is None, repr(peer.error)
    theirs = peer.run_result
    assert theirs is not None
    assert ours.exit_statuses == [0], ours.output[-3000:]
    assert ours.result("before") == "2" and ours.result("after") == "3", ours.output[-3000:]
    digest, count = ours.result("received").split()
    assert (digest, int(count)) == (theirs.result("sent"), SIZE)
    digest, count = theirs.result("received").split()
    assert (digest, int(count)) == (ours.result("sent"), SIZE)
    log = second[0].log()
    assert "event=net.link up=True" in log and "device.failed" not in log


PASST_GUEST = """
ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -s /bin/true > /tmp/dhcp 2>&1
set -- $(sed -n 's/.*lease of \\([0-9.]*\\) obtained from \\([0-9.]*\\).*/\\1 \\2/p' /tmp/dhcp)
echo "RESULT lease $1 $2"
ip addr add $1/24 dev eth0
ip route add default via $2
head -c {size} /dev/urandom > /tmp/out
echo "RESULT sent $(sha256sum < /tmp/out | cut -d' ' -f1)"
relay tcp-connect $2 {port} < /tmp/out > /tmp/in
echo "RESULT received $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
"""


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt not installed")
@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
def test_passt_gives_the_guest_dhcp_and_the_host(tmp_path, request, protocol):
    """passt (Debian's) as the daemon's peer, the daemon connecting to it
    from its jail: the guest gets a DHCP lease from passt and reaches a host
    TCP server through passt's gateway address, 4 MiB each way."""
    qemu = request.getfixturevalue("qemu_new")
    size = 4 << 20
    # passt drops root for nobody before it binds its socket: a directory
    # nobody reaches and writes (pytest's are root's alone).
    wires = Path(tempfile.mkdtemp(prefix="vfiouserd-passt-"))
    wires.chmod(0o777)
    wire = wires / "passt.sock"
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    payload = os.urandom(size)
    got: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(1)))
            sender.start()
            data = bytearray()
            while chunk := conn.recv(1 << 20):
                data += chunk
            sender.join()
            got["host"] = bytes(data)

    host = threading.Thread(target=serve, daemon=True)
    host.start()
    passt = subprocess.Popen(
        ["passt", "--foreground", "--socket", str(wire)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        allow_the_daemon(wire)
        daemon = Daemon(
            f"{protocol}-net", "--stream-socket", str(wire), workdir=tmp_path, name="net"
        )
        with daemon:
            if protocol == "vhost-user":
                devices = [
                    "-chardev",
                    f"socket,id=c0,path={daemon.socket_path}",
                    "-netdev",
                    "vhost-user,id=n0,chardev=c0",
                    "-device",
                    "virtio-net-pci,netdev=n0",
                ]
            else:
                devices = vm.vfio_user_device(daemon.socket_path)
            run = vm.boot(
                PASST_GUEST.format(size=size, port=port),
                devices=devices,
                qemu=qemu,
                memory_mb=256,
                timeout=300,
            )
            host.join(timeout=60)
            assert daemon.stop() == 0
    finally:
        passt.kill()
        passt.wait()
        server.close()
        shutil.rmtree(wires, ignore_errors=True)
    assert run.exit_statuses == [0], run.output[-3000:]
    address, gateway = run.result("lease").split()
    assert address.count(".") == 3 and gateway.count(".") == 3
    assert hashlib.sha256(got["host"]).hexdigest() == run.result("sent")
    digest, count = run.result("received").split()
    assert (digest, int(count)) == (hashlib.sha256(payload).hexdigest(), size)
