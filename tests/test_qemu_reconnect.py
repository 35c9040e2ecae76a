"""A daemon killed with SIGKILL in the middle of guest I/O and started again:
QEMU (7.2 with reconnect=1, >= 10 with reconnect-ms=1000) hands the new
daemon the inflight region, and the guest, writing and verifying all along,
sees no error and no lost data. And a daemon restarted through systemd's fd
store, under a QEMU that does not reconnect at all (vhost-user on QEMU 7.2,
vfio-user on QEMU >= 10)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import (
    WRITE_VERIFY_ROUNDS,
    ServiceManagerThread,
    assert_one_connection_across_restarts,
    blk_front_end,
    kill_hard,
    write_and_verify_across_restarts,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sigkill_in_the_middle_of_guest_io(tmp_path, packed, vhost_user_qemu):
    # Fewer rounds on the second front end: the same code, another QEMU.
    kills = (5 if packed else 10) if vhost_user_qemu == vm.QEMU else (2 if packed else 3)
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
            devices=[
                "-chardev",
                f"socket,id=b,path={socket_path},{vm.reconnect_option(vhost_user_qemu)}",
                "-device",
                device,
            ],
            qemu=vhost_user_qemu,
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


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
def test_restart_through_the_fd_store_needs_no_reconnect(tmp_path, protocol, request):
    """systemctl restart of the back end under a running guest. QEMU 7.2's
    vhost-user chardev has no reconnect=1, and QEMU 10's vfio-user client
    cannot reconnect at all: a disconnect would end the disk. With the fd
    store the connection never drops and the guest sees no error."""
    image = str(tmp_path / "disk.img")
    socket_path = str(tmp_path / "blk.sock")
    command = [
        sys.executable,
        *("-m", "vfiouserd", f"{protocol}-blk", "--fdstore", "--socket-path", socket_path),
        *("--blk-file", image, "--size", "64M"),
    ]
    qemu, devices = blk_front_end(
        protocol, socket_path, lambda: request.getfixturevalue("qemu_new")
    )
    service = ServiceManagerThread(tmp_path, command)
    manager = service.manager
    assert manager is not None
    try:
        service.run(manager.start)
        write_and_verify_across_restarts(lambda: service.run(manager.restart), qemu, devices)
        assert service.run(manager.stop) == 0
    finally:
        service.close()
    assert_one_connection_across_restarts(manager.log())
