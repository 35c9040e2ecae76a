"""The allowlist is exactly what the jailed daemon needs.

Daemons run under ``strace -f`` with ``--seccomp=log``, so nothing is killed
while recording, through workloads that reach every device path: both
protocols, every device, split and packed rings, several queues, every
virtio-blk request type, error paths, fd-less DMA with threads and the twin
socket, reconnection, SIGHUP reload, a restart through the fd store, and a
real QEMU guest. Then:

* every call the jailed daemon made is allowed (or refused softly on
  purpose), so the default kill action never fires on a real workload;
* every allowlist entry was made, or is listed in ``RARE`` with a reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from daemon import Daemon
from fake_systemd import FakeSystemd
from syscall_record import STRACE, Record, command, parse

from conftest import MiB, start_device
from vfiouserd.client.blk import BlkClient, RngClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient, VfioUserError, eventfd
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.devices.blk import BlkStatus, RequestType
from vfiouserd.devices.virtio import bit
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.sandbox import seccomp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = pytest.mark.skipif(STRACE is None, reason="strace not installed")

Workload = Callable[[Daemon], Awaitable[None]]


async def vhost_user_blk(daemon: Daemon) -> None:
    image = daemon.command[daemon.command.index("--blk-file") + 1]
    ram = GuestRam([(0, 16 * MiB), (0x1_0000_0000, 8 * MiB)])
    try:
        for packed in (False, True):
            frontend = await VhostUserFrontend.connect(daemon.socket_path)
            queues = await start_device(
                frontend, ram, queues=2, packed=packed, size=16, inflight=True
            )
            channel = await frontend.open_backend_channel()
            for blk in queues:
                await blk.write(8, b"w" * 4096, data_pieces=3, indirect=True)
                assert await blk.read(8, 4096, data_pieces=2) == b"w" * 4096
                assert (await blk.request(RequestType.FLUSH)).status == BlkStatus.OK
                assert (await blk.request(RequestType.GET_ID, in_size=20)).status == 0
                assert await blk.segments(RequestType.DISCARD, [(0, 8, 0)]) == 0
                assert await blk.segments(RequestType.WRITE_ZEROES, [(8, 8, 1)]) == 0
                assert (await blk.request(99)).status == BlkStatus.UNSUPP
                assert (await blk.request(RequestType.IN, 1 << 40, in_size=512)).status
            if not packed:
                os.truncate(image, 32 * MiB)  # grown online: announced after SIGHUP
                daemon.send(signal.SIGHUP)
                with trio.fail_after(10):
                    await frontend.answer_backend_request(channel)
            # migration: dirty logging while serving, then the device state
            log_fd = os.memfd_create("log")
            os.ftruncate(log_fd, 1 << 20)
            await frontend.call(
                R.SET_LOG_BASE, vu.LogDescription.build({"size": 1 << 20, "offset": 0}), [log_fd]
            )
            os.close(log_fd)
            await frontend.set_features(frontend.features | bit(vu.VHOST_F_LOG_ALL))
            await queues[0].read(0, 4096)
            channel.close()
            for index in range(len(queues)):
                await frontend.stop_queue(index)
            blob = await frontend.save_device_state()
            await frontend.load_device_state(blob)
            await frontend.aclose()
        # A fatal violation closes that connection; the next one is served.
        bad = await VhostUserFrontend.connect(daemon.socket_path)
        await bad.sock.send(vu.Header.build({"request": 1, "flags": 0x3, "size": 0}))
        with trio.fail_after(5):
            assert await bad.sock.recv(64) == b""
        await bad.aclose()
    finally:
        ram.close()


async def vhost_user_read_only(daemon: Daemon) -> None:
    ram = GuestRam([(0, 8 * MiB)])
    frontend = await VhostUserFrontend.connect(daemon.socket_path)
    (blk,) = await start_device(frontend, ram)
    assert (await blk.request(RequestType.OUT, 0, out=b"x" * 512)).status == BlkStatus.IOERR
    assert await blk.read(0, 512) == bytes(512)
    await frontend.aclose()
    ram.close()


async def vhost_user_rng(daemon: Daemon) -> None:
    ram = GuestRam([(0, 8 * MiB)])
    for packed in (False, True):
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        (rng,) = await start_device(frontend, ram, client=RngClient, packed=packed)
        assert len(await rng.read(4096, pieces=3)) == 4096
        await frontend.aclose()
    ram.close()


async def vfio_user_virtio(daemon: Daemon) -> None:

    rng = "vfio-user-rng" in daemon.command
    ram = GuestRam([(0, 16 * MiB)])
    for with_fd, twin, ioeventfds in ((True, False, True), (False, True, False)):
        async with VfioUserClient.connect(daemon.socket_path, ram=ram, twin_socket=twin) as client:
            await client.map_ram(with_fd=with_fd)
            driver = VirtioPciDriver(client, ram)
            queues = await driver.start(ioeventfds=ioeventfds, queue_count=2)
            if rng:
                assert len(await RngClient(ram, queues[0], arena=MiB).read(512)) == 512
            else:
                blk = BlkClient(ram, queues[0], arena=MiB)
                await blk.write(0, b"v" * 8192, data_pieces=2)
                assert await blk.read(0, 8192) == b"v" * 8192
                assert (await blk.request(RequestType.FLUSH)).status == BlkStatus.OK
            await client.region_read(vfu.PciRegion.CONFIG, 0, 64)
            with pytest.raises(VfioUserError):
                await client.region_read(9, 0, 4)
            # migration: dirty logging, the state out and back in
            await client.dma_logging_start(4096, [])
            blob = await client.save_device()
            await client.dma_logging_report(0, 16 * MiB, 4096)
            await client.dma_logging_stop()
            await client.load_device(blob)
            await client.dma_unmap(0, 0, flags=vfu.DMA_UNMAP_FLAG_ALL)
            driver.close()
    ram.close()


async def input_device(daemon: Daemon) -> None:
    """Events from the events socket into buffers waiting for them (over
    vfio-user also filled on a worker thread, memory reached through DMA),
    an LED back to the client, a client that leaves and one that comes."""
    from test_host_fed import Driver

    from vfiouserd.devices.input import EV_KEY, EV_LED, EVENT

    path = daemon.command[daemon.command.index("--events-socket") + 1]
    ram = GuestRam([(0, 16 * MiB)])

    async def exchange(events, status) -> None:
        driver = Driver(ram, events.ring, events.kick_async)
        await driver.post(8, 8)
        for _ in range(2):  # a client, then the next one
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(path)
            await client.send(EVENT.pack(EV_KEY, 30, 1))
            await driver.received(len(driver.done) + 1)
            led = ram.alloc(8, 64)
            ram.write(led, EVENT.pack(EV_LED, 1, 1))
            status.ring.add([(led, 8)], [], "led")
            await status.kick_async()
            with trio.fail_after(5):
                while EVENT.unpack(await client.recv(8)) != (EV_LED, 1, 1):
                    pass
            client.close()

    if "vhost-user-input" in daemon.command:
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        events, status = await start_device(frontend, ram, queues=2, size=16)
        await exchange(events.queue, status.queue)
        await frontend.aclose()
    else:
        await over_vfio_user(daemon, ram, lambda queues: exchange(*queues), queue_count=2)
    ram.close()


async def console_device(daemon: Daemon) -> None:
    """The console and a named port: control messages, bytes both ways
    (over vfio-user also on a worker thread, memory reached through DMA),
    a client that leaves and the next one."""
    from test_console import ConsoleDriver, exchange_on_a_named_port, vhost_user_console

    port = daemon.command[daemon.command.index("--port") + 1].partition("=")[2]
    ram = GuestRam([(0, 16 * MiB)])
    if "vhost-user-console" in daemon.command:
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        await exchange_on_a_named_port(await vhost_user_console(frontend, ram, 6), port)
        await frontend.aclose()
    else:
        await over_vfio_user(
            daemon,
            ram,
            lambda queues: exchange_on_a_named_port(ConsoleDriver(ram, queues), port),
            queue_count=6,
            queue_size=64,
        )
    ram.close()


async def vsock_device(daemon: Daemon) -> None:
    """A guest connection to a host program's PATH_<port> (connect after the
    jail), bytes both ways, a host program's CONNECT to the guest, resets."""
    from test_vsock import GuestStack, accept, host_listener, receive_exactly, vhost_user_stack

    from vfiouserd.devices.vsock import SHUTDOWN_SEND, Op

    uds = daemon.command[daemon.command.index("--uds-path") + 1]
    listener = host_listener(f"{uds}_80")
    os.chmod(f"{uds}_80", 0o777)  # the jailed daemon is not root
    ram = GuestRam([(0, 16 * MiB)])

    async def exchange(guest: GuestStack) -> None:
        await guest.connect(1234, 80)
        host = await accept(listener)
        await guest.write(1234, 80, b"to the host" * 1000)
        assert await receive_exactly(host, 11000) == b"to the host" * 1000
        await host.send(b"to the guest")
        assert await guest.read(1234, 12) == b"to the guest"
        await guest.send(Op.SHUTDOWN, 1234, 80, flags=SHUTDOWN_SEND)
        with trio.fail_after(5):
            assert await host.recv(10) == b""  # the guest's end of stream
        host.close()
        await guest.expect(1234, Op.SHUTDOWN)
        await guest.send(Op.RST, 1234, 80)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(uds)
        await client.send(b"CONNECT 52\n")
        request = await guest.expect(52, Op.REQUEST)
        guest.peers[52] = request[2]
        await guest.send(Op.RESPONSE, 52, request[2])
        await receive_exactly(client, len(f"OK {request[2]}\n"))
        await guest.send(Op.RST, 52, request[2])
        assert await client.recv(10) == b""
        client.close()

    if "vhost-user-vsock" in daemon.command:
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        await exchange(await vhost_user_stack(frontend, ram))
        await frontend.aclose()
    else:
        await over_vfio_user(
            daemon,
            ram,
            lambda queues: exchange(GuestStack(ram, queues)),
            queue_count=3,
            queue_size=64,
        )
    listener.close()
    ram.close()


