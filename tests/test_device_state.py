"""Device state over vhost-user (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE):
what QEMU 8.2+ uses to move a device's own state; QEMU 7.2 never sends it,
so the project's front end plays the VMM."""

from __future__ import annotations

import os

import pytest

from conftest import MiB, make_blk, served, start_device
from vfiouserd import state
from vfiouserd.client.blk import BlkClient, RngClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import BackendError
from vfiouserd.devices.blk import WRITEBACK_OFFSET, BlkFeature
from vfiouserd.devices.rng import VirtioRng
from vfiouserd.devices.virtio import bit
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import FrontendRequest as R


@pytest.fixture
def ram():
    guest = GuestRam([(0, 8 * MiB)])
    yield guest
    guest.close()


async def writeback(frontend) -> int:
    return (await frontend.get_config(1, WRITEBACK_OFFSET))[0]


async def test_state_moves_from_one_daemon_to_another(ram, image):
    source, destination = make_blk(image), make_blk(image)
    async with served(source) as frontend:
        await start_device(frontend, ram)
        assert frontend.features & bit(BlkFeature.CONFIG_WCE)
        await frontend.set_config(WRITEBACK_OFFSET, b"\0")  # the guest turned the cache off
        await frontend.stop_queue(0)  # QEMU stops every ring first
        blob = await frontend.save_device_state()
    assert blob.startswith(state.MAGIC)
    assert destination.writeback
    async with served(destination) as frontend:
        await frontend.negotiate()
        await frontend.load_device_state(blob)
        assert await writeback(frontend) == 0
        await frontend.set_features()
        await frontend.share_memory(ram)
        ring = frontend.make_ring(ram, 64)
        queue = await frontend.start_queue(0, ring)
        blk = BlkClient(ram, queue, arena=MiB)
        await blk.write(0, b"m" * 512)  # serving with the state it was given
        assert await blk.read(0, 512) == b"m" * 512


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage",
        state.save(VirtioRng(None)),  # another device type
    ],
    ids=["empty", "garbage", "rng-state"],
)
async def test_a_state_that_cannot_be_loaded_fails_the_check_and_changes_nothing(ram, image, blob):
    destination = make_blk(image)
    destination.writeback = False
    async with served(destination) as frontend:
        await frontend.negotiate()
        with pytest.raises(BackendError, match="CHECK_DEVICE_STATE failed"):
            await frontend.load_device_state(blob)
        assert not destination.writeback
        # the device still works: the VMM carries on without the migration
        (blk,) = await start_device(frontend, ram)
        assert await blk.read(0, 512) == bytes(512)


async def test_a_corrupted_state_is_refused(ram, image):
    source = make_blk(image)
    blob = bytearray(state.save(source))
    blob[-1] ^= 0xFF
    async with served(make_blk(image)) as frontend:
        await frontend.negotiate()
        with pytest.raises(BackendError, match="CHECK_DEVICE_STATE failed"):
            await frontend.load_device_state(bytes(blob))


async def test_transfers_are_refused_while_rings_run_or_when_malformed(ram, image):
    async with served(make_blk(image)) as frontend:
        await start_device(frontend, ram)  # ring 0 running
        read_end, write_end = os.pipe()

        async def refused(direction: int, phase: int) -> None:
            payload = vu.DeviceStateTransfer.build({"direction": direction, "phase": phase})
            copy = os.dup(write_end)
            try:
                reply = await frontend.call(R.SET_DEVICE_STATE_FD, payload, [copy])
            finally:
                os.close(copy)
            assert vu.U64.parse(reply).value & 0xFF

        await refused(0, 0)  # rings run
        await frontend.stop_queue(0)
        await refused(7, 0)  # no such direction
        await refused(0, 3)  # no such phase
        os.close(write_end)
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""  # the back end closed every copy it got
        os.close(read_end)
        assert await frontend.call_u64(R.CHECK_DEVICE_STATE) != 0  # nothing to check
        assert len(await frontend.save_device_state()) > state.HEADER_SIZE  # still works


async def test_rng_state_round_trips(ram):
    async with served(VirtioRng(None)) as frontend:
        await start_device(frontend, ram, client=RngClient)
        await frontend.stop_queue(0)
        blob = await frontend.save_device_state()
    async with served(VirtioRng(None)) as frontend:
        await frontend.negotiate()
        await frontend.load_device_state(blob)
