"""The device-state blob: round trips, and every reason a load is refused."""

from __future__ import annotations

import contextlib
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MiB
from vfiouserd import state
from vfiouserd.devices.blk import VirtioBlk
from vfiouserd.devices.rng import VirtioRng
from vfiouserd.state import HEADER_SIZE, U16, U32, Blob, Field, Schema, StateError


def blk(size: int = MiB) -> VirtioBlk:
    fd = os.memfd_create("disk")
    os.truncate(fd, size)
    return VirtioBlk(fd)


def rng() -> VirtioRng:
    return VirtioRng(None)


def test_virtio_blk_round_trip():
    source = blk()
    source.writeback = False
    blob = state.save(source)
    destination = blk()
    assert destination.writeback
    state.load(destination, blob)
    assert not destination.writeback


def test_virtio_rng_round_trip():
    blob = state.save(rng())
    state.load(rng(), blob)  # nothing but the header and an empty section


def test_a_smaller_disk_is_refused_and_left_alone():
    source = blk(2 * MiB)
    source.writeback = False
    destination = blk(MiB)
    with pytest.raises(StateError, match="4096 sectors, this image has 2048"):
        state.load(destination, state.save(source))
    assert destination.writeback  # unchanged


def test_a_grown_disk_keeps_the_size_the_guest_knows_until_reloaded():
    source = blk(MiB)
    destination = blk(2 * MiB)
    state.load(destination, state.save(source))
    assert destination.capacity == 2048
    announced = []
    destination.add_config_listener(lambda: announced.append(destination.capacity))
    destination.reload()
    assert announced == [4096]


def corrupt(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value) :]


def reseal(blob: bytes) -> bytes:
    """Recompute the checksum after changing the payload on purpose."""
    payload = blob[HEADER_SIZE:]
    header = bytearray(blob[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))
    struct.pack_into("<QI", header, HEADER_SIZE - 12, len(payload), zlib.crc32(payload))
    return bytes(header) + payload


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b[:10], "truncated: 10 bytes"),
        (lambda b: b[:-1], "truncated: the header says"),
        (lambda b: corrupt(b, 0, b"NOTSTATE"), "bad magic"),
        (lambda b: corrupt(b, 8, struct.pack("<H", 9)), "state format 9 is newer"),
        (lambda b: corrupt(b, 10, b"rng\0"), "state of a 'rng' device cannot be loaded"),
        (lambda b: corrupt(b, 42, struct.pack("<I", 7)), "device ABI version 7 is newer"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
        (lambda b: reseal(b + b"\x05extra\x01\0\0\0\0\0\0\0"), "sections this device does not"),
        (lambda b: reseal(b + b"\x05extra\x01\0\0\0\x10\0\0\0"), "runs past the end"),
    ],
)
def test_a_blob_that_cannot_be_loaded_is_refused_with_its_reason(mangle, reason):
    blob = state.save(blk())
    destination = blk()
    destination.writeback = False
    with pytest.raises(StateError, match=reason):
        state.load(destination, mangle(blob))
    assert not destination.writeback  # nothing applied


def test_a_section_newer_than_the_daemon_is_refused():
    blob = Blob("blk", 1, {"device": (2, b"")}).encode()
    with pytest.raises(StateError, match="layout version 2, newer than this daemon's 1"):
        state.load(blk(), blob)


def test_a_missing_section_is_refused():
    with pytest.raises(StateError, match="section 'device' is missing"):
        state.load(blk(), Blob("blk", 1, {}).encode())


def test_fields_added_later_take_their_default_from_an_older_blob():
    v1 = Schema(1, Field("a", U32))
    v2 = Schema(2, Field("a", U32), Field("b", U16, since=2, default=7))
    old = v1.encode({"a": 5})
    assert v2.decode(old, 1, "s") == {"a": 5, "b": 7}
    assert v2.decode(v2.encode({"a": 5, "b": 9}), 2, "s") == {"a": 5, "b": 9}
    with pytest.raises(StateError, match="bytes beyond its fields"):
        v1.decode(v2.encode({"a": 5, "b": 9}), 1, "s")
    with pytest.raises(StateError, match="field 'b'"):
        v2.decode(old, 2, "s")  # a v2 blob lacking b is malformed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_random_damage_is_only_ever_a_state_error(noise, offset, patch):
    blob = state.save(blk())
    for candidate in (noise, corrupt(blob, offset, patch), reseal(corrupt(blob, offset, patch))):
        with contextlib.suppress(StateError):
            state.load(blk(), candidate)


async def test_example_pci_device_round_trip():
    from conftest import vfio_served
    from vfiouserd.devices.example import ExampleDevice

    source = ExampleDevice()
    async with vfio_served(source) as client:
        await client.config_write(0x04, 2, 0x6)  # memory space + bus master
        await client.region_write(0, 0x04, struct.pack("<I", 0x1234))
        await client.region_write(0, 0x10, struct.pack("<Q", 0xABCD000))
    blob = state.save(source)
    destination = ExampleDevice()
    state.load(destination, blob)
    assert destination.registers == source.registers
    assert destination.config.data == source.config.data
    assert state.save(destination) == blob


async def test_virtio_pci_round_trip_keeps_the_driver_set_up():
    from conftest import vfio_served
    from vfiouserd.client.guest import GuestRam
    from vfiouserd.client.virtio_pci import VirtioPciDriver
    from vfiouserd.virtio_pci import VirtioPciDevice

    ram = GuestRam([(0, 8 * MiB)])
    source = VirtioPciDevice(blk())
    async with vfio_served(source, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        await driver.start()
        driver.close()
    source.quiesce()
    blob = state.save(source)
    destination = VirtioPciDevice(blk())
    state.load(destination, blob)
    assert state.save(destination) == blob
    assert destination.device_status == source.device_status
    assert destination.queue_enabled == source.queue_enabled
    # a different device type, or the same with fewer queues, is refused
    with pytest.raises(StateError, match="cannot be loaded"):
        state.load(VirtioPciDevice(rng()), blob)
    two_queues = VirtioPciDevice(VirtioBlk(os.memfd_create("d"), num_queues=2))
    with pytest.raises(StateError):
        state.load(two_queues, blob)
    ram.close()
