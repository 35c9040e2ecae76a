"""A hostile vfio-user client or guest driver against the real daemon process:
each test is a way the independent fuzzer took a device down (issue 11), and
ends by proving that the daemon serves a fresh, well-behaved client."""

from __future__ import annotations

import contextlib
import socket

import pytest
import trio
from daemon import Daemon

from conftest import MiB
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.framing import ConnectionClosed
from vfiouserd.protocol.vfio_user import Command

LAYOUT = [(0, 8 * MiB), (0x1_0000_0000, 4 * MiB)]


@pytest.fixture
def blk_daemon(tmp_path):
    image = str(tmp_path / "disk.img")
    with Daemon("vfio-user-blk", "--blk-file", image, "--size", "16M", workdir=tmp_path) as daemon:
        yield daemon
        daemon.stop()


async def serves_a_fresh_client(daemon: Daemon) -> None:
    """A new client is served, and its I/O completes."""
    from vfiouserd.client.blk import BlkClient

    ram = GuestRam(LAYOUT)
    try:
        with trio.fail_after(20):
            async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
                await client.reset()
                await client.map_ram()
                driver = VirtioPciDriver(client, ram)
                (queue,) = await driver.start(queue_count=1, queue_size=16)
                blk = BlkClient(ram, queue, arena=MiB)
                await blk.write(0, b"fresh" * 1000 + bytes(120))
                assert (await blk.read(0, 512))[:5] == b"fresh"
                driver.close()
    finally:
        ram.close()


INFO = vfu.DeviceInfo.build(
    {"argsz": vfu.DeviceInfo.sizeof(), "flags": 0, "num_regions": 0, "num_irqs": 0}
)


async def stall_then_pipeline(
    daemon: Daemon, before: list[bytes], count: int, read_replies: bool = True
) -> None:
    """Memory without fds, I/O started, the device's DMA_READs never
    answered; then ``before`` and ``count`` DEVICE_GET_INFO pipelined, replies
    read only now and then; then a disconnect."""
    ram = GuestRam(LAYOUT)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(daemon.socket_path)
    client = VfioUserClient(sock, ram)
    await client.negotiate()
    async with trio.open_nursery() as nursery:
        client._nursery = nursery
        nursery.start_soon(client._serve_server_requests)
        reading = trio.CancelScope()

        async def receive() -> None:
            with reading:
                await client._receive(sock)

        nursery.start_soon(receive)
        await client.map_ram(with_fd=False)
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1, queue_size=16)

        async def never(_message: object) -> None:
            await trio.sleep_forever()

        client.before_dma_reply = never
        queue.ring.add([(0x2000, 16)], [(0x3000, 512), (0x4000, 1)], "read")
        await queue.kick_async()
        reading.cancel()
        # The daemon may stop reading (back-pressure), or hang up.
        with trio.move_on_after(10), contextlib.suppress(ConnectionClosed, OSError):
            for message in before:
                await vfu.write_message(sock, message)
            for sent in range(count):
                await vfu.write_message(
                    sock, vfu.encode(0x8000 + sent, Command.DEVICE_GET_INFO, INFO)
                )
                if read_replies and sent % 300 == 299:  # now and then, a few replies
                    for _ in range(5):
                        (await vfu.read_message(sock, 1 << 20)).close_fds()
        nursery.cancel_scope.cancel()
    driver.close()
    client.close()
    ram.close()


async def test_a_pipelining_client_that_never_answers_dma_cannot_wedge_the_daemon(blk_daemon):
    """What the fuzzer found (defect 1): the daemon stayed alive but never
    served again, its reader stuck behind a full backlog of commands."""
    await stall_then_pipeline(blk_daemon, [], 1500)
    await serves_a_fresh_client(blk_daemon)
    log = blk_daemon.wait_for_log("event=session.end", count=2)
    assert "event=session.closed" in log


async def test_a_client_pipelining_without_bound_while_the_device_waits_is_cut_off(blk_daemon):
    """A migration step waits for the ring walk, which waits for a DMA reply:
    the reader goes on reading (the reply could be next), but not forever."""
    feature = vfu.DeviceFeatureHead.build(
        {
            "argsz": vfu.DeviceFeatureHead.sizeof(),
            "flags": vfu.FEATURE_PROBE | vfu.DeviceFeature.MIGRATION,
        }
    )
    stuck = vfu.encode(0x7FFF, Command.DEVICE_FEATURE, feature)
    await stall_then_pipeline(blk_daemon, [stuck], 6000, read_replies=False)
    await serves_a_fresh_client(blk_daemon)
    log = blk_daemon.wait_for_log("event=session.end", count=2)
    assert "commands" in log and "pipelined while the server waited for the client" in log
