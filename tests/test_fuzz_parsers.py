"""Property tests of what parses hostile bytes: the protocols' framing and
layouts, the vfio-user VERSION capabilities, and the ring walker over
arbitrary descriptor tables. Each either yields a result or raises its
documented error, never anything else, and the walker never reaches outside
guest memory."""

from __future__ import annotations

import contextlib
import json
import socket
import struct

import trio
from construct import ConstructError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiouserd.client.guest import GuestRam
from vfiouserd.memory import GuestMemoryError
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError
from vfiouserd.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PackedRing,
    RingError,
    SplitRing,
)

KiB = 1 << 10
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- framing: a byte stream is cut into messages or refused --------------------------------


def read_all(data: bytes, read_one) -> list:
    """Feed ``data`` through a socket, then EOF; the messages ``read_one``
    takes from it until it refuses the stream (FramingError) or it ends."""

    async def run() -> list:
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        messages = []
        with ours, theirs:
            await ours.send(data)
            ours.shutdown(socket.SHUT_WR)
            try:
                while True:
                    messages.append(await read_one(theirs))
            except (FramingError, ConnectionClosed):
                pass
        return messages

    return trio.run(run)


def headers(layout, **fixed) -> st.SearchStrategy[bytes]:
    """Plausible headers (so the search reaches the payload), then anything."""
    return st.fixed_dictionaries(
        {
            name: fixed.get(name, st.integers(0, (1 << (8 * sub.sizeof())) - 1))
            for name, sub in ((s.name, s) for s in layout.subcons)
        }
    ).map(layout.build)


vfio_streams = st.lists(
    st.one_of(
        st.binary(max_size=64),
        headers(
            vfu.Header,
            msg_size=st.integers(0, 200),
            command=st.integers(0, 20),
            flags=st.sampled_from([0, 1, 0x10, 0x20, 0xFF]),
        ),
    ),
    max_size=8,
).map(b"".join)


@SETTINGS
@given(vfio_streams)
def test_vfio_user_framing_cuts_or_refuses(data):
    messages = read_all(data, lambda sock: vfu.read_message(sock, 256))
    consumed = sum(vfu.HEADER_SIZE + len(m.payload) for m in messages)
    assert consumed <= len(data)
    for message in messages:
        assert len(message.payload) <= 256 and not message.fds


vhost_streams = st.lists(
    st.one_of(
        st.binary(max_size=64),
        headers(vu.Header, size=st.integers(0, 300), flags=st.sampled_from([1, 5, 9, 0, 2, 0xFF])),
    ),
    max_size=8,
).map(b"".join)


@SETTINGS
@given(vhost_streams)
def test_vhost_user_framing_cuts_or_refuses(data):
    messages = read_all(data, vu.read_message)
    consumed = sum(vu.HEADER_SIZE + len(m.payload) for m in messages)
    assert consumed <= len(data)
    for message in messages:
        assert len(message.payload) <= vu.MAX_PAYLOAD_SIZE and not message.fds


# -- layouts: parsed, or ConstructError ----------------------------------------------------

LAYOUTS = [
    getattr(module, name)
    for module, names in (
        (
            vfu,
            "Header VersionHead DmaMap DmaUnmap DeviceInfo RegionInfo CapHeader SparseMmapCap "
            "RegionIoFds SubRegionIoFd IrqInfo IrqSetHead RegionAccess DmaAccess QemuDmaAccess "
            "DmaWriteReply WriteMultiHead WriteMultiEntry DeviceFeatureHead MigrationInfo "
            "MigDeviceState DmaLoggingControl DmaLoggingRange DmaLoggingReport MigDataHead",
        ),
        (
            vu,
            "Header U64 VringState VringAddr MemoryRegion MemoryTable SingleMemoryRegion "
            "LogDescription IotlbMessage ConfigHeader ConfigAccess VringArea InflightDescription "
            "SharedObject DeviceStateTransfer",
        ),
    )
    for name in names.split()
]


@SETTINGS
@given(st.sampled_from(LAYOUTS), st.binary(max_size=600))
def test_layouts_parse_or_raise_construct_errors(layout, data):
    with contextlib.suppress(ConstructError):
        layout.parse(data)


# -- VERSION capabilities: accepted within bounds, or VersionError ------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
capability_names = st.sampled_from(
    [
        "max_msg_fds",
        "max_data_xfer_size",
        "max_dma_maps",
        "pgsizes",
        "write_multiple",
        "twin_socket",
        "migration",
        "other",
    ]
)
capability_documents = st.one_of(
    st.dictionaries(
        st.just("capabilities"),
        st.dictionaries(capability_names, json_values | st.integers(0, 1 << 33), max_size=6),
    ).map(lambda d: json.dumps(d).encode() + b"\0"),
    json_values.map(lambda v: json.dumps(v).encode() + b"\0"),
    st.binary(max_size=80),
)


@SETTINGS
@given(capability_documents)
def test_version_capabilities_in_bounds_or_refused(data):
    try:
        caps = vfu.parse_version_data(data)
    except vfu.VersionError:
        return
    assert 1 <= caps.max_msg_fds <= 1 << 16
    assert 1 <= caps.max_data_xfer_size <= 1 << 31
    assert 1 <= caps.max_dma_maps <= 1 << 31
    assert caps.pgsizes >= 1
    assert isinstance(caps.write_multiple, bool) and isinstance(caps.twin_socket, bool)
    assert caps.twin_socket_fd_index is None or caps.twin_socket_fd_index >= 0


