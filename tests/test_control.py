"""The control socket on a real, jailed daemon: stats, trace and fault rules
while the project's front end drives I/O; bad clients get clear errors and
never touch the device's I/O."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest
import trio
from daemon import Daemon

from conftest import MiB, start_device
from vfiouserd.client.control import ControlClient, ControlError, resolve, socket_of_pid
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.control import MAX_CLIENTS, MAX_LINE, Client
from vfiouserd.devices.blk import BlkStatus, RequestType


def blk_daemon(tmp_path: Path, *extra: str) -> Daemon:
    image = str(tmp_path / "disk.img")
    return Daemon(
        "vhost-user-blk", "--blk-file", image, "--size", "16M", *extra, workdir=tmp_path, name="blk"
    )


def control_path(tmp_path: Path) -> str:
    return str(tmp_path / "blk.control.sock")


async def call(path: str, command: str, **arguments: object) -> object:
    def run() -> object:
        with ControlClient(path) as client:
            return client.execute(command, **arguments)

    return await trio.to_thread.run_sync(run)


def raw(path: str) -> tuple[socket.socket, object]:
    """A bare connection past the greeting: (socket, its line reader),
    once the daemon has room for another client."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        try:
            sock.connect(path)
        except BlockingIOError:  # the listen backlog is full: not accepted yet
            sock.close()
            assert time.monotonic() < deadline
            time.sleep(0.05)
            continue
        reader = sock.makefile("rb")
        greeting = json.loads(reader.readline())
        if "vfiouserd" in greeting:
            return sock, reader
        assert greeting["error"]["class"] == "TooManyClients"
        assert time.monotonic() < deadline
        sock.close()
        time.sleep(0.05)


async def test_the_control_socket_is_the_owners_and_greets(tmp_path):
    with blk_daemon(tmp_path) as daemon:
        path = control_path(tmp_path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with ControlClient(path) as client:
            assert client.greeting["device"] == "blk"
            assert client.greeting["transport"] == "vhost-user"
            assert client.greeting["protocol"] == 1
            assert client.greeting["pid"] == daemon.process.pid  # outside the jail's namespace
            assert client.greeting["fault_injection"] is False
            assert "stats" in client.execute("query-commands")
        # The same daemon whichever way it is named.
        assert resolve(daemon.socket_path) == path
        assert resolve(str(daemon.process.pid)) == path
        assert socket_of_pid(daemon.process.pid) == path
    assert not os.path.exists(path)  # removed with the daemon


async def test_no_control_socket_when_asked(tmp_path):
    with blk_daemon(tmp_path, "--no-control"):
        assert not os.path.exists(control_path(tmp_path))


async def test_stats_count_requests_served_natively_and_in_python(tmp_path):
    ram = GuestRam([(0, 16 * MiB)])
    with blk_daemon(tmp_path):
        path = control_path(tmp_path)
        frontend = await VhostUserFrontend.connect(str(tmp_path / "blk.sock"))
        (blk,) = await start_device(frontend, ram)
        for sector in range(100):
            await blk.write(sector, bytes([sector]) * 512)
        snapshot = await call(path, "stats")
        queue = snapshot["queues"][0]
        assert [q["requests"] for q in snapshot["queues"][1:]] == [0] * (
            len(snapshot["queues"]) - 1
        )
        assert queue["requests"] == 100
        assert queue["bytes"] >= 100 * (512 + 16)
        assert queue["native"] is True
        assert queue["notified"] + queue["suppressed"] >= 1
        assert sum(queue["latency_log2_ns"]) == 100
        device = snapshot["device"]
        assert device["requests"] == 100 and device["sectors"] == 16 * MiB // 512
        assert queue["errors"] == 0
        # An error counts, and is served by Python (the fast path punts it).
        result = await blk.request(RequestType.IN, 1 << 40, in_size=512)
        assert result.status == BlkStatus.IOERR
        queue = (await call(path, "stats"))["queues"][0]
        assert queue["requests"] == 101 and queue["errors"] == 1
        metrics = (await call(path, "metrics"))["text"]
        assert 'vfiouserd_queue_requests_total{device="blk",name="None",queue="0"} 101' in metrics
        assert "vfiouserd_queue_latency_seconds_bucket" in metrics
        await frontend.aclose()
    ram.close()


async def test_trace_shows_each_request_and_takes_the_fast_path_off_while_attached(tmp_path):
    ram = GuestRam([(0, 16 * MiB)])
    with blk_daemon(tmp_path):
        path = control_path(tmp_path)
        frontend = await VhostUserFrontend.connect(str(tmp_path / "blk.sock"))
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"x" * 4096)
        tracer = await trio.to_thread.run_sync(ControlClient, path)
        await trio.to_thread.run_sync(
            lambda: tracer.execute("trace-start", events=["request", "message"])
        )
        await blk.write(40, b"y" * 1024)
        assert await blk.read(40, 1024) == b"y" * 1024
        events = []
        while len([e for e in events if e["kind"] == "request"]) < 2:
            events.append((await trio.to_thread.run_sync(tracer.next_event))["data"])
        write, read = [e for e in events if e["kind"] == "request"]
        assert (write["type"], write["sector"], write["sectors"]) == ("write", 40, 2)
        assert (read["type"], read["sector"], read["sectors"], read["written"]) == (
            "read",
            40,
            2,
            1025,
        )
        assert len(read["chain"]) == 3 and read["chain"][1].endswith("+1024w")
        assert read["latency_us"] >= 0
        stats = await call(path, "stats")
        assert stats["queues"][0]["native"] is False  # Python serves, and reports
        # A message, decoded, as the front end stops the queue.
        await frontend.stop_queue(0)
        while True:
            event = (await trio.to_thread.run_sync(tracer.next_event))["data"]
            if event["kind"] == "message" and event["name"] == "GET_VRING_BASE":
                break
        assert event["fields"]["index"] == 0
        await trio.to_thread.run_sync(lambda: tracer.execute("trace-stop"))
        tracer.close()
        await frontend.aclose()
    ram.close()


