"""virtio-input: config selects, events in order, LEDs back to the host."""

from __future__ import annotations

import argparse
import socket
import struct

import pytest
import trio
from test_host_fed import Driver

from conftest import MiB, served, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness
from vfiouserd.devices.input import (
    ABS_X,
    BTN_LEFT,
    CONFIG_SIZE,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_REL,
    EV_SYN,
    EVENT,
    EVENT_QUEUE,
    LED_CAPSL,
    MAX_PENDING,
    REL_WHEEL,
    STATUS_QUEUE,
    TABLET_RANGE,
    Select,
    VirtioInput,
)
from vfiouserd.devices.virtio import Feature, bit
from vfiouserd.virtio_pci import VirtioPciDevice

KEY_A = 30


def socket_device(tmp_path, kind: str = "keyboard") -> tuple[VirtioInput, str]:
    path = str(tmp_path / "events.sock")
    args = argparse.Namespace(kind=kind, events_socket=path, serial="")
    return VirtioInput.from_args(args), path


async def both_queues(frontend, ram: GuestRam):
    """Negotiated like QEMU (split rings), memory shared, both queues started."""
    await frontend.negotiate(want_features=~bit(Feature.RING_PACKED))
    await frontend.set_features()
    await frontend.share_memory(ram)
    rings = [frontend.make_ring(ram, 16) for _ in (EVENT_QUEUE, STATUS_QUEUE)]
    return [await frontend.start_queue(index, ring) for index, ring in enumerate(rings)]


def selected(harness: DeviceHarness[VirtioInput], select: int, subsel: int = 0) -> bytes:
    harness.write_config(0, bytes([select, subsel]))
    space = harness.config()
    assert len(space) == CONFIG_SIZE and space[:2] == bytes([select, subsel])
    return space[8 : 8 + space[2]]


def has_bit(bitmap: bytes, n: int) -> bool:
    return n // 8 < len(bitmap) and bool(bitmap[n // 8] >> (n % 8) & 1)


def test_a_keyboard_says_what_it_is():
    harness = DeviceHarness(VirtioInput("keyboard", serial="kb-1"))
    assert selected(harness, Select.ID_NAME) == b"vfiouserd keyboard"
    assert selected(harness, Select.ID_SERIAL) == b"kb-1"
    assert struct.unpack("<HHHH", selected(harness, Select.ID_DEVIDS))[0] == 0x06
    keys = selected(harness, Select.EV_BITS, EV_KEY)
    assert has_bit(keys, KEY_A) and not has_bit(keys, 0)
    assert has_bit(selected(harness, Select.EV_BITS, EV_LED), LED_CAPSL)
    assert selected(harness, Select.EV_BITS, EV_REL) == b""  # no such events: size 0
    assert selected(harness, Select.ABS_INFO, ABS_X) == b""
    assert selected(harness, 0x7F, 0x33) == b""  # unknown selects are empty, not errors


def test_a_mouse_and_a_tablet():
    mouse = DeviceHarness(VirtioInput("mouse"))
    assert has_bit(selected(mouse, Select.EV_BITS, EV_REL), REL_WHEEL)
    assert has_bit(selected(mouse, Select.EV_BITS, EV_KEY), BTN_LEFT)
    tablet = DeviceHarness(VirtioInput("tablet"))
    assert has_bit(selected(tablet, Select.EV_BITS, EV_ABS), ABS_X)
    low, high, *_ = struct.unpack("<iiiii", selected(tablet, Select.ABS_INFO, ABS_X))
    assert (low, high) == (0, TABLET_RANGE)


def test_events_wait_for_buffers_in_order_and_leds_are_kept():
    device = VirtioInput("keyboard")
    harness = DeviceHarness(device)
    assert harness.take(EVENT_QUEUE, 8) is None
    events = [EVENT.pack(EV_KEY, KEY_A, 1), EVENT.pack(EV_SYN, 0, 0), EVENT.pack(EV_KEY, KEY_A, 0)]
    device.pending.extend(events)
    assert [harness.take(EVENT_QUEUE, 8).data for _ in events] == events
    assert harness.take(EVENT_QUEUE, 8) is None
    harness.request(STATUS_QUEUE, readable=[EVENT.pack(EV_LED, LED_CAPSL, 1)])
    assert device.leds == {LED_CAPSL: 1}
    assert not device.outgoing  # no client: the next one is told the LED state
    device.pending.extend(events[:2])  # read from the host, no buffer yet
    moved = harness.migrate(lambda: VirtioInput("keyboard"))
    assert moved.device.leds == {LED_CAPSL: 1}
    assert [moved.take(EVENT_QUEUE, 8).data for _ in range(2)] == events[:2]


