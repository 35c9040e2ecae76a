"""The proof with a real peer: QEMU 7.2 boots a Debian kernel whose virtio
drivers use vfiouserd through vhost-user-blk-pci and vhost-user-rng-pci."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import (
    EACH_VCPU_WRITES_AND_VERIFIES,
    READ_HWRNG_TWICE,
    REBOOT_AND_VERIFY,
    WAIT_FOR_GROWTH,
    WRITE_READ_VERIFY,
    image_md5,
    qemu_messages,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

MiB = 1 << 20


@pytest.fixture
def blk_image(tmp_path) -> str:
    return str(tmp_path / "disk.img")


def blk_daemon(tmp_path, image: str, *args: str, size: str = "64M", name: str = "blk") -> Daemon:
    return Daemon(
        "vhost-user-blk", "--blk-file", image, "--size", size, *args, workdir=tmp_path, name=name
    )


def test_write_read_verify_and_data_in_image(tmp_path, blk_image, vhost_user_qemu):
    with blk_daemon(tmp_path, blk_image) as daemon:
        run = vm.boot(
            WRITE_READ_VERIFY + "cat /sys/block/vda/size | sed 's/^/RESULT sectors /'",
            devices=vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b"),
            qemu=vhost_user_qemu,
        )
        assert daemon.stop() == 0
    assert run.exit_statuses == [0], run.output[-2000:]
    assert qemu_messages(run.output) == []
    assert run.result("written") == run.result("read")
    assert image_md5(blk_image, MiB, 4 * MiB) == run.result("written")
    assert int(run.result("sectors")) == 64 * MiB // 512
    assert os.stat(blk_image).st_blocks * 512 < 16 * MiB  # created sparse


def test_discard_and_write_zeroes_from_the_guest(tmp_path, blk_image):
    script = """
    echo "RESULT discard_max $(cat /sys/block/vda/queue/discard_max_bytes)"
    echo "RESULT zeroes_max $(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
    dd if=/dev/urandom of=/dev/vda bs=1M count=4 oflag=direct 2>/dev/null || exit 10
    blkdiscard -o 0 -l 2097152 /dev/vda || exit 11
    /usr/sbin/blkdiscard -z -o 2097152 -l 1048576 /dev/vda || exit 12
    sync
    echo "RESULT discarded $(dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | md5)"
    echo "RESULT zeroed $(dd if=/dev/vda bs=1M skip=2 count=1 iflag=direct 2>/dev/null | md5)"
    """
    with blk_daemon(tmp_path, blk_image, "--log-level", "trace") as daemon:
        run = vm.boot(
            script, devices=vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b")
        )
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.exit_statuses == [0], run.output[-2000:]
    assert int(run.result("discard_max")) > 0 and int(run.result("zeroes_max")) > 0
    zeros_2m = hashlib.md5(bytes(2 * MiB)).hexdigest()
    zeros_1m = hashlib.md5(bytes(MiB)).hexdigest()
    assert run.result("discarded") == zeros_2m
    assert run.result("zeroed") == zeros_1m
    assert image_md5(blk_image, 0, 2 * MiB) == zeros_2m
    assert image_md5(blk_image, 2 * MiB, MiB) == zeros_1m
    assert image_md5(blk_image, 3 * MiB, MiB) != zeros_1m
    # The guest really sent the two request types (not emulated with writes).
    assert "type=discard" in log and "type=write-zeroes" in log  # the trace, in the log


def test_read_only_disk_rejects_writes(tmp_path, blk_image):
    with open(blk_image, "wb") as f:
        f.write(b"R" * 8 * MiB)
    script = """
    echo "RESULT ro $(cat /sys/block/vda/ro)"
    if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
        echo "RESULT write succeeded"
    else
        echo "RESULT write refused"
    fi
    echo "RESULT content $(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | md5)"
    """
    with blk_daemon(tmp_path, blk_image, "--read-only") as daemon:
        run = vm.boot(
            script, devices=vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b")
        )
        assert daemon.stop() == 0
    assert run.result("ro") == "1"
    assert run.result("write") == "refused"
    assert run.result("content") == hashlib.md5(b"R" * 4096).hexdigest()
    with open(blk_image, "rb") as f:
        assert f.read() == b"R" * 8 * MiB


def test_rng_gives_bytes_via_hwrng(tmp_path, vhost_user_qemu):
    script = READ_HWRNG_TWICE
    # QEMU 7.2's vhost-user-rng must not use reconnect=1: connect once.
    with Daemon("vhost-user-rng", workdir=tmp_path, name="rng") as daemon:
        run = vm.boot(
            script,
            devices=vm.vhost_user_device("vhost-user-rng-pci", daemon.socket_path, "r"),
            qemu=vhost_user_qemu,
        )
        assert daemon.stop() == 0
    assert run.exit_statuses == [0], run.output[-2000:]
    # QEMU >= 10 warns when a device without a config space offers CONFIG.
    assert qemu_messages(run.output) == []
    assert run.result("current").startswith("virtio_rng")
    assert run.result("size") == "4096"
    assert run.result("a") != run.result("b")


def test_two_queues_with_two_cpus(tmp_path, blk_image, vhost_user_qemu):
    script = EACH_VCPU_WRITES_AND_VERIFIES
    # Both sides left at their defaults: QEMU asks for one queue per vCPU.
    with blk_daemon(tmp_path, blk_image) as daemon:
        run = vm.boot(
            script,
            smp=2,
            devices=vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b"),
            qemu=vhost_user_qemu,
        )
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.result("hw_queues") == "2"
    assert run.result("verified") == "yes"
    for queue in (0, 1):
        served = [
            int(line.split("requests=")[1].split()[0])
            for line in log.splitlines()
            if "event=ring.stop" in line and f"queue={queue} " in line
        ]
        assert served and max(served) > 0, f"queue {queue} served nothing:\n{log}"


def test_packed_ring_negotiated_and_working(tmp_path, blk_image, vhost_user_qemu):
    script = (
        WRITE_READ_VERIFY
        + """
    for dev in /sys/bus/virtio/devices/*; do
        [ "$(cat $dev/device)" = "0x0002" ] && echo "RESULT features $(cat $dev/features)"
    done
    """
    )
    with blk_daemon(tmp_path, blk_image) as daemon:
        run = vm.boot(
            script,
            devices=vm.vhost_user_device(
                "vhost-user-blk-pci", daemon.socket_path, "b", packed="on"
            ),
            qemu=vhost_user_qemu,
        )
        assert daemon.stop() == 0
        log = daemon.log()
    features = run.result("features")
    assert features[34] == "1", f"RING_PACKED not negotiated: {features}"
    assert run.result("written") == run.result("read")
    assert "layout=packed" in log


def test_guest_reboot_resets_and_sets_up_the_device_again(tmp_path, blk_image):
    script = REBOOT_AND_VERIFY
    with blk_daemon(tmp_path, blk_image) as daemon:
        run = vm.boot(
            script,
            reboot=True,
            devices=vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b"),
        )
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.results["phase"] == ["1", "2"], run.output[-3000:]
    assert run.result("before") == run.result("after")
    assert run.result("written") == run.result("read")
    assert log.count("event=ring.start") >= 2  # set up again after the reset


def test_reconnecting_qemu_gets_a_fresh_session(tmp_path, blk_image, vhost_user_qemu):
    """Restart the daemon while the guest is idle: QEMU (reconnect=1, or
    reconnect-ms=1000 from QEMU 9.2 on) connects
    again, sets the device up from scratch and the guest's disk keeps working."""
    script = (
        WRITE_READ_VERIFY
        + """
    echo "RESULT phase idle"
    sleep 4
    dd if=/dev/vda of=/tmp/again bs=1M skip=1 count=4 iflag=direct 2>/dev/null || exit 20
    echo "RESULT again $(md5 < /tmp/again)"
    dd if=/dev/urandom of=/dev/vda bs=1M seek=8 count=1 oflag=direct 2>/dev/null || exit 21
    """
    )
    first = blk_daemon(tmp_path, blk_image, name="first").start()
    second = Daemon(
        "vhost-user-blk",
        "--blk-file",
        blk_image,
        workdir=tmp_path,
        name="second",
        socket_path=first.socket_path,
    )
    restarted = []

    def on_line(line: str) -> None:
        if line.strip() == "RESULT phase idle" and not restarted:
            assert first.stop() == 0
            second.start()
            restarted.append(True)

    try:
        run = vm.boot(
            script,
            on_line=on_line,
            devices=[
                "-chardev",
                f"socket,id=b,path={first.socket_path},{vm.reconnect_option(vhost_user_qemu)}",
                "-device",
                "vhost-user-blk-pci,chardev=b",
            ],
            qemu=vhost_user_qemu,
        )
    finally:
        if second.process is not None:
            assert second.stop() == 0
    assert restarted
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("again") == run.result("written")
    log = second.log()
    assert "event=session.start" in log and "event=ring.start" in log


def test_disk_grows_online_after_sighup(tmp_path, blk_image):
    """BACKEND_REQ: the daemon tells QEMU the config changed; the guest sees it."""
    script = (
        WAIT_FOR_GROWTH
        + """
    dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs=1M seek=100 oflag=direct 2>/dev/null || exit 10
    dd if=/dev/vda of=/tmp/b bs=1M skip=100 count=1 iflag=direct 2>/dev/null || exit 11
    cmp /tmp/p /tmp/b || exit 12
    """
    )
    with blk_daemon(tmp_path, blk_image, size="64M") as daemon:

        def on_line(line: str) -> None:
            if line.startswith("RESULT before"):
                os.truncate(blk_image, 128 * MiB)
                daemon.process.send_signal(signal.SIGHUP)

        run = vm.boot(
            script,
            on_line=on_line,
            devices=vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b"),
        )
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("before") == str(64 * MiB // 512)
    assert run.result("after") == str(128 * MiB // 512)
    assert "event=config.change_announced" in log
