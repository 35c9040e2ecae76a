"""A daemon killed with SIGKILL in the middle of guest I/O and started again:
QEMU 7.2 (reconnect=1) hands the new daemon the inflight region, and the
guest, writing and verifying all along, sees no error and no lost data. And
a daemon restarted through systemd's fd store, under a QEMU that does not
reconnect at all."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from daemon import Daemon
from fake_systemd import FakeSystemd

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


def test_restart_through_the_fd_store_needs_no_reconnect(tmp_path):
    """systemctl restart of the back end under a running guest: QEMU's
    chardev has no reconnect=1, so a disconnect would end the disk; with the
    fd store the connection never drops and the guest sees no error."""
    image = str(tmp_path / "disk.img")
    socket_path = str(tmp_path / "blk.sock")
    restarts = 3
    restart_on = {f"ROUND {1 + 3 * n}" for n in range(restarts)}
    command = [
        sys.executable,
        *("-m", "vfiouserd", "vhost-user-blk", "--fdstore", "--socket-path", socket_path),
        *("--blk-file", image, "--size", "64M"),
    ]
    service = ServiceManagerThread(tmp_path, command)
    manager = service.manager
    assert manager is not None
    restarted = []

    def on_line(line: str) -> None:
        if line.strip() in restart_on:
            service.run(manager.restart)
            restarted.append(line)

    try:
        service.run(manager.start)
        run = vm.boot(
            WRITE_VERIFY_ROUNDS.format(rounds=3 * restarts + 3),
            on_line=on_line,
            timeout=300,
            devices=vm.vhost_user_device("vhost-user-blk-pci", socket_path, "b"),
        )
        assert service.run(manager.stop) == 0
    finally:
        service.close()
    assert len(restarted) == restarts
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("verified") == str(3 * restarts + 3)
    assert run.result("ioerrors") == "0", run.output[-3000:]
    log = manager.log()
    assert log.count("event=handover.restored") == restarts, log
    assert log.count("event=session.start") == 1 + restarts, log  # one connection
