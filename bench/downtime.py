#!/usr/bin/env python3
"""Downtime and state size: what a restart or a migration costs the guest.

Downtime is the time from the stop (SIGTERM to the daemon, or the VMM
stopping the device for migration) to the first I/O served afterwards, as
the project's front ends (playing the VMM and the guest) see it:

- restart through the fd store (--fdstore, systemd played by
  tests/fake_systemd.py), vhost-user and vfio-user: the connection stays;
- upgrade in place (`systemctl reload`, ExecReload= runs vfiouserd
  --upgrade): the longest a read waited while the guest read back to back
  across it;
- the reference, measured in the same invocation: a restart without it, where
  the front end reconnects and sets the device up again (vhost-user only:
  a vfio-user client cannot reconnect at all);
- migration to a second daemon: vhost-user DEVICE_STATE and vfio-user
  STOP_COPY/RESUMING (device state only: guest memory is the VMM's business).

Each figure is the median of --runs; ratios are to the reference. Then the
size of each device's state blob, and of the handed-over session.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from common import connect, daemon_program

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fake_systemd import FakeSystemd  # noqa: E402

from vfiouserd import state  # noqa: E402
from vfiouserd.client.blk import BlkClient  # noqa: E402
from vfiouserd.client.guest import GuestRam  # noqa: E402
from vfiouserd.client.vfio_user import VfioUserClient  # noqa: E402
from vfiouserd.client.vhost_user import VhostUserFrontend  # noqa: E402
from vfiouserd.client.virtio_pci import VirtioPciDriver  # noqa: E402
from vfiouserd.devices.blk import VirtioBlk, open_image  # noqa: E402
from vfiouserd.devices.example import ExampleDevice  # noqa: E402
from vfiouserd.devices.rng import VirtioRng  # noqa: E402
from vfiouserd.protocol.vfio_user import MigrationState  # noqa: E402
from vfiouserd.virtio_pci import VirtioPciDevice  # noqa: E402

MiB = 1 << 20
QUEUE_SIZE = 64
Measure = Callable[[Path], Awaitable[float]]


def daemon(workdir: Path, protocol: str, name: str, *extra: str) -> list[str]:
    return [
        *daemon_program(),
        *(f"{protocol}-blk", "--socket-path", str(workdir / f"{name}.sock")),
        *("--blk-file", str(workdir / "disk.img"), "--size", "16M", *extra),
    ]


async def vhost_user_device(path: str, ram: GuestRam) -> tuple[VhostUserFrontend, BlkClient]:
    """What QEMU's vhost-user-blk does on (re)connection: negotiate, share
    memory, an inflight region, start the ring. Connects as soon as the
    back end listens (a reconnection races with its start)."""
    frontend = VhostUserFrontend(await connect(path, interval=0.001))
    await frontend.negotiate()
    await frontend.set_features()
    region = await frontend.get_inflight(1, QUEUE_SIZE)
    await frontend.set_inflight(region)
    region.close()
    await frontend.share_memory(ram)
    queue = await frontend.start_queue(0, frontend.make_ring(ram, QUEUE_SIZE))
    return frontend, BlkClient(ram, queue, arena=MiB)


async def until_exited(process: subprocess.Popen) -> None:
    while process.poll() is None:
        await trio.sleep(0.001)


async def restart_fdstore(workdir: Path, protocol: str) -> float:
    """SIGTERM; once the old daemon is gone the guest submits a read; the
    new daemon serves it on the same connection."""
    return await _served_by_a_managed_daemon(workdir, protocol, "store", _across_restart)


async def upgrade_in_place(workdir: Path, protocol: str) -> float:
    """`systemctl reload` (ExecReload=: vfiouserd --upgrade): the guest reads
    back to back at QD1 all along; the downtime is the longest any read
    waited, the one caught by the handover (the successor's start-up runs
    while the old daemon serves)."""
    return await _served_by_a_managed_daemon(workdir, protocol, "upgrade", _across_upgrade)


async def _served_by_a_managed_daemon(
    workdir: Path,
    protocol: str,
    name: str,
    across: Callable[[FakeSystemd, BlkClient], Awaitable[float]],
) -> float:
    """``across`` measured on a disk served by a daemon under the stand-in
    systemd (--fdstore), the guest's device set up over ``protocol``."""
    ram = GuestRam([(0, 16 * MiB)])
    command = daemon(workdir, protocol, name, "--fdstore")
    socket_path = str(workdir / f"{name}.sock")
    async with FakeSystemd(workdir, command, name=f"{name}-{protocol}") as manager:
        await manager.start()
        if protocol == "vhost-user":
            frontend, blk = await vhost_user_device(socket_path, ram)
            downtime = await across(manager, blk)
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(socket_path, ram=ram) as client:
                await client.map_ram()
                driver = VirtioPciDriver(client, ram)
                (queue,) = await driver.start(queue_count=1)
                downtime = await across(manager, BlkClient(ram, queue, arena=MiB))
                driver.close()
        await manager.stop()
    ram.close()
    return downtime


