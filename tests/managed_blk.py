"""A blk daemon run by the stand-in systemd, with the project's front end
playing the VMM and the guest: what the fd-store restart tests
(test_handover) and the upgrade tests (test_upgrade) all start from.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from fake_systemd import FakeSystemd

from conftest import MiB, start_device
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver


def daemon_command(tmp_path: Path, subcommand: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vfiouserd",
        subcommand,
        "--socket-path",
        str(tmp_path / "device.sock"),
        "--fdstore",
        *args,
    ]


def blk_command(tmp_path: Path, protocol: str) -> list[str]:
    image = str(tmp_path / "disk.img")
    return daemon_command(tmp_path, f"{protocol}-blk", "--blk-file", image, "--size", "16M")


async def io_loop(blk: BlkClient, first: int, rounds: int, done: list[int]) -> None:
    """What the guest does all along: write a sector, read it back."""
    for number in range(first, first + rounds):
        pattern = struct.pack("<I", number) * 128
        await blk.write(number, pattern)
        assert await blk.read(number, 512) == pattern
        done.append(number)


async def io_across(
    blk: BlkClient, rounds: int, steps: int, step: Callable[[int], Awaitable[Any]]
) -> list[int]:
    """The guest's I/O, with ``step(n)`` run ``steps`` times as it goes,
    spread over the rounds; the sectors done, in the order they were."""
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(io_loop, blk, 0, rounds, done)
        for number in range(steps):
            with trio.fail_after(30):
                while len(done) < (number + 1) * rounds // (steps + 2):
                    await trio.sleep(0.005)
            await step(number)
        with trio.fail_after(60):
            while len(done) < rounds:
                await trio.sleep(0.01)
    return done


def verify_image(tmp_path: Path, rounds: int) -> None:
    with open(tmp_path / "disk.img", "rb") as f:
        for number in range(rounds):
            f.seek(512 * number)
            assert f.read(512) == struct.pack("<I", number) * 128, number


@dataclass
class ManagedBlk:
    manager: FakeSystemd
    blk: BlkClient
    frontend: VhostUserFrontend | None = None  # vhost-user
    driver: VirtioPciDriver | None = None  # vfio-user


@asynccontextmanager
async def managed_blk(
    tmp_path: Path, protocol: str, ram: GuestRam, *, fd_less: bool = False, **start: Any
) -> AsyncIterator[ManagedBlk]:
    """A started blk daemon and one queue driven by the front end; on leaving,
    the front end hangs up and the daemon is stopped (and must exit 0).
    ``start`` goes to conftest.start_device (vhost-user); ``fd_less`` shares
    the guest's memory only through DMA messages (vfio-user)."""
    async with FakeSystemd(tmp_path, blk_command(tmp_path, protocol)) as manager:
        await manager.start()
        socket_path = str(tmp_path / "device.sock")
        if protocol == "vhost-user":
            frontend = await VhostUserFrontend.connect(socket_path)
            (blk,) = await start_device(frontend, ram, **start)
            yield ManagedBlk(manager, blk, frontend=frontend)
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(socket_path, ram=ram) as client:
                # In three maps of one memfd, as QEMU shares guest RAM:
                # systemd stores that open file once.
                await client.map_ram(with_fd=not fd_less, pieces=3)
                driver = VirtioPciDriver(client, ram)
                (queue,) = await driver.start(queue_count=1)
                yield ManagedBlk(manager, BlkClient(ram, queue, arena=MiB), driver=driver)
                driver.close()
        assert await manager.stop() == 0
