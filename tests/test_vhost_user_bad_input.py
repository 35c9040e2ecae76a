"""A hostile or buggy front end: every case gets an error reply or a closed
connection, never a crash, a hang, a leaked fd or a touch outside memory."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tracemalloc

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MiB, make_blk, open_fds, served, start_device
from vfiouserd.client.blk import BlkClient, RngClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import BackendError
from vfiouserd.devices.blk import BlkStatus
from vfiouserd.devices.rng import VirtioRng
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.vhost_user.backend import VhostUserBackend


async def failed_ack(frontend, request, payload=b"", fds=None) -> int:
    """Send with NEED_REPLY and return the status the back end acked."""
    await frontend.send(request, payload, fds, need_reply=True)
    reply = await frontend.receive_reply(request)
    return vu.U64.parse(reply.payload).value


async def still_alive(frontend) -> None:
    assert await frontend.call_u64(R.GET_FEATURES)


async def closed_by_backend(frontend) -> bool:
    with trio.fail_after(5):
        try:
            await vu.read_message(frontend.sock)
        except ConnectionClosed:
            return True
    return False


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def memfd(size: int) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def device(image):
    return make_blk(image)


async def test_unknown_request_gets_an_error_ack(device):
    async with served(device) as frontend:
        assert await failed_ack(frontend, 99) == 1
        assert await failed_ack(frontend, 0) == 1
        await still_alive(frontend)


async def test_unsupported_request_gets_an_error_reply(device):
    async with served(device) as frontend:
        assert await failed_ack(frontend, R.SEND_RARP, vu.U64.build({"value": 0})) == 1
        # IOTLB_MSG always has a u64 reply; failure is a non-zero value.
        await frontend.send(R.IOTLB_MSG, bytes(vu.IotlbMessage.sizeof()))
        reply = await frontend.receive_reply(R.IOTLB_MSG)
        assert vu.U64.parse(reply.payload).value != 0
        await still_alive(frontend)


@pytest.mark.parametrize(
    "request_,size",
    [
        (R.SET_FEATURES, 4),
        (R.SET_FEATURES, 9),
        (R.GET_FEATURES, 8),
        (R.SET_VRING_ADDR, 39),
        (R.SET_VRING_NUM, 0),
    ],
)
async def test_payload_size_disagreeing_with_the_request(device, request_, size):
    async with served(device) as frontend:
        assert await failed_ack(frontend, request_, bytes(size)) == 1
        await still_alive(frontend)


async def test_oversized_payload_closes_the_connection(device):
    async with served(device) as frontend:
        header = vu.Header.build({"request": R.SET_FEATURES, "flags": 1, "size": 1 << 20})
        await frontend.sock.send(header)
        assert await closed_by_backend(frontend)


@pytest.mark.parametrize("flags", [0, 2, 3])
async def test_bad_version_closes_the_connection(device, flags):
    async with served(device) as frontend:
        await frontend.sock.send(
            vu.Header.build({"request": R.GET_FEATURES, "flags": flags, "size": 0})
        )
        assert await closed_by_backend(frontend)


async def test_truncated_message_then_close_is_handled(device):
    async with served(device) as frontend:
        await frontend.sock.send(
            vu.Header.build({"request": R.SET_FEATURES, "flags": 1, "size": 8}) + b"\x01\x02"
        )
        frontend.sock.shutdown(socket.SHUT_WR)
        assert await closed_by_backend(frontend)


async def test_reply_flag_on_a_request_is_refused(device):
    async with served(device) as frontend:
        await frontend.sock.send(
            vu.Header.build(
                {
                    "request": R.GET_FEATURES,
                    "flags": 1 | vu.REPLY_FLAG | vu.NEED_REPLY_FLAG,
                    "size": 0,
                }
            )
        )
        reply = await frontend.receive_reply(R.GET_FEATURES)
        assert vu.U64.parse(reply.payload).value == 1  # error, not the feature bits
        await still_alive(frontend)


async def test_extra_fds_are_refused_and_closed(device):
    async with served(device) as frontend:
        await still_alive(frontend)
        before = open_fds()
        fds = [eventfd() for _ in range(5)]
        assert await failed_ack(frontend, R.SET_OWNER, b"", fds) == 1
        assert await failed_ack(frontend, R.SET_VRING_KICK, vu.U64.build({"value": 0}), fds) == 1
        for fd in fds:
            os.close(fd)
        assert open_fds() == before  # the back end's copies are gone too


async def test_more_fds_than_the_control_buffer_are_refused(device):
    async with served(device) as frontend:
        before = open_fds()
        fds = [eventfd() for _ in range(80)]
        assert await failed_ack(frontend, R.SET_OWNER, b"", fds) == 1
        for fd in fds:
            os.close(fd)
        await still_alive(frontend)
        assert open_fds() == before


async def test_missing_fd_and_invalid_fd_flag(device):
    async with served(device) as frontend:
        await frontend.negotiate()
        # No fd and no "invalid fd" flag.
        assert await failed_ack(frontend, R.SET_VRING_KICK, vu.U64.build({"value": 0})) == 1
        # An fd together with the "no fd" flag.
        fd = eventfd()
        assert (
            await failed_ack(
                frontend, R.SET_VRING_CALL, vu.U64.build({"value": vu.VRING_NOFD_FLAG}), [fd]
            )
            == 1
        )
        # Reserved bits.
        assert (
            await failed_ack(
                frontend, R.SET_VRING_CALL, vu.U64.build({"value": 1 << 20 | vu.VRING_NOFD_FLAG})
            )
            == 1
        )
        os.close(fd)
        assert await failed_ack(frontend, R.SET_BACKEND_REQ_FD) == 1
        assert await failed_ack(frontend, R.SET_LOG_FD) == 1


async def test_vring_index_out_of_range(device):
    async with served(device) as frontend:
        await frontend.negotiate()
        for request, payload in [
            (R.SET_VRING_NUM, vu.VringState.build({"index": 1, "num": 64})),
            (R.SET_VRING_BASE, vu.VringState.build({"index": 200, "num": 0})),
            (R.SET_VRING_ENABLE, vu.VringState.build({"index": 2**32 - 1, "num": 1})),
            (
                R.SET_VRING_ADDR,
                vu.VringAddr.build(
                    {"index": 7, "flags": 0, "descriptor": 0, "used": 0, "available": 0, "log": 0}
                ),
            ),
            (R.SET_VRING_CALL, vu.U64.build({"value": 255 | vu.VRING_NOFD_FLAG})),
        ]:
            assert await failed_ack(frontend, request, payload) == 1
        # GET_VRING_BASE has no way to say "error": the connection closes.
        await frontend.send(R.GET_VRING_BASE, vu.VringState.build({"index": 3, "num": 0}))
        assert await closed_by_backend(frontend)


async def test_vring_size_limits(device):
    async with served(device) as frontend:
        await frontend.negotiate()
        for num in (0, 32769, 2**32 - 1):
            payload = vu.VringState.build({"index": 0, "num": num})
            assert await failed_ack(frontend, R.SET_VRING_NUM, payload) == 1
        assert (
            await failed_ack(
                frontend, R.SET_VRING_ENABLE, vu.VringState.build({"index": 0, "num": 2})
            )
            == 1
        )


async def test_unoffered_features_are_refused(device):
    async with served(device) as frontend:
        assert await failed_ack(frontend, R.SET_FEATURES, vu.U64.build({"value": 1 << 63})) == 1
        await frontend.call_u64(R.GET_PROTOCOL_FEATURES)
        assert (
            await failed_ack(frontend, R.SET_PROTOCOL_FEATURES, vu.U64.build({"value": 1 << 50}))
            == 1
        )
        await still_alive(frontend)


async def test_gated_requests_need_their_protocol_feature(device):
    async with served(device) as frontend:
        await frontend.negotiate(want_protocol=0)
        assert await failed_ack(frontend, R.RESET_DEVICE) == 1
        assert await failed_ack(frontend, R.SET_STATUS, vu.U64.build({"value": 1})) == 1
        await frontend.send(
            R.GET_CONFIG, vu.ConfigHeader.build({"offset": 0, "size": 4, "flags": 0}) + bytes(4)
        )
        assert (await frontend.receive_reply(R.GET_CONFIG)).payload == b""
        await frontend.send(R.GET_MAX_MEM_SLOTS)
        assert vu.U64.parse((await frontend.receive_reply(R.GET_MAX_MEM_SLOTS)).payload).value == 1


async def test_config_access_beyond_the_limit_gets_an_empty_reply(device):
    async with served(device) as frontend:
        await frontend.negotiate()
        for offset, size, extra in [(0, 257, 0), (250, 10, 0), (0, 8, 4), (0, 8, -4)]:
            header = vu.ConfigHeader.build({"offset": offset, "size": size, "flags": 0})
            await frontend.send(R.GET_CONFIG, header + bytes(max(0, size + extra)))
            assert (await frontend.receive_reply(R.GET_CONFIG)).payload == b""
        header = vu.ConfigHeader.build({"offset": 0, "size": 1, "flags": 4})
        assert await failed_ack(frontend, R.SET_CONFIG, header + b"\0") == 1
        await still_alive(frontend)


def table(regions) -> bytes:
    return vu.MemoryTable.build(
        {
            "num_regions": len(regions),
            "regions": [
                {"guest_address": g, "size": s, "user_address": u, "mmap_offset": o}
                for g, s, u, o in regions
            ],
        }
    )


async def test_bad_memory_tables(device):
    async with served(device) as frontend:
        await frontend.negotiate(want_protocol=~(1 << vu.ProtocolFeature.CONFIGURE_MEM_SLOTS))
        before = open_fds()
        big = memfd(4 * MiB)
        small = memfd(4096)
        cases = [
            # overlapping guest ranges
            (table([(0, 2 * MiB, 0x10000000, 0), (MiB, MiB, 0x20000000, 0)]), [big, big]),
            # overlapping user ranges
            (table([(0, MiB, 0x10000000, 0), (8 * MiB, MiB, 0x10000000, 0)]), [big, big]),
            # the region needs more than the fd holds (would SIGBUS)
            (table([(0, 2 * MiB, 0x10000000, 0)]), [small]),
            (table([(0, MiB, 0x10000000, 4 * MiB)]), [big]),
            # zero size, address wrap
            (table([(0, 0, 0x10000000, 0)]), [big]),
            (table([(2**64 - 4096, 8192, 0x10000000, 0)]), [big]),
            # fd count disagrees with the region count
            (table([(0, MiB, 0x10000000, 0)]), []),
            (table([(0, MiB, 0x10000000, 0)]), [big, big]),
            # more than 8 regions, and a size that disagrees with the count
            (struct.pack("=II", 9, 0) + bytes(32 * 9), [big] * 8),
            (struct.pack("=II", 2, 0) + bytes(32), [big] * 2),
        ]
        for payload, fds in cases:
            assert await failed_ack(frontend, R.SET_MEM_TABLE, payload, fds) == 1, payload
        # A pipe is not memory.
        r, w = os.pipe()
        assert (
            await failed_ack(frontend, R.SET_MEM_TABLE, table([(0, 4096, 0x10000000, 0)]), [r]) == 1
        )
        for fd in (big, small, r, w):
            os.close(fd)
        assert open_fds() == before
        await still_alive(frontend)


async def test_bad_add_and_remove_region(device, ram):
    async with served(device) as frontend:
        await frontend.negotiate()
        await frontend.share_memory(ram)
        region = ram.regions[0]
        overlapping = vu.SingleMemoryRegion.build(
            {
                "region": {
                    "guest_address": region.guest_address + 4096,
                    "size": 4096,
                    "user_address": 0x5000_0000_0000,
                    "mmap_offset": 0,
                }
            }
        )
        fd = memfd(MiB)
        assert await failed_ack(frontend, R.ADD_MEM_REG, overlapping, [fd]) == 1
        missing = vu.SingleMemoryRegion.build(
            {
                "region": {
                    "guest_address": 0x9000_0000,
                    "size": 4096,
                    "user_address": 0x1000,
                    "mmap_offset": 0,
                }
            }
        )
        assert await failed_ack(frontend, R.REM_MEM_REG, missing) == 1
        # REM_MEM_REG with a stray fd: accepted, the fd closed (and the
        # removed region's own fd with its mapping).
        before = open_fds()
        second = ram.regions[1]
        current = vu.SingleMemoryRegion.build(
            {
                "region": {
                    "guest_address": second.guest_address,
                    "size": second.size,
                    "user_address": second.user_address,
                    "mmap_offset": 123,
                }
            }
        )
        assert await failed_ack(frontend, R.REM_MEM_REG, current, [fd]) == 0
        os.close(fd)
        after = open_fds()
        assert fd not in after and after < before and len(after) == len(before) - 2
        await still_alive(frontend)


async def test_ring_outside_memory_cannot_start(device, ram):
    async with served(device) as frontend:
        await frontend.negotiate()
        await frontend.set_features()
        await frontend.share_memory(ram)
        await frontend.call(R.SET_VRING_NUM, vu.VringState.build({"index": 0, "num": 64}))
        await frontend.call(
            R.SET_VRING_ADDR,
            vu.VringAddr.build(
                {
                    "index": 0,
                    "flags": 0,
                    "descriptor": 0xDEAD_0000,
                    "used": 0xDEAD_1000,
                    "available": 0xDEAD_2000,
                    "log": 0,
                }
            ),
        )
        kick = eventfd()
        assert await failed_ack(frontend, R.SET_VRING_KICK, vu.U64.build({"value": 0}), [kick]) == 1
        os.close(kick)
        await still_alive(frontend)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_hostile_descriptors_break_one_queue_only(image, ram, packed):
    device = make_blk(image, num_queues=2)
    async with served(device) as frontend:
        good, bad = await start_device(frontend, ram, queues=2, packed=packed)
        # A buffer in the hole between the two RAM regions.
        hole = 0x8000_0000
        bad.queue.ring.add([(hole, 16)], [(hole + 16, 1)], "hostile")
        bad.queue.kick_now()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(bad.queue.err)
        assert os.eventfd_read(bad.queue.err) == 1
        # The other queue and the session carry on.
        await good.write(0, b"ok" * 256)
        assert await good.read(0, 512) == b"ok" * 256
        await still_alive(frontend)


async def test_descriptor_loop_breaks_the_queue(image, ram):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram, packed=False)
        ring = blk.queue.ring
        buffer = ram.alloc(64)
        struct.pack_into("<QIHH", ring.desc, 0, buffer, 16, 1, 1)
        struct.pack_into("<QIHH", ring.desc, 16, buffer, 16, 1, 0)
        ring.avail[2] = 0
        ring.avail[1] = 1
        blk.queue.kick_now()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(blk.queue.err)
        await still_alive(frontend)


async def test_sessions_leak_no_fds(image):
    before = open_fds()
    device = make_blk(image)
    for _ in range(3):
        ram = GuestRam([(0, 8 * MiB)])
        async with served(device) as frontend:
            (blk,) = await start_device(frontend, ram)
            await blk.write(0, b"x" * 4096)
        ram.close()
    device.close()
    assert open_fds() == before


async def test_requests_with_wrong_layout_complete_with_errors(image, ram):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        # Header split weirdly and shorter than 16 bytes.
        header = blk.scratch(16)
        status = blk.scratch(1)
        ram.write(status, b"\xee")
        written = await blk.run([(header, 3), (header + 3, 4)], [(status, 1)])
        assert (written, ram.read(status, 1)[0]) == (1, BlkStatus.IOERR)


def _sized_payload(request: int) -> st.SearchStrategy[bytes]:
    """Mostly payloads of the right size for the request, so handlers run."""
    try:
        layout = vu.FRONTEND_RULES[R(request)].payload
    except ValueError:
        layout = None
    if hasattr(layout, "sizeof"):
        size = layout.sizeof()
        right = st.binary(min_size=size, max_size=size)
        # small indexes and values, where the interesting branches are
        small = st.integers(0, 3).map(lambda i: i.to_bytes(4, "little") + bytes(size - 4))
        return st.one_of(right, small, st.binary(max_size=64))
    return st.binary(max_size=300)


fuzz_messages = st.lists(
    st.one_of(st.sampled_from(list(R)), st.integers(0, 60)).flatmap(
        lambda request: st.tuples(
            st.just(int(request)),
            st.sampled_from([1, 1 | vu.NEED_REPLY_FLAG]),
            _sized_payload(request),
            st.integers(0, 3),
        )
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(messages=fuzz_messages)
def test_fuzzed_message_streams_never_crash_or_leak(image, messages):
    async def scenario() -> None:
        before = open_fds()
        device = make_blk(image, size=MiB)
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = VhostUserBackend(device, theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.serve)

            async def drain() -> None:
                try:
                    while True:
                        data = await ours.recv(65536)
                        if not data:
                            return
                except OSError:
                    return

            nursery.start_soon(drain)
            for request, flags, payload, nfds in messages:
                fds = [eventfd() for _ in range(nfds)]
                data = (
                    vu.Header.build({"request": request, "flags": flags, "size": len(payload)})
                    + payload
                )
                with contextlib.suppress(ConnectionClosed, OSError):
                    await vu.write_message(ours, data, fds)
                for fd in fds:
                    os.close(fd)
            ours.shutdown(socket.SHUT_WR)
        ours.close()
        theirs.close()
        device.close()
        assert open_fds() == before

    trio.run(scenario)


async def test_rng_has_exactly_one_queue(ram):
    async with served(VirtioRng()) as frontend:
        with pytest.raises(BackendError):
            await frontend.call(
                R.SET_VRING_NUM, vu.VringState.build({"index": 1, "num": 8}), ack=True
            )
        await still_alive(frontend)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.binary(min_size=64, max_size=4096), packed=st.booleans(), offset=st.integers(0, 4096)
)
def test_rings_full_of_garbage_never_crash(image, garbage, packed, offset):
    """Random bytes where the driver's rings and descriptors should be."""

    async def scenario() -> None:
        ram = GuestRam([(0, 4 * MiB)])
        device = make_blk(image, size=MiB)
        async with served(device) as frontend:
            (blk,) = await start_device(frontend, ram, size=16, packed=packed)
            ring = blk.queue.ring
            area = ring.areas[0]
            ram.write(area + offset % (16 * 16), garbage[: 16 * 16 * 2])
            ram.write(ring.areas[1], garbage[-8:].ljust(4, b"\0")[:4])
            blk.queue.kick_now()
            await trio.sleep(0.01)
            await still_alive(frontend)
        device.close()
        ram.close()

    trio.run(scenario)


