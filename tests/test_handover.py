"""Restart without disconnect: the daemon keeps its live session in
systemd's fd store across a restart, for vhost-user and for vfio-user.

A stand-in for systemd (``fake_systemd``) speaks the real sd_notify and
LISTEN_FDS protocols; the project's front ends play the VMM and the guest.
The guest's I/O runs across each restart: every request completes once,
none fails, the connection never closes and the data verifies.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import struct
import sys
import warnings

import pytest
import trio
import trio.testing
from fake_systemd import FakeSystemd
from managed_blk import (
    blk_command,
    daemon_command,
    io_across,
    managed_blk,
    verify_image,
)

from conftest import MiB, start_device
from vfiouserd.client.blk import BlkClient
from vfiouserd.client.control import ControlClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver

RESTARTS = 3


async def restart_while_io_runs(manager: FakeSystemd, blk: BlkClient, rounds: int) -> list[int]:
    return await io_across(blk, rounds, RESTARTS, lambda _: manager.restart())


def assert_handed_over(manager: FakeSystemd) -> None:
    log = manager.log()
    assert log.count("event=handover.stored fds=") >= RESTARTS, log
    assert log.count("session=True") == RESTARTS, log
    assert log.count("event=handover.restored") == RESTARTS, log
    assert "handover.refused" not in log and "session.fatal" not in log, log
    # One connection all along: the only close is the front end's, at the end.
    assert log.count("event=session.start") == 1 + RESTARTS, log
    assert log.count("event=session.closed") == 1, log
    # Each restarted daemon took its fds out of the store again.
    assert sum("FDSTOREREMOVE=1" in m for m in manager.messages) >= RESTARTS


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_vhost_user_session_carries_on_across_restarts(tmp_path, packed):
    rounds = 200
    ram = GuestRam([(0, 8 * MiB), (8 * MiB, 8 * MiB)])
    # Tracked in an inflight region, as QEMU's vhost-user-blk does.
    async with managed_blk(tmp_path, "vhost-user", ram, packed=packed, inflight=True) as served:
        done = await restart_while_io_runs(served.manager, served.blk, rounds)
        assert done == list(range(rounds))  # every request once, in order
        # The same connection still answers, and the ring stands exactly
        # where the requests put it: none repeated, none lost.
        assert served.frontend is not None
        base = await served.frontend.stop_queue(0)
        ring = served.blk.queue.ring
        if not packed:
            assert base == 2 * rounds
        else:  # where the driver will put and look for the next descriptors
            used = ring.used_wrap << 31 | ring.next_used << 16
            assert base == used | ring.avail_wrap << 15 | ring.next_avail
            assert ring.in_flight == 0
    assert_handed_over(served.manager)
    assert served.manager.starts == RESTARTS + 1
    verify_image(tmp_path, rounds)
    ram.close()


async def test_a_session_using_all_its_queues_fits_in_the_units_fd_store(tmp_path):
    """A front end using all 64 queues the daemon offers by default (QEMU on
    64 vCPUs) gives three eventfds a queue: the handover needs them all in
    the store the unit allows (the stand-in keeps as many as the shipped
    unit's FileDescriptorStoreMax= and drops the rest, as systemd does)."""
    ram = GuestRam([(0, 160 * MiB)])
    async with FakeSystemd(tmp_path, blk_command(tmp_path, "vhost-user")) as manager:
        await manager.start()
        frontend = await VhostUserFrontend.connect(str(tmp_path / "device.sock"))
        queues = await start_device(frontend, ram, queues=64, size=8, inflight=True)
        await queues[0].write(1, b"a" * 512)
        await manager.restart()
        for number, blk in ((2, queues[0]), (3, queues[63])):
            await blk.write(number, bytes([number]) * 512)
            assert await blk.read(number, 512) == bytes([number]) * 512
        await frontend.aclose()
        assert await manager.stop() == 0
    log = manager.log()
    assert log.count("event=handover.restored") == 1 and "handover.refused" not in log, log
    assert len(manager.messages) < 1000
    ram.close()


@pytest.mark.parametrize("fd_less", [False, True], ids=["mapped", "dma-messages"])
async def test_vfio_user_session_carries_on_across_restarts(tmp_path, fd_less):
    """vfio-user clients cannot reconnect at all: without the store a
    restart would lose the device. With fd-less memory every ring access is
    a DMA message, so the handover must wait for a gap between them."""
    rounds = 120 if not fd_less else 40
    ram = GuestRam([(0, 16 * MiB)])
    async with managed_blk(tmp_path, "vfio-user", ram, fd_less=fd_less) as served:
        done = await restart_while_io_runs(served.manager, served.blk, rounds)
        assert done == list(range(rounds))
        # Config space and registers answer as before the restarts.
        assert served.driver is not None
        assert await served.driver.status() & 0x4  # DRIVER_OK
    assert_handed_over(served.manager)
    verify_image(tmp_path, rounds)
    ram.close()


async def test_a_message_arriving_as_a_vfio_user_session_parks_stays_in_the_socket():
    """A reader woken for a message just as the handover parks the session
    (its wake-up already on its way) must leave it in the socket: read, it
    would sit in the command backlog, which is not handed over, and be lost
    (a doorbell lost so under an NVMe restart left a command never seen)."""
    from vfiouserd.changes import Changes
    from vfiouserd.protocol import vfio_user as vfu
    from vfiouserd.vfio_user.channel import Channel

    plain, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours = trio.socket.from_stdlib_socket(plain)
    channel = Channel(ours, 4096, Changes(), lambda: False)
    parked = False
    results: list[bool] = []

    async def read() -> None:
        results.append(await channel.read_loop(ours, channel.commands, lambda: parked))

    access = vfu.RegionAccess.build({"offset": 0x1008, "region": 0, "count": 4})
    message = vfu.encode(7, vfu.Command.REGION_WRITE, access + b"\1\0\0\0", no_reply=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits for the socket
        # No checkpoint between: the message comes, then the session parks.
        theirs.send(message)
        parked = True
    assert results == [False] and len(channel.commands) == 0
    assert plain.recv(4096) == message  # still there for the next daemon
    ours.close()
    theirs.close()


async def test_an_idle_listener_is_handed_over_and_the_socket_stays(tmp_path):
    ram = GuestRam([(0, 8 * MiB)])
    socket_path = tmp_path / "device.sock"
    async with FakeSystemd(tmp_path, blk_command(tmp_path, "vhost-user")) as manager:
        await manager.start()
        await manager.restart()
        assert manager.stored_names() == []  # taken back by the new daemon
        assert socket_path.exists()  # still the same listening socket
        frontend = await VhostUserFrontend.connect(str(socket_path))
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"i" * 512)
        assert await blk.read(0, 512) == b"i" * 512
        # The control socket came along too, and answers for the new daemon.
        control = str(tmp_path / "device.control.sock")

        def statistics() -> dict:
            with ControlClient(control) as client:
                return client.execute("stats")

        stats = await trio.to_thread.run_sync(statistics)
        assert stats["queues"][0]["requests"] == 2
        await frontend.aclose()
        assert await manager.stop() == 0
        assert sorted(manager.stored_names()) == ["vfu-control", "vfu-listener"]
        assert "event=handover.listener" in manager.log()
    ram.close()


async def test_a_socket_activated_daemons_control_socket_stays_across_restarts(tmp_path):
    """Under socket activation the listening socket is systemd's and is not
    stored; the control socket is the daemon's, stored and handed over, so
    its file must stay for the next daemon. (The jail's parent kept the
    files only when the listener was stored, and removed the control
    socket's: the next daemon listened where no client could reach it.)"""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "device.sock"))
    listener.listen()
    image = str(tmp_path / "disk.img")
    command = [sys.executable, "-m", "vfiouserd", "vhost-user-blk", "--fdstore"]
    control = tmp_path / "device.control.sock"  # beside the socket unit's socket
    async with FakeSystemd(tmp_path, [*command, "--blk-file", image, "--size", "16M"]) as manager:
        manager.store.append(("device.socket", os.dup(listener.fileno())))  # a socket unit's
        await manager.start()
        first = manager.process.pid
        await manager.restart()
        assert control.exists()

        def greeting() -> dict:
            with ControlClient(str(control)) as client:
                return client.greeting

        assert (await trio.to_thread.run_sync(greeting))["pid"] == manager.process.pid != first
        assert await manager.stop() == 0
        assert sorted(manager.stored_names()) == ["device.socket", "vfu-control"]
    listener.close()


