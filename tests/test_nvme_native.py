"""The NVMe controller's native I/O loop (devices/nvme/fastpath.c) and
shadow doorbells, driven in process by the project's NVMe driver: which
commands it serves and which it leaves to Python (with the same results),
the doorbells it takes while it runs, what stops it, and state after it."""

from __future__ import annotations

import os

import pytest
import trio

import vfiouserd.devices.nvme.formats as nvme
from conftest import MiB, vfio_served
from vfiouserd import faults, state, stats
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.nvme import NvmeDriver
from vfiouserd.devices.nvme import NvmeController
from vfiouserd.devices.nvme.formats import AdminOpcode, Feature, Generic, Sct
from vfiouserd.trace import Filter, Subscription, tracer

IMAGE = 8 * MiB
BLOCKS = IMAGE // 512


@pytest.fixture
def images(tmp_path):
    paths = []
    for name, size in (("a.img", IMAGE), ("b.img", IMAGE // 2)):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        paths.append(str(path))
    return paths


@pytest.fixture
def ram():
    guest = GuestRam([(0, 16 * MiB)])
    guest.alloc(4096)
    yield guest
    guest.close()


def controller(images: list[str], read_only: bool = False) -> NvmeController:
    opened = [(os.open(p, os.O_RDWR), read_only and i == 1, p) for i, p in enumerate(images)]
    return NvmeController(opened)


async def started(client, ram, *, shadow: bool, queues: int = 2) -> NvmeDriver:
    await client.map_ram(with_fd=True)
    driver = NvmeDriver(client, ram)
    await driver.setup_pci()
    await driver.enable()
    if queues:
        await driver.create_io_queues(queues)
    if shadow:
        assert (await driver.doorbell_buffer_config()).status == 0
    return driver


def image_bytes(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


async def settle(device: NvmeController) -> None:
    """Until the queue task has handed the I/O queues to the native loop."""
    with trio.fail_after(5):
        while not device.native.running:
            await trio.sleep(0.001)


def native_requests(qid: int) -> int:
    return int(stats.of_queue(qid).snapshot()["native_requests"])


@pytest.mark.parametrize("shadow", [False, True], ids=["registers", "shadow"])
async def test_reads_and_writes_are_served_natively_with_their_data(images, ram, shadow):
    stats.clear()
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=shadow)
        await settle(device)
        interrupts_before = driver.interrupts(1)
        written = {}
        for i, (qid, size) in enumerate([(1, 4096), (2, 512), (1, 64 * 1024), (2, 256 * 1024)]):
            data = os.urandom(size)
            slba = 100 + 600 * i
            assert (await driver.write(qid, 1, slba, data)).status == 0
            written[slba] = data
        for i, (slba, data) in enumerate(written.items()):
            qid = 1 + i % 2
            done, back = await driver.read(qid, 1, slba, len(data))
            assert done.status == 0 and back == data
            assert image_bytes(images[0], slba * 512, len(data)) == data
        # A PRP1 in the middle of a page, a two-page transfer, namespace 2.
        done, back = await driver.read(1, 2, 7, 8192)
        assert done.status == 0 and back == image_bytes(images[1], 7 * 512, 8192)
        # Every one of them went through the native loop, with its interrupts.
        assert native_requests(1) + native_requests(2) == 9
        assert driver.interrupts(1) > interrupts_before
        health = device.nvm.health
        device.native.pause()
        assert health[nvme_io_reads()] >= 5
        if shadow:
            assert driver.doorbells_skipped > 0 or driver.doorbells_rung > 0
        driver.close()
    device.close()


def nvme_io_reads() -> int:
    from vfiouserd.devices.nvme.io import READS

    return READS


async def test_shadow_doorbells_spare_register_writes_while_the_loop_is_busy(images, ram):
    """Many commands in the SQ at once: the driver rings the register for
    the first only (the loop's EventIdx says so), the rest go through the
    shadow page, and every command completes once."""
    stats.clear()
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=True, queues=1)
        await settle(device)
        rung = driver.doorbells_rung
        cids = []
        for i in range(40):
            cmd, _ = driver_read_command(driver, i)
            cids.append(await driver.submit(1, cmd))
        for cid in cids:
            assert (await driver.wait(1, cid)).status == 0
        sq_rings = driver.doorbells_rung - rung
        assert driver.doorbells_skipped > 0
        assert sq_rings < 40 + 40  # SQ and CQ head doorbells: not one per command each
        assert native_requests(1) == 40
        driver.close()
    device.close()


def driver_read_command(driver: NvmeDriver, index: int):
    buffer, prp1, prp2 = driver.data_buffer(4096)
    cmd = nvme.command(nvme.IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw=(index * 8, 0, 7))
    return cmd, buffer


async def test_what_the_loop_leaves_to_python_gets_the_same_answers(images, ram):
    stats.clear()
    device = controller(images, read_only=True)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=True)
        await settle(device)
        generic = lambda sc: nvme.status(Sct.GENERIC, sc)  # noqa: E731
        # Past the end, a write-protected namespace, an unknown opcode, a PRP
        # outside memory, a flush, a write with FUA: Python answers each.
        done, _ = await driver.read(1, 1, BLOCKS - 1, 1024)
        assert done.status == generic(Generic.LBA_OUT_OF_RANGE)
        done = await driver.write(2, 2, 0, b"x" * 512)
        assert done.status == generic(Generic.NAMESPACE_WRITE_PROTECTED)
        done = await driver.call(1, nvme.command(0x7F, nsid=1))
        assert done.status == generic(Generic.INVALID_OPCODE)
        far = nvme.command(nvme.IoOpcode.READ, nsid=1, prp1=0x7000_0000, cdw=(0, 0, 0))
        assert (await driver.call(1, far)).status == generic(Generic.DATA_TRANSFER_ERROR)
        assert (await driver.flush(2, 1)).status == 0
        data = os.urandom(4096)
        buffer, prp1, prp2 = driver.data_buffer(4096)
        ram.write(buffer, data)
        fua = nvme.command(
            nvme.IoOpcode.WRITE, nsid=1, prp1=prp1, prp2=prp2, cdw=(40, 0, 7 | 1 << 30)
        )
        assert (await driver.call(2, fua)).status == 0
        assert image_bytes(images[0], 40 * 512, 4096) == data
        # And the loop carries on afterwards.
        await settle(device)
        before = native_requests(1)
        done, back = await driver.read(1, 1, 40, 4096)
        assert done.status == 0 and back == data
        assert native_requests(1) == before + 1
        # The errors were Python's: in the error log, in order.
        assert device.errors.count >= 4
        driver.close()
    device.close()