async def test_fault_rules_need_the_daemon_to_allow_them(tmp_path):
    with blk_daemon(tmp_path), pytest.raises(ControlError, match="--allow-fault-injection"):
        await call(control_path(tmp_path), "inject-add", kind="ioerr", sectors="0-8")


async def test_ioerr_corrupt_and_delay_rules_act_on_matching_requests_only(tmp_path):
    ram = GuestRam([(0, 16 * MiB)])
    with blk_daemon(tmp_path, "--allow-fault-injection") as daemon:
        path = control_path(tmp_path)
        frontend = await VhostUserFrontend.connect(str(tmp_path / "blk.sock"))
        (blk,) = await start_device(frontend, ram)
        pattern = bytes(range(256)) * 16  # sectors 100-107
        await blk.write(100, pattern)
        rule = await call(path, "inject-add", kind="ioerr", sectors="104+2", type="read")
        assert (await blk.request(RequestType.IN, 100, in_size=4096)).status == BlkStatus.IOERR
        assert await blk.read(100, 2048) == pattern[:2048]  # outside the range
        await blk.write(104, pattern[2048:3072])  # writes are not in the rule
        await call(path, "inject-remove", id=rule["id"])
        assert await blk.read(100, 4096) == pattern
        rule = await call(path, "inject-add", kind="corrupt", sectors="101-102")
        data = await blk.read(100, 1536)
        assert data[:512] == pattern[:512] and data[1024:] == pattern[1024:1536]
        assert data[512:1024] == bytes(b ^ 0xFF for b in pattern[512:1024])
        listed = await call(path, "inject-list")
        assert listed["rules"][0]["hits"] == 1
        await call(path, "inject-clear")
        await call(path, "inject-add", kind="delay", ms=300, queue=0, count=1)
        started = time.monotonic()
        assert await blk.read(100, 512) == pattern[:512]
        assert time.monotonic() - started >= 0.3
        assert (await call(path, "inject-list"))["rules"] == []  # used up
        log = daemon.log()
        assert "event=fault.added" in log and "event=fault.applied" in log
        await frontend.aclose()
    ram.close()


async def test_a_hang_takes_no_request_until_it_ends_then_the_device_goes_on(tmp_path):
    ram = GuestRam([(0, 16 * MiB)])
    with blk_daemon(tmp_path, "--allow-fault-injection"):
        path = control_path(tmp_path)
        frontend = await VhostUserFrontend.connect(str(tmp_path / "blk.sock"))
        (blk,) = await start_device(frontend, ram)
        await blk.write(0, b"h" * 512)
        await call(path, "inject-add", kind="hang", ms=800)
        started = time.monotonic()
        assert await blk.read(0, 512) == b"h" * 512
        assert time.monotonic() - started >= 0.7
        assert (await call(path, "inject-list"))["rules"] == []  # over: gone
        queue = (await call(path, "stats"))["queues"][0]
        await blk.read(0, 512)
        assert (await call(path, "stats"))["queues"][0]["requests"] == queue["requests"] + 1
        await frontend.aclose()
    ram.close()


async def test_a_dropped_interrupt_is_not_sent_and_a_delayed_one_is_late(tmp_path):
    ram = GuestRam([(0, 16 * MiB)])
    with blk_daemon(tmp_path, "--allow-fault-injection"):
        path = control_path(tmp_path)
        frontend = await VhostUserFrontend.connect(str(tmp_path / "blk.sock"))
        (blk,) = await start_device(frontend, ram)
        await call(path, "inject-add", kind="irq-drop", queue=0, count=1)
        blk.queue.ring.add([(blk.scratch(16), 16)], [(blk.scratch(1), 1)], "lost")
        await blk.queue.kick_async()
        with trio.move_on_after(1) as waited:
            await blk.queue.wait_call()
        assert waited.cancelled_caught  # no interrupt came
        assert [d.token for d in blk.queue.ring.collect()] == ["lost"]  # completed all the same
        await call(path, "inject-add", kind="irq-delay", ms=400, count=1)
        started = time.monotonic()
        await blk.read(0, 512)
        assert time.monotonic() - started >= 0.35
        await frontend.aclose()
    ram.close()


