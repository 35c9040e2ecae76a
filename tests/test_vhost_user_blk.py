"""virtio-blk over vhost-user, driven by the project's front end (no QEMU)."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from conftest import MiB, make_blk, served, start_device
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.vhost_user import BackendError
from vfiouserd.devices.blk import CONFIG, BlkFeature, BlkStatus, RequestType
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import FrontendRequest as R

LAYOUTS = [
    {},
    {"header_pieces": 2, "data_pieces": 3},
    {"status_separate": False, "data_pieces": 4},
    {"indirect": True, "data_pieces": 5},
]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["notify", "event_idx"])
async def test_write_read_roundtrip_reaches_the_image(ram, image, packed, event_idx):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram, packed=packed, event_idx=event_idx)
        pattern = os.urandom(64 * 1024)
        await blk.write(8, pattern)
        assert await blk.read(8, len(pattern)) == pattern
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(len(pattern)) == pattern


@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=["plain", "split-header", "merged-status", "indirect"]
)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_any_descriptor_layout(ram, image, layout, packed):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram, packed=packed)
        data = os.urandom(8192)
        await blk.write(3, data, **layout)
        assert await blk.read(3, 8192, **layout) == data
        result = await blk.request(RequestType.IN, 3, in_size=4096, **layout)
        assert (result.status, result.written) == (BlkStatus.OK, 4097)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_many_requests_wrap_a_tiny_ring(ram, image, packed):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram, size=4, packed=packed)
        for i in range(300):
            data = i.to_bytes(2, "little") * 256
            await blk.write(i % 64, data)
            assert await blk.read(i % 64, 512) == data


async def test_split_ring_indexes_wrap_past_65535(ram, image):
    device = make_blk(image)
    async with served(device) as frontend:
        await frontend.negotiate(want_features=~bit(Feature.RING_PACKED))
        await frontend.set_features()
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, 8)
        # Resume a ring just below the 16-bit wrap, as after a migration.
        ring.avail_idx = ring.kicked_at = ring.last_used = 65530
        ring.avail[1] = ring.used16[1] = 65530
        blk = BlkClient(ram, await frontend.start_queue(0, ring, base=65530))
        for i in range(20):
            await blk.write(i, bytes([i]) * 512)
            assert await blk.read(i, 512) == bytes([i]) * 512
        assert ring.avail_idx == (65530 + 40) & 0xFFFF
        assert await frontend.stop_queue(0) == ring.avail_idx


async def test_flush_get_id_and_config(ram, image):
    device = make_blk(image, size=3 * MiB + 1000, serial="serial-0123456789abcdef")
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        assert (await blk.request(RequestType.FLUSH)).status == BlkStatus.OK
        result = await blk.request(RequestType.GET_ID, in_size=20)
        assert result.status == BlkStatus.OK
        assert result.data == b"serial-0123456789abc"
        config = await frontend.get_config(CONFIG.size)
        fields = CONFIG.unpack(config)
        assert fields[0] == (3 * MiB + 1000) // 512  # capacity, whole sectors
        assert fields[1] == 1 << 20  # size_max
        assert fields[2] == 128 - 2  # seg_max: header and status need 2 of 128 descriptors
        # A partial read of the config space returns exactly the bytes asked for.
        assert await frontend.get_config(8, offset=0) == config[:8]
        assert await frontend.get_config(4, offset=34) == config[34:38]


async def test_requests_beyond_the_disk_or_unaligned_fail_with_ioerr(ram, image):
    device = make_blk(image, size=1 * MiB)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        last = 1 * MiB // 512
        assert (await blk.request(RequestType.IN, last, in_size=512)).status == BlkStatus.IOERR
        assert (await blk.request(RequestType.IN, last - 1, in_size=1024)).status == BlkStatus.IOERR
        assert (await blk.request(RequestType.OUT, 0, out=b"x" * 100)).status == BlkStatus.IOERR
        assert (await blk.request(RequestType.IN, 2**63, in_size=512)).status == BlkStatus.IOERR
        assert (
            await blk.request(RequestType.GET_LIFETIME, 0, in_size=16)
        ).status == BlkStatus.UNSUPP
        assert (await blk.request(99, 0, in_size=16)).status == BlkStatus.UNSUPP
        # The queue still works afterwards.
        assert await blk.read(last - 1, 512) == bytes(512)


async def test_short_request_header_gets_ioerr(ram, image):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        header = blk.scratch(8)
        status = blk.scratch(1)
        ram.write(status, b"\xee")
        written = await blk.run([(header, 8)], [(status, 1)])
        assert written == 1
        assert ram.read(status, 1)[0] == BlkStatus.IOERR
        # No status byte at all: the request comes back with nothing written.
        header = blk.scratch(16)
        ram.write(header, struct.pack("<IIQ", RequestType.IN, 0, 0))
        assert await blk.run([(header, 16)], []) == 0
        assert await blk.read(0, 512) == bytes(512)


async def test_discard_and_write_zeroes(ram, image):
    device = make_blk(image, size=4 * MiB)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        data = os.urandom(MiB)
        await blk.write(0, data)
        await blk.write(4096, data)
        os.fsync(device.fd)
        allocated = os.stat(image).st_blocks
        assert await blk.segments(RequestType.DISCARD, [(0, 1024, 0), (2048, 8, 0)]) == 0
        assert await blk.read(0, 512 * 1024) == bytes(512 * 1024)
        assert await blk.read(1024, 512) == data[512 * 1024 : 512 * 1025]
        assert os.stat(image).st_blocks < allocated  # really deallocated
        assert await blk.segments(RequestType.WRITE_ZEROES, [(4096, 16, 0)]) == 0
        assert await blk.read(4096, 16 * 512) == bytes(16 * 512)
        assert await blk.read(4096 + 16, 512) == data[16 * 512 : 17 * 512]
        assert await blk.segments(RequestType.WRITE_ZEROES, [(4096 + 16, 16, 1)]) == 0
        assert await blk.read(4096 + 16, 16 * 512) == bytes(16 * 512)
        # Bad segments are refused before anything changes.
        assert await blk.segments(RequestType.DISCARD, [(0, 8, 1)]) == BlkStatus.UNSUPP
        assert await blk.segments(RequestType.WRITE_ZEROES, [(8190, 8, 0)]) == BlkStatus.IOERR
        assert (
            await blk.segments(RequestType.WRITE_ZEROES, [(4096 + 40, 1, 0), (9000, 1, 0)])
            == BlkStatus.IOERR
        )
        assert await blk.read(4096 + 40, 512) == data[40 * 512 : 41 * 512]
        assert (await blk.request(RequestType.DISCARD, 0, out=b"short")).status == BlkStatus.IOERR


async def test_read_only_disk_never_writes(ram, image):
    with open(image, "wb") as f:
        f.write(b"A" * MiB)
    device = make_blk(image, read_only=True)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        offered = await frontend.call_u64(R.GET_FEATURES)
        assert offered & bit(BlkFeature.RO)
        assert (await blk.request(RequestType.OUT, 0, out=b"B" * 512)).status == BlkStatus.IOERR
        assert await blk.segments(RequestType.DISCARD, [(0, 8, 0)]) == BlkStatus.IOERR
        assert await blk.segments(RequestType.WRITE_ZEROES, [(0, 8, 0)]) == BlkStatus.IOERR
        assert (await blk.request(RequestType.FLUSH)).status == BlkStatus.OK
        assert await blk.read(0, 512) == b"A" * 512
    with open(image, "rb") as f:
        assert f.read() == b"A" * MiB


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_eight_queues_in_parallel(ram, image, packed):
    device = make_blk(image, num_queues=8)
    async with served(device) as frontend:
        await frontend.negotiate()
        assert await frontend.queue_count() == 8
        blks = await start_device(frontend, ram, queues=8, packed=packed)

        async def worker(index: int) -> None:
            for round_ in range(10):  # 80 sectors of its own (queues run truly in parallel)
                data = bytes([index * 16 + round_]) * 4096
                await blks[index].write(index * 128 + round_ * 8, data)
                assert await blks[index].read(index * 128 + round_ * 8, 4096) == data

        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(worker, index)
        config = CONFIG.unpack(await frontend.get_config(CONFIG.size))
        assert config[13] == 8  # num_queues


async def test_writeback_field_is_the_only_writable_config(ram, image):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        await frontend.set_config(32, b"\x00")
        assert (await frontend.get_config(1, offset=32)) == b"\x00"
        assert device.writeback is False
        await blk.write(0, b"w" * 512)  # write-through path (fdatasync per write)
        with pytest.raises(Exception, match="failed"):
            await frontend.set_config(0, b"\x01" * 8)  # capacity is read-only
        with pytest.raises(Exception, match="failed"):
            await frontend.set_config(30, b"\x01" * 4)  # overlaps writeback
        # With the migration flag, replaying the same values is accepted.
        current = await frontend.get_config(8)
        await frontend.set_config(0, current, flags=vu.CONFIG_FLAG_MIGRATION)
        with pytest.raises(Exception, match="failed"):
            await frontend.set_config(0, b"\xff" * 8, flags=vu.CONFIG_FLAG_MIGRATION)


async def test_rng_fills_buffers(ram):
    from conftest import RngClient, VirtioRng

    async with served(VirtioRng()) as frontend:
        (rng,) = await start_device(frontend, ram, client=RngClient)
        first = await rng.read(4096, pieces=3)
        second = await rng.read(4096)
        assert len(first) == len(second) == 4096
        assert first != second and first != bytes(4096)
        # One request is capped; the driver asks again for more.
        assert len(await rng.read(1 << 20)) == VirtioRng.max_bytes_per_request


async def test_config_is_offered_only_by_a_device_with_a_config_space(image):
    """QEMU >= 10 warns when a device without one (rng) offers CONFIG."""
    from conftest import VirtioRng

    for device, offered in ((make_blk(image), True), (VirtioRng(), False)):
        async with served(device) as frontend:
            protocol = await frontend.call_u64(R.GET_PROTOCOL_FEATURES)
            assert bool(protocol & bit(vu.ProtocolFeature.CONFIG)) is offered
            if offered:
                continue
            # Nor can a front end read one: virtio-rng has no config space
            # (the fuzzer once got 60 zero bytes back).
            await frontend.negotiate()
            header = vu.ConfigHeader.build({"offset": 0, "size": 60, "flags": 0})
            await frontend.send(R.GET_CONFIG, header + bytes(60))
            assert (await frontend.receive_reply(R.GET_CONFIG)).payload == b""
            with pytest.raises(BackendError):
                await frontend.call(
                    R.SET_PROTOCOL_FEATURES,
                    vu.U64.build({"value": bit(vu.ProtocolFeature.CONFIG)}),
                    ack=True,
                )


async def test_rng_from_file(ram, tmp_path):
    from conftest import RngClient, VirtioRng

    source = tmp_path / "entropy"
    source.write_bytes(b"0123456789" * 100)
    device = VirtioRng(os.open(source, os.O_RDONLY))
    async with served(device) as frontend:
        (rng,) = await start_device(frontend, ram, client=RngClient, packed=True)
        assert await rng.read(15) == b"012345678901234"
        assert await rng.read(10) == b"5678901234"


async def test_growing_the_image_is_announced_on_the_backend_channel(ram, image):
    device = make_blk(image, size=MiB)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        assert frontend.protocol_features & bit(vu.ProtocolFeature.BACKEND_REQ)
        channel = await frontend.open_backend_channel()
        os.truncate(image, 3 * MiB)
        # Until the reload the new space is beyond the disk.
        result = await blk.request(RequestType.IN, 2048, in_size=512)
        assert result.status == BlkStatus.IOERR
        device.reload()
        with trio.fail_after(5):
            message = await frontend.answer_backend_request(channel)
        assert message.request == vu.BackendRequest.CONFIG_CHANGE_MSG and message.need_reply
        assert CONFIG.unpack(await frontend.get_config(CONFIG.size))[0] == 3 * MiB // 512
        assert await blk.read(2048, 512) == bytes(512)  # the new space is usable
        device.reload()  # unchanged: nothing is announced
        with trio.move_on_after(0.2) as quiet:
            await frontend.answer_backend_request(channel)
        assert quiet.cancelled_caught
        channel.close()


async def test_config_change_without_a_backend_channel_is_only_logged(ram, image):
    device = make_blk(image, size=MiB)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        os.truncate(image, 2 * MiB)
        device.reload()
        await trio.sleep(0.05)
        assert await blk.read(3000, 512) == bytes(512)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_stop_returns_the_base_and_the_ring_resumes_from_it(ram, image, packed):
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram, size=8, packed=packed)
        for i in range(10):  # 30 descriptors: an 8-entry ring wraps 3 times
            await blk.write(i, bytes([i]) * 512)
        base = await frontend.stop_queue(0)
        ring = blk.queue.ring
        if packed:
            assert base == (
                ring.next_avail
                | ring.avail_wrap << 15
                | ring.next_used << 16
                | ring.used_wrap << 31
            )
            assert not ring.avail_wrap  # the wrap counters really moved
        else:
            assert base == ring.avail_idx == 10
        # A stopped ring is not served: the request waits...
        buffer = blk.scratch(16)
        ring.add([], [(buffer, 1)], "waiting")
        blk.queue.kick_now()
        await trio.sleep(0.05)
        assert ring.collect() == []
        # ...until the front end starts it again from the base it was given.
        frontend.queues.remove(blk.queue)
        blk.queue.close()
        handle = await frontend.start_queue(0, ring, base=base)
        with trio.fail_after(5):
            while not (done := ring.collect()):
                await handle.wait_call()
        assert done[0].token == "waiting"
        resumed = BlkClient(ram, handle)
        assert await resumed.read(9, 512) == bytes([9]) * 512