async def test_kick_fd_that_cannot_be_polled_breaks_only_its_queue(image, ram, tmp_path):
    device = make_blk(image, num_queues=2)
    async with served(device) as frontend:
        good, bad = await start_device(frontend, ram, queues=2)
        regular = os.open(tmp_path / "not-an-eventfd", os.O_RDWR | os.O_CREAT)
        await frontend.call(R.SET_VRING_KICK, vu.U64.build({"value": 1}), [regular], ack=True)
        os.close(regular)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(bad.queue.err)
        await good.write(0, b"g" * 512)
        assert await good.read(0, 512) == b"g" * 512
        await still_alive(frontend)


@pytest.mark.crash_expected  # the device's bug is the point
async def test_a_failing_device_breaks_the_queue_not_the_daemon(ram):
    class Faulty(VirtioRng):
        def handle(self, queue, request):
            raise ZeroDivisionError("device bug")

    async with served(Faulty()) as frontend:
        (rng,) = await start_device(frontend, ram, client=RngClient)
        buffer = rng.scratch(16)
        rng.queue.ring.add([], [(buffer, 16)], "never")
        rng.queue.kick_now()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(rng.queue.err)
        await still_alive(frontend)


async def test_huge_discard_segment_list_is_refused_without_copying(image, ram):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        header = blk.scratch(16)
        ram.write(header, struct.pack("<IIQ", 11, 0, 0))  # DISCARD
        status = blk.scratch(1)
        # 24 MiB of "segments": far beyond max_discard_seg * 16 bytes.
        tracemalloc.start()
        try:
            written = await blk.run([(header, 16), (0x10_0000, 24 * MiB)], [(status, 1)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (written, ram.read(status, 1)[0]) == (1, BlkStatus.IOERR)
        assert peak < 4 * MiB  # the guest's buffer was never copied


async def test_a_broken_queue_works_again_after_the_ring_is_restarted(image, ram):
    """QEMU re-initialises the rings after a guest reset (no RESET_DEVICE)."""
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        blk.queue.ring.add([(0x8000_0000, 16)], [(0x8000_0010, 1)], "hostile")
        blk.queue.kick_now()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(blk.queue.err)
        await frontend.stop_queue(0)
        frontend.queues.remove(blk.queue)
        blk.queue.close()
        fresh = BlkClient(ram, await frontend.start_queue(0, frontend.make_ring(ram, 64)))
        await fresh.write(0, b"again" * 100 + bytes(12))
        assert (await fresh.read(0, 512))[:5] == b"again"


async def test_backend_channel_that_is_not_a_socket_is_refused_and_closed(image, tmp_path):
    """A file or a pipe as the back-end channel: an error ack, the session
    goes on and the fd is closed (it used to end the session and leak)."""
    before = open_fds()
    device = make_blk(image)
    async with served(device) as frontend:
        await frontend.negotiate()
        read_end, write_end = os.pipe()
        regular = os.open(tmp_path / "not-a-socket", os.O_RDWR | os.O_CREAT)
        for fd in (read_end, write_end, regular):
            assert await failed_ack(frontend, R.SET_BACKEND_REQ_FD, b"", [fd]) == 1
            os.close(fd)
        await still_alive(frontend)
        channel = await frontend.open_backend_channel()  # a socket still works
        channel.close()
    device.close()
    assert open_fds() == before


async def test_a_kick_fd_swapped_then_the_ring_stopped_is_never_read_after_its_close(image, ram):
    """A pipe full of bytes as the kick fd stays readable: the ring task is
    woken over and over, and GET_VRING_BASE closes the fd between a wake-up
    and the task running (the fuzzer saw EBADF there, on a number that could
    by then have been another file)."""
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        frontend.queues.remove(blk.queue)
        blk.queue.close()
        for _ in range(40):
            read_end, write_end = os.pipe()
            os.write(write_end, bytes(32768))
            await frontend.call(R.SET_VRING_KICK, vu.U64.build({"value": 0}), [read_end])
            os.close(read_end)
            os.close(write_end)
            await trio.sleep(0.002)
            await frontend.stop_queue(0)
            queue = await frontend.start_queue(0, frontend.make_ring(ram, 64))
            frontend.queues.remove(queue)
            queue.close()
        await frontend.stop_queue(0)
        fresh = BlkClient(ram, await frontend.start_queue(0, frontend.make_ring(ram, 64)))
        await fresh.write(0, b"kick" * 128)
        assert (await fresh.read(0, 512))[:4] == b"kick"
        await still_alive(frontend)


@pytest.mark.parametrize("kind", ["pipe-write-end", "pipe-at-eof"])
async def test_a_kick_fd_that_cannot_deliver_kicks_breaks_only_its_queue(image, ram, kind):
    """A pipe's write end polls as an error and cannot be read (the fuzzer
    found EBADF there); a pipe at end of file polls readable for ever (the
    ring would spin). Either breaks its queue; the session goes on."""
    device = make_blk(image, num_queues=2)
    async with served(device) as frontend:
        good, bad = await start_device(frontend, ram, queues=2)
        read_end, write_end = os.pipe()
        given, kept = (write_end, read_end) if kind == "pipe-write-end" else (read_end, write_end)
        os.close(kept)
        await frontend.call(R.SET_VRING_KICK, vu.U64.build({"value": 1}), [given], ack=True)
        os.close(given)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(bad.queue.err)
        await good.write(0, b"g" * 512)
        assert await good.read(0, 512) == b"g" * 512
        await still_alive(frontend)
