"""Wire-format facts of docs/interop/vhost-user.rst."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from conftest import open_fds
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError
from vfiouserd.protocol.vhost_user import BackendRequest, FrontendRequest, ProtocolFeature


def test_every_request_of_the_spec_has_rules():
    assert [int(r) for r in FrontendRequest] == list(range(1, 44))
    assert set(vu.FRONTEND_RULES) == set(FrontendRequest)
    assert [int(r) for r in BackendRequest] == list(range(1, 9))
    assert set(vu.BACKEND_RULES) == set(BackendRequest)
    assert [int(f) for f in ProtocolFeature] == list(range(20))


@pytest.mark.parametrize(
    "layout,size",
    [
        (vu.Header, 12),
        (vu.U64, 8),
        (vu.VringState, 8),
        (vu.VringAddr, 40),
        (vu.MemoryRegion, 32),
        (vu.XenMemoryRegion, 40),
        (vu.SingleMemoryRegion, 40),
        (vu.LogDescription, 16),
        (vu.IotlbMessage, 32),
        (vu.ConfigHeader, 12),
        (vu.VringArea, 24),
        (vu.InflightDescription, 24),
        (vu.SharedObject, 16),
        (vu.DeviceStateTransfer, 8),
    ],
)
def test_payload_sizes_match_the_c_structs(layout, size):
    assert layout.sizeof() == size


def test_memory_table_round_trip():
    regions = [
        {"guest_address": i << 30, "size": 1 << 20, "user_address": 0x7F00 + i, "mmap_offset": i}
        for i in range(3)
    ]
    data = vu.MemoryTable.build({"num_regions": 3, "regions": regions})
    assert len(data) == 8 + 3 * 32
    parsed = vu.MemoryTable.parse(data)
    assert [{k: r[k] for k in regions[0]} for r in parsed.regions] == regions


def test_reply_flags_are_exactly_what_qemu_accepts():
    header = vu.Header.parse(vu.encode(FrontendRequest.GET_FEATURES, b"", reply=True))
    assert header.flags == 0x5


async def test_messages_carry_fds_and_payload():
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        fd = os.eventfd(0)
        await vu.write_message(
            a, vu.encode_u64(FrontendRequest.SET_VRING_KICK, 3, need_reply=True), [fd]
        )
        message = await vu.read_message(b)
        assert (message.request, message.need_reply, len(message.fds)) == (12, True, 1)
        assert message.parse(vu.U64).value == 3
        os.eventfd_write(message.fds[0], 5)
        assert os.eventfd_read(fd) == 5  # the same eventfd
        message.close_fds()
        os.close(fd)


async def test_framing_errors_close_received_fds():
    before = open_fds()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        fd = os.eventfd(0)
        await vu.write_message(a, vu.Header.build({"request": 1, "flags": 1, "size": 100000}), [fd])
        with pytest.raises(FramingError):
            await vu.read_message(b)
        await vu.write_message(
            a, vu.Header.build({"request": 1, "flags": 1, "size": 8}) + b"abc", [fd]
        )
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosed):
            await vu.read_message(b)
        os.close(fd)
    assert open_fds() == before