async def net_device(daemon: Daemon) -> None:
    """Frames both ways with a peer the daemon connects to from its jail
    (and connects to again after that peer goes), the control queue over
    vfio-user, SEND_RARP over vhost-user."""
    from test_net import Guest, frame, read_frames, vhost_user_guest

    from vfiouserd.devices.net import CTRL, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, LENGTH

    wire = daemon.command[daemon.command.index("--stream-socket") + 1]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(wire)
    os.chmod(wire, 0o777)  # the jailed daemon is not root
    listener.listen(4)
    listener.setblocking(False)
    ram = GuestRam([(0, 16 * MiB)])

    async def peer() -> trio.socket.SocketType:
        await trio.lowlevel.wait_readable(listener)
        return trio.socket.from_stdlib_socket(listener.accept()[0])

    links = 0

    async def exchange(guest: Guest) -> None:
        nonlocal links
        for _ in range(2):  # the second time after the first peer went
            wire_end = await peer()
            # What the guest sends before the daemon has its end is lost, as
            # on a cable not yet plugged in: wait for the link.
            links += 1
            daemon.wait_for_log("event=net.link up=True", count=links)
            await guest.send(frame(100))
            assert await read_frames(wire_end, 1) == [frame(100)]
            await wire_end.send(LENGTH.pack(80) + frame(80))
            assert await guest.receive(1) == [frame(80)]
            wire_end.close()

    if "vhost-user-net" in daemon.command:
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        await exchange(await vhost_user_guest(frontend, ram))
        # The RARP is for the next peer: once the daemon saw the last one go,
        # or the end of that peer's stream would take it along.
        daemon.wait_for_log("event=net.link up=False", count=links)
        await frontend.call(R.SEND_RARP, bytes(8))
        wire_end = await peer()
        await read_frames(wire_end, 1)
        wire_end.close()
        await frontend.aclose()
    else:

        async def control_then_exchange(queues: list) -> None:
            command, ack = ram.alloc(4, 8), ram.alloc(1, 8)
            ram.write(command, CTRL.pack(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) + b"\x01\x00")
            queues[2].ring.add([(command, 4)], [(ack, 1)], "ctrl")
            await queues[2].kick_async()
            await exchange(Guest(ram, queues[0], queues[1]))

        await over_vfio_user(daemon, ram, control_then_exchange, queue_count=3, queue_size=64)
    listener.close()
    ram.close()