async def test_over_vhost_user_with_a_host_client(tmp_path):
    """A client of the events socket types; the driver gets every event in
    order, more than its buffers hold at once (the rest wait); the LED the
    driver sets reaches the client."""
    device, path = socket_device(tmp_path, "keyboard")
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            events, status = await both_queues(frontend, ram)
            events_ring, status_ring = events.ring, status.ring
            driver = Driver(ram, events_ring, events.kick_async)
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(path)
            typed = [EVENT.pack(EV_KEY, KEY_A + n % 10, n % 2) for n in range(40)]
            await client.send(b"".join(typed)[:100])  # records cut anywhere
            await client.send(b"".join(typed)[100:])
            got: list[bytes] = []
            with trio.fail_after(10):
                while len(got) < len(typed):
                    await driver.post(*[8] * 8)  # a slow driver: 8 buffers at a time
                    await driver.received(min(len(driver.done) + 8, len(typed)))
                    got = [data for _, data in driver.done]
            assert got == typed
            led = ram.alloc(8, 64)
            ram.write(led, EVENT.pack(EV_LED, LED_CAPSL, 1))
            status_ring.add([(led, 8)], [], "led")
            await status.kick_async()
            with trio.fail_after(5):
                assert await client.recv(8) == EVENT.pack(EV_LED, LED_CAPSL, 1)
            client.close()
    finally:
        ram.close()
        device.close()


async def test_a_flooding_client_waits_for_the_guest(tmp_path):
    """Past MAX_PENDING waiting events the device stops reading: the client
    blocks, nothing is dropped, and reading resumes as the driver takes them."""
    device, path = socket_device(tmp_path, "mouse")
    ram = GuestRam([(0, 16 * MiB)])
    try:
        async with vfio_served(VirtioPciDevice(device), ram=ram) as vmm:
            await vmm.map_ram()
            pci = VirtioPciDriver(vmm, ram)
            events, _ = await pci.start(
                want=~bit(Feature.RING_PACKED), queue_count=2, queue_size=128
            )
            driver = Driver(ram, events.ring, events.kick_async)
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(path)
            total = MAX_PENDING + 600
            stream = b"".join(EVENT.pack(EV_REL, 0, n) for n in range(total))
            sent = 0

            async def flood() -> None:
                nonlocal sent
                while sent < len(stream):
                    sent += await client.send(stream[sent : sent + 65536])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await trio.sleep(0.5)
                assert len(device.pending) == MAX_PENDING  # the device stopped reading
                got = 0
                with trio.fail_after(60):
                    while got < total:
                        await driver.post(*[8] * 100)
                        got = len(await driver.received(min(got + 100, total)))
            values = [EVENT.unpack(data)[2] for _, data in driver.done]
            assert values == list(range(total))
            pci.close()
            client.close()
    finally:
        ram.close()
        device.close()


@pytest.mark.parametrize("kind", ["keyboard", "mouse", "tablet"])
def test_config_writes_past_select_and_subsel_change_nothing(kind):
    """QEMU's vhost-user-input writes the whole space back each time."""
    harness = DeviceHarness(VirtioInput(kind))
    name = selected(harness, Select.ID_NAME)
    harness.write_config(0, bytes([Select.ID_NAME, 0]) + b"\xff" * (CONFIG_SIZE - 2))
    assert harness.config()[8 : 8 + len(name)] == name


