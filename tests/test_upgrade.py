"""Upgrade in place (vfiouserd.upgrade, the unit's ExecReload=): a new
daemon starts beside the running one, takes its session over through the
control socket, and the guest's I/O runs on across it.

The stand-in systemd (``fake_systemd``) runs the reload command, follows
MAINPID= and listens to the main process (and the reload command), as
NotifyAccess=exec does.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import trio
from fake_systemd import FakeSystemd
from managed_blk import (
    blk_command,
    daemon_command,
    io_across,
    io_loop,
    managed_blk,
    verify_image,
)

from conftest import MiB, start_device
from vfiouserd.client.control import ControlClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend

UPGRADES = 3


def upgrade_command(command: list[str]) -> list[str]:
    return [*command, "--upgrade"]


async def upgrade_while_io_runs(manager: FakeSystemd, blk, rounds: int) -> list[int]:
    async def upgrade(_: int) -> None:
        before = manager.main_pid
        assert await manager.reload(upgrade_command(manager.command)) == 0, manager.log()
        assert manager.main_pid != before

    return await io_across(blk, rounds, UPGRADES, upgrade)


def assert_upgraded(manager: FakeSystemd, upgrades: int = UPGRADES) -> None:
    log = manager.log()
    assert log.count("event=upgrade.handed_over") == upgrades, log
    assert log.count("event=upgrade.taken_over") == upgrades, log
    assert "session=True" in log and "refused" not in log and "session.fatal" not in log, log
    # One connection all along; the only close is the front end's, at the end.
    assert log.count("event=session.start") == 1 + upgrades, log
    assert log.count("event=session.closed") == 1, log
    assert manager.ignored == [], manager.ignored  # nobody spoke out of turn
    # Nothing went through the fd store but what the last daemon put there
    # when it was stopped (--fdstore), for a next start.
    assert log.count("event=handover.stored") == 1 and "handover.restored" not in log, log


async def test_vhost_user_session_carries_on_across_upgrades(tmp_path):
    rounds = 200
    ram = GuestRam([(0, 8 * MiB), (8 * MiB, 8 * MiB)])
    async with managed_blk(tmp_path, "vhost-user", ram, inflight=True) as served:
        manager = served.manager
        done = await upgrade_while_io_runs(manager, served.blk, rounds)
        assert done == list(range(rounds))  # every request once, in order
        assert served.frontend is not None
        assert await served.frontend.stop_queue(0) == 2 * rounds  # none repeated, none lost
        # The control socket goes on too, answering for the last daemon.
        control = str(tmp_path / "device.control.sock")

        def greet() -> dict:
            with ControlClient(control) as client:
                return client.greeting

        greeting = await trio.to_thread.run_sync(greet)
        assert greeting["pid"] == manager.main_pid
        assert (tmp_path / "device.sock").exists()
    assert_upgraded(manager)
    verify_image(tmp_path, rounds)
    ram.close()


@pytest.mark.parametrize("fd_less", [False, True], ids=["mapped", "dma-messages"])
async def test_vfio_user_session_carries_on_across_upgrades(tmp_path, fd_less):
    rounds = 120 if not fd_less else 40
    ram = GuestRam([(0, 16 * MiB)])
    async with managed_blk(tmp_path, "vfio-user", ram, fd_less=fd_less) as served:
        done = await upgrade_while_io_runs(served.manager, served.blk, rounds)
        assert done == list(range(rounds))
        assert served.driver is not None
        assert await served.driver.status() & 0x4  # DRIVER_OK
    assert_upgraded(served.manager)
    verify_image(tmp_path, rounds)
    ram.close()


async def test_an_idle_daemon_hands_over_its_listener(tmp_path):
    ram = GuestRam([(0, 8 * MiB)])
    socket_path = tmp_path / "device.sock"
    async with FakeSystemd(tmp_path, blk_command(tmp_path, "vhost-user")) as manager:
        await manager.start()
        first = manager.main_pid
        assert await manager.reload(upgrade_command(manager.command)) == 0, manager.log()
        assert manager.main_pid != first and socket_path.exists()
        frontend = await VhostUserFrontend.connect(str(socket_path))
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"i" * 512)
        assert await blk.read(0, 512) == b"i" * 512
        await frontend.aclose()
        assert await manager.stop() == 0
    log = manager.log()
    assert "event=upgrade.handed_over" in log and "session=False" in log, log
    ram.close()


async def test_a_successor_for_another_device_is_turned_away_before_anything_stops(tmp_path):
    ram = GuestRam([(0, 8 * MiB)])
    async with managed_blk(tmp_path, "vhost-user", ram) as served:
        manager, blk = served.manager, served.blk
        await blk.write(0, b"a" * 512)
        first = manager.main_pid
        other = upgrade_command(daemon_command(tmp_path, "vhost-user-rng"))
        assert await manager.reload(other) == 1
        assert manager.main_pid == first
        assert await blk.read(0, 512) == b"a" * 512  # never paused
    log = manager.log()
    assert "serves blk over vhost-user, not rng over vhost-user" in log, log
    assert "upgrade.handed_over" not in log and "session.paused" not in log, log
    ram.close()


async def test_a_successor_that_cannot_load_the_state_leaves_the_session_serving(tmp_path):
    """The state check of a restart, in an upgrade: a successor whose image
    is smaller than the disk the guest knows refuses the session; the
    running daemon takes it back and serves on; the reload fails."""
    ram = GuestRam([(0, 8 * MiB)])
    async with managed_blk(tmp_path, "vhost-user", ram) as served:
        manager, blk = served.manager, served.blk
        done: list[int] = []
        first = manager.main_pid
        smaller = [*manager.command]
        smaller[smaller.index("--blk-file") + 1] = str(tmp_path / "small.img")
        smaller[smaller.index("--size") + 1] = "1M"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io_loop, blk, 0, 100, done)
            with trio.fail_after(30):
                while len(done) < 20:
                    await trio.sleep(0.005)
            assert await manager.reload(upgrade_command(smaller)) == 1
            # The socket files are still the running daemon's: its would-be
            # successor's waiter left them.
            assert (tmp_path / "device.sock").exists()
            assert (tmp_path / "device.control.sock").exists()
        await io_loop(blk, 100, 50, done)  # served on, after all that
        assert done == list(range(150))
        assert manager.main_pid == first
    log = manager.log()
    assert "the disk had 32768 sectors, this image has 2048" in log, log
    assert log.count("event=upgrade.refused") == 2, log  # said by both
    assert "event=upgrade.taken_back" in log, log
    assert log.count("event=session.closed") == 1, log
    verify_image(tmp_path, 150)
    ram.close()


def ask_as_successor(control: Path, pid: int) -> tuple[socket.socket, bytes]:
    """A successor of our own: connect, ask for the session as ``pid``, and
    close the fds that come; the connection and what it said."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(control))
    sock.settimeout(10)
    greeting = sock.recv(65536)
    assert b"upgrade" in greeting
    sock.sendall(b'{"execute": "upgrade", "arguments": {"pid": %d}, "id": 1}\n' % pid)
    data, fds, _, _ = socket.recv_fds(sock, 65536, 250)
    for fd in fds:
        os.close(fd)
    return sock, data