async def _across_restart(manager: FakeSystemd, blk: BlkClient) -> float:
    await blk.write(0, b"d" * 512)
    assert manager.process is not None
    old = manager.process
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(manager.restart)
        await until_exited(old)
        assert await blk.read(0, 512) == b"d" * 512
        return trio.current_time() - started


async def _across_upgrade(manager: FakeSystemd, blk: BlkClient) -> float:
    async def reload() -> None:
        status = await manager.reload([*manager.command, "--upgrade"])
        assert status == 0, manager.log()

    longest = await _longest_read_during(blk, reload)
    assert "event=upgrade.taken_over" in manager.log(), manager.log()
    return longest


async def _longest_read_during(blk: BlkClient, action: Callable[[], Awaitable[object]]) -> float:
    """The longest a read waited while the guest read back to back as long
    as ``action`` ran."""
    await blk.write(0, b"u" * 512)
    longest = 0.0
    done = False

    async def act() -> None:
        nonlocal done
        await action()
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(act)
        while not done:
            started = trio.current_time()
            assert await blk.read(0, 512) == b"u" * 512
            longest = max(longest, trio.current_time() - started)
    return longest


async def under_real_systemd(workdir: Path, action: str) -> float:
    """The shipped unit under a real systemd (tests/real_systemd.py):
    `systemctl reload` (an upgrade in place) or `systemctl restart` (the fd
    store) while the guest reads back to back over vhost-user; the longest
    a read waited."""
    from real_systemd import RealSystemd

    ram = GuestRam([(0, 16 * MiB)])
    name = "bench"
    unit = f"vfiouserd@{name}.service"
    with RealSystemd(workdir) as systemd:
        systemd.write(
            f"/etc/vfiouserd/{name}.toml",
            'command = "vhost-user-blk"\n'
            f'socket-path = "/run/vfiouserd/{name}/vhost-user.sock"\n'
            f'blk-file = "/var/lib/vfiouserd/{name}.img"\nsize = "16M"\n',
        )
        systemd.systemctl("start", unit)
        try:
            path = systemd.path(f"/run/vfiouserd/{name}/vhost-user.sock")
            frontend, blk = await vhost_user_device(path, ram)
            longest = await _longest_read_during(
                blk, lambda: trio.to_thread.run_sync(systemd.systemctl, action, unit)
            )
            await frontend.aclose()
        finally:
            systemd.systemctl("stop", unit)
    ram.close()
    return longest


async def restart_reconnect(workdir: Path) -> float:
    """The reference: no fd store; the front end sees the connection close,
    reconnects to the new daemon and sets everything up again (the inflight
    region carries over, as with QEMU's reconnect=)."""
    ram = GuestRam([(0, 16 * MiB)])
    command = daemon(workdir, "vhost-user", "plain")
    socket_path = str(workdir / "plain.sock")
    async with FakeSystemd(workdir, command, name="plain") as manager:
        await manager.start()
        frontend, blk = await vhost_user_device(socket_path, ram)
        await blk.write(0, b"r" * 512)
        started = trio.current_time()
        await manager.restart()
        await frontend.aclose()
        frontend, blk = await vhost_user_device(socket_path, ram)
        assert await blk.read(0, 512) == b"r" * 512
        downtime = trio.current_time() - started
        await frontend.aclose()
        await manager.stop()
    ram.close()
    return downtime


async def migrate_vhost_user(workdir: Path) -> float:
    ram = GuestRam([(0, 16 * MiB)])
    async with (
        FakeSystemd(workdir, daemon(workdir, "vhost-user", "src"), name="src") as source,
        FakeSystemd(workdir, daemon(workdir, "vhost-user", "dst"), name="dst") as destination,
    ):
        await source.start()
        await destination.start()
        frontend, blk = await vhost_user_device(str(workdir / "src.sock"), ram)
        await blk.write(0, b"m" * 512)
        started = trio.current_time()
        await frontend.stop_queue(0)
        blob = await frontend.save_device_state()
        target = await VhostUserFrontend.connect(str(workdir / "dst.sock"))
        await target.negotiate()
        await target.load_device_state(blob)
        await target.set_features()
        await target.share_memory(ram)
        queue = await target.start_queue(0, target.make_ring(ram, QUEUE_SIZE))
        assert await BlkClient(ram, queue, arena=MiB).read(0, 512) == b"m" * 512
        downtime = trio.current_time() - started
        await frontend.aclose()
        await target.aclose()
        await source.stop()
        await destination.stop()
    ram.close()
    return downtime


