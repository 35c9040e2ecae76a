"""virtio-console in real guests, the daemon jailed: QEMU 10.2 over vhost-user
(its generic vhost-user-test-device-pci; QEMU 7.2 has no vhost-user console)
and over vfio-user. The guest's hvc0 and a named port (the guest agent's
name) carry text both ways with socat on the host, 16 MiB each way
checksummed, the console size, and a port whose host side closes and opens
again."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from daemon import Daemon

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed"),
]

AGENT = "org.qemu.guest_agent.0"
SIZE = 16 << 20
QUEUES = 6  # the console and one named port: two pairs each, and the control pair

SCRIPT = f"""
# The driver adds ports as the device's control messages come: wait for them.
port=""
for i in $(seq 100); do
    for p in /sys/class/virtio-ports/vport*; do
        [ "$(cat $p/name 2>/dev/null)" = "{AGENT}" ] && port=/dev/$(basename $p)
    done
    [ -n "$port" ] && [ -e /dev/hvc0 ] && break
    usleep 100000
done
exec 3<>/dev/hvc0
stty -F /dev/hvc0 raw -echo
echo "RESULT size $(stty -F /dev/hvc0 size)"
echo "RESULT names $(cat /sys/class/virtio-ports/*/name | tr '\\n' ' ')"
echo "RESULT port $port"
echo "hello-from-guest" >&3
read -r line <&3
echo "RESULT console-line $line"
echo "RESULT phase receive"
# A read on a port whose host side is closed ends at once: try until the
# host's client is there, then read to the end (it closes when done). The
# port stays open all along: Linux drops what a port got when it closes.
exec 4<>$port  # one open at a time: reads and writes go through it
while [ ! -s /tmp/in ]; do cat <&4 >> /tmp/in; usleep 100000; done
echo "RESULT received $(sha256sum < /tmp/in | cut -d' ' -f1) $(wc -c < /tmp/in)"
rm /tmp/in
head -c {SIZE} /dev/urandom > /tmp/out
echo "RESULT sent $(sha256sum < /tmp/out | cut -d' ' -f1)"
echo "RESULT phase send"
cat /tmp/out >&4
echo "RESULT phase reopen"
again=""
while [ -z "$again" ]; do again=$(cat <&4); usleep 100000; done
echo "RESULT reopened $again"
"""


class Host(threading.Thread):
    """The host's side: socat on the console, then the named port's clients,
    each step when the guest says it is there."""

    def __init__(self, console: str, agent: str) -> None:
        super().__init__(daemon=True)
        self.console, self.agent = console, agent
        self.phases: dict[str, threading.Event] = {
            name: threading.Event() for name in ("receive", "send", "reopen")
        }
        self.payload = os.urandom(SIZE)
        self.got_from_guest = b""
        self.console_text = b""
        self.error: BaseException | None = None

    def on_line(self, line: str) -> None:
        if line.startswith("RESULT phase "):
            self.phases[line.split()[2]].set()

    def wait_phase(self, name: str) -> None:
        if not self.phases[name].wait(240):
            raise TimeoutError(f"the guest never reached {name}")

    def run(self) -> None:
        socat = subprocess.Popen(
            ["socat", "-", f"UNIX-CONNECT:{self.console}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert socat.stdout is not None and socat.stdin is not None
            while b"hello-from-guest\n" not in self.console_text:
                chunk = os.read(socat.stdout.fileno(), 4096)
                if not chunk:
                    raise EOFError("socat ended")
                self.console_text += chunk
            socat.stdin.write(b"hello-from-host\n")
            socat.stdin.flush()

            self.wait_phase("receive")
            payload_file = Path(self.console).with_name("payload")
            payload_file.write_bytes(self.payload)
            subprocess.run(
                ["socat", "-u", f"FILE:{payload_file}", f"UNIX-CONNECT:{self.agent}"],
                check=True,
                timeout=240,
            )

            self.wait_phase("send")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(self.agent)
                sock.settimeout(240)
                data = bytearray()
                while len(data) < SIZE:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise EOFError("the daemon closed the port")
                    data += chunk
                self.got_from_guest = bytes(data)
                # Until the guest is done writing: then it waits for the
                # next client.
                self.wait_phase("reopen")

            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(self.agent)
                sock.sendall(b"third-client")
        except BaseException as exc:  # the test reports it
            self.error = exc
        finally:
            socat.kill()
            socat.wait()


FRONT_ENDS = ["vhost-user", "vfio-user"]


@pytest.mark.parametrize("protocol", FRONT_ENDS)
def test_console_and_named_port(tmp_path, qemu_new, protocol):
    console, agent = str(tmp_path / "hvc0.sock"), str(tmp_path / "agent.sock")
    daemon = Daemon(
        f"{protocol}-console",
        "--console",
        console,
        "--port",
        f"{AGENT}={agent}",
        "--size",
        "100x40",
        workdir=tmp_path,
        name="console",
    )
    with daemon:
        host = Host(console, agent)
        host.start()
        if protocol == "vhost-user":
            devices = [
                "-chardev",
                f"socket,id=con,path={daemon.socket_path}",
                "-device",
                "vhost-user-test-device-pci,chardev=con,virtio-id=3,"
                f"num_vqs={QUEUES},config_size=12",
            ]
        else:
            devices = vm.vfio_user_device(daemon.socket_path)
        run = vm.boot(SCRIPT, devices=devices, qemu=qemu_new, on_line=host.on_line, timeout=400)
        host.join(timeout=30)
        assert daemon.stop() == 0
        log = daemon.log()
    assert host.error is None, repr(host.error)
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("size") == "40 100"
    assert AGENT in run.result("names").split()
    assert run.result("console-line") == "hello-from-host"
    digest, count = run.result("received").split()
    assert (digest, int(count)) == (hashlib.sha256(host.payload).hexdigest(), SIZE)
    assert hashlib.sha256(host.got_from_guest).hexdigest() == run.result("sent")
    assert run.result("reopened") == "third-client"
    assert "event=ring.broken" not in log and "device.failed" not in log