async def test_bad_control_clients_get_errors_and_never_stop_the_io(tmp_path):
    ram = GuestRam([(0, 16 * MiB)])
    with blk_daemon(tmp_path) as daemon:
        path = control_path(tmp_path)
        frontend = await VhostUserFrontend.connect(str(tmp_path / "blk.sock"))
        (blk,) = await start_device(frontend, ram)
        sock, reader = raw(path)
        for line, error in (
            (b"{nope\n", "ParseError"),
            (b"[1, 2]\n", "GenericError"),
            (b'{"execute": "reboot"}\n', "CommandNotFound"),
            (b'{"execute": "trace-start", "arguments": {"events": ["x"]}}\n', "InvalidArgument"),
            (b'{"execute": "inject-remove", "arguments": {"id": "a"}}\n', "InvalidArgument"),
            (b'{"execute": "stats", "arguments": 3}\n', "GenericError"),
        ):
            sock.sendall(line)
            assert json.loads(reader.readline())["error"]["class"] == error
        sock.sendall(b"x" * (MAX_LINE + 10))
        assert json.loads(reader.readline())["error"]["class"] == "LineTooLong"
        assert reader.readline() == b""  # and the connection closes
        sock.close()
        for _ in range(20):  # gone before the greeting
            quick = socket.socket(socket.AF_UNIX)
            quick.connect(path)
            quick.close()
        # A tracer that never reads, clients up to the limit and beyond, one
        # that leaves mid-event: the I/O goes on.
        idle, _ = raw(path)
        idle.sendall(b'{"execute": "trace-start"}\n')
        crowd = [socket.socket(socket.AF_UNIX) for _ in range(100)]
        refused = 0
        for client in crowd:
            client.settimeout(10)
            client.connect(path)
            greeting = json.loads(client.makefile("rb").readline())
            refused += greeting.get("error", {}).get("class") == "TooManyClients"
        assert refused == 100 - (MAX_CLIENTS - 1)
        daemon.wait_for_log("event=control.refused", count=refused)  # each one logged
        for client in crowd:
            client.close()
        leaving, _ = raw(path)
        leaving.sendall(b'{"execute": "trace-start"}\n')
        for sector in range(6000):
            await blk.write(sector % 64, bytes([sector % 256]) * 512)
            if sector == 10:
                leaving.close()  # with events on their way
        with ControlClient(path) as client:  # room again
            assert client.execute("stats")["queues"][0]["requests"] == 6000
        # The tracer that never read lost events, and is told how many.
        idle.settimeout(10)
        lines = idle.makefile("rb")
        assert json.loads(lines.readline())["return"] == {}
        while (message := json.loads(lines.readline())).get("event") != "TRACE_LOST":
            assert message["event"] == "TRACE"
        assert message["data"]["count"] > 0
        idle.close()
        await frontend.aclose()
    ram.close()


async def test_waiting_lines_go_to_a_client_together_and_in_order():
    """Replies and events that wait go out in few sends, not one line a turn
    of the event loop: a tracer reading as fast as it could got one event a
    turn and lost most of them (bench/lab.py: 85 % at queue depth 32)."""
    sends = []

    class Sock:
        async def send(self, data):
            await trio.lowlevel.checkpoint()
            chunk = bytes(data[:50_000])  # partial sends too
            sends.append(chunk)
            return len(chunk)

    client = Client(None, Sock(), 1)  # type: ignore[arg-type]
    client.send_reply({"return": {}, "id": 1})
    for n in range(2000):
        client.send_event({"event": "TRACE", "data": {"n": n}})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._write_all)
        while client.replies or client.events or client._sending:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    lines = b"".join(sends).splitlines()
    assert json.loads(lines[0]) == {"return": {}, "id": 1}
    assert [json.loads(line)["data"]["n"] for line in lines[1:]] == list(range(2000))
    assert len(sends) <= 5


async def test_a_tracer_that_loses_every_event_for_long_is_detached(monkeypatch):
    """While it is attached the rings stay off the native fast path: one that
    stopped reading must not keep them there for good."""
    import vfiouserd.control as control
    from vfiouserd.trace import tracer

    monkeypatch.setattr(control, "STALLED_TRACE", 0.5)

    class NeverReads:
        async def send(self, data):
            await trio.sleep_forever()

    client = Client(None, NeverReads(), 1)  # type: ignore[arg-type]
    client.start_trace({"events": ["session"]})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._write_all)
        nursery.start_soon(client._end_stalled_trace)
        for n in range(control.MAX_QUEUED + 10):
            tracer.emit("session", "start", n=n)
        assert tracer.wants("session") and client.lost == 10
        with trio.fail_after(5):
            while client.subscription is not None:  # events keep coming, unread
                for n in range(1000):
                    tracer.emit("session", "start", n=n)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert not tracer.wants("session")
    assert json.loads(client.events[-1])["event"] == "TRACE_STOPPED"