async def migrate_vfio_user(workdir: Path) -> float:
    ram = GuestRam([(0, 16 * MiB)])
    async with (
        FakeSystemd(workdir, daemon(workdir, "vfio-user", "src"), name="vsrc") as source,
        FakeSystemd(workdir, daemon(workdir, "vfio-user", "dst"), name="vdst") as destination,
    ):
        await source.start()
        await destination.start()
        async with VfioUserClient.connect(str(workdir / "src.sock"), ram=ram) as a:
            await a.map_ram()
            driver = VirtioPciDriver(a, ram)
            (queue,) = await driver.start(queue_count=1)
            blk = BlkClient(ram, queue, arena=MiB)
            await blk.write(0, b"v" * 512)
            started = trio.current_time()
            blob = await a.save_device(pre_copy=False)
            async with VfioUserClient.connect(str(workdir / "dst.sock"), ram=ram) as b:
                await b.map_ram()
                await b.load_device(blob, run=False)
                await driver.move_to(b)
                await b.set_migration_state(MigrationState.RUNNING)
                assert await blk.read(0, 512) == b"v" * 512
                downtime = trio.current_time() - started
                driver.close()
        await source.stop()
        await destination.stop()
    ram.close()
    return downtime


def blob_sizes(workdir: Path) -> list[tuple[str, int]]:
    image = str(workdir / "sizes.img")
    blk, rng = VirtioBlk(open_image(image, 16 * MiB, False)), VirtioRng(None)
    sizes = [
        ("vhost-user blk", len(state.save(blk))),
        ("vhost-user rng", len(state.save(rng))),
        ("vfio-user virtio-blk", len(state.save(VirtioPciDevice(blk)))),
        ("vfio-user virtio-rng", len(state.save(VirtioPciDevice(rng)))),
        ("vfio-user example", len(state.save(ExampleDevice()))),
    ]
    seen = set()
    for log in sorted(workdir.glob("*/store-*.log")):
        protocol = log.stem.removeprefix("store-")
        found = re.findall(r"session=True state_bytes=(\d+)", log.read_text())
        if found and protocol not in seen:
            seen.add(protocol)
            sizes.append((f"handed-over {protocol} blk session", int(found[0])))
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--real-systemd",
        action="store_true",
        help="also systemctl reload and restart of the shipped unit under a real systemd "
        "(root, a private PID namespace; see tests/real_systemd.py)",
    )
    args = parser.parse_args()
    scenarios: list[tuple[str, Measure]] = [
        ("restart, reconnect (reference)", restart_reconnect),
        ("restart, fd store, vhost-user", lambda w: restart_fdstore(w, "vhost-user")),
        ("restart, fd store, vfio-user", lambda w: restart_fdstore(w, "vfio-user")),
        ("upgrade in place, vhost-user", lambda w: upgrade_in_place(w, "vhost-user")),
        ("upgrade in place, vfio-user", lambda w: upgrade_in_place(w, "vfio-user")),
        *(
            [
                ("systemctl restart, real systemd", lambda w: under_real_systemd(w, "restart")),
                ("systemctl reload, real systemd", lambda w: under_real_systemd(w, "reload")),
            ]
            if args.real_systemd
            else []
        ),
        ("migration, vhost-user", migrate_vhost_user),
        ("migration, vfio-user", migrate_vfio_user),
    ]
    with tempfile.TemporaryDirectory(prefix="vfiouserd-downtime-") as directory:
        workdir = Path(directory)
        results: dict[str, float] = {}
        for name, measure in scenarios:
            samples = []
            for run in range(args.runs):
                rundir = workdir / f"{len(results)}-{run}"
                rundir.mkdir()
                samples.append(trio.run(measure, rundir))
            results[name] = statistics.median(samples)
        reference = results[scenarios[0][0]]
        print(f"{'scenario':34} {'downtime ms':>12} {'vs reference':>13}")
        for name, value in results.items():
            print(f"{name:34} {value * 1000:12.1f} {value / reference:12.2f}x")
        print()
        print(f"{'state blob':34} {'bytes':>12}")
        for name, size in blob_sizes(workdir):
            print(f"{name:34} {size:12d}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