async def test_admin_commands_and_new_queues_while_the_loop_runs(images, ram):
    stats.clear()
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=False, queues=2)
        await settle(device)
        done = await driver.get_feature(Feature.NUMBER_OF_QUEUES)
        assert done.status == 0
        assert (await driver.delete_sq(2)).status == 0
        assert (await driver.delete_cq(2)).status == 0
        data = os.urandom(8192)
        assert (await driver.write(1, 1, 8, data)).status == 0
        assert (await driver.create_cq(2, 16)).status == 0
        assert (await driver.create_sq(2, 16)).status == 0
        assert (await driver.read(2, 1, 8, 8192))[1] == data
        assert native_requests(2) == 1 and native_requests(1) == 1
        # A controller reset, then the same again.
        await driver.enable()
        await driver.create_io_queues(1)
        await settle(device)
        assert (await driver.read(1, 1, 8, 8192))[1] == data
        driver.close()
    device.close()


async def test_tracing_and_fault_rules_take_the_queues_to_python_and_back(images, ram):
    stats.clear()
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=True, queues=1)
        await settle(device)
        assert stats.of_queue(1).python_because() is None
        events: list[dict] = []
        subscription = Subscription(events.append, Filter(frozenset({"request"})))
        tracer.subscribe(subscription)
        try:
            done, _ = await driver.read(1, 1, 0, 4096)
            assert done.status == 0
            assert stats.of_queue(1).python_because() == "traced"
            assert [(e["queue"], e["slba"]) for e in events] == [(1, 0)]
        finally:
            tracer.unsubscribe(subscription)
        faults.rules.allowed = faults.rules.sector_kinds = True
        try:
            rule = faults.rules.add({"kind": "ioerr", "queue": 1, "sectors": "0-8"})
            done, _ = await driver.read(1, 1, 0, 4096)
            assert done.status == nvme.status(Sct.MEDIA, nvme.Media.UNRECOVERED_READ_ERROR)
            faults.rules.remove(rule.id)
        finally:
            faults.rules.clear()
            faults.rules.allowed = faults.rules.sector_kinds = False
        before = native_requests(1)
        done, _ = await driver.read(1, 1, 0, 4096)
        assert done.status == 0
        await settle(device)
        done, _ = await driver.read(1, 1, 0, 4096)
        assert native_requests(1) > before
        driver.close()
    device.close()


