"""The NVMe benchmark's driver (bench/nvme.py, bench/nvme_driver.c) is not
lying: run briefly against a real ``vfiouserd vfio-user-nvme`` on an image
of known bytes, every command succeeds, every read brings the image's bytes
(checked in C after each command, and here in the slots' buffers against
the file), the daemon counts as many requests as the driver completed, and
the doorbell messages it counts are what its loop must have sent."""

from __future__ import annotations

import array
import sys
from pathlib import Path

import pytest
import trio
from daemon import Daemon

from conftest import ROOT, MiB
from vfiouserd.client.control import ControlClient
from vfiouserd.client.guest import GuestRam

sys.path.insert(0, str(ROOT / "bench"))
import nvme as bench_nvme  # bench/ is no package: its modules import each other by name
from common import Workload, request_args

IMAGE = 4 * MiB
SECONDS = 0.3
MARK = 0xABCD << 48  # nvme_driver.c's PATTERN_MARK


@pytest.fixture(scope="module")
def driver():
    return bench_nvme.load_driver()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """Each 8-byte word holds its byte offset, marked: the pattern the C loop checks."""
    path = tmp_path / "pattern.img"
    path.write_bytes(array.array("Q", (offset | MARK for offset in range(0, IMAGE, 8))).tobytes())
    return path


def requests_served(control: str) -> int:
    with ControlClient(control, timeout=10) as client:
        return sum(q["requests"] for q in client.execute("stats")["queues"])


async def drive(driver, sock: str, queues: int, depth: int, block_size: int, shadow: bool):
    """Run the C loops; returns (shadow doorbells were on, each queue's
    arguments, each queue's slots as (SLBA read last, the buffer's bytes),
    requests the daemon counted meanwhile)."""
    control = sock.removesuffix(".sock") + ".control.sock"
    ram = GuestRam([(0, 64 * MiB)])
    keep = []  # cffi buffers the loops write, alive until the end
    try:
        async with bench_nvme.attach(sock, ram, queues, shadow=shadow) as controller:
            runs = []
            for index in range(queues):
                args = bench_nvme.queue_args(driver, ram, controller, index)
                keep.append(
                    request_args(
                        driver,
                        args,
                        ram,
                        Workload("read", block_size, write=False, sequential=False),
                        depth=depth,
                        seconds=SECONDS,
                        seed=1 + index,
                        capacity_sectors=IMAGE // 512,
                    )
                )
                slot_lba = driver.ffi.new("uint64_t[]", [2**64 - 1] * depth)
                keep.append(slot_lba)
                args.slot_lba = slot_lba
                args.verify = 1
                runs.append(args)
            before = await trio.to_thread.run_sync(requests_served, control)
            async with trio.open_nursery() as nursery:
                statuses = []

                async def one(args):
                    statuses.append(await trio.to_thread.run_sync(driver.lib.run_nvme, args))

                for args in runs:
                    nursery.start_soon(one, args)
            served = await trio.to_thread.run_sync(requests_served, control) - before
            assert statuses == [0] * queues, statuses
            slots = [
                [
                    (
                        args.slot_lba[slot],
                        ram.read(args.slots_gpa + slot * args.slot_bytes + 4096, block_size),
                    )
                    for slot in range(depth)
                ]
                for args in runs
            ]
            return controller.shadow_pages is not None, runs, slots, served
    finally:
        ram.close()


@pytest.mark.parametrize("shadow", [False, True], ids=["mmio-doorbells", "shadow-doorbells"])
@pytest.mark.parametrize(
    ("queues", "depth", "block_size"),
    [(1, 1, 4096), (2, 32, 4096), (1, 4, 8192), (1, 8, 128 * 1024)],
    ids=["QD1-4KiB", "2xQD32-4KiB", "QD4-8KiB-PRP2", "QD8-128KiB-PRP-list"],
)
def test_reads_bring_the_image_bytes_and_no_command_fails(
    driver, image, tmp_path, queues, depth, block_size, shadow
):
    with Daemon("vfio-user-nvme", "--namespace", str(image), workdir=tmp_path) as daemon:
        used_shadow, runs, slots, served = trio.run(
            drive, driver, daemon.socket_path, queues, depth, block_size, shadow
        )
    if shadow and not used_shadow:
        pytest.skip("the controller does not offer shadow doorbells (OACS bit 8)")
    expected = image.read_bytes()
    completed = 0
    for args, queue_slots in zip(runs, slots, strict=True):
        assert args.completed > depth and args.errors == 0 and args.bad_data == 0
        assert args.interrupts > 0  # it waited on the MSI-X eventfd
        completed += args.completed
        for slba, data in queue_slots:
            assert slba * 512 + block_size <= IMAGE, "a slot never completed"
            assert data == expected[slba * 512 : slba * 512 + block_size], slba
        if not used_shadow and depth == 1:
            # One SQ tail doorbell to start, then per command a CQ head doorbell
            # and an SQ tail doorbell for the next (none after the last).
            assert args.doorbells == 2 * args.completed
    assert served == completed  # the daemon saw what the driver counts


def test_need_event_is_linux_test():
    """nvme_dbbuf_need_event: the new value has passed the controller's EventIdx."""
    lib = bench_nvme.load_driver().lib

    def wanted(event: int, new: int, old: int) -> bool:
        return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF

    values = [0, 1, 2, 5, 100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]
    for event in values:
        for new in values:
            for old in values:
                assert bool(lib.nvme_need_event(event, new, old)) == wanted(event, new, old)
    assert lib.nvme_need_event(4, 5, 4)  # just past the event index: ring
    assert not lib.nvme_need_event(9, 5, 4)  # the controller asked for later: do not
    assert lib.nvme_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
