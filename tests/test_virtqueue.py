"""The device-side rings against the driver-side rings, and hostile drivers."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouserd.client.guest import DriverPackedRing, DriverSplitRing, GuestRam
from vfiouserd.devices.virtio import Feature, Request, bit
from vfiouserd.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    AddressSpace,
    PackedRing,
    RingError,
    SplitRing,
    Virtqueue,
    need_event,
)

MiB = 1 << 20
LAYOUT = [(0x0, 4 * MiB), (0x1_0000_0000, 4 * MiB)]


def device_ring(driver, ram: GuestRam, *, indirect: bool = True, event_idx: bool = False):
    desc, driver_area, device_area = driver.areas
    if driver.packed:
        return PackedRing(
            ram.memory,
            driver.size,
            desc,
            driver_area,
            device_area,
            indirect=indirect,
            event_idx=event_idx,
            base=driver.base(),
        )
    return SplitRing(
        ram.memory,
        driver.size,
        desc,
        driver_area,
        device_area,
        indirect=indirect,
        event_idx=event_idx,
        last_avail_idx=0,
    )


def test_need_event_matches_the_spec_formula():
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(5, 6, 0)
    assert need_event(65535, 1, 65534)  # wrap
    assert not need_event(10, 10, 5)


chains = st.lists(
    st.tuples(
        st.lists(st.integers(1, 300), max_size=3),  # readable lengths
        st.lists(st.integers(1, 300), max_size=3),  # writable lengths
        st.booleans(),  # indirect
    ).filter(lambda c: c[0] or c[1]),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(
    chains=chains,
    packed=st.booleans(),
    size=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_device_sees_exactly_what_the_driver_posted(chains, packed, size, seed):
    ram = GuestRam(LAYOUT)
    try:
        ring_class = DriverPackedRing if packed else DriverSplitRing
        driver = ring_class(ram, size)
        device = device_ring(driver, ram)
        expected_reads: dict[int, bytes] = {}
        pending = []
        for token, (readable, writable, indirect) in enumerate(chains):
            buffers_r = []
            content = b""
            for n in readable:
                address = ram.alloc(n, 8, region=token % 2)
                data = os.urandom(n)
                ram.write(address, data)
                content += data
                buffers_r.append((address, n))
            buffers_w = [(ram.alloc(n, 8, region=(token + 1) % 2), n) for n in writable]
            # A direct chain longer than the ring can never be posted.
            indirect = indirect or len(readable) + len(writable) > size
            expected_reads[token] = content
            pending.append((token, buffers_r, buffers_w, indirect))
        completed = []
        rng = (seed * 2654435761) & 0xFFFFFFFF
        while pending or driver.tokens:
            # Driver: post as many chains as fit.
            while pending:
                token, buffers_r, buffers_w, indirect = pending[0]
                try:
                    driver.add(buffers_r, buffers_w, (token, buffers_w), indirect=indirect)
                except BufferError:
                    break
                pending.pop(0)
            # Device: serve everything available.
            while (request := device.pop()) is not None:
                token_content = b"".join(bytes(v) for v in request.readable)
                assert all(v.readonly for v in request.readable)
                room = request.writable_size
                rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
                written = rng % (room + 1)
                fill = token_content[:1] or b"\x5a"
                remaining = written
                for view in request.writable:
                    n = min(len(view), remaining)
                    view[:n] = fill * n
                    remaining -= n
                request_tokens = token_content
                device.push(request, written)
                device_seen = (request_tokens, written)
                completed.append(device_seen)
            for done in driver.collect():
                token, buffers_w = done.token
                assert done.written <= sum(n for _, n in buffers_w)
                got = b"".join(ram.read(a, n) for a, n in buffers_w)[: done.written]
                fill = expected_reads[token][:1] or b"\x5a"
                assert got == fill * done.written
        assert sorted(c[0] for c in completed) == sorted(expected_reads.values())
    finally:
        ram.close()


# -- hostile drivers ----------------------------------------------------------


@pytest.fixture
def ram():
    guest = GuestRam(LAYOUT)
    yield guest
    guest.close()


def put_split(
    ring: DriverSplitRing, index: int, address: int, length: int, flags: int, next_index: int = 0
) -> None:
    struct.pack_into("<QIHH", ring.desc, 16 * index, address, length, flags, next_index)


def publish_split(ring: DriverSplitRing, head: int) -> None:
    ring.avail[2 + ring.avail_idx % ring.size] = head
    ring.avail_idx += 1
    ring.avail[1] = ring.avail_idx


def hostile_split(ram, setup, *, indirect=True) -> str:
    ring = DriverSplitRing(ram, 8)
    buffer = ram.alloc(4096)
    setup(ring, buffer)
    device = device_ring(ring, ram, indirect=indirect)
    with pytest.raises(RingError) as info:
        device.pop()
    return str(info.value)


def test_head_outside_the_ring(ram):
    assert "outside" in hostile_split(ram, lambda r, b: publish_split(r, 8))


def test_next_outside_the_table(ram):
    def setup(ring, buffer):
        put_split(ring, 0, buffer, 16, DESC_F_NEXT, 9)
        publish_split(ring, 0)

    assert "outside" in hostile_split(ram, setup)


def test_descriptor_loop(ram):
    def setup(ring, buffer):
        put_split(ring, 0, buffer, 16, DESC_F_NEXT, 1)
        put_split(ring, 1, buffer, 16, DESC_F_NEXT, 0)
        publish_split(ring, 0)

    assert "loops" in hostile_split(ram, setup)


def test_available_index_jumps_beyond_the_ring(ram):
    def setup(ring, buffer):
        ring.avail[1] = 9

    assert "ahead" in hostile_split(ram, setup)


@pytest.mark.parametrize(
    "address,length",
    [
        (0x500000, 16),
        (0xFFFF_FFFF_FFFF_F000, 4096),
        (0x1_0000_0000 + 4 * MiB - 8, 16),
        (4 * MiB - 8, 16),
    ],
    ids=["hole", "top-of-address-space", "past-region-end", "into-the-hole"],
)
def test_buffers_outside_memory_are_refused(ram, address, length):
    def setup(ring, buffer):
        put_split(ring, 0, address, length, 0)
        publish_split(ring, 0)

    message = hostile_split(ram, setup)
    assert "not in shared memory" in message or "invalid guest range" in message


def test_readable_after_writable(ram):
    def setup(ring, buffer):
        put_split(ring, 0, buffer, 16, DESC_F_WRITE | DESC_F_NEXT, 1)
        put_split(ring, 1, buffer + 64, 16, 0)
        publish_split(ring, 0)

    assert "after a device-writable" in hostile_split(ram, setup)


def indirect_setup(entries, flags=DESC_F_INDIRECT, length=None):
    def setup(ring, buffer):
        table = buffer + 1024
        for i, (address, n, f, nxt) in enumerate(entries):
            struct.pack_into(
                "<QIHH", ring.ram.view(table, 16 * len(entries)), 16 * i, address, n, f, nxt
            )
        put_split(ring, 0, table, 16 * len(entries) if length is None else length, flags)
        publish_split(ring, 0)

    return setup


def test_indirect_inside_indirect(ram):
    setup = indirect_setup([(0x1000, 16, DESC_F_INDIRECT, 0)])
    assert "inside an indirect" in hostile_split(ram, setup)


def test_indirect_with_next_flag(ram):
    setup = indirect_setup([(0x1000, 16, 0, 0)], flags=DESC_F_INDIRECT | DESC_F_NEXT)
    assert "NEXT" in hostile_split(ram, setup)


@pytest.mark.parametrize("length", [0, 17])
def test_indirect_table_of_bad_length(ram, length):
    setup = indirect_setup([(0x1000, 16, 0, 0)], length=length)
    assert "multiple of 16" in hostile_split(ram, setup)


def test_indirect_not_negotiated(ram):
    setup = indirect_setup([(0x1000, 16, 0, 0)])
    assert "not negotiated" in hostile_split(ram, setup, indirect=False)


def test_indirect_loop(ram):
    setup = indirect_setup([(0x1000, 16, DESC_F_NEXT, 1), (0x1000, 16, DESC_F_NEXT, 0)])
    assert "loops" in hostile_split(ram, setup)


def test_packed_chain_longer_than_the_queue(ram):
    ring = DriverPackedRing(ram, 4)
    buffer = ram.alloc(64)
    for i in range(4):
        struct.pack_into(
            "<QIHH", ring.desc, 16 * i, buffer, 16, 0, PACKED_DESC_F_AVAIL | DESC_F_NEXT
        )
    device = device_ring(ring, ram)
    with pytest.raises(RingError, match="longer"):
        device.pop()


def test_packed_indirect_inside_a_chain(ram):
    ring = DriverPackedRing(ram, 4)
    buffer = ram.alloc(64)
    struct.pack_into("<QIHH", ring.desc, 0, buffer, 16, 0, PACKED_DESC_F_AVAIL | DESC_F_NEXT)
    struct.pack_into("<QIHH", ring.desc, 16, buffer, 16, 0, PACKED_DESC_F_AVAIL | DESC_F_INDIRECT)
    device = device_ring(ring, ram)
    with pytest.raises(RingError, match="inside a chain"):
        device.pop()


def test_packed_base_outside_the_queue(ram):
    ring = DriverPackedRing(ram, 4)
    desc, driver, device = ring.areas
    with pytest.raises(RingError, match="outside"):
        PackedRing(
            ram.memory, 4, desc, driver, device, indirect=True, event_idx=False, base=9 | 1 << 15
        )


def test_ring_setup_checks(ram):
    ring = DriverSplitRing(ram, 8)
    desc, avail, used = ring.areas
    with pytest.raises(RingError, match="power of 2"):
        SplitRing(
            ram.memory, 6, desc, avail, used, indirect=True, event_idx=False, last_avail_idx=0
        )
    with pytest.raises(RingError, match="misaligned"):
        SplitRing(
            ram.memory, 8, desc + 8, avail, used, indirect=True, event_idx=False, last_avail_idx=0
        )
    with pytest.raises(RingError, match="ring area"):
        SplitRing(
            ram.memory, 8, 0x500000, avail, used, indirect=True, event_idx=False, last_avail_idx=0
        )


def test_broken_queue_signals_err_and_stops(ram):
    ring = DriverSplitRing(ram, 8)
    put_split(ring, 0, 0x500000, 64, 0)
    publish_split(ring, 0)
    queue = Virtqueue(0, ram.memory, AddressSpace.GUEST)
    queue.size = 8
    queue.desc_address, queue.avail_address, queue.used_address = ring.areas
    queue.addresses_set = True
    queue.enabled = True
    queue.features = bit(Feature.RING_INDIRECT_DESC)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    queue.set_err(err)
    handled = []

    def handle(request: Request) -> int:
        handled.append(request)
        return 0

    queue.process(handle)
    assert queue.broken and not handled
    assert os.eventfd_read(err) == 1
    # A broken queue stays quiet even when more buffers arrive.
    buffer = ram.alloc(64)
    ring.add([(buffer, 16)], [], "ok")
    queue.process(handle)
    assert not handled
    os.close(err)


def test_event_idx_suppresses_needless_notifications(ram):
    driver = DriverSplitRing(ram, 8, event_idx=True)
    device = device_ring(driver, ram, event_idx=True)
    buffer = ram.alloc(64)
    # The driver asks to be interrupted only after the 3rd completion.
    driver.avail[2 + 8] = 2
    for token in range(3):
        driver.add([], [(buffer, 8)], token)
    mark = device.used_mark()
    device.push(device.pop(), 0)
    assert not device.should_notify(mark)
    mark = device.used_mark()
    device.push(device.pop(), 0)
    assert not device.should_notify(mark)
    mark = device.used_mark()
    device.push(device.pop(), 0)
    assert device.should_notify(mark)
    # And the device asks to be kicked for the next available buffer.
    assert not device.arm()
    assert driver.used16[2 + 4 * 8] == device.last_avail_idx == 3
    driver.kicked_at = driver.avail_idx
    driver.add([], [(buffer, 8)], 4)
    assert driver.needs_kick()