async def over_vfio_user(
    daemon: Daemon, ram: GuestRam, use: Callable[[list], Awaitable[object]], **start: int
) -> None:
    """Drive a virtio device over vfio-user twice, memory shared with fds
    and reached through DMA messages: ``use`` gets the started queues."""
    for with_fd in (True, False):
        async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
            await client.map_ram(with_fd=with_fd)
            pci = VirtioPciDriver(client, ram)
            await use(list(await pci.start(**start)))
            pci.close()


async def vfio_user_example(daemon: Daemon) -> None:
    ram = GuestRam([(0, 4 * MiB)])
    for with_fd in (True, False):
        async with VfioUserClient.connect(daemon.socket_path, ram=ram) as client:
            await client.map_ram(with_fd=with_fd)
            await client.config_write(0x04, 2, 0x6)
            irq = eventfd()
            await client.set_irqs(
                vfu.PciIrq.MSI,
                vfu.IrqSetFlag.DATA_EVENTFD | vfu.IrqSetFlag.ACTION_TRIGGER,
                0,
                1,
                fds=[irq],
            )
            ram.write(0x1000, b"e" * 8192)
            await client.region_write(0, 0x10, struct.pack("<Q", 0x1000))
            await client.region_write(0, 0x18, struct.pack("<II", 0x8000, 0))
            await client.region_write(0, 0x20, struct.pack("<I", 8192))
            await client.region_write(0, 0x24, struct.pack("<I", 1))
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(irq)
            assert ram.read(0x8000, 8192) == b"e" * 8192
            await client.reset()
            os.close(irq)
    ram.close()


