"""A daemon killed with SIGKILL in the middle of guest I/O and started again:
QEMU 7.2 (reconnect=1) hands the new daemon the inflight region, and the
guest, writing and verifying all along, sees no error and no lost data."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from daemon import Daemon

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

# Each round writes 1 MiB of fresh random data at its own offset, reads it
# back with O_DIRECT and compares; at the end every round is read again.
WRITE_VERIFY_ROUNDS = """
rounds={rounds}
i=0
while [ $i -lt $rounds ]; do
    echo "ROUND $i"
    dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs=64k seek=$((i * 16)) oflag=direct 2>/dev/null \\
        || {{ echo "RESULT failed write $i"; exit 10; }}
    dd if=/dev/vda of=/tmp/b bs=64k skip=$((i * 16)) count=16 iflag=direct 2>/dev/null \\
        || {{ echo "RESULT failed read $i"; exit 11; }}
    cmp -s /tmp/p /tmp/b || {{ echo "RESULT mismatch $i"; exit 12; }}
    md5 < /tmp/p > /tmp/sum$i
    i=$((i + 1))
done
i=0
while [ $i -lt $rounds ]; do
    dd if=/dev/vda bs=64k skip=$((i * 16)) count=16 iflag=direct 2>/dev/null | md5 > /tmp/again
    cmp -s /tmp/sum$i /tmp/again || {{ echo "RESULT lost $i"; exit 13; }}
    i=$((i + 1))
done
echo "RESULT ioerrors $(dmesg | grep -ci 'i/o error')"
echo "RESULT verified $rounds"
"""


def kill_hard(daemon: Daemon) -> None:
    """SIGKILL, as a crash or the OOM killer would; wait until the jailed
    child (PID 1 of its namespace, killed with its parent) is gone too."""
    jailed = daemon.jailed_pid()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{jailed}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{jailed}")


@pytest.mark.parametrize(("packed", "kills"), [(False, 10), (True, 5)], ids=["split", "packed"])
def test_sigkill_in_the_middle_of_guest_io(tmp_path, packed, kills):
    image = str(tmp_path / "disk.img")
    rounds = 3 * kills + 3
    kill_on = {f"ROUND {1 + 3 * n}" for n in range(kills)}
    socket_path = str(tmp_path / "blk.sock")
    daemons = [
        Daemon(
            "vhost-user-blk",
            "--blk-file",
            image,
            "--size",
            "64M",
            workdir=tmp_path,
            socket_path=socket_path,
            name="daemon-0",
        ).start()
    ]
    killed = []

    def on_line(line: str) -> None:
        if line.strip() in kill_on:
            kill_hard(daemons[-1])
            killed.append(line)
            daemons.append(
                Daemon(
                    "vhost-user-blk",
                    "--blk-file",
                    image,
                    workdir=tmp_path,
                    socket_path=socket_path,
                    name=f"daemon-{len(daemons)}",
                ).start()
            )

    device = "vhost-user-blk-pci,chardev=b" + (",packed=on" if packed else "")
    try:
        run = vm.boot(
            WRITE_VERIFY_ROUNDS.format(rounds=rounds)
            + ("cat /sys/bus/virtio/devices/*/features | sed 's/^/RESULT features /'\n"),
            on_line=on_line,
            timeout=300,
            devices=["-chardev", f"socket,id=b,path={socket_path},reconnect=1", "-device", device],
        )
    finally:
        assert daemons[-1].stop() == 0
    assert len(killed) == kills
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("verified") == str(rounds)
    assert run.result("ioerrors") == "0", run.output[-3000:]
    assert (run.result("features")[34] == "1") == packed  # the ring layout really used
    # Every restarted daemon was handed the region QEMU kept (no GET again).
    logs = [daemon.log() for daemon in daemons[1:]]
    for log in logs:
        assert "event=inflight.set" in log and "event=inflight.created" not in log
    if packed:
        # QEMU cannot ask a killed daemon where a packed ring stood and sends
        # a stale base: the region set it right.
        assert any("event=inflight.base_corrected" in log for log in logs)
