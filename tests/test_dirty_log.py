"""Dirty logging (LOG_SHMFD, LOG_ALL) for live migration: every byte the
back end writes to guest memory is in the front end's log, nothing it only
reads is, and bad log set-ups are refused."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from conftest import MiB, make_blk, served
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.guest import USER_ADDRESS_OFFSET, GuestRam
from vfiouserd.client.vhost_user import BackendError
from vfiouserd.devices.blk import RequestType
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.protocol.vhost_user import ProtocolFeature

PAGE = 4096
HIGH = 0x1_0000_0000
LAYOUT = [(0, 16 * MiB), (HIGH, 8 * MiB)]
LOG_SIZE = (HIGH + 8 * MiB) // PAGE // 8  # one bit per page up to the top of RAM


@pytest.fixture
def ram():
    guest = GuestRam(LAYOUT)
    yield guest
    guest.close()


def new_log(size: int = LOG_SIZE) -> int:
    fd = os.memfd_create("dirty-log")
    os.ftruncate(fd, size)
    return fd


def logged_pages(fd: int, size: int = LOG_SIZE) -> set[int]:
    data = os.pread(fd, size, 0)
    return {
        byte * 8 + bit_
        for byte, value in enumerate(data)
        if value
        for bit_ in range(8)
        if value >> bit_ & 1
    }


def pages(address: int, length: int) -> set[int]:
    return set(range(address // PAGE, (address + length - 1) // PAGE + 1))


async def set_log(frontend, fd: int, size: int = LOG_SIZE) -> None:
    reply = await frontend.call(
        R.SET_LOG_BASE, vu.LogDescription.build({"size": size, "offset": 0}), [os.dup(fd)]
    )
    assert vu.U64.parse(reply).value == 0


async def start(frontend, ram, *, packed: bool, log_all: bool) -> tuple:
    await frontend.negotiate(want_features=~0 if packed else ~bit(Feature.RING_PACKED))
    features = frontend.features | (bit(vu.VHOST_F_LOG_ALL) if log_all else 0)
    await frontend.set_features(features)
    await frontend.share_memory(ram)
    ring = frontend.make_ring(ram, 64, region=1)  # ring addresses above 4 GiB
    queue = await frontend.start_queue(0, ring)
    return ring, queue


async def one_request(ram, ring, queue, readable, writable) -> None:
    token = object()
    ring.add(readable, writable, token)
    queue.kick_now()
    with trio.fail_after(5):
        while not any(done.token is token for done in ring.collect()):
            await queue.wait_call()


def blk_requests(ram) -> dict[str, int]:
    """Page-aligned buffers, each on pages of its own."""
    return {name: ram.alloc(3 * PAGE, PAGE) for name in ("header", "data", "status", "into")}


def ring_pages(ring) -> set[int]:
    desc, _driver, device = ring.areas
    if ring.packed:
        return pages(desc, 16 * ring.size) | pages(device, 4)
    return pages(device, 6 + 8 * ring.size)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_everything_written_is_logged_and_nothing_else(ram, image, packed):
    log_fd = new_log()
    async with served(make_blk(image)) as frontend:
        ring, queue = await start(frontend, ram, packed=packed, log_all=True)
        await set_log(frontend, log_fd)
        buffers = blk_requests(ram)
        # a write: the device only reads header and data, writes the status
        ram.write(buffers["header"], struct.pack("<IIQ", RequestType.OUT, 0, 0))
        ram.write(buffers["data"], b"w" * 8192)
        await one_request(
            ram,
            ring,
            queue,
            [(buffers["header"], 16), (buffers["data"] + 100, 8192)],
            [(buffers["status"] + 5, 1)],
        )
        # a read of 6000 bytes into a buffer that starts mid-page
        ram.write(buffers["header"], struct.pack("<IIQ", RequestType.IN, 0, 0))
        await one_request(
            ram,
            ring,
            queue,
            [(buffers["header"], 16)],
            [(buffers["into"] + 4000, 6144), (buffers["status"] + 5, 1)],
        )
    logged = logged_pages(log_fd)
    expected = pages(buffers["status"] + 5, 1) | pages(buffers["into"] + 4000, 6144)
    assert expected <= logged
    assert not pages(buffers["data"], 3 * PAGE) & logged  # only read by the device
    assert not pages(buffers["header"], 3 * PAGE) & logged
    assert logged - expected <= ring_pages(ring)  # the rest: the ring's own writes
    assert logged & ring_pages(ring)  # and those are logged too (the used entries)
    os.close(log_fd)


async def test_without_log_all_nothing_is_logged(ram, image):
    log_fd = new_log()
    async with served(make_blk(image)) as frontend:
        _ring, queue = await start(frontend, ram, packed=False, log_all=False)
        await set_log(frontend, log_fd)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.read(0, 4096)
    assert logged_pages(log_fd) == set()
    os.close(log_fd)


async def test_migration_starts_and_stops_while_the_ring_runs(ram, image):
    """QEMU's order: SET_LOG_BASE, SET_FEATURES with LOG_ALL, SET_VRING_ADDR
    with the log flag, all while the device runs; then LOG_ALL off again."""
    first, second = new_log(), new_log(2 * LOG_SIZE)
    async with served(make_blk(image)) as frontend:
        ring, queue = await start(frontend, ram, packed=False, log_all=False)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.read(0, 4096)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        await frontend.call(R.SET_LOG_FD, b"", [os.dup(kick)])
        await set_log(frontend, first)
        await frontend.set_features(frontend.features | bit(vu.VHOST_F_LOG_ALL))
        desc, driver, device = ring.areas
        await frontend.call(
            R.SET_VRING_ADDR,
            vu.VringAddr.build(
                {
                    "index": 0,
                    "flags": vu.VRING_FLAG_LOG,
                    "descriptor": desc + USER_ADDRESS_OFFSET,
                    "used": device + USER_ADDRESS_OFFSET,
                    "available": driver + USER_ADDRESS_OFFSET,
                    "log": device,
                }
            ),
        )
        assert await blk.read(0, 4096) == bytes(4096)
        assert logged_pages(first) & ring_pages(ring)
        assert os.eventfd_read(kick) >= 1  # told after the batch that logged
        # memory grew: a new, bigger log replaces the first one
        await set_log(frontend, second, 2 * LOG_SIZE)
        before = os.pread(first, LOG_SIZE, 0)
        await blk.read(8, 4096)
        assert os.pread(first, LOG_SIZE, 0) == before
        assert logged_pages(second, 2 * LOG_SIZE) & ring_pages(ring)
        # migration over (or cancelled): no more logging
        await frontend.set_features(frontend.features & ~bit(vu.VHOST_F_LOG_ALL))
        os.ftruncate(second, 0)
        os.ftruncate(second, 2 * LOG_SIZE)
        await blk.read(16, 4096)
        assert logged_pages(second, 2 * LOG_SIZE) == set()
        os.close(kick)
    for fd in (first, second):
        os.close(fd)


async def test_a_log_too_small_for_guest_memory_is_not_written_past(ram, image):
    small = PAGE  # covers the first 128 MiB only; the ring lives above 4 GiB
    log_fd = new_log(small)
    async with served(make_blk(image)) as frontend:
        _ring, queue = await start(frontend, ram, packed=False, log_all=True)
        await set_log(frontend, log_fd, small)
        blk = BlkClient(ram, queue, arena=MiB)
        assert await blk.read(0, 512) == bytes(512)  # still served
    assert os.fstat(log_fd).st_size == small
    os.close(log_fd)


async def test_bad_log_set_ups_are_refused(ram, image):
    log_fd = new_log()
    async with served(make_blk(image)) as frontend:
        await frontend.negotiate(want_protocol=~bit(ProtocolFeature.LOG_SHMFD))
        description = vu.LogDescription.build({"size": LOG_SIZE, "offset": 0})
        reply = await frontend.call(R.SET_LOG_BASE, description, [os.dup(log_fd)])
        assert vu.U64.parse(reply).value != 0  # not negotiated
        ring = frontend.make_ring(ram, 16)
        await frontend.set_features()
        await frontend.share_memory(ram)
        await frontend.call(R.SET_VRING_NUM, vu.VringState.build({"index": 0, "num": 16}))
        with pytest.raises(BackendError):
            desc, driver, device = ring.areas
            await frontend.call(
                R.SET_VRING_ADDR,
                vu.VringAddr.build(
                    {
                        "index": 0,
                        "flags": vu.VRING_FLAG_LOG,
                        "descriptor": desc + USER_ADDRESS_OFFSET,
                        "used": device + USER_ADDRESS_OFFSET,
                        "available": driver + USER_ADDRESS_OFFSET,
                        "log": device,
                    }
                ),
                ack=True,
            )
    async with served(make_blk(image)) as frontend:
        await frontend.negotiate()
        for payload, fds in [
            (description, []),  # no fd
            (vu.LogDescription.build({"size": 2 * LOG_SIZE, "offset": 0}), [os.dup(log_fd)]),
            (vu.LogDescription.build({"size": LOG_SIZE, "offset": 1 << 62}), [os.dup(log_fd)]),
        ]:
            reply = await frontend.call(R.SET_LOG_BASE, payload, fds)
            assert vu.U64.parse(reply).value != 0
        await set_log(frontend, log_fd)  # and a good one still works
    os.close(log_fd)


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def mark(self, address: int, length: int) -> None:
        self.writes.append((address, length))

    def kick(self) -> None:
        pass


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_the_ring_logs_exactly_the_bytes_it_writes(ram, packed):
    """Each ring write, at its guest-physical address and length."""
    from test_virtqueue import device_ring

    from vfiouserd.client.guest import DriverPackedRing, DriverSplitRing

    size = 256  # a used ring of several pages: entries land away from the index
    driver_cls = DriverPackedRing if packed else DriverSplitRing
    driver = driver_cls(ram, size, event_idx=True, region=1)
    recorder = Recorder()
    ram.memory.dirty = recorder
    device = device_ring(driver, ram, event_idx=True)
    into = ram.alloc(8192, PAGE)
    for number in range(3):
        driver.add([], [(into + 100, 300), (into + 5000, 50)], number)
    desc, _, used = driver.areas
    recorder.writes.clear()
    for slot in range(3):
        request = device.pop()
        assert request.dirty_ranges == [(into + 100, 300), (into + 5000, 50)]
        device.push(request, 350)
        if packed:
            assert recorder.writes == [(desc + 16 * 2 * slot, 16)]  # chains of 2 slots
        else:
            assert recorder.writes == [(used + 4 + 8 * slot, 8), (used + 2, 2)]
        recorder.writes.clear()
    if not packed:
        device.arm()
        assert recorder.writes == [(used + 4 + 8 * size, 2)]  # avail_event
    ram.memory.dirty = None
