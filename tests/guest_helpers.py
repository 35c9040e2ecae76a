"""What the real-QEMU tests share: guest scripts, checks of the image, the
service manager stand-in on a thread of its own, and a hard kill."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from daemon import Daemon
from fake_systemd import FakeSystemd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

MiB = 1 << 20

# Writes 4 MiB of random data at 1 MiB, reads it back with O_DIRECT, compares.
WRITE_READ_VERIFY = """
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null || exit 10
dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=4 iflag=direct 2>/dev/null || exit 11
echo "RESULT written $(md5 < /tmp/pattern)"
echo "RESULT read $(md5 < /tmp/back)"
"""


# Phase 1 writes, marks the disk and reboots; phase 2 reads back, then
# WRITE_READ_VERIFY: the device set up again after the reset keeps working.
REBOOT_AND_VERIFY = (
    """
    marker=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 6)
    if [ "$marker" != "PHASE1" ]; then
        echo "RESULT phase 1"
        dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null
        dd if=/tmp/p of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null || exit 10
        echo "RESULT before $(md5 < /tmp/p)"
        printf 'PHASE1' | dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null
        reboot -f
    fi
    echo "RESULT phase 2"
    echo "RESULT after $(dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5)"
"""
    + WRITE_READ_VERIFY
)

# Waits until the 64 MiB disk has grown (the daemon announced a config change).
WAIT_FOR_GROWTH = """
    echo "RESULT before $(cat /sys/block/vda/size)"
    for i in $(seq 100); do
        [ "$(cat /sys/block/vda/size)" != "131072" ] && break
        sleep 0.2
    done
    echo "RESULT after $(cat /sys/block/vda/size)"
"""


# On a two-vCPU guest: how many queues the disk has, and I/O from each vCPU
# (so from each queue), verified.
EACH_VCPU_WRITES_AND_VERIFIES = """
    echo "RESULT hw_queues $(ls /sys/block/vda/mq | wc -l)"
    for cpu in 0 1; do
        dd if=/dev/urandom of=/tmp/p$cpu bs=1M count=2 2>/dev/null
        at=$((cpu * 2))
        taskset -c $cpu dd if=/tmp/p$cpu of=/dev/vda bs=1M seek=$at oflag=direct 2>/dev/null \\
            || exit 10
        taskset -c $cpu dd if=/dev/vda of=/tmp/b$cpu bs=1M skip=$at count=2 iflag=direct \\
            2>/dev/null || exit 11
        cmp /tmp/p$cpu /tmp/b$cpu || exit 12
    done
    echo "RESULT verified yes"
"""


# Reads the entropy device twice: the two reads must differ.
READ_HWRNG_TWICE = """
    echo "RESULT current $(cat /sys/class/misc/hw_random/rng_current)"
    head -c 4096 /dev/hwrng > /tmp/a || exit 10
    head -c 4096 /dev/hwrng > /tmp/b || exit 11
    echo "RESULT size $(wc -c < /tmp/a)"
    echo "RESULT a $(md5 < /tmp/a)"
    echo "RESULT b $(md5 < /tmp/b)"
"""

RESTARTS = 3


def blk_front_end(
    protocol: str, socket_path: str, qemu_new: Callable[[], str]
) -> tuple[str, list[str]]:
    """The QEMU and its -device arguments for a disk served over ``protocol``
    by a front end that cannot reconnect: QEMU 7.2's vhost-user chardev
    without reconnect, or QEMU 10's vfio-user client (``qemu_new`` gives it)."""
    if protocol == "vhost-user":
        return vm.QEMU, vm.vhost_user_device("vhost-user-blk-pci", socket_path, "b")
    return qemu_new(), vm.vfio_user_device(socket_path)


def write_and_verify_across_restarts(
    restart: Callable[[], object],
    qemu: str,
    devices: list[str],
    disk: str = "/dev/vda",
    after: str = "",
) -> vm.GuestRun:
    """A guest writes and verifies in rounds on ``disk`` while ``restart``
    restarts the back end RESTARTS times under it; every round must verify,
    no I/O error. ``after``: more of the guest's script, for the caller's
    own checks of the run returned."""
    restart_on = {f"ROUND {1 + 3 * n}" for n in range(RESTARTS)}
    restarted = []

    def on_line(line: str) -> None:
        if line.strip() in restart_on:
            restart()
            restarted.append(line)

    rounds = 3 * RESTARTS + 3
    run = vm.boot(
        WRITE_VERIFY_ROUNDS.format(rounds=rounds).replace("/dev/vda", disk) + after,
        on_line=on_line,
        timeout=300,
        devices=devices,
        qemu=qemu,
    )
    assert len(restarted) == RESTARTS, run.output[-3000:]
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("verified") == str(rounds)
    assert run.result("ioerrors") == "0", run.output[-3000:]
    return run


def assert_one_connection_across_restarts(log: str) -> None:
    """Each restarted daemon took the session over; the VMM connected once."""
    assert log.count("event=handover.restored") == RESTARTS, log[-3000:]
    assert log.count("event=session.start") == 1 + RESTARTS, log[-3000:]


def qemu_messages(output: str, *expected: str) -> list[str]:
    """What QEMU itself printed (warnings, errors) on the console, except the
    ``expected`` ones."""
    return [
        line
        for line in output.splitlines()
        if line.startswith("qemu-system-x86_64:") and not any(e in line for e in expected)
    ]


def image_md5(path: str, offset: int, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(size)).hexdigest()


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


class ServiceManagerThread:
    """The stand-in for systemd on its own thread (the guest console is read
    on this one), so notifications are taken while the test waits."""

    def __init__(self, workdir: Path, command: list[str]) -> None:
        self.manager: FakeSystemd | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main, workdir, command))
        self._thread.start()
        self._ready.wait(30)
        assert self.manager is not None

    async def _main(self, workdir: Path, command: list[str]) -> None:
        self._done = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with FakeSystemd(workdir, command) as manager:
            self.manager = manager
            self._ready.set()
            await self._done.wait()

    def run(self, function: Callable[[], Awaitable[object]]) -> object:
        return trio.from_thread.run(function, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._done.set, trio_token=self._token)
        self._thread.join(30)


def migration_info(source: vm.Guest) -> tuple[str, int]:
    """A migration's status and dirty sync count, from the source's monitor."""
    info = source.command("info migrate")
    status = re.search(r"Migration status: (\S+)", info)
    syncs = re.search(r"dirty sync count: (\d+)", info)
    return (status.group(1) if status else "none"), int(syncs.group(1)) if syncs else 0


def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)