async def test_a_state_the_next_daemon_cannot_load_ends_only_that_session(tmp_path):
    """An upgrade to a daemon for another device: it refuses the session
    with a clear error, the VMM sees its connection close, and the daemon
    listens on the handed-over socket for the VMM to come back."""
    ram = GuestRam([(0, 8 * MiB)])
    socket_path = tmp_path / "device.sock"
    async with FakeSystemd(tmp_path, blk_command(tmp_path, "vhost-user")) as manager:
        await manager.start()
        frontend = await VhostUserFrontend.connect(str(socket_path))
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"r" * 512)
        assert await manager.stop() == 0
        manager.command = daemon_command(tmp_path, "vhost-user-rng")
        await manager.start()
        with trio.fail_after(10):
            assert await frontend.sock.recv(1) == b""  # closed by the new daemon
        log = manager.log()
        assert "event=handover.refused" in log and "cannot be loaded into" in log, log
        await frontend.aclose()
        again = await VhostUserFrontend.connect(str(socket_path))
        assert await again.queue_count() == 1  # the rng device answers
        await again.aclose()
        assert await manager.stop() == 0
    ram.close()


def test_a_damaged_or_incomplete_handover_is_refused_and_its_fds_closed():
    """What the store gives back is checked like any state blob: a damaged
    record leaves no session and no stray fds (the listener is still used)."""
    from vfiouserd import handover
    from vfiouserd.systemd import PassedFd

    def passed(record: bytes) -> tuple[list[PassedFd], list[int]]:
        state_fd = handover.write_state(record)
        listener, extra = os.eventfd(0), os.eventfd(0)
        return [
            PassedFd(listener, handover.LISTENER),
            PassedFd(extra, "vfu-fd-0"),
            PassedFd(state_fd, handover.STATE),
            PassedFd(os.eventfd(0), "socket-unit"),
        ], [listener, extra]

    good = handover.Handover("vhost-user", {"connection": "vfu-conn"}, b"").encode()
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF
    for record in (bytes(damaged), good[: len(good) // 2], b"not a state"):
        fds, (listener, extra) = passed(record)
        received, others = handover.take(fds)
        assert received is not None and received.handover is None
        assert list(received.fds) == [handover.LISTENER]  # the rest closed
        with pytest.raises(OSError):
            os.fstat(extra)
        assert [p.name for p in others] == ["socket-unit"]
        os.close(listener)
        os.close(others[0].fd)
    # A record that names an fd the store did not give back.
    fds, (listener, extra) = passed(good)
    received, others = handover.take(fds)
    assert received is not None and received.handover is not None
    with pytest.raises(handover.HandoverError, match="did not give back 'vfu-conn'"):
        received.fd("vfu-conn")
    received.close_unused()
    os.close(others[0].fd)


async def test_a_session_whose_fds_did_not_all_come_back_is_closed_not_left_to_the_gc():
    """A socket left to the garbage collector warns (ResourceWarning), and
    Python builds the warning's text with the socket's repr: getpeername,
    which a jailed daemon was killed for after such a refused handover."""
    from vfiouserd import handover

    ours, theirs = socket.socketpair()
    received = handover.Received(None, {"vfu-conn": ours.detach()}, ["vfu-conn"])

    class Session:
        def __init__(self, sock) -> None:
            self.sock = sock

        def take_over(self, document, fd) -> None:
            fd("vfu-fd-7")

        def close(self) -> None:
            self.sock.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(handover.HandoverError, match="vfu-fd-7"):
            handover.restore(Session, {"connection": "vfu-conn"}, received, "vhost-user")
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    received.close_unused()
    theirs.close()


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
async def test_buffers_waiting_for_the_host_are_handed_over(tmp_path, protocol):
    """virtio-input across restarts through the fd store: the driver's
    event buffers still waiting go to the next daemon with the session
    (given back to the ring, taken again), and each one is filled once,
    in order, by the events the host types between restarts."""
    from test_host_fed import Driver

    from vfiouserd.devices.input import EV_KEY, EVENT

    events_path = str(tmp_path / "events.sock")
    command = daemon_command(tmp_path, f"{protocol}-input", "--events-socket", events_path)
    total = RESTARTS + 1
    ram = GuestRam([(0, 8 * MiB)])

    async def type_across_restarts(manager: FakeSystemd, queue) -> None:
        driver = Driver(ram, queue.ring, queue.kick_async)
        await driver.post(*[8] * (total + 2))  # more than will be filled
        for number in range(total):
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with trio.fail_after(10):
                while True:  # the restarted daemon's events socket
                    try:
                        await client.connect(events_path)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            await client.send(EVENT.pack(EV_KEY, 30, number))
            await driver.received(number + 1)
            client.close()
            if number < RESTARTS:
                await manager.restart()
        await trio.sleep(0.2)
        values = [EVENT.unpack(data)[2] for _, data in driver.collect()]
        assert values == list(range(total))  # once each, in order

    async with FakeSystemd(tmp_path, command) as manager:
        await manager.start()
        socket_path = str(tmp_path / "device.sock")
        if protocol == "vhost-user":
            frontend = await VhostUserFrontend.connect(socket_path)
            events, _ = await start_device(frontend, ram, queues=2, size=16)
            await type_across_restarts(manager, events.queue)
            assert await frontend.stop_queue(0) == total  # two still waiting: given back
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(socket_path, ram=ram) as vmm:
                await vmm.map_ram()
                pci = VirtioPciDriver(vmm, ram)
                queue, _ = await pci.start(queue_count=2, queue_size=16)
                await type_across_restarts(manager, queue)
                pci.close()
        assert await manager.stop() == 0
        assert_handed_over(manager)
    ram.close()


async def test_host_events_no_buffer_took_yet_go_with_the_device_state(tmp_path):
    """Events read from the host while the driver had no buffer out are
    device state: after an fd-store restart they still reach the driver."""
    from test_host_fed import Driver

    from vfiouserd.devices.input import EV_KEY, EVENT

    events_path = str(tmp_path / "events.sock")
    command = daemon_command(tmp_path, "vhost-user-input", "--events-socket", events_path)
    ram = GuestRam([(0, 8 * MiB)])
    async with FakeSystemd(tmp_path, command) as manager:
        await manager.start()
        frontend = await VhostUserFrontend.connect(str(tmp_path / "device.sock"))
        events, _ = await start_device(frontend, ram, queues=2, size=16)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(events_path)
        typed = [EVENT.pack(EV_KEY, 30, n) for n in range(3)]
        await client.send(b"".join(typed))
        await trio.sleep(0.3)  # read by the daemon, waiting for buffers
        client.close()
        await manager.restart()
        driver = Driver(ram, events.queue.ring, events.queue.kick_async)
        await driver.post(8, 8, 8)
        assert [data for _, data in await driver.received(3)] == typed
        await frontend.aclose()
        assert await manager.stop() == 0
        assert "event=handover.restored" in manager.log()
    ram.close()


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
async def test_console_clients_stay_connected_across_restarts(tmp_path, protocol):
    """virtio-console across restarts through the fd store while bytes flow
    both ways on a named port: the host's client stays connected all along
    (its connection goes through the store with the session), and every
    byte arrives once, in order, each way."""
    from test_console import ConsoleDriver, connect, receive_exactly, vhost_user_console

    path = str(tmp_path / "data.sock")
    command = daemon_command(tmp_path, f"{protocol}-console", "--port", f"data={path}")
    to_guest, to_host = os.urandom(1 << 20), os.urandom(1 << 20)
    ram = GuestRam([(0, 16 * MiB)])

    async def stream_across_restarts(manager: FakeSystemd, driver: ConsoleDriver) -> None:
        await driver.open_all([1])
        client = await connect(path)
        got: dict[str, bytes] = {}

        async def host_writes() -> None:
            view = memoryview(to_guest)
            while view:
                view = view[await client.send(view[:4096]) :]
                await trio.sleep(0.001)

        async def host_reads() -> None:
            got["host"] = await receive_exactly(client, len(to_host), timeout=120)

        async def guest_reads() -> None:
            got["guest"] = await driver.receive(1, len(to_guest), timeout=120)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(host_writes)
            nursery.start_soon(host_reads)
            nursery.start_soon(guest_reads)
            nursery.start_soon(driver.send, 1, to_host, 120)
            for _ in range(RESTARTS):
                await trio.sleep(0.3)
                await manager.restart()
        assert got["guest"] == to_guest and got["host"] == to_host
        client.close()

    async with FakeSystemd(tmp_path, command) as manager:
        await manager.start()
        socket_path = str(tmp_path / "device.sock")
        if protocol == "vhost-user":
            frontend = await VhostUserFrontend.connect(socket_path)
            await stream_across_restarts(manager, await vhost_user_console(frontend, ram, 6))
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(socket_path, ram=ram) as vmm:
                await vmm.map_ram()
                pci = VirtioPciDriver(vmm, ram)
                queues = await pci.start(queue_count=6, queue_size=64)
                await stream_across_restarts(manager, ConsoleDriver(ram, list(queues)))
                pci.close()
        assert await manager.stop() == 0
        assert_handed_over(manager)
        log = manager.log()
        assert log.count("event=console.client port=1") == 1, log  # never reconnected
    ram.close()


async def test_an_events_client_stays_connected_across_restarts(tmp_path):
    """virtio-input's events client keeps its connection through restarts,
    even with a record cut in two by one: each event arrives once, in
    order, and the LED the driver sets afterwards reaches the same client."""
    from test_host_fed import Driver

    from vfiouserd.devices.input import EV_KEY, EV_LED, EVENT

    events_path = str(tmp_path / "events.sock")
    command = daemon_command(tmp_path, "vhost-user-input", "--events-socket", events_path)
    ram = GuestRam([(0, 8 * MiB)])
    typed = [EVENT.pack(EV_KEY, 30, n) for n in range(3)]
    async with FakeSystemd(tmp_path, command) as manager:
        await manager.start()
        frontend = await VhostUserFrontend.connect(str(tmp_path / "device.sock"))
        events, status = await start_device(frontend, ram, queues=2, size=16)
        driver = Driver(ram, events.queue.ring, events.queue.kick_async)
        await driver.post(8, 8, 8)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(events_path)
        await client.send(typed[0])
        await driver.received(1)
        await manager.restart()
        await client.send(typed[1][:4])
        await trio.sleep(0.2)  # the half record is read, and kept
        await manager.restart()
        await client.send(typed[1][4:] + typed[2])
        assert [data for _, data in await driver.received(3)] == typed
        led = ram.alloc(8, 64)
        ram.write(led, EVENT.pack(EV_LED, 1, 1))
        status.queue.ring.add([(led, 8)], [], "led")
        await status.queue.kick_async()
        with trio.fail_after(5):
            assert await client.recv(8) == EVENT.pack(EV_LED, 1, 1)
        client.close()
        await frontend.aclose()
        assert await manager.stop() == 0
        log = manager.log()
        assert log.count("event=handover.restored") == 2, log
        assert log.count("event=input.client ") == 1, log  # never reconnected
    ram.close()


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
def test_a_handover_record_is_checked_field_by_field(protocol):
    """The session a previous daemon describes is input: a field of the
    wrong type, a missing one or a wrong shape is refused with its path,
    and a record survives its own JSON form unchanged."""
    from vfiouserd.handover import record_from_document, record_to_document
    from vfiouserd.vfio_user import records as vfio_records
    from vfiouserd.vhost_user import records as vhost_records

    if protocol == "vhost-user":
        queue = vhost_records.Queue(
            256,
            0x1000,
            0x2000,
            0x3000,
            0,
            0,
            True,
            7,
            True,
            True,
            False,
            "vfu-fd-1",
            "vfu-fd-2",
            None,
        )
        record = vhost_records.Session(
            "vfu-conn",
            1 << 32,
            0x3F,
            15,
            [vhost_records.Region(0, 1 << 20, 0x7F00, 0, "vfu-fd-0")],
            [queue],
            None,
            None,
            None,
            None,
        )
        cls = vhost_records.Session
        bad = [
            (("queues", 0, "base"), True, "Session.queues[0].base: True is not int"),
            (("queues", 0, "kick"), 3, "Session.queues[0].kick: 3 is not str"),
            (("memory",), {}, "Session.memory: not a list"),
        ]
    else:
        record = vfio_records.Session(
            "vfu-conn",
            None,
            vfio_records.Client(16, 1 << 20, 65535, 4096, False, None, True, ["max_msg_fds"]),
            4096,
            9,
            None,
            [vfio_records.DmaRegion(0, 1 << 20, "vfu-fd-0", 0, True, True)],
            {"MSIX": vfio_records.IrqIndex(["vfu-fd-1", None], [False, True], [False, False])},
            None,
            {"bar2": "vfu-fd-3"},
            vfio_records.Migration("RUNNING", "", ""),
            None,
        )
        cls = vfio_records.Session
        bad = [
            (("irqs", "MSIX", "masked", 1), 1, "Session.irqs.MSIX.masked[1]: 1 is not bool"),
            (("client", "twin_socket_fd_index"), "0", "is not int"),
            (("migration",), None, "Session.migration: not an object"),
        ]
    document = record_to_document(record)
    assert record_from_document(cls, json.loads(json.dumps(document))) == record
    for path, value, message in bad:
        damaged = json.loads(json.dumps(document))
        target = damaged
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            record_from_document(cls, damaged)
    del document["connection"]
    with pytest.raises(ValueError, match="Session: no connection"):
        record_from_document(cls, document)


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
async def test_a_network_peer_stays_connected_across_restarts(tmp_path, protocol):
    """virtio-net across restarts through the fd store while frames flow
    both ways: the peer's stream goes through the store with the session,
    and every frame arrives once, in order, each way, even one the peer had
    sent part of when a daemon stopped."""
    from test_net import Guest, frame, read_frames, vhost_user_guest

    from vfiouserd.devices.net import LENGTH

    wire = str(tmp_path / "wire.sock")
    command = daemon_command(tmp_path, f"{protocol}-net", "--stream-listen", wire)
    count = 300
    to_guest = [frame(60 + n, n % 256) for n in range(count)]
    to_peer = [frame(1000 + n, n % 256) for n in range(count)]
    ram = GuestRam([(0, 16 * MiB)])

    async def stream_across_restarts(manager: FakeSystemd, guest: Guest) -> None:
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await peer.connect(wire)
        with trio.fail_after(10):  # the guest's frames are lost until the daemon has its end
            while "event=net.link up=True" not in manager.log():
                await trio.sleep(0.01)
        got: dict[str, list[bytes]] = {}

        async def peer_writes() -> None:
            stream = b"".join(LENGTH.pack(len(f)) + f for f in to_guest)
            for at in range(0, len(stream), 1000):  # frames cut across sends
                await peer.send(stream[at : at + 1000])
                await trio.sleep(0.002)

        async def peer_reads() -> None:
            got["peer"] = await read_frames(peer, count, timeout=120)

        async def guest_reads() -> None:
            got["guest"] = await guest.receive(count, timeout=120)

        async def guest_writes() -> None:
            for f in to_peer:
                await guest.send(f)
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            for task in (peer_writes, peer_reads, guest_reads, guest_writes):
                nursery.start_soon(task)
            for _ in range(RESTARTS):
                await trio.sleep(0.3)
                await manager.restart()
        assert got["guest"] == to_guest and got["peer"] == to_peer
        peer.close()

    async with FakeSystemd(tmp_path, command) as manager:
        await manager.start()
        socket_path = str(tmp_path / "device.sock")
        if protocol == "vhost-user":
            frontend = await VhostUserFrontend.connect(socket_path)
            await stream_across_restarts(manager, await vhost_user_guest(frontend, ram))
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(socket_path, ram=ram) as vmm:
                await vmm.map_ram()
                pci = VirtioPciDriver(vmm, ram)
                queues = await pci.start(queue_count=3, queue_size=64)
                await stream_across_restarts(manager, Guest(ram, queues[0], queues[1]))
                pci.close()
        assert await manager.stop() == 0
        assert_handed_over(manager)
        log = manager.log()
        assert log.count("event=net.link up=True") == 1, log  # never reconnected
    ram.close()


async def test_an_nvme_controller_carries_on_across_restarts(tmp_path):
    """vfio-user-nvme through the fd store, driven as Linux's nvme driver
    drives it: I/O on two queues all along, a third queue whose completion
    queue is full (completions waiting for room, commands not yet taken)
    and two AERs held at each restart. Every command completes once, with
    its data; the held AERs complete with the events raised afterwards;
    the interrupt eventfds still fire."""
    import vfiouserd.devices.nvme.formats as nvme
    from vfiouserd.client.nvme import NvmeDriver
    from vfiouserd.devices.nvme.formats import AdminOpcode, Completion, Feature, IoOpcode

    rounds = 60  # per I/O queue
    image = tmp_path / "ns1.img"
    command = daemon_command(tmp_path, "vfio-user-nvme", "--namespace", str(image), "--size", "16M")
    ram = GuestRam([(0, 32 * MiB)])
    ram.alloc(4096)  # no queue at address 0: the controller refuses one there

    def posted(driver: NvmeDriver, qid: int) -> int:
        """Completions waiting in the CQ for the driver (none consumed)."""
        queue, count = driver.queues[qid], 0
        head, phase = queue.cq_head, queue.phase
        size = queue.cq_size or queue.size
        while count < size:
            raw = ram.read(queue.cq_base + head * nvme.CQE_SIZE, nvme.CQE_SIZE)
            if Completion.decode(raw).phase != phase:
                break
            count += 1
            head = (head + 1) % size
            phase = phase if head else not phase
        return count

    async with FakeSystemd(tmp_path, command) as manager:
        await manager.start()
        async with VfioUserClient.connect(str(tmp_path / "device.sock"), ram=ram) as client:
            await client.map_ram(pieces=3)
            driver = NvmeDriver(client, ram)
            await driver.setup_pci()
            await driver.enable()
            assert (await driver.set_feature(Feature.NUMBER_OF_QUEUES, 2 * 0x10001)).status == 0
            for qid in (1, 2):
                assert (await driver.create_cq(qid, 64)).status == 0
                assert (await driver.create_sq(qid, 64)).status == 0
            # Queue 3: a CQ with room for 3 completions under an SQ of 8.
            assert (await driver.create_cq(3, 4)).status == 0
            assert (await driver.create_sq(3, 8)).status == 0
            assert (await driver.set_feature(Feature.ASYNC_EVENT_CONFIG, 0xFF)).status == 0
            aers = [
                await driver.submit(0, nvme.command(AdminOpcode.ASYNC_EVENT_REQUEST))
                for _ in range(2)
            ]
            done: list[int] = []

            async def io(qid: int, first: int) -> None:
                for number in range(first, first + rounds):
                    data = struct.pack("<I", number) * 1024
                    assert (await driver.write(qid, 1, 8 * number, data)).status == 0
                    completion, back = await driver.read(qid, 1, 8 * number, 4096)
                    assert completion.status == 0 and back == data, number
                    done.append(number)

            async def backlog(restart: int) -> list[tuple[int, int, bytes]]:
                """Six reads on queue 3: three complete, the rest wait for room."""
                reads = []
                for n in range(6):
                    data = bytes([restart * 8 + n + 1]) * 4096
                    slba = 8 * (1024 + 8 * restart + n)
                    assert (await driver.write(1 + n % 2, 1, slba, data)).status == 0
                    buffer, prp1, prp2 = driver.data_buffer(4096)
                    cmd = nvme.command(
                        IoOpcode.READ, nsid=1, prp1=prp1, prp2=prp2, cdw=(slba, 0, 7)
                    )
                    reads.append((await driver.submit(3, cmd), buffer, data))
                with trio.fail_after(10):
                    while posted(driver, 3) < 3:
                        await trio.sleep(0.005)
                await trio.sleep(0.05)
                assert posted(driver, 3) == 3  # full: no more posted
                return reads

            async with trio.open_nursery() as nursery:
                nursery.start_soon(io, 1, 0)
                nursery.start_soon(io, 2, rounds)
                for restart in range(RESTARTS):
                    reads = await backlog(restart)
                    with trio.fail_after(30):
                        while len(done) < (restart + 1) * 2 * rounds // (RESTARTS + 2):
                            await trio.sleep(0.005)
                    await manager.restart()
                    for cid, buffer, data in reads:  # each once, with its data
                        completion = await driver.wait(3, cid)
                        assert completion.status == 0 and ram.read(buffer, 4096) == data
            assert sorted(done) == list(range(2 * rounds))

            # The AERs held since before the first restart: one per event.
            assert (await driver.set_feature(Feature.TEMPERATURE_THRESHOLD, 300)).status == 0
            event = await driver.wait(0, aers[0])
            assert event.status == 0 and event.dw0 == 1 | 1 << 8 | 2 << 16  # SMART, temperature
            await driver.write32(nvme.doorbell_offset(9, False), 1)
            event = await driver.wait(0, aers[1])
            assert event.dw0 == 1 << 16  # error: invalid doorbell register
            # The handed-over interrupt eventfds fire.
            for qid in (1, 2):
                driver.interrupts(qid)
                assert (await driver.flush(qid, 1)).status == 0
                assert driver.interrupts(qid) >= 1
            # Nothing more completes: no completion lost, none repeated.
            for qid in (0, 1, 2, 3):
                assert await driver.nothing_completes(qid, 0.1)
                assert driver.queues[qid].done == {}
            driver.close()
        assert await manager.stop() == 0
        assert_handed_over(manager)
        log = manager.log()
        assert "event=controller.fatal" not in log and "device.failed" not in log, log
    with open(image, "rb") as f:
        for number in range(2 * rounds):
            f.seek(4096 * number)
            assert f.read(4096) == struct.pack("<I", number) * 1024, number
    ram.close()