async def test_a_client_that_vanishes_mid_record_leaves_the_device_serving_the_next(tmp_path):
    """Half a record then a hang-up: the half is dropped, the next client's
    events arrive whole and in order, and the LEDs are told to it first."""
    device, path = socket_device(tmp_path, "keyboard")
    device.leds = {LED_CAPSL: 1}
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            events, _ = await both_queues(frontend, ram)
            events_ring = events.ring
            driver = Driver(ram, events_ring, events.kick_async)
            await driver.post(*[8] * 4)
            first = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await first.connect(path)
            with trio.fail_after(5):
                assert await first.recv(8) == EVENT.pack(EV_LED, LED_CAPSL, 1)
            await first.send(EVENT.pack(EV_KEY, KEY_A, 1) + b"\x01\x00\x1e")
            first.close()
            assert [data for _, data in await driver.received(1)] == [EVENT.pack(EV_KEY, KEY_A, 1)]
            second = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with trio.fail_after(5):
                await second.connect(path)
                assert await second.recv(8) == EVENT.pack(EV_LED, LED_CAPSL, 1)
            await second.send(EVENT.pack(EV_KEY, KEY_A, 0))
            done = await driver.received(2)
            assert done[1][1] == EVENT.pack(EV_KEY, KEY_A, 0)
            second.close()
    finally:
        ram.close()
        device.close()


async def test_bad_event_buffers_break_nothing_and_lose_no_event():
    """A buffer too small for an event goes back empty (the event waits for
    the next one); a buffer outside guest memory breaks the queue, not the
    session: the device still answers config reads."""
    device = VirtioInput("keyboard")
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            events, _ = await both_queues(frontend, ram)
            events_ring = events.ring
            driver = Driver(ram, events_ring, events.kick_async)
            small, fits = await driver.post(4, 8)
            device.pending.append(EVENT.pack(EV_KEY, KEY_A, 1))
            device.data_ready(EVENT_QUEUE)
            assert await driver.received(2) == [
                (small, b""),
                (fits, EVENT.pack(EV_KEY, KEY_A, 1)),
            ]
            events_ring.add([], [(64 * MiB, 8)], "outside")  # past the end of memory
            await events.kick_async()
            with trio.fail_after(5):  # the queue is broken: its error eventfd says so
                await trio.lowlevel.wait_readable(events.err)
            assert len(await frontend.get_config(CONFIG_SIZE)) == CONFIG_SIZE
    finally:
        ram.close()


async def test_the_client_stays_connected_while_the_rings_stop_and_start(tmp_path):
    """A paused VM stops the rings (GET_VRING_BASE) and the device's task;
    the events client stays connected, and what it sends meanwhile arrives
    once the rings run again."""
    device, path = socket_device(tmp_path, "keyboard")
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            events, status = await both_queues(frontend, ram)
            rings = [events.ring, status.ring]
            driver = Driver(ram, rings[0], events.kick_async)
            await driver.post(*[8] * 4)
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(path)
            await client.send(EVENT.pack(EV_KEY, KEY_A, 1))
            await driver.received(1)
            bases = [await frontend.stop_queue(index) for index in (EVENT_QUEUE, STATUS_QUEUE)]
            await client.send(EVENT.pack(EV_KEY, KEY_A, 0) + EVENT.pack(EV_SYN, 0, 0)[:3])
            await trio.sleep(0.1)
            events = await frontend.start_queue(EVENT_QUEUE, rings[0], base=bases[0])
            await frontend.start_queue(STATUS_QUEUE, rings[1], base=bases[1])
            await client.send(EVENT.pack(EV_SYN, 0, 0)[3:])
            done = await driver.received(3)
            assert [data for _, data in done] == [
                EVENT.pack(EV_KEY, KEY_A, 1),
                EVENT.pack(EV_KEY, KEY_A, 0),
                EVENT.pack(EV_SYN, 0, 0),
            ]
            client.close()
    finally:
        ram.close()
        device.close()


async def test_a_client_that_stops_reading_its_status_is_dropped_not_the_device(tmp_path):
    """A client that shut its reading side: the LED the driver sets fails to
    reach it (EPIPE), which ends that client, never the device; the next
    client is told the LEDs. (Seen in a loaded CI run: device.failed.)"""
    device, path = socket_device(tmp_path, "keyboard")
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(device) as frontend:
            _, status = await both_queues(frontend, ram)
            first = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await first.connect(path)
            first.shutdown(socket.SHUT_RD)
            led = ram.alloc(8, 64)
            ram.write(led, EVENT.pack(EV_LED, LED_CAPSL, 1))
            status.ring.add([(led, 8)], [], "led")
            await status.kick_async()
            second = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with trio.fail_after(5):
                await second.connect(path)
                assert await second.recv(8) == EVENT.pack(EV_LED, LED_CAPSL, 1)
            first.close()
            second.close()
    finally:
        ram.close()
        device.close()