# -- the ring walker over arbitrary tables ------------------------------------------------------

# A small guest: two regions with a hole between them.
RAM_LAYOUT = [(0x0, 64 * KiB), (0x10_0000, 16 * KiB)]
DESC, DRIVER, DEVICE, BUFFERS = 0x0, 0x1000, 0x2000, 0x4000


def addresses() -> st.SearchStrategy[int]:
    inside = st.integers(BUFFERS, 64 * KiB - 1) | st.integers(0x10_0000, 0x10_0000 + 16 * KiB - 1)
    edges = st.sampled_from(
        [0, DESC, DRIVER, 64 * KiB - 1, 64 * KiB, 0x10_0000 - 1, 0x10_4000, (1 << 64) - 1]
    )
    return st.one_of(inside, inside, edges, st.integers(0, (1 << 64) - 1))


# Mostly what a driver writes (so walks get somewhere), then anything.
descriptors = st.tuples(
    addresses(),
    st.one_of(
        st.integers(0, 600),
        st.integers(0, 600),
        st.sampled_from([4096, 0x10000, 0xFFFF_FFFF]) | st.integers(0, 0xFFFF_FFFF),
    ),
    st.one_of(
        st.sampled_from([0, DESC_F_WRITE]),
        st.sampled_from([0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_NEXT | DESC_F_WRITE]),
        st.sampled_from([0, DESC_F_WRITE, DESC_F_INDIRECT, DESC_F_INDIRECT | DESC_F_NEXT]),
        st.integers(0, 0xFFFF),
    ),
    st.one_of(st.integers(0, 8), st.integers(0, 8), st.integers(0, 0xFFFF)),
)
small_or_any = st.one_of(st.integers(0, 3), st.integers(1, 4), st.integers(0, 0xFFFF))


def owners(ram: GuestRam) -> set[int]:
    return {id(region.mapping.buffer.obj) for region in ram.memory.regions}


def check_request(ram: GuestRam, request) -> None:
    """Every buffer of a chain is a view into the guest's own mappings."""
    known = owners(ram)
    for view in [*request.readable, *request.writable]:
        assert isinstance(view, memoryview)
        assert id(view.obj) in known


@SETTINGS
@given(
    size=st.sampled_from([1, 2, 4, 8, 16]),
    table=st.lists(descriptors, min_size=16, max_size=16),
    indirect_table=st.lists(descriptors, max_size=8),
    avail_idx=small_or_any,
    heads=st.lists(small_or_any, min_size=16, max_size=16),
    last_avail=st.one_of(st.just(0), st.just(0), st.integers(0, 0xFFFF)),
    indirect=st.booleans(),
)
def test_split_ring_walks_only_guest_memory(
    size, table, indirect_table, avail_idx, heads, last_avail, indirect
):
    ram = GuestRam(RAM_LAYOUT)
    try:
        for i, entry in enumerate(table[:size]):
            ram.write(DESC + 16 * i, struct.pack("<QIHH", *entry))
        for i, entry in enumerate(indirect_table):
            ram.write(BUFFERS + 16 * i, struct.pack("<QIHH", *entry))
        ram.write(DRIVER, struct.pack("<HH", 0, avail_idx))
        ram.write(DRIVER + 4, struct.pack(f"<{size}H", *heads[:size]))
        walk(
            ram,
            lambda: SplitRing(
                ram.memory,
                size,
                DESC,
                DRIVER,
                DEVICE,
                indirect=indirect,
                event_idx=False,
                last_avail_idx=last_avail,
            ),
            size,
        )
    finally:
        ram.close()


@SETTINGS
@given(
    size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    table=st.lists(descriptors, min_size=16, max_size=16),
    indirect_table=st.lists(descriptors, max_size=8),
    avail=st.lists(st.booleans(), min_size=16, max_size=16),
    base=st.one_of(st.just(1 << 15 | 1 << 31), st.just(1 << 15 | 1 << 31), st.integers(0, 1 << 32)),
    indirect=st.booleans(),
)
def test_packed_ring_walks_only_guest_memory(size, table, indirect_table, avail, base, indirect):
    ram = GuestRam(RAM_LAYOUT)
    try:
        for i, (address, length, flags, buffer_id) in enumerate(table[:size]):
            # Mostly published in the driver's first lap, so the walk goes on.
            if avail[i]:
                flags = flags & ~PACKED_DESC_F_USED | PACKED_DESC_F_AVAIL
            ram.write(DESC + 16 * i, struct.pack("<QIHH", address, length, buffer_id, flags))
        for i, (address, length, flags, _) in enumerate(indirect_table):
            ram.write(BUFFERS + 16 * i, struct.pack("<QIHH", address, length, 0, flags))
        walk(
            ram,
            lambda: PackedRing(
                ram.memory,
                size,
                DESC,
                DRIVER,
                DEVICE,
                indirect=indirect,
                event_idx=False,
                base=base,
            ),
            size,
        )
    finally:
        ram.close()


def walk(ram: GuestRam, make, size: int) -> None:
    """Take chains until none is left or the ring is refused; complete each."""
    try:
        ring = make()
        for _ in range(2 * size + 2):
            request = ring.pop()
            if request is None:
                return
            check_request(ram, request)
            ring.push(request, 0)
    except (RingError, GuestMemoryError):
        pass
