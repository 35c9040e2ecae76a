"""The daemon as a program: conventions of QEMU's vhost-user back ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio
from daemon import Daemon

from conftest import MiB, start_device
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed

VFIOUSERD = [sys.executable, "-m", "vfiouserd"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VFIOUSERD, *args], capture_output=True, text=True, timeout=30)


def test_print_capabilities_ignores_other_arguments():
    done = run_cli("vhost-user-blk", "--print-capabilities", "--no-such-option", "x")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"type": "block", "features": ["read-only", "blk-file"]}
    done = run_cli("vhost-user-rng", "--print-capabilities")
    assert json.loads(done.stdout) == {"type": "rng", "features": []}


def test_devices_lists_plugins_with_features():
    done = run_cli("devices", "--json")
    listing = json.loads(done.stdout)
    assert listing["blk"]["virtio_device_id"] == 2
    assert "DISCARD" in listing["blk"]["features"]
    assert "RING_PACKED" in listing["rng"]["features"]
    assert "vhost-user-blk" in run_cli("devices").stdout


def test_devices_names_the_interrupts_each_pci_plugin_declares():
    """MSI-X only (nvme), MSI only (example): each line says what the device
    has, from its declaration, never "0 vectors" of the kind it lacks."""
    from vfiouserd.devices.example import ExampleDevice
    from vfiouserd.devices.nvme import NvmeController

    listing = json.loads(run_cli("devices", "--json").stdout)
    assert listing["nvme"]["msix_vectors"] == NvmeController.msix_vectors > 0
    assert listing["nvme"]["msi_vectors"] == 0
    assert listing["example"]["msi_vectors"] == ExampleDevice.msi_vectors > 0
    lines = run_cli("devices").stdout.splitlines()
    assert f"  PCI 1234:4e56, MSI-X vectors {NvmeController.msix_vectors}" in lines
    assert f"  PCI 1234:5646, MSI vectors {ExampleDevice.msi_vectors}" in lines
    assert not [line for line in lines if "vectors 0" in line]
    # Both kinds, and neither (a legacy device: its INTx pin, or nothing).
    from vfiouserd.cli import _interrupt_kinds

    both = {"msi_vectors": 4, "msix_vectors": 8, "interrupt_pin": 1}
    assert _interrupt_kinds(both) == "MSI vectors 4, MSI-X vectors 8"
    assert _interrupt_kinds({**both, "msi_vectors": 0, "msix_vectors": 0}) == "INTx only"
    none = {"msi_vectors": 0, "msix_vectors": 0, "interrupt_pin": 0}
    assert _interrupt_kinds(none) == "no interrupts"


def test_startup_errors_are_clear(tmp_path):
    done = run_cli(
        "vhost-user-blk",
        "--socket-path",
        str(tmp_path / "s"),
        "--blk-file",
        str(tmp_path / "missing.img"),
    )
    assert done.returncode == 1
    assert "give --size to create it" in done.stderr
    done = run_cli("vhost-user-blk", "--blk-file", "x")
    assert done.returncode == 2 and "--socket-path or --fd" in done.stderr
    (tmp_path / "file").write_text("not a socket")
    done = run_cli("vhost-user-rng", "--socket-path", str(tmp_path / "file"))
    assert done.returncode == 1 and "not a socket" in done.stderr


def test_sparse_image_is_created_with_size(tmp_path):
    image = tmp_path / "new.img"
    with Daemon(
        "vhost-user-blk", "--blk-file", str(image), "--size", "1G", workdir=tmp_path
    ) as daemon:
        assert image.stat().st_size == 1 << 30
        assert image.stat().st_blocks == 0
        assert daemon.stop() == 0


def test_sigterm_exits_promptly_and_removes_the_socket(tmp_path):
    daemon = Daemon("vhost-user-rng", workdir=tmp_path).start()
    client = socket.socket(socket.AF_UNIX)
    client.connect(daemon.socket_path)  # even with a session open
    time.sleep(0.2)
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 2
    assert not os.path.exists(daemon.socket_path)
    assert "event=signal signal=SIGTERM" in daemon.log()
    client.close()


# A stop signal arriving while the daemon stops (systemd signals the whole
# cgroup, and the jail's parent relays the same SIGTERM): trio's own signal
# receiver re-raised it at close with tgkill, which the jail's filter kills.
STOP_TWICE = """
import os, signal, trio
from vfiouserd import log
from vfiouserd.signals import hold_stop_signals, run_until_signalled
log.configure("info")
hold_stop_signals()
os.kill(os.getpid(), signal.SIGTERM)  # held until the handler is in place

async def main():
    await trio.sleep_forever()

async def on_stop():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    await trio.sleep(0.2)  # both arrive while the stop is under way

