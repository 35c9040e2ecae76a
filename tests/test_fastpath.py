"""The native fast path (vfiouserd/fastpath.c, devices/blk_fastpath.c).

It must serve the common requests without Python, leave everything else to
the Python ring, and answer exactly as Python does: the same status bytes,
used lengths and data for every request, the well-formed and the odd.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from conftest import MiB, make_blk, served, start_device
from vfiouserd.devices.blk import BlkStatus, RequestType
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import FrontendRequest as R

SECTOR = 512


def count_python_requests(device, monkeypatch) -> list[int]:
    """Requests that reach the device's Python handler (the fast path's
    go to its C handler)."""
    seen: list[int] = []
    original = device.handle

    def handle(queue: int, request: object) -> int:
        seen.append(queue)
        return original(queue, request)

    monkeypatch.setattr(device, "handle", handle)
    return seen


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
@pytest.mark.parametrize("inflight", [True, False], ids=["inflight", "no-inflight"])
async def test_reads_writes_and_flushes_never_reach_python(
    image, ram, monkeypatch, event_idx, inflight
):
    device = make_blk(image)
    python = count_python_requests(device, monkeypatch)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram, event_idx=event_idx, inflight=inflight)
        for number in range(200):
            data = bytes([number % 251]) * 4096
            await blk.write(8 * number, data, data_pieces=1 + number % 3)
            assert await blk.read(8 * number, 4096, data_pieces=1 + number % 4) == data
        assert (await blk.request(RequestType.FLUSH)).status == BlkStatus.OK
        assert await frontend.stop_queue(0) == 401  # every request once
    assert python == []
    with open(image, "rb") as f:
        f.seek(8 * 199 * SECTOR)
        assert f.read(4096) == bytes([199 % 251]) * 4096


async def test_what_it_does_not_know_goes_to_python_in_order(image, ram, monkeypatch):
    device = make_blk(image, size=MiB)
    python = count_python_requests(device, monkeypatch)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"a" * 512)
        identity = await blk.request(RequestType.GET_ID, in_size=20)
        assert identity.status == BlkStatus.OK and identity.data.startswith(b"vfiouserd")
        beyond = await blk.request(RequestType.IN, MiB // SECTOR, in_size=512)
        assert beyond.status == BlkStatus.IOERR
        assert await blk.read(0, 512) == b"a" * 512  # and back on the fast path
    assert len(python) == 2


# Requests as a driver may shape them; each is sent to a device with the
# fast path and to one without, and must get the same answer.
SHAPES = [
    ("read", dict(kind=RequestType.IN, sector=8, in_size=4096)),
    ("read, data in 5 pieces", dict(kind=RequestType.IN, sector=8, in_size=4096, data_pieces=5)),
    (
        "read, status inside the data buffer",
        dict(kind=RequestType.IN, sector=8, in_size=1024, status_separate=False),
    ),
    ("read, header in 2 pieces", dict(kind=RequestType.IN, sector=8, in_size=512, header_pieces=2)),
    ("read, indirect", dict(kind=RequestType.IN, sector=8, in_size=4096, indirect=True)),
    ("read, partial sector", dict(kind=RequestType.IN, sector=8, in_size=100)),
    ("read, beyond the end", dict(kind=RequestType.IN, sector=2047, in_size=1024)),
    ("read, nothing", dict(kind=RequestType.IN, sector=8, in_size=0)),
    ("write", dict(kind=RequestType.OUT, sector=16, out=b"w" * 4096)),
    ("write, in 3 pieces", dict(kind=RequestType.OUT, sector=16, out=b"p" * 1536, data_pieces=3)),
    (
        "write, header in 2 pieces",
        dict(kind=RequestType.OUT, sector=16, out=b"h" * 512, header_pieces=2),
    ),
    ("write, indirect", dict(kind=RequestType.OUT, sector=24, out=b"i" * 512, indirect=True)),
    ("write, partial sector", dict(kind=RequestType.OUT, sector=16, out=b"x" * 100)),
    ("write, beyond the end", dict(kind=RequestType.OUT, sector=2047, out=b"e" * 1024)),
    ("flush", dict(kind=RequestType.FLUSH)),
    ("flush with a data buffer", dict(kind=RequestType.FLUSH, in_size=512)),
    ("unknown type", dict(kind=99, in_size=16)),
]


async def answers(image: str, ram, fast: bool, read_only: bool = False) -> list[tuple]:
    device = make_blk(image, size=MiB, read_only=read_only)
    device.use_fast_path = fast
    results = []
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        for _, shape in SHAPES:
            shape = dict(shape)
            kind, sector = shape.pop("kind"), shape.pop("sector", 0)
            result = await blk.request(kind, sector, **shape)
            results.append((result.status, result.written, result.data))
    return results


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
async def test_every_shape_gets_the_answer_python_gives(tmp_path, ram, read_only):
    images = [str(tmp_path / "fast.img"), str(tmp_path / "python.img")]
    contents = os.urandom(MiB)
    for path in images:  # the same contents in both
        with open(path, "wb") as f:
            f.write(contents)
    fast = await answers(images[0], ram, True, read_only)
    python = await answers(images[1], ram, False, read_only)
    for (name, _), got, expected in zip(SHAPES, fast, python, strict=True):
        assert got == expected, name
    assert Path(images[0]).read_bytes() == Path(images[1]).read_bytes()


async def test_memory_can_change_under_a_busy_queue(image, ram):
    """Regions come and go while requests stream: the loop steps out of
    guest memory before it is unmapped, and picks up the new table."""
    from vfiouserd.client.guest import GuestRam

    extra = GuestRam([(64 * MiB, MiB)])
    device = make_blk(image)
    async with served(device) as frontend:
        (blk,) = await start_device(frontend, ram)
        done = 0

        async def stream() -> None:
            nonlocal done
            for number in range(300):
                await blk.write(number, bytes([number % 256]) * 512)
                assert await blk.read(number, 512) == bytes([number % 256]) * 512
                done += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            region = extra.regions[0]
            payload = vu.SingleMemoryRegion.build(
                {
                    "region": {
                        "guest_address": region.guest_address,
                        "size": region.size,
                        "user_address": region.user_address,
                        "mmap_offset": 0,
                    }
                }
            )
            for _ in range(20):
                await frontend.call(R.ADD_MEM_REG, payload, [region.fd])
                await trio.sleep(0.002)
                await frontend.call(R.REM_MEM_REG, payload)
        assert done == 300
    extra.close()