@pytest.mark.parametrize(
    "behaviour", ["hangs up", "garbage", "refuses", "bad pid"], ids=lambda b: b.replace(" ", "-")
)
async def test_a_successor_that_misbehaves_leaves_the_session_serving(tmp_path, behaviour):
    """Whatever a successor does once it has the fds (hangs up, answers
    nonsense, refuses), the running daemon takes its session back."""
    ram = GuestRam([(0, 8 * MiB)])
    control = tmp_path / "device.control.sock"
    async with managed_blk(tmp_path, "vhost-user", ram) as served:
        manager, blk = served.manager, served.blk
        done: list[int] = []

        def misbehave() -> bytes:
            sock, data = ask_as_successor(control, 1 if behaviour == "bad pid" else os.getpid())
            if behaviour == "hangs up":
                sock.close()
                return data
            if behaviour == "garbage":
                sock.sendall(b"\xff{not json\n")
            elif behaviour == "refuses":
                sock.sendall(b'{"taken": false, "reason": "testing"}\n')
            while b'"id":1' not in data:  # the command's reply, last
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            sock.close()
            return data

        async with trio.open_nursery() as nursery:
            nursery.start_soon(io_loop, blk, 0, 100, done)
            with trio.fail_after(30):
                while len(done) < 20:
                    await trio.sleep(0.005)
            answer = await trio.to_thread.run_sync(misbehave)
        await io_loop(blk, 100, 50, done)  # served on, after all that
        assert done == list(range(150))
    log = manager.log()
    if behaviour == "bad pid":
        assert b"InvalidArgument" in answer and "session.paused" not in log, (answer, log)
    else:
        if behaviour != "hangs up":
            assert b'"released": false' in answer, answer
        assert "event=upgrade.taken_back" in log, log
    assert log.count("event=session.closed") == 1, log
    verify_image(tmp_path, 150)
    ram.close()