trio.run(run_until_signalled, main, None, on_stop)
os.kill(os.getpid(), signal.SIGTERM)  # and one more as the daemon exits
print("exited cleanly")
"""


def test_stop_signals_during_the_stop_are_ignored_never_re_raised():
    done = subprocess.run(
        [sys.executable, "-c", STOP_TWICE], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exited cleanly\n"
    assert done.stderr.count("event=signal") == 1, done.stderr


def test_a_jailed_daemon_signalled_by_systemd_and_its_parent_exits_cleanly(tmp_path):
    """Under systemd the jailed daemon gets SIGTERM directly and again from
    its parent, a moment later; it must never die by its own filter."""
    for attempt in range(8):
        daemon = Daemon("vhost-user-rng", workdir=tmp_path, name=f"d{attempt}").start()
        os.kill(daemon.jailed_pid(), signal.SIGTERM)
        time.sleep(0.001 * (attempt % 4))
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
        assert "daemon.killed" not in daemon.log()


async def do_io(path: str) -> None:
    ram = GuestRam([(0, 8 * MiB)])
    frontend = await VhostUserFrontend.connect(path)
    try:
        (blk,) = await start_device(frontend, ram)
        data = os.urandom(4096)
        await blk.write(10, data)
        assert await blk.read(10, 4096) == data
    finally:
        await frontend.aclose()
        ram.close()


async def test_sessions_follow_one_another(tmp_path):
    image = str(tmp_path / "disk.img")
    with Daemon("vhost-user-blk", "--blk-file", image, "--size", "16M", workdir=tmp_path) as daemon:
        for _ in range(3):
            await do_io(daemon.socket_path)
        assert daemon.wait_for_log("event=session.end", 3).count("event=session.end") == 3


async def test_fatal_violation_closes_only_that_connection(tmp_path):
    image = str(tmp_path / "disk.img")
    with Daemon("vhost-user-blk", "--blk-file", image, "--size", "16M", workdir=tmp_path) as daemon:
        bad = await VhostUserFrontend.connect(daemon.socket_path)
        await bad.sock.send(vu.Header.build({"request": 1, "flags": 0x3, "size": 0}))
        with pytest.raises(ConnectionClosed), trio.fail_after(5):
            await vu.read_message(bad.sock)
        await bad.aclose()
        await do_io(daemon.socket_path)
        assert "event=session.fatal" in daemon.wait_for_log("event=session.fatal")
        assert daemon.process.poll() is None


def inherit_fd_and_run(tmp_path, sock: socket.socket, *args: str) -> subprocess.Popen:
    fd = sock.fileno()
    os.set_inheritable(fd, True)
    with open(tmp_path / "fd.log", "wb") as log:  # the daemon has its own copy
        return subprocess.Popen(
            [
                *VFIOUSERD,
                "vhost-user-blk",
                f"--fd={fd}",
                "--blk-file",
                str(tmp_path / "disk.img"),
                "--size",
                "16M",
                *args,
            ],
            pass_fds=[fd],
            stdout=log,
            stderr=log,
        )


async def test_fd_with_a_listening_socket(tmp_path):
    path = str(tmp_path / "listen.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    process = inherit_fd_and_run(tmp_path, listener)
    listener.close()
    try:
        await do_io(path)
        await do_io(path)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    assert os.path.exists(path)  # not ours to remove


async def test_fd_with_a_connected_socket(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = inherit_fd_and_run(tmp_path, theirs)
    theirs.close()
    ram = GuestRam([(0, 8 * MiB)])
    frontend = VhostUserFrontend(trio.socket.from_stdlib_socket(ours))
    (blk,) = await start_device(frontend, ram)
    await blk.write(0, b"z" * 512)
    assert await blk.read(0, 512) == b"z" * 512
    await frontend.aclose()
    ram.close()
    assert process.wait(10) == 0  # one connection, then done


def test_vfio_user_subcommands_and_probe(tmp_path):
    with Daemon(
        "vfio-user-blk",
        "--blk-file",
        str(tmp_path / "d.img"),
        "--size",
        "8M",
        "--num-queues",
        "2",
        workdir=tmp_path,
        name="vblk",
    ) as daemon:
        done = run_cli("probe", daemon.socket_path)
        assert done.returncode == 0, done.stderr
        assert "1af4:1042" in done.stdout and "MSI-X: 3 vectors" in done.stdout
        assert "virtio common in BAR4" in done.stdout
        probe = json.loads(run_cli("probe", daemon.socket_path, "--json").stdout)
        assert probe["header"]["vendor"] == 0x1AF4 and probe["regions"][4]["size"] == 0x4000
        assert daemon.stop() == 0
    with Daemon("vfio-user-example", workdir=tmp_path, name="example") as daemon:
        done = run_cli("probe", daemon.socket_path)
        assert "1234:5646" in done.stdout and "MSI: 1 vectors" in done.stdout
        assert daemon.stop() == 0
    assert "vfio-user-rng" in run_cli("--help").stdout


async def test_vfio_user_client_comes_back_to_the_same_device_state(tmp_path):
    from vfiouserd.client.blk import BlkClient
    from vfiouserd.client.vfio_user import VfioUserClient
    from vfiouserd.client.virtio_pci import VirtioPciDriver

    image = str(tmp_path / "disk.img")
    with Daemon("vfio-user-blk", "--blk-file", image, "--size", "8M", workdir=tmp_path) as daemon:
        ram = GuestRam([(0, 8 * MiB)])
        async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
            await client.map_ram()
            driver = VirtioPciDriver(client, ram)
            (queue,) = await driver.start(queue_count=1)
            await BlkClient(ram, queue, arena=MiB).write(0, b"v" * 512)
            driver.close()
        # Reconnect: the spec says the device keeps its state; memory and
        # interrupts are the client's to set up again.
        async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
            await client.map_ram()
            driver = VirtioPciDriver(client, ram)
            await driver.probe()
            assert await driver.status() & 0x4  # still DRIVER_OK
            (queue,) = await driver.start(queue_count=1)  # a driver re-initialises
            assert await BlkClient(ram, queue, arena=MiB).read(0, 512) == b"v" * 512
            driver.close()
        ram.close()
        assert daemon.wait_for_log("event=session.end", 2).count("event=session.end") == 2
