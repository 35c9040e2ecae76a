"""A VMM that shrinks a file after sharing it must not kill the daemon with
SIGBUS: the guard turns lost pages into zeros, the session ends cleanly, and
the daemon serves the next connection."""

from __future__ import annotations

import os

import trio
from daemon import Daemon

from conftest import MiB, start_device
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.protocol.framing import ConnectionClosed


async def wait_for(predicate, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_vhost_user_front_end_truncating_guest_memory(tmp_path):
    image = str(tmp_path / "disk.img")
    with Daemon("vhost-user-blk", "--blk-file", image, "--size", "8M", workdir=tmp_path) as daemon:
        ram = GuestRam([(0, 8 * MiB)])
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"a" * 512)
        blk.queue.ring.add([], [(0x10000, 1)], "lost")  # published, then the memory goes
        os.ftruncate(ram.regions[0].fd, 0)
        blk.queue.kick_now()
        await wait_for(lambda: "truncated memory" in daemon.log())
        assert daemon.process.poll() is None  # alive
        await frontend.aclose()
        ram.close()
        # And it serves the next front end.
        ram = GuestRam([(0, 8 * MiB)])
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        (blk,) = await start_device(frontend, ram)
        assert await blk.read(0, 512) == b"a" * 512
        await frontend.aclose()
        ram.close()
        assert daemon.stop() == 0


async def test_vfio_user_client_truncating_dma_memory(tmp_path):
    image = str(tmp_path / "disk.img")
    with Daemon("vfio-user-blk", "--blk-file", image, "--size", "8M", workdir=tmp_path) as daemon:
        ram = GuestRam([(0, 8 * MiB)])
        try:
            async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
                await client.map_ram()
                driver = VirtioPciDriver(client, ram)
                (queue,) = await driver.start(queue_count=1)
                await BlkClient(ram, queue, arena=MiB).write(0, b"b" * 512)
                queue.ring.add([], [(0x10000, 1)], "lost")
                os.ftruncate(ram.regions[0].fd, 0)
                await queue.kick_async()
                await wait_for(lambda: "truncated memory" in daemon.log())
                driver.close()
        except ConnectionClosed:
            pass  # the daemon may close the session first: that is the point
        ram.close()
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
