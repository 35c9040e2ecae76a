"""Inflight I/O tracking: a back end killed at any point of a request leaves
the region so that its successor resubmits what was in flight, in order, and
completes nothing twice. Split and packed rings, crashes injected at each
step of a request's life."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from conftest import MiB, make_blk
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import BackendError, VhostUserFrontend
from vfiouserd.devices.blk import RequestType
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.inflight import PackedInflight, SplitInflight
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol import vhost_user_inflight as vui
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.vhost_user.backend import VhostUserBackend

QUEUE_SIZE = 32
REQUESTS = 6
CRASH_ON = 3  # the third request of the first back end


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no clean-up touches the region."""


@pytest.fixture
def ram():
    guest = GuestRam([(0, 8 * MiB)])
    yield guest
    guest.close()


def ring_features(packed: bool) -> int:
    return ~0 if packed else ~bit(Feature.RING_PACKED)


async def connect(device, nursery) -> tuple[VhostUserFrontend, trio.Event]:
    """A back-end session that may 'die', and a front end talking to it."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    died = trio.Event()

    async def serve() -> None:
        try:
            await VhostUserBackend(device, theirs).serve()
        except* Crash:
            pass
        died.set()

    nursery.start_soon(serve)
    return VhostUserFrontend(ours), died


def write_request(blk_queue, ram, ring, number: int) -> None:
    header = blk_queue.scratch(16)
    data = blk_queue.scratch(512)
    status = blk_queue.scratch(1)
    ram.write(header, struct.pack("<IIQ", RequestType.OUT, 0, 8 * number))
    ram.write(data, bytes([number + 1]) * 512)
    ram.write(status, b"\xee")
    ring.add([(header, 16), (data, 512)], [(status, 1)], number)


def arm(monkeypatch, where: str, packed: bool, device) -> None:
    calls = {"n": 0}

    def crash_on_third(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == CRASH_ON:
                raise Crash
            return original(*args, **kwargs)

        return wrapper

    tracker = PackedInflight if packed else SplitInflight
    if where == "handling":  # taken from the ring, not done
        monkeypatch.setattr(device, "handle", crash_on_third(device.handle))
    elif where == "before-publish":  # done, not yet visible to the driver
        monkeypatch.setattr(tracker, "completing", crash_on_third(tracker.completing))
    else:  # visible to the driver, the region not yet told
        monkeypatch.setattr(tracker, "completed", crash_on_third(tracker.completed))


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("where", ["handling", "before-publish", "after-publish"])
async def test_a_killed_back_end_loses_nothing_and_repeats_nothing(
    ram, image, monkeypatch, packed, where
):
    from vfiouserd.client.blk import BlkClient

    first = make_blk(image)
    # The crash is injected in Python, so the ring runs there (the native
    # fast path's own bookkeeping meets SIGKILL in the QEMU reconnect test).
    first.use_fast_path = False
    async with trio.open_nursery() as nursery:
        frontend, died = await connect(first, nursery)
        await frontend.negotiate(want_features=ring_features(packed))
        await frontend.set_features()
        region = await frontend.get_inflight(1, QUEUE_SIZE)
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, QUEUE_SIZE)
        start_base = ring.base()
        queue = await frontend.start_queue(0, ring)
        blk = BlkClient(ram, queue, arena=MiB)
        arm(monkeypatch, where, packed, first)
        for number in range(REQUESTS):
            write_request(blk, ram, ring, number)
        queue.kick_now()
        with trio.fail_after(5):
            await died.wait()
        monkeypatch.undo()
        completed = [c.token for c in ring.collect()]
        await frontend.aclose()

        # The restarted daemon: a new device on the same image, the region
        # the front end kept, and the base QEMU would send after a crash:
        # the used index for split rings, its stale start value for packed.
        second = make_blk(image)
        frontend, _ = await connect(second, nursery)
        await frontend.negotiate(want_features=ring_features(packed))
        await frontend.set_features()
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        base = start_base if packed else ring.used16[1]
        queue = await frontend.start_queue(0, ring, base=base)
        with trio.fail_after(5):
            while len(completed) < REQUESTS:
                completed += [c.token for c in ring.collect()]
                if len(completed) < REQUESTS:
                    await queue.wait_call()
        await trio.sleep(0.05)
        completed += [c.token for c in ring.collect()]  # anything completed twice shows here
        await frontend.aclose()
        region.close()
        nursery.cancel_scope.cancel()
    assert sorted(completed) == list(range(REQUESTS)), completed
    # In flight at the crash: resubmitted before anything newer.
    assert completed == list(range(REQUESTS))
    with open(image, "rb") as f:
        for number in range(REQUESTS):
            f.seek(8 * number * 512)
            assert f.read(512) == bytes([number + 1]) * 512


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_a_fresh_region_is_laid_out_as_the_spec_says(ram, image, packed):
    device = make_blk(image)
    async with trio.open_nursery() as nursery:
        frontend, _ = await connect(device, nursery)
        await frontend.negotiate(want_features=ring_features(packed))
        await frontend.set_features()
        region = await frontend.get_inflight(1, 128)
        # 64-byte aligned regions: the sizes libvhost-user and DPDK compute
        assert region.size == (4160 if packed else 2112) and region.offset == 0
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, 128)
        queue = await frontend.start_queue(0, ring)
        from vfiouserd.client.blk import BlkClient

        blk = BlkClient(ram, queue, arena=MiB)
        for number in range(3):
            await blk.write(number, b"x" * 512)
        data = region.read()
        if packed:
            header = vui.INFLIGHT_PACKED_QUEUE.unpack_from(data)
            assert header[1:3] == (1, 128)  # version, desc_num
            assert header[5] == header[6] == 9  # 3 chains of 3 slots, committed
        else:
            header = vui.INFLIGHT_SPLIT_QUEUE.unpack_from(data)
            version, desc_num, used_idx = header[1], header[2], header[4]
            assert (version, desc_num, used_idx) == (1, 128, 3)
            inflight = [
                vui.INFLIGHT_SPLIT_DESC.unpack_from(data, 16 + 16 * i)[0] for i in range(128)
            ]
            assert not any(inflight)
        await frontend.aclose()
        region.close()
        nursery.cancel_scope.cancel()


async def refused(frontend, request: R, payload: bytes, fds: list[int]) -> None:
    with pytest.raises(BackendError):
        await frontend.call(request, payload, fds, ack=True)


def description(size: int, offset: int = 0, queues: int = 1, queue_size: int = 16) -> bytes:
    return vu.InflightDescription.build(
        {"mmap_size": size, "mmap_offset": offset, "num_queues": queues, "queue_size": queue_size}
    )


async def test_bad_inflight_requests_are_refused(ram, image):
    device = make_blk(image)
    async with trio.open_nursery() as nursery:
        frontend, _ = await connect(device, nursery)
        await frontend.negotiate(want_protocol=~bit(vu.ProtocolFeature.INFLIGHT_SHMFD))
        memfd = os.memfd_create("region")
        os.ftruncate(memfd, 4096)
        # not negotiated
        await refused(frontend, R.SET_INFLIGHT_FD, description(4096), [os.dup(memfd)])
        await frontend.aclose()

        frontend, _ = await connect(device, nursery)
        await frontend.negotiate()
        await frontend.set_features()
        too_small = vui.inflight_region_size(16, False) - 1
        await refused(frontend, R.SET_INFLIGHT_FD, description(too_small), [os.dup(memfd)])
        # the region is larger than the file behind it
        await refused(frontend, R.SET_INFLIGHT_FD, description(1 << 20), [os.dup(memfd)])
        await refused(frontend, R.SET_INFLIGHT_FD, description(4096, queues=0), [os.dup(memfd)])
        await refused(frontend, R.SET_INFLIGHT_FD, description(4096, queues=9), [os.dup(memfd)])
        await refused(frontend, R.SET_INFLIGHT_FD, description(4096, queue_size=0), [os.dup(memfd)])
        read_end, write_end = os.pipe()
        os.close(write_end)
        await refused(frontend, R.SET_INFLIGHT_FD, description(4096), [read_end])
        # GET's error reply is a region of size 0 (QEMU then goes without)
        answer = await frontend.call(R.GET_INFLIGHT_FD, description(0, queues=0))
        assert answer == bytes(vu.InflightDescription.sizeof())
        # still a working session
        region = await frontend.get_inflight(1, 16)
        await frontend.set_inflight(region)
        region.close()
        os.close(memfd)
        await frontend.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_a_region_a_front_end_scribbled_on_breaks_only_that_queue(ram, image, packed):
    device = make_blk(image)
    async with trio.open_nursery() as nursery:
        frontend, _ = await connect(device, nursery)
        await frontend.negotiate(want_features=ring_features(packed))
        await frontend.set_features()
        region = await frontend.get_inflight(1, QUEUE_SIZE)
        # version 1 but the wrong number of descriptors, every entry in flight
        # with links that point nowhere
        data = bytearray(region.read())
        if packed:
            struct.pack_into("<QHHHHHHBB", data, 0, 0, 1, QUEUE_SIZE, 0, 0, 0, 0, 1, 1)
            for i in range(QUEUE_SIZE):
                vui.INFLIGHT_PACKED_DESC.pack_into(
                    data, 32 + 32 * i, 1, 0xFFFF, 0, 9999, i, 0, 0, 0, 0
                )
        else:
            struct.pack_into("<QHHHH", data, 0, 0, 1, QUEUE_SIZE, 0xFFFF, 5)
            for i in range(QUEUE_SIZE):
                vui.INFLIGHT_SPLIT_DESC.pack_into(data, 16 + 16 * i, 1, 0xFFFF, i)
        os.pwrite(region.fd, bytes(data), 0)
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, QUEUE_SIZE)
        with pytest.raises(BackendError, match="SET_VRING_KICK failed"):
            await frontend.start_queue(0, ring, base=ring.base())
        assert await frontend.call_u64(R.GET_FEATURES)  # the session goes on
        await frontend.aclose()
        region.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("when", ["before-start", "while-running"])
async def test_an_inflight_region_that_does_not_add_up_breaks_only_its_queue(
    ram, image, packed, when
):
    """The front end can write the region at any time: garbage there is
    refused or breaks the queue, never the session."""
    from vfiouserd.client.blk import BlkClient

    device = make_blk(image)
    device.use_fast_path = False  # the Python walker keeps the region here
    async with trio.open_nursery() as nursery:
        frontend, died = await connect(device, nursery)
        await frontend.negotiate(want_features=ring_features(packed))
        await frontend.set_features()
        region = await frontend.get_inflight(1, QUEUE_SIZE)
        garbage = b"\xff\x7f" * (region.size // 2)
        if when == "before-start":
            os.pwrite(region.fd, garbage, region.offset)
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, QUEUE_SIZE)
        try:
            queue = await frontend.start_queue(0, ring)
        except BackendError:
            assert when == "before-start"  # refused: fine, as long as the session lives
        else:
            if when == "while-running":
                os.pwrite(region.fd, garbage, region.offset)
            blk = BlkClient(ram, queue, arena=MiB)
            for number in range(4):
                write_request(blk, ram, ring, number)
            queue.kick_now()
            with trio.fail_after(5):
                if packed:  # the region's free list leads nowhere: the queue breaks
                    await trio.lowlevel.wait_readable(queue.err)
                else:  # a split ring only writes its region while running
                    completed: list = []
                    while len(completed) < 4:
                        await queue.wait_call()
                        completed += ring.collect()
        assert await frontend.call_u64(R.GET_FEATURES)
        assert not died.is_set()
        await frontend.aclose()
        region.close()


@pytest.mark.parametrize("field", ["used", "old-used", "free"])
async def test_a_packed_inflight_header_pointing_outside_the_queue_is_refused(ram, image, field):
    """A well-formed header (version, size) whose indexes lie outside the
    queue: the ring start is refused, the session lives (our fuzzer found
    the ring read at such an index as a crashed session)."""
    device = make_blk(image)
    async with trio.open_nursery() as nursery:
        frontend, died = await connect(device, nursery)
        await frontend.negotiate(want_features=ring_features(True))
        await frontend.set_features()
        region = await frontend.get_inflight(1, QUEUE_SIZE)
        used, old_used, free = 3, 2, 0
        if field == "used":
            used = 37466
        elif field == "old-used":
            old_used = 37466
        else:
            free = 600
        header = vui.INFLIGHT_PACKED_QUEUE.pack(0, 1, QUEUE_SIZE, free, free, used, old_used, 1, 1)
        os.pwrite(region.fd, header, region.offset)
        await frontend.set_inflight(region)
        await frontend.share_memory(ram)
        with pytest.raises(BackendError):
            await frontend.start_queue(0, frontend.make_ring(ram, QUEUE_SIZE))
        assert await frontend.call_u64(R.GET_FEATURES)
        assert not died.is_set()
        await frontend.aclose()
        region.close()
        nursery.cancel_scope.cancel()
