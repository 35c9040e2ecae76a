"""The device lab's parts, each on its own: the trace's filters, rate limit
and decoded messages, the fault rules' checks, the statistics' formats and
the command line's output (the whole path on a live daemon is in
test_control.py and the QEMU tests)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
import trio
from daemon import Daemon
from test_vfio_user_example import DST, SRC, enable_msi, start_copy, wait_irq

from conftest import MiB, vfio_served
from vfiouserd import faults, stats
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.lab import parse_rule, rates
from vfiouserd.devices.example import ExampleDevice
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.trace import Filter, RateLimit, Subscription, parse_range, render, tracer


@pytest.fixture
def rules():
    faults.rules.clear()
    faults.rules.allowed = True
    faults.rules.sector_kinds = True
    yield faults.rules
    faults.rules.clear()
    faults.rules.allowed = False


@pytest.fixture
def events():
    seen: list[dict] = []
    subscription = Subscription(seen.append, Filter())
    tracer.subscribe(subscription)
    yield seen
    tracer.unsubscribe(subscription)


# -- trace ---------------------------------------------------------------------------------


def test_filters_narrow_by_kind_queue_region_and_address():
    chosen = Filter.from_arguments(
        {
            "events": ["request", "pci"],
            "queues": [1],
            "regions": ["bar0:0x10-0x20"],
            "addresses": ["0x1000+0x1000"],
        }
    )
    assert chosen.matches({"kind": "request", "queue": 1, "addresses": [0x1800]})
    assert not chosen.matches({"kind": "request", "queue": 0, "addresses": [0x1800]})
    assert not chosen.matches({"kind": "request", "queue": 1, "addresses": [0x3000]})
    assert chosen.matches({"kind": "pci", "region": "bar0", "offset": 0x10})
    assert not chosen.matches({"kind": "pci", "region": "bar0", "offset": 0x20})
    assert not chosen.matches({"kind": "pci", "region": "config", "offset": 0x10})
    assert not chosen.matches({"kind": "irq", "vector": 0})


@pytest.mark.parametrize(
    "arguments",
    [
        {"events": ["everything"]},
        {"events": "request"},
        {"queues": [-1]},
        {"queues": ["0"]},
        {"regions": [3]},
        {"regions": ["bar0:5-1"]},
        {"addresses": ["zero-ten"]},
    ],
)
def test_bad_filters_are_refused_with_a_reason(arguments):
    with pytest.raises(ValueError):
        Filter.from_arguments(arguments)


def test_ranges():
    assert parse_range("0x10-0x20") == (16, 32)
    assert parse_range("100+8") == (100, 108)
    for bad in ("5", "9-9", "a+b", "-1-4"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_the_rate_limit_holds_back_bursts():
    limit = RateLimit(10)
    taken = sum(limit.take() for _ in range(100))
    assert taken == 10
    time.sleep(0.25)
    assert 1 <= sum(limit.take() for _ in range(100)) <= 4


def test_a_trace_of_nothing_costs_a_test_and_says_so():
    assert not tracer.active and not tracer.wants("request")
    subscription = Subscription(lambda e: None, Filter(frozenset({"pci"})))
    changes = []
    stop = tracer.on_change(lambda: changes.append(tracer.wants("request")))
    tracer.subscribe(subscription)
    assert tracer.wants("pci") and not tracer.wants("request") and changes == []
    request_tracer = Subscription(lambda e: None, Filter(frozenset({"request"})))
    tracer.subscribe(request_tracer)  # the rings must leave the fast path
    tracer.unsubscribe(request_tracer)  # and may go back
    assert changes == [True, False]
    tracer.unsubscribe(subscription)
    stop()
    assert not tracer.active


def test_render_is_one_line_with_the_fields():
    line = render(
        {"kind": "pci", "event": "write", "time": 0.0, "region": "bar0", "offset": 16, "value": 7}
    )
    assert "\n" not in line and "pci" in line and "offset=0x10" in line and "value=7" in line


def test_vhost_user_messages_are_decoded_and_garbage_is_not_fatal():
    data = vu.encode(
        vu.FrontendRequest.SET_VRING_NUM, vu.VringState.build({"index": 1, "num": 256})
    )
    assert vu.describe(data, 0) == {
        "name": "SET_VRING_NUM",
        "size": 8,
        "fields": {"index": 1, "num": 256},
    }
    reply = vu.describe(vu.encode_u64(vu.FrontendRequest.GET_FEATURES, 5, reply=True), 0)
    assert reply["reply"] is True and reply["fields"] == {"value": 5}
    for junk in (b"", b"\x01" * 5, os.urandom(12) + os.urandom(40), struct.pack("<III", 99, 1, 0)):
        assert "name" in vu.describe(junk, 3)


def test_vfio_user_messages_are_decoded_with_their_data():
    payload = vfu.RegionAccess.build({"offset": 0x24, "region": 0, "count": 4}) + b"\x01\0\0\0"
    described = vfu.describe(vfu.encode(7, vfu.Command.REGION_WRITE, payload), 0)
    assert described["name"] == "REGION_WRITE" and described["id"] == 7
    assert described["fields"] == {"offset": 0x24, "region": 0, "count": 4}
    assert described["data"] == "01000000"
    error = vfu.describe(vfu.encode(8, vfu.Command.DMA_MAP, reply=True, error=22), 1)
    assert error["error"] == 22 and error["reply"] is True and error["fds"] == 1
    for junk in (b"", os.urandom(16), os.urandom(64)):
        assert "name" in vfu.describe(junk, 0)


async def test_pci_accesses_dma_and_interrupts_are_traced_with_their_values(events, rules):
    device = ExampleDevice()
    async with vfio_served(device) as client:
        await client.region_write(vfu.PciRegion.BAR0, 0x04, (0x1234).to_bytes(4, "little"))
        assert await client.region_read(vfu.PciRegion.BAR0, 0x04, 4) == (
            ~0x1234 & 0xFFFFFFFF
        ).to_bytes(4, "little")
        pci = [e for e in events if e["kind"] == "pci" and e["region"] == "bar0"]
        assert [(e["event"], e["offset"], e["value"]) for e in pci] == [
            ("write", 4, 0x1234),
            ("read", 4, ~0x1234 & 0xFFFFFFFF),
        ]
        messages = [e["name"] for e in events if e["kind"] == "message"]
        assert "REGION_WRITE" in messages and "REGION_READ" in messages
        # A forced register reads back its value, the rest as the device says.
        rule = rules.add({"kind": "register", "region": "bar0", "offset": "0", "value": "0xfeed"})
        liveness = ~0x1234 & 0xFFFFFFFF
        assert await client.region_read(vfu.PciRegion.BAR0, 0, 8) == struct.pack(
            "<II", 0xFEED, liveness
        )
        rules.remove(rule.id)
        assert await client.region_read(vfu.PciRegion.BAR0, 0, 4) == struct.pack("<I", 0x56460001)


# -- fault rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"kind": "explode"}, "kind must be"),
        ({"kind": "delay"}, "needs ms"),
        ({"kind": "delay", "ms": 0}, "ms must be"),
        ({"kind": "delay", "ms": 10, "colour": "red"}, "takes no colour"),
        ({"kind": "ioerr", "sectors": "8-4"}, "empty"),
        ({"kind": "ioerr", "sectors": 5}, "START-END"),
        ({"kind": "irq-drop", "queue": 1, "vector": 1}, "not both"),
        ({"kind": "register", "region": "bar9", "offset": 0, "value": 1}, "region must be"),
        ({"kind": "register", "region": "bar0", "offset": 0, "value": 256, "size": 1}, "value"),
        ({"kind": "register", "region": "bar0", "offset": 0, "value": 1, "size": 3}, "size"),
        ({"kind": "ioerr", "sectors": "0-1", "type": "explode"}, "type must be"),
    ],
)
def test_bad_rules_are_refused_with_a_reason(rules, rule, reason):
    with pytest.raises(faults.RuleError, match=reason):
        rules.add(rule)
    assert rules.in_force() == []


def test_rules_need_permission_and_sector_rules_a_disk(rules):
    rules.allowed = False
    with pytest.raises(faults.RuleError, match="--allow-fault-injection"):
        rules.add({"kind": "hang", "ms": 5})
    rules.allowed, rules.sector_kinds = True, False
    with pytest.raises(faults.RuleError, match="sectors"):
        rules.add({"kind": "corrupt", "sectors": "0-1"})


def test_a_counted_rule_goes_when_used_up_and_the_rings_hear_of_it(rules):
    told = []
    stop = rules.on_change(lambda: told.append(rules.steering))
    rule = rules.add({"kind": "ioerr", "sectors": "10+5", "count": "2"})
    assert rules.sector_fault("ioerr", 0, "read", (0, 10)) is None
    assert rules.sector_fault("ioerr", 0, "read", (12, 20)) == (12, 15)
    assert rules.sector_fault("ioerr", 0, "write", (14, 30)) == (14, 15)
    assert rules.in_force() == [] and rule.hits == 2
    assert told == [True, False]
    stop()


def test_interrupt_rules_by_queue_vector_or_all(rules):
    rules.add({"kind": "irq-drop", "queue": "1"})
    rules.add({"kind": "irq-delay", "vector": "3", "ms": "20"})
    assert rules.interrupt(queue=0) is None
    assert rules.interrupt(queue=1) == float("inf")
    assert rules.interrupt(vector=3, catch_all=False) == pytest.approx(0.02)
    rules.clear()
    rules.add({"kind": "irq-drop"})
    assert rules.interrupt(queue=5) == float("inf")
    assert rules.interrupt(vector=0, catch_all=False) is None  # met at its queue already


# -- statistics and the command line --------------------------------------------------------


def test_percentiles_and_prometheus_text():
    buckets = [0] * stats.BUCKETS
    buckets[10] = 98  # about 1-2 us
    buckets[20] = 2  # about 1-2 ms
    assert stats.percentile(buckets, 0.5) == 2048
    assert stats.percentile(buckets, 0.99) == 2**21
    assert stats.percentile([0] * 4, 0.5) is None
    queue = stats.QueueStats(3)
    queue.count(5, 4096, 1500)
    text = stats.prometheus(stats.collect({}) | {"queues": [queue.snapshot()]}, {"device": 'a"b'})
    assert 'vfiouserd_queue_requests_total{device="a\\"b",queue="3"} 5' in text
    assert 'vfiouserd_queue_latency_seconds_bucket{device="a\\"b",queue="3",le="+Inf"} 1' in text
    assert text.endswith("\n") and "# TYPE vfiouserd_queue_in_flight gauge" in text


def test_rates_between_two_samples():
    before = {
        "time": 10.0,
        "queues": [
            {
                "queue": 0,
                "requests": 100,
                "bytes": 1000,
                "notified": 5,
                "suppressed": 1,
                "errors": 0,
                "latency_log2_ns": [0, 100],
            }
        ],
    }
    after = {
        "time": 12.0,
        "queues": [
            {
                "queue": 0,
                "requests": 300,
                "bytes": 5000,
                "notified": 9,
                "suppressed": 1,
                "errors": 2,
                "latency_log2_ns": [0, 300],
            }
        ],
    }
    (row,) = rates(before, after)
    assert row["requests_per_s"] == 100 and row["bytes_per_s"] == 2000 and row["errors_per_s"] == 1
    assert row["window_p50_ns"] == 4


def test_rules_on_the_command_line():
    assert parse_rule(["ioerr", "sectors=8+8", "type=read"]) == {
        "kind": "ioerr",
        "sectors": "8+8",
        "type": "read",
    }
    with pytest.raises(ValueError):
        parse_rule(["ioerr", "sectors"])
    with pytest.raises(ValueError):
        parse_rule([])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vfiouserd", *args], capture_output=True, text=True, timeout=60
    )


def test_stats_top_trace_and_inject_commands_on_a_daemon(tmp_path):
    with Daemon("vhost-user-rng", workdir=tmp_path, name="rng") as daemon:
        shown = run_cli("stats", daemon.socket_path, "--interval", "0.1")
        assert shown.returncode == 0, shown.stderr
        assert "rng over vhost-user" in shown.stdout and "req/s" in shown.stdout
        as_json = json.loads(
            run_cli("stats", str(daemon.process.pid), "--json", "--interval", "0").stdout
        )
        assert as_json["daemon"]["device"] == "rng"
        metrics = run_cli("stats", daemon.socket_path, "--prometheus").stdout
        assert "# TYPE vfiouserd_queue_requests_total counter" in metrics
        top = run_cli("top", str(tmp_path), "--iterations", "1")
        assert top.returncode == 0 and "rng.control.sock: rng over vhost-user" in top.stdout
        refused = run_cli("inject", daemon.socket_path, "hang", "ms=10")
        assert refused.returncode == 1 and "--allow-fault-injection" in refused.stderr
        recording = tmp_path / "trace.jsonl"
        traced = run_cli(
            "trace", daemon.socket_path, "--duration", "0.5", "--output", str(recording)
        )
        assert traced.returncode == 0, traced.stderr
        assert "vfiouserd" in json.loads(recording.read_text().splitlines()[0])
        assert run_cli("trace", "--replay", str(recording)).returncode == 0
        missing = run_cli("stats", str(tmp_path / "nothing.sock"))
        assert missing.returncode == 1 and "not a socket" in missing.stderr


async def test_dma_and_interrupts_are_traced_and_an_interrupt_can_be_dropped_or_delayed(
    events, rules
):
    ram = GuestRam([(0, 4 * MiB), (0x1_0000_0000, MiB)])
    async with vfio_served(ExampleDevice(), ram=ram) as client:
        await client.map_ram(with_fd=True)
        fd = await enable_msi(client)
        data = os.urandom(4096)
        ram.write(SRC, data)
        await start_copy(client, SRC, DST, len(data))
        await wait_irq(fd)
        dma = [(e["event"], e["address"], e["size"]) for e in events if e["kind"] == "dma"]
        assert dma == [("read", SRC, 4096), ("write", DST, 4096)]
        irqs = [(e["event"], e["type"], e["vector"]) for e in events if e["kind"] == "irq"]
        assert irqs == [("raise", "MSI", 0)]
        # Dropped: the copy is done, no interrupt comes.
        rules.add({"kind": "irq-drop", "vector": "0", "count": "1"})
        await start_copy(client, SRC, DST, len(data))
        with trio.move_on_after(0.5) as waited:
            await trio.lowlevel.wait_readable(fd)
        assert waited.cancelled_caught
        assert any(e["kind"] == "fault" and e["event"] == "irq-drop" for e in events)
        # Delayed: it comes, late.
        rules.add({"kind": "irq-delay", "ms": "300", "count": "1"})
        started = time.monotonic()
        await start_copy(client, SRC, DST, len(data))
        await wait_irq(fd)
        assert time.monotonic() - started >= 0.3
        os.close(fd)
    ram.close()
