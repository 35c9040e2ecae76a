"""Devices on their own, through the device harness (no ring, no session)."""

from __future__ import annotations

import os
import struct

import pytest

from conftest import MiB, make_blk
from vfiouserd.device_harness import DeviceHarness, HarnessError
from vfiouserd.devices.blk import (
    CONFIG,
    REQUEST_HEADER,
    WRITEBACK_OFFSET,
    BlkFeature,
    BlkStatus,
    RequestType,
    VirtioBlk,
)
from vfiouserd.devices.rng import VirtioRng
from vfiouserd.devices.virtio import DeviceId, Request, VirtioDevice, bit
from vfiouserd.state import StateError

# -- virtio-rng -------------------------------------------------------------------------


def test_rng_fills_every_writable_buffer():
    harness = DeviceHarness(VirtioRng())
    done = harness.request(0, writable=[16, 48])
    assert done.written == 64
    assert done.buffers[0] != b"\xaa" * 16 and done.buffers[1] != b"\xaa" * 48


def test_rng_gives_at_most_its_bound_per_request():
    harness = DeviceHarness(VirtioRng())
    bound = VirtioRng.max_bytes_per_request
    done = harness.request(0, writable=[bound, 4096])
    assert done.written == bound
    assert done.buffers[1] == b"\xaa" * 4096  # the driver asks again for the rest


def test_rng_reads_its_entropy_file(tmp_path):
    source = tmp_path / "entropy"
    source.write_bytes(bytes(range(200)))
    harness = DeviceHarness(VirtioRng(os.open(source, os.O_RDONLY)))
    assert harness.request(0, writable=[100]).data == bytes(range(100))
    # A file that runs dry gives what it has; the request is not padded.
    done = harness.request(0, writable=[150])
    assert done.written == 100 and done.data == bytes(range(100, 200))
    harness.device.close()


def test_rng_has_no_config_space():
    assert DeviceHarness(VirtioRng()).config() == b""


# -- virtio-blk --------------------------------------------------------------------------


def blk_request(harness: DeviceHarness[VirtioBlk], kind: int, sector: int = 0, **buffers: object):
    header = REQUEST_HEADER.pack(kind, 0, sector)
    data = buffers.get("data", b"")
    read = buffers.get("read", 0)
    done = harness.request(0, readable=[header, data] if data else [header], writable=[read, 1])
    return done.buffers[-1][0], done


@pytest.fixture
def blk(tmp_path) -> DeviceHarness[VirtioBlk]:
    return DeviceHarness(make_blk(str(tmp_path / "disk.img"), size=MiB))


def test_blk_writes_then_reads_a_sector(blk):
    status, done = blk_request(blk, RequestType.OUT, 3, data=b"sector three".ljust(512, b"."))
    assert status == BlkStatus.OK and done.written == 1  # the status byte only
    status, done = blk_request(blk, RequestType.IN, 3, read=512)
    assert status == BlkStatus.OK and done.written == 513
    assert done.buffers[0] == b"sector three".ljust(512, b".")


def test_blk_refuses_what_lies_past_the_end(blk):
    sectors = MiB // 512
    status, _ = blk_request(blk, RequestType.IN, sectors, read=512)
    assert status == BlkStatus.IOERR
    status, _ = blk_request(blk, RequestType.OUT, sectors - 1, data=bytes(1024))
    assert status == BlkStatus.IOERR


def test_blk_answers_unknown_requests_unsupported(blk):
    status, done = blk_request(blk, 0x7F, read=16)
    assert status == BlkStatus.UNSUPP and done.written == 1


def test_blk_config_space_and_writeback_switch(blk):
    config = CONFIG.unpack(blk.config())
    assert config[0] == MiB // 512  # capacity in sectors
    assert blk.config(WRITEBACK_OFFSET, 1) == b"\x01"
    blk.write_config(WRITEBACK_OFFSET, b"\x00")  # CONFIG_WCE was negotiated
    assert blk.config(WRITEBACK_OFFSET, 1) == b"\x00"
    blk.reset()  # a reset turns writeback on again
    assert blk.config(WRITEBACK_OFFSET, 1) == b"\x01"


def test_blk_state_migrates_to_a_device_on_the_same_image(tmp_path, blk):
    blk.write_config(WRITEBACK_OFFSET, b"\x00")
    path = str(tmp_path / "disk.img")
    moved = blk.migrate(lambda: make_blk(path, size=MiB))
    assert moved.config(WRITEBACK_OFFSET, 1) == b"\x00"
    assert moved.device.has_feature(BlkFeature.CONFIG_WCE)
    with pytest.raises(StateError, match="sectors"):  # smaller: a grown one would do
        blk.migrate(lambda: make_blk(str(tmp_path / "other.img"), size=MiB // 2))


# -- what the harness holds devices to -----------------------------------------------------


class Boastful(VirtioDevice):
    name = "boastful"
    description = "reports more bytes written than it was given"
    device_id = DeviceId.ENTROPY
    vhost_user_type = "rng"

    def handle(self, queue: int, request: Request) -> int:
        return request.writable_size + 1


def test_a_device_that_overstates_what_it_wrote_is_caught():
    with pytest.raises(HarnessError, match="reported 9 bytes written of 8"):
        DeviceHarness(Boastful()).request(0, writable=[8])


def test_features_must_have_been_offered_and_queues_must_exist():
    with pytest.raises(HarnessError, match="not offered"):
        DeviceHarness(VirtioRng(), features=bit(60))
    with pytest.raises(HarnessError, match="queue 1"):
        DeviceHarness(VirtioRng()).request(1, writable=[8])


def test_config_changes_are_counted(tmp_path):
    path = str(tmp_path / "disk.img")
    harness = DeviceHarness(make_blk(path, size=MiB))
    os.truncate(path, 2 * MiB)
    harness.device.reload()  # SIGHUP: the image grew
    assert harness.config_changes == 1
    assert struct.unpack_from("<Q", harness.config())[0] == 2 * MiB // 512
