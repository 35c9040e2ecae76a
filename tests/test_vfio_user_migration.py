"""vfio-user migration: the v2 state machine, the data stream, DMA logging,
and a virtio-blk device moved between two daemons while I/O runs, with the
project's client as the VMM and its virtio-pci driver as the guest."""

from __future__ import annotations

import errno
import itertools
import os
import struct
import tracemalloc

import pytest
import trio
from daemon import Daemon

from conftest import MiB, make_blk, vfio_served
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient, VfioUserError
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.devices.example import ExampleDevice
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import MigrationState as S
from vfiouserd.vfio_user.migration import path
from vfiouserd.virtio_pci import VirtioPciDevice

PAGE = 4096

# libvfio-user's transition table (lib/migration.c), P2P states left out:
# the states a request goes through, the target last.
EXPECTED_PATHS = {
    (S.STOP, S.RUNNING): [S.RUNNING],
    (S.STOP, S.STOP_COPY): [S.STOP_COPY],
    (S.STOP, S.RESUMING): [S.RESUMING],
    (S.STOP, S.PRE_COPY): [S.RUNNING, S.PRE_COPY],
    (S.RUNNING, S.STOP): [S.STOP],
    (S.RUNNING, S.PRE_COPY): [S.PRE_COPY],
    (S.RUNNING, S.STOP_COPY): [S.STOP, S.STOP_COPY],
    (S.RUNNING, S.RESUMING): [S.STOP, S.RESUMING],
    (S.STOP_COPY, S.STOP): [S.STOP],
    (S.STOP_COPY, S.RUNNING): [S.STOP, S.RUNNING],
    (S.STOP_COPY, S.RESUMING): [S.STOP, S.RESUMING],
    (S.RESUMING, S.STOP): [S.STOP],
    (S.RESUMING, S.RUNNING): [S.STOP, S.RUNNING],
    (S.RESUMING, S.STOP_COPY): [S.STOP, S.STOP_COPY],
    (S.RESUMING, S.PRE_COPY): [S.STOP, S.RUNNING, S.PRE_COPY],
    (S.PRE_COPY, S.RUNNING): [S.RUNNING],
    (S.PRE_COPY, S.STOP_COPY): [S.STOP_COPY],
    (S.PRE_COPY, S.STOP): [S.RUNNING, S.STOP],
    (S.PRE_COPY, S.RESUMING): [S.RUNNING, S.STOP, S.RESUMING],
}
STATES = [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY]


def test_every_arc_follows_the_shortest_allowed_path():
    for current, target in itertools.product(STATES, STATES):
        if current is target:
            assert path(current, target) == []
        elif (current, target) == (S.STOP_COPY, S.PRE_COPY):
            with pytest.raises(Exception, match="cannot go back"):
                path(current, target)
        else:
            assert path(current, target) == EXPECTED_PATHS[(current, target)], (current, target)


async def test_state_requests_over_the_wire():
    async with vfio_served(ExampleDevice()) as client:
        assert await client.migration_flags() == (
            vfu.MigrationFlag.STOP_COPY | vfu.MigrationFlag.PRE_COPY
        )
        assert await client.migration_state() is S.RUNNING
        for target in (S.ERROR, S.RUNNING_P2P, S.PRE_COPY_P2P, 8, 0xABCD):
            with pytest.raises(VfioUserError) as refused:
                await client.set_migration_state(target)
            assert refused.value.errno == errno.EINVAL
        await client.set_migration_state(S.STOP_COPY)  # through STOP
        assert await client.migration_state() is S.STOP_COPY
        with pytest.raises(VfioUserError):
            await client.set_migration_state(S.PRE_COPY)
        assert await client.migration_state() is S.STOP_COPY
        with pytest.raises(VfioUserError):  # no data to write but in RESUMING
            await client.migration_write(b"x")
        await client.set_migration_state(S.RUNNING)
        with pytest.raises(VfioUserError):  # and none to read but while saving
            await client.migration_read(16)