async def test_a_stop_while_a_successor_keeps_silent_still_hands_the_session_over(tmp_path):
    """systemctl stop (or restart) during an upgrade whose successor never
    answers: the running daemon gives up on it within the verdict timeout,
    takes the session back and puts it in the fd store; the next start
    carries on with it."""
    ram = GuestRam([(0, 8 * MiB)])
    control = tmp_path / "device.control.sock"
    async with managed_blk(tmp_path, "vhost-user", ram) as served:
        manager, blk = served.manager, served.blk
        done: list[int] = []
        await io_loop(blk, 0, 20, done)
        sock, _ = await trio.to_thread.run_sync(ask_as_successor, control, os.getpid())
        assert await manager.restart() < 10  # TimeoutStopSec=
        sock.close()
        await io_loop(blk, 20, 30, done)
        assert done == list(range(50))
    log = manager.log()
    assert "event=upgrade.taken_back" in log and "event=handover.restored" in log, log
    assert log.count("event=session.closed") == 1, log
    verify_image(tmp_path, 50)
    ram.close()


def test_the_upgrade_command_needs_a_listening_socket():
    from vfiouserd.cli import main

    assert main(["vhost-user-rng", "--fd", "3", "--upgrade"]) == 2


def test_the_successor_says_why_when_nothing_runs(tmp_path):
    """`systemctl reload` of a daemon that is not there: the reload command
    fails with the reason, nothing is left behind."""
    import subprocess

    command = upgrade_command(blk_command(tmp_path, "vhost-user"))
    command.remove("--fdstore")  # no systemd here
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "upgrade failed: cannot reach the running daemon" in result.stderr, result.stderr
    assert not (tmp_path / "device.sock").exists()


def test_the_wire_format_batches_fds_and_checks_verdicts():
    from vfiouserd import upgrade

    named = {f"vfu-fd-{n}": n for n in range(600)}
    batches = upgrade.fd_batches(named)
    assert [len(fds) for _, fds in batches] == [250, 250, 100]
    assert sum(len(json.loads(line)["fds"]) for line, _ in batches) == 600
    assert upgrade.parse_verdict(b'{"taken": true}') is None
    assert upgrade.parse_verdict(b'{"taken": false, "reason": "x"}') == "x"
    assert "not a verdict" in (upgrade.parse_verdict(b'{"taken": 1}') or "")
    assert "not JSON" in (upgrade.parse_verdict(b"\xff") or "")
    for bad in ({}, {"pid": "2"}, {"pid": 1}, {"pid": True}):
        with pytest.raises(ValueError):
            upgrade.successor_pid(bad)
    assert upgrade.successor_pid({"pid": 4242}) == 4242
    assert sys.executable  # the module's own imports only
