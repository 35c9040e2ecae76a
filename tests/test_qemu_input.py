"""virtio-input in real guests: QEMU 7.2 and 10.2 over vhost-user
(vhost-user-input-pci), QEMU 10.2 over vfio-user. The guest's evdev node
appears with the device's name and capabilities; key events typed on the
host arrive in order as raw input_event records; the caps-lock LED the
guest sets reaches the host's client (which is also how the host learns
that the guest is reading)."""

from __future__ import annotations

import shutil
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import qemu_messages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

EVENT = struct.Struct("<HHi")
EV_SYN, EV_KEY, EV_LED = 0, 1, 0x11
KEY_A, KEY_B, LED_CAPSL = 30, 48, 1
TYPED = [(EV_KEY, KEY_A, 1), (EV_SYN, 0, 0), (EV_KEY, KEY_A, 0), (EV_SYN, 0, 0)]
TYPED += [(EV_KEY, KEY_B, 1), (EV_SYN, 0, 0), (EV_KEY, KEY_B, 0), (EV_SYN, 0, 0)]

# The guest finds the device's input node, starts reading it (24-byte
# struct input_event records), turns caps lock on through it (the LED goes
# to the device's status queue, and to readers of the node), and prints
# type, code and value of what it read.
READ_EVENTS = f"""
    for node in /sys/class/input/input*; do
        [ "$(cat $node/name)" = "vfiouserd keyboard" ] && break
    done
    echo "RESULT name $(cat $node/name)"
    echo "RESULT ev $(cat $node/capabilities/ev)"
    echo "RESULT led $(cat $node/capabilities/led)"
    event=$(basename $(ls -d $node/event*))
    dd if=/dev/input/$event of=/tmp/events bs=24 count={len(TYPED) + 1} 2>/dev/null &
    reader=$!
    sleep 1
    printf '\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\021\\0\\001\\0\\001\\0\\0\\0' \\
        > /dev/input/$event
    for i in $(seq 100); do kill -0 $reader 2>/dev/null || break; sleep 0.2; done
    echo "RESULT events $(hexdump -v -e '24/1 "%02x" " "' /tmp/events)"
"""


def decode(dump: str) -> list[tuple[int, int, int]]:
    """type, code, value of each record hexdump printed (after its time)."""
    return [EVENT.unpack(bytes.fromhex(record)[16:24]) for record in dump.split()]


class HostKeyboard(threading.Thread):
    """The events socket's client: waits for the guest's caps-lock LED, then types."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.leds: list[tuple[int, int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            while True:
                try:
                    sock.connect(self.path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            sock.settimeout(max(deadline - time.monotonic(), 1))
            with sock:
                while (EV_LED, LED_CAPSL, 1) not in self.leds:
                    self.leds.append(EVENT.unpack(sock.recv(EVENT.size, socket.MSG_WAITALL)))
                sock.sendall(b"".join(EVENT.pack(*event) for event in TYPED))
                time.sleep(30)  # the guest powers off before: the daemon sees the end
        except BaseException as exc:  # the test reports it
            self.error = exc


def input_daemon(tmp_path: Path, protocol: str) -> tuple[Daemon, str]:
    path = str(tmp_path / "events.sock")
    return Daemon(
        f"{protocol}-input", "--events-socket", path, workdir=tmp_path, name="input"
    ), path


def check(run, keyboard: HostKeyboard, log: str) -> None:
    assert run.exit_statuses == [0], run.output[-3000:]
    assert keyboard.error is None, keyboard.error
    assert run.result("name") == "vfiouserd keyboard"
    ev = int(run.result("ev"), 16)
    assert ev & (1 << EV_KEY) and ev & (1 << EV_LED)
    assert int(run.result("led"), 16) & (1 << LED_CAPSL)
    events = decode(run.result("events"))
    assert events == [(EV_LED, LED_CAPSL, 1), *TYPED]  # its own LED write, then the keys
    assert (EV_LED, LED_CAPSL, 1) in keyboard.leds
    assert "event=ring.broken" not in log and "device.failed" not in log


def test_over_vhost_user(tmp_path, vhost_user_qemu):
    daemon, path = input_daemon(tmp_path, "vhost-user")
    with daemon:
        keyboard = HostKeyboard(path)
        keyboard.start()
        run = vm.boot(
            READ_EVENTS,
            devices=vm.vhost_user_device("vhost-user-input-pci", daemon.socket_path, "i"),
            qemu=vhost_user_qemu,
            check=False,
        )
        keyboard.join(timeout=1)
        if (
            "vhost initialization failed: requires kvm" in run.output
            and "kvm" not in vm.accelerator()
        ):
            daemon.stop()
            # QEMU 7.2's vhost-user-input wants KVM's ioeventfds (QEMU 10 no
            # longer does); this machine has no hardware virtualisation.
            pytest.skip("this QEMU's vhost-user-input-pci needs KVM, which is not here")
        assert daemon.stop() == 0
        log = daemon.log()
    check(run, keyboard, log)
    assert qemu_messages(run.output) == []


@pytest.mark.parametrize("shared", [True, False], ids=["memfd", "through-dma"])
def test_over_vfio_user(tmp_path, qemu_new, shared):
    daemon, path = input_daemon(tmp_path, "vfio-user")
    with daemon:
        keyboard = HostKeyboard(path)
        keyboard.start()
        run = vm.boot(
            READ_EVENTS,
            devices=vm.vfio_user_device(daemon.socket_path),
            qemu=qemu_new,
            shared_memory=shared,
        )
        keyboard.join(timeout=1)
        assert daemon.stop() == 0
        log = daemon.log()
    check(run, keyboard, log)