async def test_device_feature_probe_and_operations():
    async with vfio_served(ExampleDevice()) as client:
        probe = vfu.FEATURE_PROBE
        for index, operations in [
            (vfu.DeviceFeature.MIGRATION, vfu.FEATURE_GET),
            (vfu.DeviceFeature.MIG_DEVICE_STATE, vfu.FEATURE_GET | vfu.FEATURE_SET),
            (vfu.DeviceFeature.DMA_LOGGING_START, vfu.FEATURE_SET),
            (vfu.DeviceFeature.DMA_LOGGING_STOP, vfu.FEATURE_SET),
            (vfu.DeviceFeature.DMA_LOGGING_REPORT, vfu.FEATURE_GET),
        ]:
            assert await client.device_feature(index, probe | operations) == b""
            for other in (vfu.FEATURE_GET, vfu.FEATURE_SET):
                if not other & operations:
                    with pytest.raises(VfioUserError) as refused:
                        await client.device_feature(index, probe | other)
                    assert refused.value.errno == errno.EINVAL
        with pytest.raises(VfioUserError) as refused:  # GET and SET at once
            await client.device_feature(
                vfu.DeviceFeature.MIG_DEVICE_STATE, vfu.FEATURE_GET | vfu.FEATURE_SET, room=8
            )
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(VfioUserError) as refused:  # a feature the device lacks
            await client.device_feature(3, vfu.FEATURE_GET, room=8)
        assert refused.value.errno == errno.ENOTTY


async def test_dma_logging_reports_the_pages_the_device_wrote():
    ram = GuestRam([(0, 4 * MiB), (0x1_0000_0000, MiB)])
    device = ExampleDevice()
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        await client.config_write(0x04, 2, 0x6)
        with pytest.raises(VfioUserError):  # nothing to report yet
            await client.dma_logging_report(0, 4 * MiB, PAGE)
        for bad in [(1000, []), (PAGE, [(100, PAGE)]), (PAGE, [(0, 2 * PAGE), (PAGE, PAGE)])]:
            with pytest.raises(VfioUserError):
                await client.dma_logging_start(*bad)
        await client.dma_logging_start(PAGE, [])  # every mapped region
        ram.write(0x1000, b"d" * 9000)
        # the DMA engine copies 9000 bytes to 0x1_0000_0000 + 0x2100
        await client.region_write(0, 0x10, struct.pack("<Q", 0x1000))
        await client.region_write(0, 0x18, struct.pack("<II", 0x2100, 1))
        await client.region_write(0, 0x20, struct.pack("<I", 9000))
        await client.region_write(0, 0x24, struct.pack("<I", 1))
        high = 0x1_0000_0000
        assert await client.dma_logging_report(high, MiB, PAGE) == {2, 3, 4}
        assert await client.dma_logging_report(high, MiB, PAGE) == set()  # reported: cleared
        assert await client.dma_logging_report(0, 4 * MiB, PAGE) == set()  # only read there
        await client.region_write(0, 0x24, struct.pack("<I", 1))
        # coarser pages: one 64 KiB page; finer ranges: part of the region
        assert await client.dma_logging_report(high, MiB, 16 * PAGE) == {0}
        await client.region_write(0, 0x24, struct.pack("<I", 1))
        assert await client.dma_logging_report(high + 3 * PAGE, 2 * PAGE, PAGE) == {0, 1}
        with pytest.raises(VfioUserError):  # not a logged range
            await client.dma_logging_report(8 * MiB, PAGE, PAGE)
        with pytest.raises(VfioUserError):  # a bitmap that does not fit the reply
            await client.device_feature(
                vfu.DeviceFeature.DMA_LOGGING_REPORT,
                vfu.FEATURE_GET,
                vfu.DmaLoggingReport.build({"iova": high, "length": MiB, "page_size": PAGE}),
            )
        await client.dma_logging_stop()
        with pytest.raises(VfioUserError):
            await client.dma_logging_report(high, MiB, PAGE)
    ram.close()


async def test_a_stopped_device_makes_no_progress(image):
    ram = GuestRam([(0, 8 * MiB)])
    device = VirtioPciDevice(make_blk(image))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"a" * 512)
        await client.set_migration_state(S.STOP)
        with trio.move_on_after(0.3) as waited:
            await blk.write(1, b"b" * 512)
        assert waited.cancelled_caught  # not served while stopped
        await client.set_migration_state(S.RUNNING)
        with trio.fail_after(5):
            while queue.ring.collect() == []:
                await queue.wait_call()  # the pending request completes now
        driver.close()
    ram.close()