def qemu_guest(tmp_path: Path, trace: Path) -> Record:
    """Both vhost-user devices under a real QEMU guest."""
    script = """
    dd if=/dev/urandom of=/tmp/p bs=64k count=8 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null || exit 10
    dd if=/dev/vda of=/tmp/b bs=64k count=8 iflag=direct 2>/dev/null || exit 11
    cmp /tmp/p /tmp/b || exit 12
    blkdiscard -o 0 -l 65536 /dev/vda || exit 13
    head -c 1024 /dev/hwrng > /tmp/r || exit 14
    """
    blk = recorded_daemon(
        tmp_path,
        trace.with_suffix(".blk"),
        "vhost-user-blk",
        "--blk-file",
        str(tmp_path / "q.img"),
        "--size",
        "16M",
        name="qblk",
    )
    rng = recorded_daemon(tmp_path, trace.with_suffix(".rng"), "vhost-user-rng", name="qrng")
    with blk, rng:
        run = vm.boot(
            script,
            devices=vm.vhost_user_device("vhost-user-blk-pci", blk.socket_path, "b")
            + vm.vhost_user_device("vhost-user-rng-pci", rng.socket_path, "r"),
        )
        assert blk.stop() == 0 and rng.stop() == 0
    assert run.exit_statuses == [0], run.output[-2000:]
    record = parse(trace.with_suffix(".blk"))
    record.update(parse(trace.with_suffix(".rng")))
    return record


