"""Live migration between two QEMU 7.2 instances on this machine, each with
its own daemon on the same image, while the guest writes and verifies.

QEMU switches dirty logging on in the source daemon (LOG_SHMFD, LOG_ALL,
logged rings), copies guest memory while the guest runs, stops the source
daemon's rings and starts the destination daemon's where they were. The host
tells the guest, through a marker block on the disk, when QEMU has copied all
memory once: only then does the guest write and read back fresh data, so the
daemon writes guest memory while QEMU copies it; the guest checks everything
again on the destination, from its page cache and from the disk.

Whether a page the daemon wrote reaches the destination depends on the log
only if the guest does not touch that page again before the switch, which a
guest kernel recycling memory rarely allows; that every byte the daemon writes
is logged is checked exactly in test_dirty_log.py.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import migration_info, until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

ROUNDS = 12
MARKER_BLOCK = 960  # in 64 KiB blocks: 60 MiB into the 64 MiB disk
BANDWIDTH = "8M"

SCRIPT = f"""
marker() {{
    dd if=/dev/vda bs=64k skip={MARKER_BLOCK} count=1 iflag=direct 2>/dev/null | head -c 8
}}
wait_for() {{ while [ "$(marker)" != "$1" ]; do usleep 100000; done; }}
# Memory the CPU keeps dirtying, so QEMU cannot finish copying until the
# rounds are done.
(while [ ! -f /tmp/stop ]; do
    dd if=/dev/urandom of=/tmp/noise bs=64k count=64 2>/dev/null
done) &
echo "RESULT phase waiting"
wait_for GO-GO-GO
i=0
while [ $i -lt {ROUNDS} ]; do
    dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs=64k seek=$((i * 16)) oflag=direct 2>/dev/null || exit 10
    dd if=/dev/vda of=/tmp/b bs=64k skip=$((i * 16)) count=16 2>/dev/null || exit 11
    cmp -s /tmp/p /tmp/b || {{ echo "RESULT mismatch $i"; exit 12; }}
    md5 < /tmp/p > /tmp/sum$i
    i=$((i + 1))
done
touch /tmp/stop
wait
echo "RESULT phase rounds-done"
wait_for MIGRATED
i=0
while [ $i -lt {ROUNDS} ]; do
    dd if=/dev/vda bs=64k skip=$((i * 16)) count=16 2>/dev/null | md5 > /tmp/cached
    cmp -s /tmp/sum$i /tmp/cached || {{ echo "RESULT stale $i"; exit 13; }}
    dd if=/dev/vda bs=64k skip=$((i * 16)) count=16 iflag=direct 2>/dev/null | md5 > /tmp/disk
    cmp -s /tmp/sum$i /tmp/disk || {{ echo "RESULT lost $i"; exit 14; }}
    i=$((i + 1))
done
echo "RESULT ioerrors $(dmesg | grep -ci 'i/o error')"
echo "RESULT verified {ROUNDS}"
"""


def blk_daemon(tmp_path: Path, image: str, name: str) -> Daemon:
    return Daemon(
        "vhost-user-blk", "--blk-file", image, "--size", "64M", workdir=tmp_path, name=name
    )


def set_marker(image: str, text: bytes) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, text.ljust(4096, b"\0"), MARKER_BLOCK * 65536)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_live_migration_while_the_guest_writes_and_verifies(tmp_path):
    image = str(tmp_path / "disk.img")
    migration = str(tmp_path / "migration.sock")
    with (
        blk_daemon(tmp_path, image, "source") as source_daemon,
        blk_daemon(tmp_path, image, "destination") as destination_daemon,
    ):
        phases: dict[str, threading.Event] = {
            "waiting": threading.Event(),
            "rounds-done": threading.Event(),
        }

        def on_line(line: str) -> None:
            for phase, event in phases.items():
                if line.strip() == f"RESULT phase {phase}":
                    event.set()

        def device(daemon: Daemon) -> list[str]:
            return vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b")

        destination = vm.Guest(
            SCRIPT,
            devices=device(destination_daemon),
            monitor=True,
            extra=["-incoming", f"unix:{migration}"],
        )
        source = vm.Guest(
            SCRIPT,
            devices=device(source_daemon),
            monitor=True,
            on_line=on_line,
        )
        try:
            assert phases["waiting"].wait(120), source.output[-3000:]
            source.command(f"migrate_set_parameter max-bandwidth {BANDWIDTH}")
            source.command(f"migrate -d unix:{migration}")
            # All memory copied once: from now on only logged pages are copied again.
            until(lambda: migration_info(source)[1] >= 2, 120, "no second dirty sync")
            set_marker(image, b"GO-GO-GO")
            assert phases["rounds-done"].wait(120), source.output[-3000:]
            until(
                lambda: migration_info(source)[0] in ("completed", "failed", "cancelled"),
                120,
                "migration did not finish",
            )
            status, _ = migration_info(source)
            assert status == "completed", source.command("info migrate")
            set_marker(image, b"MIGRATED")
            source.command("quit")
            source.wait(30, check=False)
            run = destination.wait(240)
        finally:
            source.kill()
            destination.kill()
        source_log, destination_log = source_daemon.log(), destination_daemon.log()
    # Every round ran on the source while QEMU copied memory; the check ran on
    # the destination.
    assert "RESULT phase rounds-done" in source.output
    assert "RESULT verified" not in source.output
    assert run.exit_statuses == [0], source.output[-1500:] + run.output[-3000:]
    assert run.result("verified") == str(ROUNDS)
    assert run.result("ioerrors") == "0"
    assert "event=dirty_log.set" in source_log
    log_all = [
        int(m.group(1), 16) & (1 << 26)
        for m in re.finditer(r"event=features.set features=(0x\w+)", source_log)
    ]
    assert any(log_all), "QEMU never switched LOG_ALL on"
    assert "event=ring.start" in destination_log