async def test_state_saved_while_the_loop_runs_carries_the_queues_and_the_shadow_buffer(
    images, ram
):
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=True, queues=1)
        await settle(device)
        for i in range(5):
            assert (await driver.read(1, 1, i * 8, 4096))[0].status == 0
        saved = device.save_device_state()
        assert saved["doorbell_buffer"] == [
            {"shadow": driver.shadow[0], "events": driver.shadow[1]}  # type: ignore[index]
        ]
        sq = next(q for q in saved["submission_queues"] if q["qid"] == 1)
        assert sq["head"] == sq["tail"] == 5
        twin = controller(images)
        try:
            state.load(twin, state.save(device))
            assert twin.save_device_state() == device.save_device_state()
        finally:
            twin.close()
        driver.close()
    device.close()


async def test_doorbell_buffer_config_refuses_unaligned_or_unreachable_pages(images, ram):
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=False, queues=0)
        generic = lambda sc: nvme.status(Sct.GENERIC, sc)  # noqa: E731
        page = driver.alloc_pages()
        for prp1, prp2, expected in (
            (page + 8, page + 4096, Generic.INVALID_FIELD),
            (page, page + 12, Generic.INVALID_FIELD),
            (page, page, Generic.INVALID_FIELD),
            (page, 0x7000_0000, Generic.DATA_TRANSFER_ERROR),
        ):
            cmd = nvme.command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=prp1, prp2=prp2)
            assert (await driver.admin(cmd)).status == generic(expected)
        assert device.queues.buffer is None
        driver.close()
    device.close()


async def test_sgls_as_drivers_lay_them_out_are_served_natively(images, ram):
    """A single Data Block, and a Last Segment of Data Blocks (Linux's two
    layouts); a bit bucket or a chain of segments goes to Python, with the
    same data."""
    stats.clear()
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=True, queues=1)
        await settle(device)
        data = os.urandom(64 * 1024)
        assert (await driver.write_sgl(1, 1, 200, data, [])).status == 0  # one Data Block
        pieces = [4096 - 8, 512, 12 * 1024, 4]
        assert (await driver.write_sgl(1, 1, 400, data, pieces)).status == 0  # a Last Segment
        assert image_bytes(images[0], 200 * 512, len(data)) == data
        assert image_bytes(images[0], 400 * 512, len(data)) == data
        done, back = await driver.read_sgl(1, 1, 200, len(data), [8192, 8192])
        assert done.status == 0 and back == data
        assert native_requests(1) == 3
        assert device.statistics()["sgl_commands"] == 3
        # A chain of two segments: Python's, with the same result.
        done, back = await driver.read_sgl(1, 1, 400, len(data), [4096] * 15, per_segment=8)
        assert done.status == 0 and back == data
        assert native_requests(1) == 3
        await settle(device)
        assert device.statistics()["sgl_commands"] == 4
        driver.close()
    device.close()


async def test_no_fast_path_keeps_every_command_in_python(images, ram):
    stats.clear()
    device = controller(images)
    device.native.enabled = False
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, shadow=True, queues=1)
        for i in range(3):
            assert (await driver.read(1, 1, i * 8, 4096))[0].status == 0
        assert native_requests(1) == 0 and not device.native.running
        assert stats.of_queue(1).python_because() == "fast path off"
        driver.close()
    device.close()