def killed_under_systemd(tmp_path: Path, trace: Path) -> Record:
    """The outer process tells systemd it is ready and reports a killed daemon."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    daemon = recorded_daemon(
        tmp_path,
        trace,
        "vhost-user-rng",
        name="notified",
        env={"NOTIFY_SOCKET": notify.getsockname()},
    )
    with daemon, notify:
        notify.settimeout(10)
        assert notify.recv(256).startswith(b"READY=1")
        os.kill(daemon.jailed_pid(), signal.SIGKILL)
        assert daemon.process.wait(10) == 128 + signal.SIGKILL
    assert "event=daemon.killed" in daemon.log()
    return parse(trace)


async def handed_over(tmp_path: Path, protocol: str) -> Record:
    """A restart through systemd's fd store (a stand-in for systemd): the
    old daemon stores its session, its parent passes the fds on, the new
    one takes them back. ``strace -D`` keeps the daemon's pid, which
    LISTEN_PID must name."""
    workdir = tmp_path / f"handover-{protocol}"
    workdir.mkdir()
    socket_path = str(workdir / "device.sock")
    ram = GuestRam([(0, 16 * MiB)])

    def traced(start: int, *more: str) -> list[str]:
        return [
            *command(workdir / f"{start}.trace", [])[:1],
            "-D",
            *command(workdir / f"{start}.trace", [])[1:],
            sys.executable,
            *("-m", "vfiouserd", f"{protocol}-blk", "--socket-path", socket_path, "--fdstore"),
            *("--blk-file", str(workdir / "disk.img"), "--size", "16M", "--seccomp", "log"),
            *more,
        ]

    async def upgrade() -> None:  # and an upgrade in place (ExecReload=)
        assert await manager.reload(traced(3, "--upgrade")) == 0, manager.log()

    async with FakeSystemd(workdir, traced(1)) as manager:
        await manager.start()
        if protocol == "vhost-user":
            frontend = await VhostUserFrontend.connect(socket_path)
            (blk,) = await start_device(frontend, ram, inflight=True)
            await blk.write(0, b"h" * 512)
            manager.command = traced(2)
            await manager.restart()
            assert await blk.read(0, 512) == b"h" * 512
            await upgrade()
            assert await blk.read(0, 512) == b"h" * 512
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(socket_path, ram=ram) as client:
                await client.map_ram()
                driver = VirtioPciDriver(client, ram)
                (queue,) = await driver.start(queue_count=1)
                blk = BlkClient(ram, queue, arena=MiB)
                await blk.write(0, b"h" * 512)
                manager.command = traced(2)
                await manager.restart()
                assert await blk.read(0, 512) == b"h" * 512
                await upgrade()
                assert await blk.read(0, 512) == b"h" * 512
                driver.close()
        assert await manager.stop() == 0
        assert "event=handover.restored" in manager.log(), manager.log()
        assert "event=upgrade.taken_over" in manager.log(), manager.log()
    ram.close()
    record = parse(workdir / "1.trace")
    for start in (2, 3):
        record.update(parse(workdir / f"{start}.trace"))
    return record


def recorded_daemon(
    tmp_path: Path, trace: Path, *args: str, name: str, env: dict[str, str] | None = None
) -> Daemon:
    return Daemon(
        *args, "--seccomp", "log", workdir=tmp_path, name=name, wrap=command(trace, []), env=env
    )


WORKLOADS: list[tuple[tuple[str, ...], Workload]] = [
    (("vhost-user-blk", "--size", "16M", "--num-queues", "2"), vhost_user_blk),
    (("vhost-user-blk", "--size", "8M", "--read-only"), vhost_user_read_only),
    (("vhost-user-rng",), vhost_user_rng),
    (("vfio-user-blk", "--size", "16M"), vfio_user_virtio),
    (("vfio-user-rng",), vfio_user_virtio),
    (("vfio-user-example",), vfio_user_example),
    (("vhost-user-input",), input_device),
    (("vfio-user-input",), input_device),
    (("vhost-user-console",), console_device),
    (("vfio-user-console",), console_device),
    (("vhost-user-vsock",), vsock_device),
    (("vfio-user-vsock",), vsock_device),
    (("vhost-user-net",), net_device),
    (("vfio-user-net",), net_device),
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Record:
    tmp_path = tmp_path_factory.mktemp("syscalls")
    record = Record()
    for number, (args, workload) in enumerate(WORKLOADS):
        trace = tmp_path / f"{number}.trace"
        image = tmp_path / f"{number}.img"
        extra: tuple[str, ...] = ("--blk-file", str(image)) if "blk" in args[0] else ()
        if "input" in args[0]:
            extra = ("--events-socket", str(tmp_path / f"{number}.events"))
        if "console" in args[0]:
            extra = ("--console", str(tmp_path / f"{number}.con"))
            extra += ("--port", f"agent={tmp_path / f'{number}.agent'}")
        if "vsock" in args[0]:
            sockets = tmp_path / f"vsock{number}"
            sockets.mkdir(mode=0o755)
            sockets.chmod(0o755)  # the jailed daemon is not root
            extra = ("--uds-path", str(sockets / "v.sock"), "--guest-cid", "5")
        if "net" in args[0]:
            wires = tmp_path / f"wire{number}"
            wires.mkdir(mode=0o755)
            wires.chmod(0o755)  # the jailed daemon is not root
            extra = ("--stream-socket", str(wires / "wire.sock"))
        if "--read-only" in args:
            os.truncate(os.open(image, os.O_CREAT | os.O_WRONLY, 0o644), 8 * MiB)
        daemon = recorded_daemon(tmp_path, trace, *args, *extra, name=f"w{number}")
        with daemon:
            trio.run(workload, daemon)
            status = daemon.stop()
        assert status == 0, daemon.log()[-3000:]
        assert "event=sandbox.entered" in daemon.log()
        record.update(parse(trace))
    record.update(killed_under_systemd(tmp_path, tmp_path / "notify.trace"))
    for protocol in ("vhost-user", "vfio-user"):
        record.update(trio.run(handed_over, tmp_path, protocol))
    if shutil.which(vm.QEMU):
        record.update(qemu_guest(tmp_path, tmp_path / "qemu.trace"))
    assert record.daemon and record.reaper, "nothing recorded: is the filter loaded?"
    return record


def allowed_for_devices() -> dict[str, str]:
    from vfiouserd.plugins import device_plugins

    names: dict[str, str] = {}
    for plugin, cls in device_plugins().items():
        for name in cls.syscalls:
            names[name] = f"declared by {plugin}"
    return names


def test_every_call_the_jailed_daemon_makes_is_allowed(recorded):
    allowed = set(seccomp.BASE) | set(seccomp.RARE) | set(allowed_for_devices())
    refused_softly = set(seccomp.SOFT_DENY)
    assert recorded.daemon - allowed - refused_softly == set()
    assert recorded.reaper - set(seccomp.REAPER) - set(seccomp.REAPER_RARE) == set()


def test_the_allowlist_holds_nothing_the_daemon_does_not_make(recorded):
    unused = set(seccomp.BASE) - recorded.daemon
    assert unused == set(), f"move to RARE with a reason, or drop: {sorted(unused)}"
    unused_device = set(allowed_for_devices()) - recorded.daemon
    assert unused_device == set()
    assert set(seccomp.REAPER) - recorded.reaper == set()
    everything = {**seccomp.RARE, **seccomp.BASE, **seccomp.REAPER, **seccomp.REAPER_RARE}
    for name, reason in everything.items():
        assert len(reason) > 10, f"{name}: say why"