def daemon(tmp_path, image: str, name: str, *args: str) -> Daemon:
    return Daemon(
        "vfio-user-blk", "--blk-file", image, "--size", "16M", *args, workdir=tmp_path, name=name
    )


async def io_loop(blk: BlkClient, rounds: int, done: list[int]) -> None:
    """What the guest does all along: write a sector, read it back."""
    for number in range(rounds):
        pattern = struct.pack("<I", number) * 128
        await blk.write(number, pattern)
        assert await blk.read(number, 512) == pattern
        done.append(number)


async def test_virtio_blk_moves_to_another_daemon_while_io_runs(tmp_path):
    image = str(tmp_path / "disk.img")
    ram = GuestRam([(0, 16 * MiB)])
    rounds = 60
    done: list[int] = []
    with (
        daemon(tmp_path, image, "source") as source,
        daemon(tmp_path, image, "destination") as destination,
    ):
        async with VfioUserClient.connect(source.socket_path, ram=ram) as a:
            await a.map_ram()
            driver = VirtioPciDriver(a, ram)
            (queue,) = await driver.start(queue_count=1)
            blk = BlkClient(ram, queue, arena=MiB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(io_loop, blk, rounds, done)
                while len(done) < 10:
                    await trio.sleep(0.01)
                await a.dma_logging_start(PAGE, [(0, 16 * MiB)])
                while len(done) < 20:
                    await trio.sleep(0.01)
                blob = await a.save_device()  # the device stops in there
                stopped_at = len(done)
                dirty = await a.dma_logging_report(0, 16 * MiB, PAGE)
                assert dirty, "the source wrote guest memory while logging"
                async with VfioUserClient.connect(destination.socket_path, ram=ram) as b:
                    await b.map_ram()
                    await b.load_device(blob, run=False)
                    await driver.move_to(b)  # interrupts set up before it runs, as QEMU does
                    await b.set_migration_state(S.RUNNING)
                    with trio.fail_after(30):
                        while len(done) < rounds:
                            await trio.sleep(0.01)
                    assert await b.migration_state() is S.RUNNING
                    driver.close()
        assert 20 <= stopped_at < rounds  # I/O ran on both sides
        assert "event=migration.loaded" in destination.log()
    with open(image, "rb") as f:
        for number in range(rounds):
            f.seek(512 * number)
            assert f.read(512) == struct.pack("<I", number) * 128
    ram.close()


@pytest.mark.parametrize("bad", ["corrupted", "another-device"])
async def test_a_refused_state_leaves_the_source_serving(tmp_path, bad):
    image = str(tmp_path / "disk.img")
    ram = GuestRam([(0, 16 * MiB)])
    with (
        daemon(tmp_path, image, "source") as source,
        Daemon(
            *(
                ("vfio-user-rng",)
                if bad == "another-device"
                else ("vfio-user-blk", "--blk-file", image)
            ),
            workdir=tmp_path,
            name="destination",
        ) as destination,
    ):
        async with VfioUserClient.connect(source.socket_path, ram=ram) as a:
            await a.map_ram()
            driver = VirtioPciDriver(a, ram)
            (queue,) = await driver.start(queue_count=1)
            blk = BlkClient(ram, queue, arena=MiB)
            await blk.write(0, b"s" * 512)
            blob = bytearray(await a.save_device())
            if bad == "corrupted":
                blob[len(blob) // 2] ^= 0x40
            async with VfioUserClient.connect(destination.socket_path, ram=ram) as b:
                await b.map_ram()
                with pytest.raises(VfioUserError) as refused:
                    await b.load_device(bytes(blob))
                assert refused.value.errno == errno.EINVAL
                assert await b.migration_state() is S.RESUMING  # nothing applied
            # The VMM gives up on the migration: the source runs on.
            await a.set_migration_state(S.RUNNING)
            await blk.write(1, b"t" * 512)
            assert await blk.read(0, 512) == b"s" * 512
            driver.close()
        reason = "checksum mismatch" if bad == "corrupted" else "cannot be loaded into"
        assert reason in destination.log()
    ram.close()
    os.remove(image)


@pytest.mark.parametrize("left_in", [S.STOP, S.STOP_COPY, S.RESUMING, S.PRE_COPY])
async def test_a_device_reset_returns_to_running(image, left_in):
    """A VMM that left the device mid-migration and went away: the next one
    resets it and finds it RUNNING and serving (the kernel uAPI's rule;
    a reset is also how a RESUMING session is aborted)."""
    ram = GuestRam([(0, 8 * MiB)])
    device = VirtioPciDevice(make_blk(image))
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        await VirtioPciDriver(client, ram).start(queue_count=1)
        await client.set_migration_state(left_in)
        if left_in is S.RESUMING:
            await client.migration_write(b"half of a state")
        elif left_in is S.STOP_COPY:
            await client.migration_read(16)
    async with vfio_served(device, ram=ram) as client:
        assert await client.migration_state() is left_in  # a reconnect alone keeps it
        await client.reset()
        assert await client.migration_state() is S.RUNNING
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        (queue,) = await driver.start(queue_count=1)
        blk = BlkClient(ram, queue, arena=MiB)
        with trio.fail_after(5):
            await blk.write(0, b"r" * 512)
            assert await blk.read(0, 512) == b"r" * 512
        await client.set_migration_state(S.STOP_COPY)  # and migrates again
        assert await client.migration_read(1 << 20)
        driver.close()
    ram.close()


async def test_dma_logging_of_huge_ranges_costs_what_the_device_writes():
    """With 1 MiB mapped, START for 1 TiB and 8 TiB ranges used to allocate
    their whole bitmaps (the daemon grew by 300 MB); the bits are now kept
    for what the device wrote, and a report too large for one reply is
    refused rather than built."""
    ram = GuestRam([(0, MiB)])
    device = ExampleDevice()
    async with vfio_served(device, ram=ram) as client:
        await client.map_ram()
        await client.config_write(0x04, 2, 0x6)
        tracemalloc.start()
        try:
            await client.dma_logging_start(PAGE, [(0, 1 << 40), (1 << 41, 8 << 40)])
            ram.write(0x1000, b"d" * 3 * PAGE)
            await client.region_write(0, 0x10, struct.pack("<Q", 0x1000))
            await client.region_write(0, 0x18, struct.pack("<II", 0x8000, 0))
            await client.region_write(0, 0x20, struct.pack("<I", 3 * PAGE))
            await client.region_write(0, 0x24, struct.pack("<I", 1))
            with pytest.raises(VfioUserError):  # a 32 MiB bitmap
                await client.dma_logging_report(0, 1 << 40, PAGE)
            assert await client.dma_logging_report(0, MiB, PAGE) == {8, 9, 10}
            assert await client.dma_logging_report(1 << 41, 1 << 30, 1 << 20) == set()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * MiB
        await client.dma_logging_stop()
    ram.close()


def test_a_dirty_log_past_its_memory_limit_reports_every_page(monkeypatch):
    """Saturated, the log errs on the safe side: all pages dirty (a migration
    copies more), never a page missed."""
    from vfiouserd.vfio_user.migration import DirtyBitmaps

    monkeypatch.setattr(DirtyBitmaps, "MAX_BITMAP_BYTES", 2 * DirtyBitmaps.CHUNK_BYTES)
    span = DirtyBitmaps.CHUNK_BYTES * 8 * PAGE  # the pages one chunk covers
    log = DirtyBitmaps(PAGE, [(0, 4 * span)])
    log.mark(0, PAGE)
    log.mark(span, PAGE)
    assert not log.saturated
    assert log.report(0, 64 * PAGE, PAGE) == b"\x01" + bytes(7)
    log.mark(2 * span, PAGE)  # a third chunk: past the limit
    assert log.saturated and not log.chunks
    assert log.report(0, 64 * PAGE, PAGE) == b"\xff" * 8
    assert log.report(0, 61 * PAGE, PAGE) == b"\xff" * 7 + b"\x1f"
    restored = DirtyBitmaps.from_document(log.to_document())
    assert restored.saturated
