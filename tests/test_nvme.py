"""The NVMe controller over vfio-user, driven by the project's NVMe driver
(vfiouserd/client/nvme.py) as Linux's nvme driver drives it, and by a
hostile one: every bad input gets the spec's status (or CSTS.CFS)."""

from __future__ import annotations

import os
import struct

import pytest
import trio

import vfiouserd.devices.nvme.formats as nvme
from conftest import MiB, vfio_served
from vfiouserd import faults, state, stats
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.nvme import NvmeDriver
from vfiouserd.devices.nvme import NvmeController
from vfiouserd.devices.nvme.errors import CAPACITY, ENTRY_SIZE, NOT_APPLICABLE, ErrorEntry
from vfiouserd.devices.nvme.formats import (
    AdminOpcode,
    Cns,
    Feature,
    Generic,
    IoOpcode,
    LogPage,
    Media,
    Reg,
    Sct,
    SglDescriptor,
    SglType,
    Specific,
)
from vfiouserd.state import StateError

IMAGE = 8 * MiB
BLOCKS = IMAGE // 512


def gen(sc: int) -> int:
    return nvme.status(Sct.GENERIC, sc)


def spec(sc: int) -> int:
    return nvme.status(Sct.COMMAND_SPECIFIC, sc)


@pytest.fixture
def images(tmp_path):
    paths = []
    for name, size in (("a.img", IMAGE), ("b.img", IMAGE // 2)):
        path = tmp_path / name
        path.write_bytes(b"")
        os.truncate(path, size)
        paths.append(str(path))
    return paths


def controller(images, read_only=False) -> NvmeController:
    opened = [(os.open(p, os.O_RDWR), read_only and i == 1, p) for i, p in enumerate(images)]
    return NvmeController(opened)


@pytest.fixture
def ram():
    guest = GuestRam([(0, 16 * MiB), (0x1_0000_0000, MiB)])
    guest.alloc(4096)  # no queue at address 0: the controller refuses one there
    yield guest
    guest.close()


async def started(client, ram, *, with_fd=True, io_queues=2) -> NvmeDriver:
    await client.map_ram(with_fd=with_fd)
    driver = NvmeDriver(client, ram)
    await driver.setup_pci()
    await driver.enable()
    if io_queues:
        await driver.create_io_queues(io_queues)
    return driver


def image_bytes(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@pytest.mark.parametrize("mode", ["fd", "messages"])
async def test_identify_io_discard_flush_two_namespaces(images, ram, mode):
    stats.clear()
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        assert await client.config_read(0x08, 4) >> 8 == 0x010802
        driver = await started(client, ram, with_fd=mode == "fd")
        cap = await driver.cap()
        assert cap & 0xFFFF == 1023 and cap >> 16 & 1 and cap >> 37 & 1
        assert await driver.read32(Reg.VS) == 0x00010400

        status, ident = await driver.identify(Cns.CONTROLLER)
        assert status == 0
        assert struct.unpack_from("<H", ident, 0)[0] == 0x1234
        assert ident[0x18:0x40].rstrip() == b"vfiouserd NVMe"
        assert ident[0x4D] == 6 and ident[0x200] == 0x66 and ident[0x201] == 0x44
        assert struct.unpack_from("<I", ident, 0x204)[0] == 2  # NN
        assert ident[0x20D] == 0x07 and struct.unpack_from("<H", ident, 0x208)[0] == 0x0C
        assert ident[0x300:].split(b"\0")[0].startswith(b"nqn.2014-08.org.nvmexpress:uuid:")

        status, ns = await driver.identify(Cns.NAMESPACE, nsid=1)
        assert status == 0 and struct.unpack_from("<QQ", ns) == (BLOCKS, BLOCKS)
        assert struct.unpack_from("<I", ns, 0x80)[0] == 9 << 16
        status, ns = await driver.identify(Cns.NAMESPACE, nsid=2)
        assert struct.unpack_from("<Q", ns)[0] == BLOCKS // 2
        status, active = await driver.identify(Cns.ACTIVE_NAMESPACES)
        assert struct.unpack_from("<3I", active) == (1, 2, 0)
        status, active = await driver.identify(Cns.ACTIVE_NAMESPACES, nsid=1)
        assert struct.unpack_from("<2I", active) == (2, 0)
        status, descriptors = await driver.identify(Cns.NS_DESCRIPTORS, nsid=1)
        assert status == 0 and descriptors[:2] == bytes((3, 16)) and any(descriptors[4:20])
        status, zeros = await driver.identify(Cns.CSI_CONTROLLER)
        assert status == 0 and zeros == bytes(4096)

        # Write 64 KiB (a PRP list), read it back, find it in the image.
        data = os.urandom(64 * 1024)
        assert (await driver.write(1, 1, 100, data)).status == 0
        done, back = await driver.read(2, 1, 100, len(data))
        assert done.status == 0 and back == data
        assert image_bytes(images[0], 100 * 512, len(data)) == data
        # One page, two pages, an unaligned first page.
        for size in (512, 4096, 8192, 12288):
            chunk = os.urandom(size)
            assert (await driver.write(1, 1, 2000, chunk)).status == 0
            assert (await driver.read(1, 1, 2000, size))[1] == chunk
        # The largest transfer MDTS allows (256 KiB: 63 list entries).
        big = os.urandom(256 * 1024)
        assert (await driver.write(1, 1, 4096, big)).status == 0
        assert (await driver.read(1, 1, 4096, len(big)))[1] == big

        # The second namespace is the second image.
        other = os.urandom(4096)
        assert (await driver.write(1, 2, 8, other)).status == 0
        assert image_bytes(images[1], 8 * 512, 4096) == other
        assert image_bytes(images[0], 8 * 512, 4096) == bytes(4096)

        assert (await driver.flush(1, 1)).status == 0
        assert (await driver.flush(1, nvme.BROADCAST_NSID)).status == 0
        # Deallocate two ranges (holes), zero another.
        assert (await driver.deallocate(1, 1, [(100, 8), (116, 16)])).status == 0
        assert image_bytes(images[0], 100 * 512, 8 * 512) == bytes(8 * 512)
        assert image_bytes(images[0], 108 * 512, 8 * 512) == data[4096:8192]
        assert image_bytes(images[0], 116 * 512, 16 * 512) == bytes(16 * 512)
        assert (await driver.write_zeroes(1, 1, 4096, 8)).status == 0
        assert (await driver.write_zeroes(1, 1, 4104, 8, deallocate=True)).status == 0
        assert (await driver.read(1, 1, 4096, 8192))[1] == bytes(8192)
        assert (await driver.read(1, 1, 4112, 4096))[1] == big[8192:12288]

        # Completions raised the CQ's own vector.
        assert driver.interrupts(1) > 0 and driver.interrupts(2) > 0
        figures = stats.collect(device.statistics())
        by_queue = {q["queue"]: q for q in figures["queues"]}
        assert by_queue[1]["requests"] > 10 and by_queue[1]["bytes"] > len(big)
        assert by_queue[0]["requests"] > 5
        if mode == "fd":
            assert client.dma_requests == 0
        else:
            assert client.dma_requests > 100
        driver.close()


async def test_features_logs_and_async_events(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=0)
        done = await driver.set_feature(Feature.NUMBER_OF_QUEUES, 200 | 3 << 16)
        assert done.status == 0 and done.dw0 == 63 | 3 << 16
        assert (await driver.get_feature(Feature.NUMBER_OF_QUEUES)).dw0 == 63 | 3 << 16
        assert (await driver.get_feature(Feature.VOLATILE_WRITE_CACHE)).dw0 == 1
        assert (await driver.set_feature(Feature.VOLATILE_WRITE_CACHE, 0)).status == 0
        assert (await driver.get_feature(Feature.VOLATILE_WRITE_CACHE)).dw0 == 0
        assert (await driver.get_feature(Feature.VOLATILE_WRITE_CACHE, select=1)).dw0 == 1
        assert (await driver.set_feature(Feature.INTERRUPT_COALESCING, 0x0A05)).status == 0
        assert (await driver.get_feature(Feature.INTERRUPT_COALESCING)).dw0 == 0x0A05
        assert (await driver.get_feature(Feature.TEMPERATURE_THRESHOLD)).dw0 == 0x157
        assert (await driver.set_feature(Feature.POWER_MANAGEMENT, 1)).status == gen(
            Generic.INVALID_FIELD
        )
        assert (await driver.set_feature(0x7E, 0)).status == gen(Generic.INVALID_FIELD)
        assert (await driver.get_feature(Feature.KEEP_ALIVE_TIMER)).status == gen(
            Generic.INVALID_FIELD
        )
        saved = await driver.admin(
            nvme.command(AdminOpcode.SET_FEATURES, cdw=(Feature.ARBITRATION | 1 << 31, 0))
        )
        assert saved.status == spec(Specific.FEATURE_NOT_SAVEABLE)

        for lid, size in ((LogPage.ERROR, 64), (LogPage.SMART, 512), (LogPage.FIRMWARE_SLOT, 512)):
            done, page = await driver.admin_data(
                nvme.command(
                    AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF, cdw=(lid | (size // 4 - 1) << 16,)
                ),
                size,
            )
            assert done.status == 0, lid
            if lid == LogPage.SMART:
                assert struct.unpack_from("<H", page, 1)[0] == 313
            if lid == LogPage.FIRMWARE_SLOT:
                assert page[0] == 1 and page[8:16].rstrip() == b"1.0"
        done, _ = await driver.admin_data(
            nvme.command(AdminOpcode.GET_LOG_PAGE, cdw=(0x42 | 127 << 16,))
        )
        assert done.status == spec(Specific.INVALID_LOG_PAGE)

        # Async events: four requests held, a fifth refused; a temperature
        # threshold below the current temperature completes one.
        cids = [
            await driver.submit(0, nvme.command(AdminOpcode.ASYNC_EVENT_REQUEST)) for _ in range(4)
        ]
        extra = await driver.admin(nvme.command(AdminOpcode.ASYNC_EVENT_REQUEST))
        assert extra.status == spec(Specific.ASYNC_EVENT_LIMIT_EXCEEDED)
        assert (await driver.admin(nvme.command(AdminOpcode.KEEP_ALIVE))).status == 0
        abort = await driver.admin(nvme.command(AdminOpcode.ABORT, cdw=(cids[0] << 16,)))
        assert abort.status == 0 and abort.dw0 & 1  # not aborted
        assert (await driver.set_feature(Feature.ASYNC_EVENT_CONFIG, 0xFF)).status == 0
        assert (await driver.set_feature(Feature.TEMPERATURE_THRESHOLD, 300)).status == 0
        event = await driver.wait(0, cids[0])
        assert event.status == 0 and event.dw0 == 1 | 1 << 8 | 2 << 16
        # An invalid doorbell (a queue that does not exist) is an error event.
        await driver.write32(nvme.doorbell_offset(9, False), 1)
        event = await driver.wait(0, cids[1])
        assert event.dw0 == 0 | 0 << 8 | 1 << 16
        driver.close()


async def test_queue_creation_errors(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=0)
        assert (await driver.set_feature(Feature.NUMBER_OF_QUEUES, 1 | 1 << 16)).status == 0
        base = driver.alloc_pages(1)
        cq = AdminOpcode.CREATE_IO_CQ
        cases = [
            ((0 | 15 << 16, 1 | 1 << 16 | 2), base, spec(Specific.INVALID_QUEUE_IDENTIFIER)),
            ((3 | 15 << 16, 1 | 3 << 16 | 2), base, spec(Specific.INVALID_QUEUE_IDENTIFIER)),
            ((1 | 0 << 16, 1 | 1 << 16 | 2), base, spec(Specific.INVALID_QUEUE_SIZE)),
            ((1 | 1024 << 16, 1 | 1 << 16 | 2), base, spec(Specific.INVALID_QUEUE_SIZE)),
            ((1 | 15 << 16, 1 | 99 << 16 | 2), base, spec(Specific.INVALID_INTERRUPT_VECTOR)),
            ((1 | 15 << 16, 0 | 1 << 16 | 2), base, gen(Generic.INVALID_FIELD)),
            ((1 | 15 << 16, 1 | 1 << 16 | 2), base + 8, gen(Generic.PRP_OFFSET_INVALID)),
        ]
        for cdw, prp1, expected in cases:
            done = await driver.admin(nvme.command(cq, prp1=prp1, cdw=cdw))
            assert done.status == expected, (cdw, nvme.status_name(done.status))
        # An SQ needs an existing CQ other than the admin one.
        sq = AdminOpcode.CREATE_IO_SQ
        for cqid in (0, 2):
            done = await driver.admin(
                nvme.command(sq, prp1=base, cdw=(1 | 15 << 16, cqid << 16 | 1))
            )
            assert done.status == spec(Specific.COMPLETION_QUEUE_INVALID)
        assert (await driver.create_cq(1, 16)).status == 0
        assert (await driver.create_cq(1, 16)).status == spec(Specific.INVALID_QUEUE_IDENTIFIER)
        assert (await driver.create_sq(1, 16)).status == 0
        # The grant cannot change while I/O queues exist.
        done = await driver.set_feature(Feature.NUMBER_OF_QUEUES, 0)
        assert done.status == gen(Generic.COMMAND_SEQUENCE_ERROR)
        assert (await driver.delete_cq(1)).status == spec(Specific.INVALID_QUEUE_DELETION)
        assert (await driver.delete_sq(2)).status == spec(Specific.INVALID_QUEUE_IDENTIFIER)
        assert (await driver.delete_sq(0)).status == spec(Specific.INVALID_QUEUE_IDENTIFIER)
        assert (await driver.delete_sq(1)).status == 0
        assert (await driver.delete_cq(1)).status == 0
        assert (await driver.delete_cq(1)).status == spec(Specific.INVALID_QUEUE_IDENTIFIER)
        # Unknown opcodes, CNS, reserved flags, SGLs.
        for opcode in (0x80, 0x3F, 0x10):
            done = await driver.admin(nvme.command(opcode))
            assert done.status == gen(Generic.INVALID_OPCODE), opcode
        assert (await driver.identify(0x13))[0] == gen(Generic.INVALID_FIELD)
        assert (await driver.identify(Cns.NAMESPACE, nsid=3))[0] == gen(Generic.INVALID_NAMESPACE)
        assert (await driver.identify(Cns.NAMESPACE, nsid=0))[0] == gen(Generic.INVALID_NAMESPACE)
        for flags in (0x01, 0x40, 0x04):
            done = await driver.admin(nvme.command(AdminOpcode.KEEP_ALIVE, flags=flags))
            assert done.status == gen(Generic.INVALID_FIELD)
        driver.close()


async def test_io_errors(images, ram):
    faults.rules.clear()
    async with vfio_served(controller(images, read_only=True), ram=ram) as client:
        driver = await started(client, ram, io_queues=1)
        done = await driver.write(1, 1, BLOCKS - 1, bytes(1024))
        assert done.status == gen(Generic.LBA_OUT_OF_RANGE)
        assert (await driver.read(1, 1, 1 << 40, 512))[0].status == gen(Generic.LBA_OUT_OF_RANGE)
        for nsid in (0, 3, 0xFFFFFFFE):
            assert (await driver.read(1, nsid, 0, 512))[0].status == gen(Generic.INVALID_NAMESPACE)
        done = await driver.call(1, nvme.command(0x7F, nsid=1))
        assert done.status == gen(Generic.INVALID_OPCODE)
        done = await driver.call(1, nvme.command(IoOpcode.WRITE_UNCORRECTABLE, nsid=1))
        assert done.status == gen(Generic.INVALID_OPCODE)
        # More than MDTS (256 KiB).
        done, _ = await driver.read(1, 1, 0, 512 * 1024)
        assert done.status == gen(Generic.INVALID_FIELD)
        # The second namespace is write protected.
        assert (await driver.write(1, 2, 0, bytes(512))).status == gen(
            Generic.NAMESPACE_WRITE_PROTECTED
        )
        assert (await driver.write_zeroes(1, 2, 0, 8)).status == gen(
            Generic.NAMESPACE_WRITE_PROTECTED
        )
        assert (await driver.deallocate(1, 1, [(BLOCKS - 4, 8)])).status == gen(
            Generic.LBA_OUT_OF_RANGE
        )

        def read_cmd(prp1, prp2, blocks=8):
            return nvme.command(IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw=(0, 0, blocks - 1))

        page = driver.alloc_pages(1)
        # PRP1 not dword aligned, PRP2 with an offset, entries outside memory.
        assert (await driver.call(1, read_cmd(page + 2, 0))).status == gen(Generic.INVALID_FIELD)
        done = await driver.call(1, read_cmd(page, page + 512, 16))
        assert done.status == gen(Generic.PRP_OFFSET_INVALID)
        done = await driver.call(1, read_cmd(0x9000_0000, 0))
        assert done.status == gen(Generic.DATA_TRANSFER_ERROR)
        listed = driver.prp_list([0x9000_0000, 0x9000_1000])
        done = await driver.call(1, read_cmd(page, listed, 24))
        assert done.status == gen(Generic.DATA_TRANSFER_ERROR)
        done = await driver.call(1, read_cmd(page, 0x9000_0000, 24))  # the list itself
        assert done.status == gen(Generic.DATA_TRANSFER_ERROR)
        # A list whose last entry points back at itself: it loops.
        loop = driver.alloc_pages(1)
        ram.write(loop, struct.pack("<511Q", *[page] * 511) + struct.pack("<Q", loop))
        done = await driver.call(1, read_cmd(page, loop, 512))  # 256 KiB: needs 63 entries
        assert done.status == 0  # 63 entries fit: the pointer slot is never read
        ram.write(loop, struct.pack("<Q", loop) * 512)
        assert (await driver.call(1, read_cmd(page, loop + 8 * 500, 512))).status == gen(
            Generic.DATA_TRANSFER_ERROR
        )
        # The controller carries on.
        assert (await driver.read(1, 1, 0, 4096))[0].status == 0
        assert await driver.csts() == nvme.CSTS_RDY
        driver.close()


# -- SGLs --------------------------------------------------------------------------------------


def data(address: int, length: int, subtype: int = 0) -> SglDescriptor:
    return SglDescriptor(address, length, SglType.DATA_BLOCK, subtype)


def bucket(length: int) -> SglDescriptor:
    return SglDescriptor(0, length, SglType.BIT_BUCKET)


def segment(ram, address: int, entries: list[SglDescriptor], last: bool = True) -> SglDescriptor:
    """``entries`` written at ``address``: the descriptor of that segment."""
    ram.write(address, b"".join(e.encode() for e in entries))
    kind = SglType.LAST_SEGMENT if last else SglType.SEGMENT
    return SglDescriptor(address, len(entries) * 16, kind)


async def test_sgl_data_blocks_segments_and_bit_buckets(images, ram):
    device = controller(images)
    async with vfio_served(device, ram=ram) as client:
        driver = await started(client, ram, io_queues=1)
        status, ident = await driver.identify(Cns.CONTROLLER)
        sgls = struct.unpack_from("<I", ident, 0x218)[0]
        wanted = nvme.SGLS_DWORD_GRANULAR | nvme.SGLS_BIT_BUCKET | nvme.SGLS_LONGER_THAN_DATA
        assert status == 0 and sgls == wanted

        # One Data Block in the command (Linux's one contiguous buffer).
        payload = os.urandom(128 * 1024)
        assert (await driver.write_sgl(1, 1, 256, payload, [])).status == 0
        assert image_bytes(images[0], 256 * 512, len(payload)) == payload
        done, back = await driver.read_sgl(1, 1, 256, len(payload), [])
        assert done.status == 0 and back == payload
        # Pieces of odd lengths (dword multiples) in one Last Segment; and
        # back through PRPs.
        chunk = os.urandom(16 * 1024)
        pieces = [4, 508, 1020, 12, 4096, 2052, 8]
        assert (await driver.write_sgl(1, 1, 1000, chunk, pieces)).status == 0
        assert image_bytes(images[0], 1000 * 512, len(chunk)) == chunk
        assert (await driver.read(1, 1, 1000, len(chunk)))[1] == chunk
        done, back = await driver.read_sgl(1, 1, 1000, len(chunk), pieces[::-1])
        assert done.status == 0 and back == chunk
        # Segments chained: three descriptors each (two pieces and the
        # next segment's descriptor), 20 pieces; then Segment descriptors
        # only, the last segment ending the list without a pointer (as
        # Linux's page of exactly 256 descriptors does).
        pieces = [4 * k for k in range(1, 20)]
        for last_segment in (True, False):
            chunk = os.urandom(8192)
            layout = {"per_segment": 3, "last_segment": last_segment}
            assert (await driver.write_sgl(1, 1, 2000, chunk, pieces, **layout)).status == 0
            assert image_bytes(images[0], 2000 * 512, len(chunk)) == chunk
            done, back = await driver.read_sgl(1, 1, 2000, len(chunk), pieces[::-1], **layout)
            assert done.status == 0 and back == chunk
        # MDTS in 4 KiB pages: 64 descriptors in one Last Segment.
        big = os.urandom(256 * 1024)
        assert (await driver.write_sgl(1, 1, 4096, big, [4096] * 64)).status == 0
        done, back = await driver.read_sgl(1, 1, 4096, len(big), [4096] * 64)
        assert done.status == 0 and back == big

        # NULL descriptors (zero-length Data Blocks, anywhere) between pieces.
        blocks = driver.data_blocks(chunk[:1024], [512])
        null = data(0x9000_0000, 0)
        sgl1 = driver.sgl([null, blocks[0], null, null, blocks[1], null])
        assert (await driver.rw_sgl(1, IoOpcode.WRITE, 1, 3000, 2, sgl1)).status == 0
        assert image_bytes(images[0], 3000 * 512, 1024) == chunk[:1024]

        # Longer than the data: what the data needs is used, the rest not
        # read (a descriptor after it points nowhere).
        buffer = driver.alloc_pages(2)
        ram.write(buffer, b"\xaa" * 8192)
        sgl1 = driver.sgl([data(buffer, 8192), data(0x9000_0000, 4096)])
        assert (await driver.rw_sgl(1, IoOpcode.READ, 1, 1000, 8, sgl1)).status == 0
        assert ram.read(buffer, 8192) == image_bytes(images[0], 1000 * 512, 4096) + b"\xaa" * 4096

        # Bit buckets: a read discards what they cover; in a write they do nothing.
        pieces = driver.data_blocks(2048, [512, 1024])
        sgl1 = driver.sgl([pieces[0], bucket(2048), pieces[1], bucket(0), pieces[2]])
        assert (await driver.rw_sgl(1, IoOpcode.READ, 1, 1000, 8, sgl1)).status == 0
        on_disk = image_bytes(images[0], 1000 * 512, 4096)
        assert driver.gather(pieces) == on_disk[:512] + on_disk[2560:]
        sgl1 = bucket(512)  # all of it
        assert (await driver.rw_sgl(1, IoOpcode.READ, 1, 1000, 1, sgl1)).status == 0
        chunk = os.urandom(1024)
        pieces = driver.data_blocks(chunk, [512])
        sgl1 = driver.sgl([pieces[0], bucket(4096), pieces[1]])
        assert (await driver.rw_sgl(1, IoOpcode.WRITE, 1, 3100, 2, sgl1)).status == 0
        assert image_bytes(images[0], 3100 * 512, 1024) == chunk

        # Dataset Management's ranges through an SGL.
        assert (await driver.write(1, 1, 5000, os.urandom(8192))).status == 0
        ranges = driver.data_blocks(nvme.DSM_RANGE.pack(0, 16, 5000), [8])
        prp1, prp2 = driver.sgl(ranges).sgl1()
        cmd = nvme.command(
            IoOpcode.DATASET_MANAGEMENT,
            nsid=1,
            prp1=prp1,
            prp2=prp2,
            flags=nvme.PSDT_SGL << 6,
            cdw=(0, nvme.DSM_ATTR_DEALLOCATE),
        )
        assert (await driver.call(1, cmd)).status == 0
        assert image_bytes(images[0], 5000 * 512, 8192) == bytes(8192)

        # Each of the 16 SGL commands counted; the PRP ones not.
        assert device.statistics()["sgl_commands"] == 16
        driver.close()


async def test_sgl_errors(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=1)
        page, other = driver.alloc_pages(1), driver.alloc_pages(1)
        buffer = driver.alloc_pages(2)
        segments = [driver.alloc_pages(1) for _ in range(8)]
        far = (1 << 64) - 2048
        limit = 1024  # prp.MAX_SGL_DESCRIPTORS

        cases: list[tuple[str, SglDescriptor, int]] = [
            # The SGL describes less than the transfer.
            ("short", data(buffer, 2048), Generic.DATA_SGL_LENGTH_INVALID),
            (
                "short segment",
                segment(ram, segments[0], [data(buffer, 1024), data(buffer + 1024, 1024)]),
                Generic.DATA_SGL_LENGTH_INVALID,
            ),
            (
                "a segment without a pointer ends the list",
                segment(ram, segments[1], [data(buffer, 2048)], last=False),
                Generic.DATA_SGL_LENGTH_INVALID,
            ),
            ("past 2**64", data(far & ~3, 4096), Generic.DATA_SGL_LENGTH_INVALID),
            (
                "segment past 2**64",
                SglDescriptor((1 << 64) - 16, 32, SglType.LAST_SEGMENT),
                Generic.DATA_SGL_LENGTH_INVALID,
            ),
            # Types and sub types not offered (keyed, transport, reserved,
            # vendor; offsets, transport specific).
            *(
                (
                    f"type {kind}",
                    SglDescriptor(buffer, 4096, kind),
                    Generic.SGL_DESCRIPTOR_TYPE_INVALID,
                )
                for kind in (4, 5, 6, 0xE, 0xF)
            ),
            ("offset", data(buffer, 4096, subtype=1), Generic.SGL_DESCRIPTOR_TYPE_INVALID),
            (
                "transport specific",
                data(buffer, 4096, subtype=0xA),
                Generic.SGL_DESCRIPTOR_TYPE_INVALID,
            ),
            (
                "bit bucket sub type",
                SglDescriptor(0, 4096, SglType.BIT_BUCKET, 1),
                Generic.SGL_DESCRIPTOR_TYPE_INVALID,
            ),
            (
                "segment sub type",
                SglDescriptor(segments[0], 32, SglType.LAST_SEGMENT, 1),
                Generic.SGL_DESCRIPTOR_TYPE_INVALID,
            ),
            (
                "keyed in a segment",
                segment(ram, segments[2], [data(buffer, 512), SglDescriptor(buffer, 3584, 4)]),
                Generic.SGL_DESCRIPTOR_TYPE_INVALID,
            ),
            # Dword granularity.
            ("address", data(buffer + 2, 4096), Generic.SGL_DATA_BLOCK_GRANULARITY_INVALID),
            (
                "length",
                segment(ram, segments[3], [data(buffer, 4094), data(buffer + 4096, 2)]),
                Generic.SGL_DATA_BLOCK_GRANULARITY_INVALID,
            ),
            # A segment descriptor before the end of its segment.
            (
                "pointer not last",
                segment(
                    ram,
                    segments[4],
                    [
                        data(buffer, 512),
                        SglDescriptor(page, 16, SglType.LAST_SEGMENT),
                        data(buffer, 3584),
                    ],
                ),
                Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
            ),
            # A last segment with a pointer; a pointer of length 0, not a
            # multiple of 16, not qword aligned.
            (
                "pointer in the last segment",
                segment(
                    ram,
                    segments[5],
                    [data(buffer, 512), segment(ram, other, [data(buffer + 512, 3584)])],
                ),
                Generic.INVALID_SGL_SEGMENT_DESCRIPTOR,
            ),
            (
                "length 0",
                SglDescriptor(other, 0, SglType.LAST_SEGMENT),
                Generic.INVALID_SGL_SEGMENT_DESCRIPTOR,
            ),
            (
                "length 24",
                SglDescriptor(other, 24, SglType.SEGMENT),
                Generic.INVALID_SGL_SEGMENT_DESCRIPTOR,
            ),
            (
                "unaligned segment",
                SglDescriptor(other + 4, 16, SglType.LAST_SEGMENT),
                Generic.INVALID_SGL_SEGMENT_DESCRIPTOR,
            ),
            # Chains that loop: to itself; A, B, A.
            (
                "self",
                segment(
                    ram, page, [data(0, 0), SglDescriptor(page, 32, SglType.SEGMENT)], last=False
                ),
                Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
            ),
            (
                "a, b, a",
                segment(
                    ram,
                    segments[6],
                    [
                        data(buffer, 512),
                        segment(
                            ram,
                            segments[7],
                            [data(buffer, 512), SglDescriptor(segments[6], 32, SglType.SEGMENT)],
                            last=False,
                        ),
                    ],
                    last=False,
                ),
                Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
            ),
            # More descriptors than the controller reads (NULL ones).
            (
                "too many",
                driver.sgl([data(0, 0)] * limit + [data(buffer, 4096)]),
                Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
            ),
            # Out of guest memory: data, a segment, a segment across its end.
            ("data nowhere", data(0x9000_0000, 4096), Generic.DATA_TRANSFER_ERROR),
            (
                "segment nowhere",
                SglDescriptor(0x9000_0000, 64, SglType.LAST_SEGMENT),
                Generic.DATA_TRANSFER_ERROR,
            ),
            (
                "segment across the end",
                SglDescriptor(16 * MiB - 16, 32, SglType.LAST_SEGMENT),
                Generic.DATA_TRANSFER_ERROR,
            ),
            ("data across the end", data(16 * MiB - 2048, 4096), Generic.DATA_TRANSFER_ERROR),
        ]
        ram.write(16 * MiB - 16, data(buffer, 4096).encode())
        for name, sgl1, expected in cases:
            for opcode in (IoOpcode.READ, IoOpcode.WRITE):
                done = await driver.rw_sgl(1, opcode, 1, 64, 8, sgl1)
                assert done.status == gen(expected), (name, opcode, nvme.status_name(done.status))
        assert image_bytes(images[0], 64 * 512, 4096) == bytes(4096)  # no write got through

        # Within the bound, the same NULL descriptors are fine.
        sgl1 = driver.sgl([data(0, 0)] * (limit - 10) + [data(buffer, 4096)])
        assert (await driver.rw_sgl(1, IoOpcode.READ, 1, 64, 8, sgl1)).status == 0
        # In a write a bit bucket counts for nothing: too short.
        sgl1 = driver.sgl([data(buffer, 2048), bucket(2048)])
        done = await driver.rw_sgl(1, IoOpcode.WRITE, 1, 64, 8, sgl1)
        assert done.status == gen(Generic.DATA_SGL_LENGTH_INVALID)
        assert (await driver.rw_sgl(1, IoOpcode.READ, 1, 64, 8, sgl1)).status == 0

        # PSDT 10b (MPTR an SGL: not offered) and 11b (reserved) on I/O, any
        # PSDT on an admin command: Invalid Field.
        prp1, prp2 = data(buffer, 4096).sgl1()
        for flags in (0x80, 0xC0):
            cmd = nvme.command(
                IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, flags=flags, cdw=(0, 0, 7)
            )
            assert (await driver.call(1, cmd)).status == gen(Generic.INVALID_FIELD)
        cmd = nvme.command(
            AdminOpcode.IDENTIFY, prp1=prp1, prp2=prp2, flags=0x40, cdw=(Cns.CONTROLLER,)
        )
        assert (await driver.admin(cmd)).status == gen(Generic.INVALID_FIELD)

        # The controller carries on.
        assert (await driver.read(1, 1, 0, 4096))[0].status == 0
        assert await driver.csts() == nvme.CSTS_RDY
        driver.close()


async def test_injected_faults(images, ram):
    faults.rules.allowed = faults.rules.sector_kinds = True
    try:
        async with vfio_served(controller(images), ram=ram) as client:
            driver = await started(client, ram, io_queues=1)
            data = os.urandom(8192)
            assert (await driver.write(1, 1, 64, data)).status == 0
            faults.rules.add({"kind": "ioerr", "sectors": "70-71", "type": "read"})
            done, _ = await driver.read(1, 1, 64, 8192)
            assert done.status == nvme.status(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR)
            assert (await driver.read(1, 1, 0, 4096))[0].status == 0
            faults.rules.clear()
            faults.rules.add({"kind": "corrupt", "sectors": "65-66"})
            done, back = await driver.read(1, 1, 64, 8192)
            assert done.status == 0 and back[:512] == data[:512]
            assert back[512:1024] == bytes(b ^ 0xFF for b in data[512:1024])
            assert back[1024:] == data[1024:]
            driver.close()
    finally:
        faults.rules.clear()
        faults.rules.allowed = faults.rules.sector_kinds = False


async def test_hostile_doorbells_and_deleted_queues(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=2)
        # Doorbells of queues that do not exist, beyond the size, between
        # two doorbells, of a narrow width: ignored.
        for offset, value in (
            (nvme.doorbell_offset(5, False), 1),
            (nvme.doorbell_offset(63, True), 0),
            (nvme.doorbell_offset(1, False), 64),
            (nvme.doorbell_offset(1, True), 5),  # a head past what was posted
            (0x1002, 1),
            (0x3FFC, 1),
        ):
            await driver.write32(offset, value, posted=True)
        await client.region_write(0, 0x1008, b"\x01")
        assert await driver.csts() == nvme.CSTS_RDY
        assert (await driver.read(1, 1, 0, 512))[0].status == 0
        # A command on a deleted queue: never taken, never completed.
        assert (await driver.delete_sq(2)).status == 0
        queue = driver.queues[2]
        await driver.submit(2, nvme.command(IoOpcode.READ, nsid=1, prp1=queue.cq_base))
        assert await driver.nothing_completes(2)
        assert (await driver.delete_cq(2)).status == 0
        assert (await driver.read(1, 1, 0, 512))[0].status == 0
        driver.close()


async def test_queue_memory_out_of_reach_is_fatal_until_reset(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=0)
        # A CQ outside guest memory: the completion cannot be posted.
        assert (await driver.create_cq(1, 16, base=0x8000_0000)).status == 0
        assert (await driver.create_sq(1, 16)).status == 0
        await driver.submit(1, nvme.command(IoOpcode.FLUSH, nsid=1))
        await driver.wait_csts(nvme.CSTS_CFS, nvme.CSTS_CFS)
        # A controller reset brings it back.
        await driver.enable()
        await driver.create_io_queues(1)
        assert (await driver.read(1, 1, 0, 512))[0].status == 0
        # So do bad admin queue registers at enable: CFS, RDY stays 0.
        await driver.disable()
        await driver.write32(Reg.AQA, 0)
        await driver.write32(Reg.CC, 0x00460001)
        await driver.wait_csts(nvme.CSTS_CFS | nvme.CSTS_RDY, nvme.CSTS_CFS)
        await driver.enable()
        assert (await driver.identify(Cns.CONTROLLER))[0] == 0
        driver.close()


async def test_full_completion_queue_waits_for_the_head_doorbell(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=0)
        assert (await driver.create_cq(1, 4)).status == 0
        assert (await driver.create_sq(1, 16)).status == 0
        queue = driver.queues[1]
        cids = [await driver.submit(1, nvme.command(IoOpcode.FLUSH, nsid=1)) for _ in range(8)]
        await trio.sleep(0.2)
        # Three entries fit in a CQ of four; the rest wait for the driver.
        posted = driver._collect(queue)
        assert [c.cid for c in posted] == cids[:3]
        for entry in posted:
            queue.done[entry.cid] = entry
        await driver.write32(nvme.doorbell_offset(1, True), queue.cq_head)
        for cid in cids:
            assert (await driver.wait(1, cid)).status == 0
        driver.close()


async def test_reset_shutdown_and_flr(images, ram):
    async with vfio_served(controller(images), ram=ram) as client:
        driver = await started(client, ram, io_queues=1)
        data = os.urandom(4096)
        assert (await driver.write(1, 1, 0, data)).status == 0
        await driver.shutdown()
        assert image_bytes(images[0], 0, 4096) == data
        # Reset: the I/O queues are gone; enable again.
        await driver.enable()
        await driver.write32(nvme.doorbell_offset(1, False), 1)
        assert await driver.csts() == nvme.CSTS_RDY
        await driver.create_io_queues(1)
        assert (await driver.read(1, 1, 0, 4096))[1] == data
        # FLR through the PCIe capability: power-on values.
        express = dict(await client.capabilities())[0x10]
        await client.config_write(express + 8, 2, 0x8000)
        assert await driver.read32(Reg.CC) == 0 and await driver.read32(Reg.AQA) == 0
        assert await driver.csts() == 0
        await driver.setup_pci()
        await driver.enable()
        await driver.create_io_queues(1)
        assert (await driver.read(1, 1, 0, 4096))[1] == data
        # The VMM's reset, too.
        await client.reset()
        assert await driver.read32(Reg.CC) == 0
        driver.close()


async def test_state_round_trip(images, ram):
    first = controller(images)
    async with vfio_served(first, ram=ram) as client:
        driver = await started(client, ram, io_queues=2)
        data = os.urandom(8192)
        assert (await driver.write(1, 1, 10, data)).status == 0
        aer = await driver.submit(0, nvme.command(AdminOpcode.ASYNC_EVENT_REQUEST))
        assert (await driver.set_feature(Feature.VOLATILE_WRITE_CACHE, 0)).status == 0
        assert (await driver.set_feature(Feature.ASYNC_EVENT_CONFIG, 2)).status == 0
        await trio.sleep(0.05)
        blob = state.save(first)
        driver.close()
    # Another device on the same images takes the state and carries on.
    second = controller(images)
    state.load(second, blob)
    async with vfio_served(second, ram=ram) as client:
        await client.map_ram()
        driver.client = client
        await driver.setup_pci()
        assert await driver.csts() == nvme.CSTS_RDY
        assert (await driver.read(2, 1, 10, 8192))[1] == data
        assert (await driver.get_feature(Feature.VOLATILE_WRITE_CACHE)).dw0 == 0
        assert (await driver.set_feature(Feature.TEMPERATURE_THRESHOLD, 300)).status == 0
        event = await driver.wait(0, aer)  # the AER held before the save
        assert event.dw0 & 7 == 1
        driver.close()
    second.close()
    # A device whose namespaces differ refuses it, unchanged.
    bigger = images[:1]
    third = controller(bigger)
    with pytest.raises(StateError, match="namespaces"):
        state.load(third, blob)
    assert third.cc == 0
    third.close()
    # A corrupt queue record is refused too.
    values = first.save_device_state()
    values["submission_queues"][1]["tail"] = 70000
    with pytest.raises(StateError):
        first.check_device_state(values)
    first.close()


def test_options(images, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    NvmeController.add_arguments(parser)
    args = parser.parse_args(["--namespace", images[0], "--namespace", f"{images[1]},ro"])
    device = NvmeController.from_args(args)
    assert [n.read_only for n in device.namespaces.values()] == [False, True]
    assert device.namespaces[2].blocks == BLOCKS // 2
    device.close()
    with pytest.raises(ValueError, match="FILE or FILE,ro"):
        NvmeController.from_args(parser.parse_args(["--namespace", f"{images[0]},rw"]))
    args = parser.parse_args(["--namespace", str(tmp_path / "new.img"), "--size", "1M"])
    device = NvmeController.from_args(args)
    assert device.namespaces[1].blocks == 2048
    device.close()


async def test_requests_are_traced(images, ram):
    from vfiouserd.trace import Filter, Subscription, tracer

    seen: list[dict] = []
    subscription = Subscription(seen.append, Filter(frozenset({"request"})))
    tracer.subscribe(subscription)
    try:
        async with vfio_served(controller(images), ram=ram) as client:
            driver = await started(client, ram, io_queues=1)
            assert (await driver.write(1, 2, 24, bytes(4096))).status == 0
            assert (await driver.read(1, 1, BLOCKS, 512))[0].status != 0
            driver.close()
    finally:
        tracer.unsubscribe(subscription)
    write, bad = seen[-2], seen[-1]
    assert write["queue"] == 1 and write["opcode"] == "write" and write["nsid"] == 2
    assert (write["slba"], write["nlb"], write["status"]) == (24, 8, "success")
    assert bad["status"] == "lba_out_of_range" and bad["latency_ns"] > 0
    assert any(e["queue"] == 0 and e["opcode"] == "create-io-sq" for e in seen)


# -- the Error Information log ---------------------------------------------------------------


async def error_log(driver: NvmeDriver, size: int = CAPACITY * ENTRY_SIZE, offset: int = 0):
    done, page = await driver.log_page(LogPage.ERROR, size, offset=offset)
    assert done.status == 0
    return [ErrorEntry.decode(page, at) for at in range(0, size - size % ENTRY_SIZE, ENTRY_SIZE)]


async def error_count_in_smart(driver: NvmeDriver) -> int:
    done, page = await driver.log_page(LogPage.SMART, 512)
    assert done.status == 0
    return int.from_bytes(page[0xB0:0xC0], "little")


async def test_error_log_records_failed_commands_newest_first(images, ram):
    faults.rules.allowed = faults.rules.sector_kinds = True
    try:
        async with vfio_served(controller(images), ram=ram) as client:
            driver = await started(client, ram, io_queues=1)
            assert (await driver.identify(Cns.CONTROLLER))[1][0x106] == CAPACITY - 1  # ELPE
            assert await error_log(driver) == [ErrorEntry(0, 0, 0, 0, False, 0, 0, 0)] * CAPACITY
            assert await error_count_in_smart(driver) == 0

            out_of_range, _ = await driver.read(1, 1, BLOCKS - 1, 1024)
            bad_opcode = await driver.call(1, nvme.command(0x7F, nsid=2))
            no_namespace, _ = await driver.admin_data(
                nvme.command(AdminOpcode.IDENTIFY, nsid=3, cdw=(Cns.NAMESPACE,))
            )
            reserved_flag = await driver.admin(nvme.command(AdminOpcode.KEEP_ALIVE, flags=0x04))
            faults.rules.add({"kind": "ioerr", "sectors": "70-71", "type": "read"})
            media, _ = await driver.read(1, 1, 64, 8192)
            faults.rules.clear()
            unreachable = await driver.call(
                1, nvme.command(IoOpcode.READ, nsid=1, prp1=0x9000_0000, cdw=(8, 0, 0))
            )
            assert (await driver.read(1, 1, 0, 512))[0].status == 0  # successes: no entry

            unrecovered = nvme.status(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR)
            expected = [  # (completion, status, location, LBA, NSID), newest first
                (unreachable, gen(Generic.DATA_TRANSFER_ERROR), NOT_APPLICABLE, 0, 1),
                (media, unrecovered, NOT_APPLICABLE, 64, 1),
                (reserved_flag, gen(Generic.INVALID_FIELD), 1 | 2 << 8, 0, 0),  # byte 1, bit 2
                (no_namespace, gen(Generic.INVALID_NAMESPACE), 4, 0, 3),
                (bad_opcode, gen(Generic.INVALID_OPCODE), 0, 0, 2),
                (out_of_range, gen(Generic.LBA_OUT_OF_RANGE), 40, BLOCKS - 1, 1),  # at SLBA
            ]
            entries = await error_log(driver)
            assert entries[len(expected) :] == [ErrorEntry(0, 0, 0, 0, False, 0, 0, 0)] * (
                CAPACITY - len(expected)
            )
            for count, entry, (done, status, location, lba, nsid) in zip(
                range(len(expected), 0, -1), entries, expected, strict=False
            ):
                assert done.status == status, nvme.status_name(done.status)
                assert entry == ErrorEntry(
                    count, done.sq_id, done.cid, status, done.phase, location, lba, nsid
                )
            assert {e.sqid for e in entries[:6]} == {0, 1}
            assert await error_count_in_smart(driver) == len(expected)

            # Offset and length: the third entry alone; the last dword of the page.
            (third,) = await error_log(driver, ENTRY_SIZE, offset=2 * ENTRY_SIZE)
            assert third == entries[2]
            done, tail = await driver.log_page(LogPage.ERROR, 8, offset=CAPACITY * ENTRY_SIZE - 4)
            assert done.status == 0 and tail == bytes(8)
            done, _ = await driver.log_page(LogPage.ERROR, 4, offset=CAPACITY * ENTRY_SIZE + 4)
            assert done.status == gen(Generic.INVALID_FIELD)  # itself an error, number 7

            # More errors than the log holds: the oldest go, the count goes on;
            # the admin CQ (32 entries) wraps, and each entry has the phase
            # tag its completion was posted with.
            failed = [await driver.admin(nvme.command(0x3F)) for _ in range(CAPACITY + 6)]
            entries = await error_log(driver)
            total = len(expected) + 1 + len(failed)
            assert [e.error_count for e in entries] == list(range(total, total - CAPACITY, -1))
            assert [(e.cid, e.phase) for e in entries] == [
                (d.cid, d.phase) for d in reversed(failed[-CAPACITY:])
            ]
            assert {e.phase for e in entries} == {True, False}
            assert await error_count_in_smart(driver) == total

            # A controller reset and a function-level reset keep the log.
            await driver.enable()
            await driver.create_io_queues(1)
            express = dict(await client.capabilities())[0x10]
            await client.config_write(express + 8, 2, 0x8000)
            await driver.setup_pci()
            await driver.enable()
            assert await error_log(driver) == entries
            assert await error_count_in_smart(driver) == total
            driver.close()
    finally:
        faults.rules.clear()
        faults.rules.allowed = faults.rules.sector_kinds = False


async def test_error_log_is_device_state(images, ram):
    first = controller(images)
    async with vfio_served(first, ram=ram) as client:
        driver = await started(client, ram, io_queues=1)
        for slba in (BLOCKS, BLOCKS + 8):
            assert (await driver.read(1, 1, slba, 512))[0].status == gen(Generic.LBA_OUT_OF_RANGE)
        before = await error_log(driver)
        blob = state.save(first)
        driver.close()
    second = controller(images)
    state.load(second, blob)
    async with vfio_served(second, ram=ram) as client:
        await client.map_ram()
        driver.client = client
        await driver.setup_pci()
        assert await error_log(driver) == before
        assert [e.lba for e in before[:2]] == [BLOCKS + 8, BLOCKS]
        # The count goes on from where the first controller left it.
        assert (await driver.call(1, nvme.command(0x7F, nsid=1))).status == gen(
            Generic.INVALID_OPCODE
        )
        assert [e.error_count for e in (await error_log(driver))[:3]] == [3, 2, 1]
        assert await error_count_in_smart(driver) == 3
        driver.close()
    second.close()

    # A saved log that is not what a controller records is refused.
    values = first.save_device_state()
    for spoil in (
        lambda v: v.update(error_count=1),  # entries newer than the count
        lambda v: v["error_log"].reverse(),  # newest first
        lambda v: v.update(error_log=v["error_log"] * 40, error_count=80),  # more than it holds
        lambda v: v.update(error_count=0, error_log=[dict(v["error_log"][0], count=0)]),
    ):
        spoiled = {**values, "error_log": [dict(e) for e in values["error_log"]]}
        spoil(spoiled)
        with pytest.raises(StateError, match="error log"):
            first.check_device_state(spoiled)
    first.check_device_state(values)
    first.close()

    # A layout 1 blob (before the log) loads with an empty one.
    schema = NvmeController.state
    old = b"".join(f.kind.build(values[f.name]) for f in schema.fields if f.since == 1)
    decoded = schema.decode(old, 1, "nvme")
    assert (decoded["error_count"], decoded["error_log"]) == (0, [])
