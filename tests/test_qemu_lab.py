"""The device lab against a real guest: QEMU 7.2 boots the Debian kernel on a
jailed ``vfiouserd vhost-user-blk --allow-fault-injection``, and the host
adds and removes fault rules (through ``vfiouserd inject`` and the control
socket) and traces requests (``vfiouserd trace``) while the guest's stock
virtio-blk driver does I/O. What the guest's kernel and clock see is the
proof: its I/O errors, its timings, its hung-task detector.

The host and the guest take turns: the guest prints ``HOST <step>`` and
waits until the host, done with that step, writes the step's name into a
second, tiny disk (QEMU's own virtio-blk on a file, /dev/vdb; the guest
reads it with O_DIRECT). So the guest never runs ahead of a rule being
added or removed, and its polling never reaches the daemon: no rule, hang
or trace sees it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from guest_helpers import image_md5, qemu_messages

from vfiouserd.client.control import ControlClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(vm.QEMU) is None, reason="qemu-system-x86 not installed"),
]

SECTOR = 512
DISK_SECTORS = 64 * (1 << 20) // SECTOR
MARK_SECTORS = 2048  # the turn-taking disk: 1 MiB

# Shell the guest scripts share: the turn-taking with the host, and a clock.
HANDSHAKE = f"""
if [ "$(cat /sys/block/vda/size)" != {DISK_SECTORS} ] \\
        || [ "$(cat /sys/block/vdb/size)" != {MARK_SECTORS} ]; then
    echo "RESULT disks $(cat /sys/block/vd*/size)"  # not the order expected
    exit 91
fi
marker() {{ dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\\0'; }}
# Tell the host step $1 is reached; go on once it wrote "$1" at the marker.
host_step() {{
    echo "HOST $1"
    tries=0
    while [ "$(marker)" != "$1" ]; do
        tries=$((tries + 1))
        [ $tries -gt 1200 ] && {{ echo "RESULT stuck $1"; exit 90; }}
        sleep 0.1
    done
}}
# The guest's own clock in milliseconds (/proc/uptime: 10 ms resolution).
now_ms() {{ awk '{{printf "%d\\n", $1 * 1000}}' /proc/uptime; }}
"""


def lab_daemon(tmp_path: Path) -> Daemon:
    """A 64 MiB disk (created sparse), jailed by the default sandbox, that
    takes fault rules."""
    image = str(tmp_path / "disk.img")
    return Daemon(
        "vhost-user-blk",
        "--blk-file",
        image,
        "--size",
        "64M",
        "--allow-fault-injection",
        workdir=tmp_path,
        name="blk",
    )


def control(daemon: Daemon, command: str, **arguments: Any) -> Any:
    """One command on the daemon's control socket (beside its VMM socket)."""
    path = daemon.socket_path.removesuffix(".sock") + ".control.sock"
    with ControlClient(path) as client:
        return client.execute(command, **arguments)


def cli(*args: str, timeout: float = 60) -> str:
    """``vfiouserd ARGS`` as a user runs it; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "vfiouserd", *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"vfiouserd {' '.join(args)}: {done.stderr}"
    return done.stdout


def requests_served(daemon: Daemon) -> tuple[int, int]:
    """(requests completed, requests taken and not completed) over all queues."""
    stats = control(daemon, "stats")
    return (
        sum(q["requests"] for q in stats["queues"]),
        sum(q["in_flight"] for q in stats["queues"]),
    )


class Turns:
    """The host's side of the turn-taking: which steps the guest reached."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        marker.write_bytes(bytes(MARK_SECTORS * SECTOR))
        self.reached: queue.Queue[str] = queue.Queue()
        self.guest: vm.Guest | None = None

    def on_line(self, line: str) -> None:
        if line.startswith("HOST "):
            self.reached.put(line.split()[1])

    def wait(self, step: str, timeout: float = 120) -> None:
        """Until the guest reached ``step`` (failing at once if it died)."""
        assert self.guest is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reached = self.reached.get(timeout=0.5)
            except queue.Empty:
                if self.guest.process.poll() is not None:
                    break
                continue
            assert reached == step, f"guest at step {reached!r}, expected {step!r}"
            return
        raise AssertionError(f"guest never reached {step!r}; console:\n{self.guest.output[-3000:]}")

    def go(self, step: str) -> None:
        """Let the guest go on past ``step``."""
        fd = os.open(self.marker, os.O_WRONLY)
        try:
            os.pwrite(fd, step.encode().ljust(SECTOR, b"\0"), 0)
        finally:
            os.close(fd)


@contextmanager
def lab(tmp_path: Path, script: str) -> Iterator[tuple[Daemon, vm.Guest, Turns]]:
    """The daemon and a guest running ``script`` on it; both are gone after."""
    with lab_daemon(tmp_path) as daemon:
        daemon.jailed_pid()  # served from the jail
        turns = Turns(tmp_path / "marker.img")
        guest = vm.Guest(
            HANDSHAKE + script,
            devices=[
                *vm.vhost_user_device("vhost-user-blk-pci", daemon.socket_path, "b"),
                *("-drive", f"if=none,id=mark,file={turns.marker},format=raw"),
                *("-device", "virtio-blk-pci,drive=mark"),
            ],
            on_line=turns.on_line,
        )
        turns.guest = guest
        try:
            yield daemon, guest, turns
        finally:
            guest.kill()  # only if still running (an assertion failed)
        assert daemon.stop() == 0


def finish(guest: vm.Guest, timeout: float = 240) -> vm.GuestRun:
    run = guest.wait(timeout)
    assert run.exit_statuses == [0], run.output[-3000:]
    assert qemu_messages(run.output) == []
    return run


# -- 1. ioerr ------------------------------------------------------------------------------

# Eight 4 KiB blocks, sectors 2032-2096, written; the rule covers 2048-2080
# (blocks 256-259). Blocks 255 and 260 touch the range at either end.
IOERR_BLOCKS = range(254, 262)
IOERR_RANGE = (2048, 2080)

READ_BLOCKS_ONE_BY_ONE = """
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=8 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=254 oflag=direct conv=fsync 2>/dev/null || exit 10
echo "RESULT written $(md5 < /tmp/pattern)"
host_step rule-added
dmesg -c > /dev/null
for block in 254 255 256 257 258 259 260 261; do
    if dd if=/dev/vda of=/tmp/b bs=4096 skip=$block count=1 iflag=direct 2>/dev/null; then
        echo "RESULT block $block ok $(md5 < /tmp/b)"
    else
        echo "RESULT block $block failed"
    fi
done
dmesg | grep 'I/O error' | sed 's/^/RESULT kmsg /'
host_step rule-removed
dmesg -c > /dev/null
dd if=/dev/vda of=/tmp/back bs=4096 skip=254 count=8 iflag=direct 2>/dev/null || exit 11
echo "RESULT read $(md5 < /tmp/back)"
echo "RESULT errors_after $(dmesg | grep -c 'I/O error')"
"""


def test_ioerr_rule_fails_the_guests_reads_of_its_sectors_only_until_removed(tmp_path):
    with lab(tmp_path, READ_BLOCKS_ONE_BY_ONE) as (daemon, guest, turns):
        turns.wait("rule-added")
        start, end = IOERR_RANGE
        rule = json.loads(
            cli("inject", daemon.socket_path, "ioerr", f"sectors={start}-{end}", "type=read")
        )
        assert rule["sectors"] == f"{start}-{end}" and rule["type"] == "read"
        turns.go("rule-added")
        turns.wait("rule-removed")
        (listed,) = json.loads(cli("inject", daemon.socket_path, "--list"))["rules"]
        assert listed["id"] == rule["id"] and listed["hits"] == 4  # one per failed block
        control(daemon, "inject-remove", id=rule["id"])
        assert control(daemon, "inject-list")["rules"] == []
        turns.go("rule-removed")
        run = finish(guest)
        log = daemon.log()
    image = str(tmp_path / "disk.img")
    outcomes = {}
    for line in run.results["block"]:
        block, outcome, *md5 = line.split()
        outcomes[int(block)] = outcome
        if outcome == "ok":  # what a read outside the rule returned is what is on disk
            assert md5 == [image_md5(image, int(block) * 4096, 4096)]
    failing = {b for b in IOERR_BLOCKS if start <= b * 8 < end}
    assert failing == {256, 257, 258, 259}
    assert outcomes == {b: "failed" if b in failing else "ok" for b in IOERR_BLOCKS}
    # The guest kernel's own report: one I/O error per failed read, each at
    # a sector inside the range, none outside it.
    print("guest kernel log:\n" + "\n".join(run.results["kmsg"]))
    reported = [int(m) for m in re.findall(r"I/O error, dev vda, sector (\d+)", run.output)]
    kmsg = [int(k.split("sector ")[1].split()[0]) for k in run.results["kmsg"]]
    assert sorted(kmsg) == [b * 8 for b in sorted(failing)], run.results["kmsg"]
    assert all(start <= s < end for s in reported + kmsg)
    # Removed through the control socket: the whole range reads back as written.
    assert run.result("read") == run.result("written")
    assert run.result("errors_after") == "0"
    assert image_md5(image, 254 * 4096, 8 * 4096) == run.result("written")
    assert "event=fault.added" in log and "event=fault.removed" in log


# -- 2. delay --------------------------------------------------------------------------------

DELAY_MS = 300

TIMED_READS = """
dd if=/dev/urandom of=/tmp/p bs=4096 count=1 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4096 seek=512 oflag=direct conv=fsync 2>/dev/null || exit 10
# Five O_DIRECT reads of sectors 4096-4104, each timed by the guest's clock.
timed_reads() {
    for n in 1 2 3 4 5; do
        start=$(now_ms)
        dd if=/dev/vda of=/tmp/b bs=4096 skip=512 count=1 iflag=direct 2>/dev/null || exit 11
        end=$(now_ms)
        cmp -s /tmp/p /tmp/b || exit 12
        echo "RESULT $1 $((end - start))"
    done
}
timed_reads plain
host_step delay-added
timed_reads delayed
host_step delay-removed
timed_reads after
"""


def test_delay_rule_shows_in_the_guests_own_timing_of_a_read(tmp_path):
    with lab(tmp_path, TIMED_READS) as (daemon, guest, turns):
        turns.wait("delay-added")
        rule = control(
            daemon, "inject-add", kind="delay", ms=DELAY_MS, type="read", sectors="4096+8"
        )
        turns.go("delay-added")
        turns.wait("delay-removed")
        (listed,) = control(daemon, "inject-list")["rules"]
        assert listed["hits"] == 5  # one per delayed read
        control(daemon, "inject-remove", id=rule["id"])
        turns.go("delay-removed")
        run = finish(guest)
    plain, delayed, after = (
        [int(ms) for ms in run.results[key]] for key in ("plain", "delayed", "after")
    )
    print(f"guest's read times, ms: plain {plain}, delayed {delayed}, after {after}")
    assert len(plain) == len(delayed) == len(after) == 5
    assert min(delayed) >= DELAY_MS - 10  # the clock's resolution
    # TCG on a shared machine is noisy: compare typical times, with room.
    assert min(delayed) - statistics.median(plain) >= DELAY_MS * 2 / 3
    assert min(delayed) - statistics.median(after) >= DELAY_MS * 2 / 3


# -- 3. hang ---------------------------------------------------------------------------------

HANG_MS = 8000

# A writer in the background writes 64 KiB rounds of fresh data through the
# page cache and fsyncs each (timed), until the host writes STOP at the
# marker; then it reads every round back with O_DIRECT and compares.
# Meanwhile the foreground counts the requests the block layer has
# outstanding at the driver (debugfs). The hung-task detector is set to 2 s.
#
# The writes are buffered, and the guest treats the disk as write-through
# (no flush after them), on purpose: a task waiting in fsync for its pages'
# writeback is one the hung-task detector can see; one waiting for its own
# O_DIRECT bio (blk_io_schedule) or for a flush (submit_bio_wait) is not,
# both wake every half hung_task_timeout_secs "to prevent the hang check
# from firing at us"; a buffered read's wait is killable, which it skips too.
WRITER_THROUGH_A_HANG = """
echo 2 > /proc/sys/kernel/hung_task_timeout_secs && echo "RESULT hung_task_detector yes"
echo "write through" > /sys/block/vda/queue/write_cache || exit 31
[ -e /sys/block/vda/queue/io_timeout ] && echo "RESULT io_timeout shown" \\
    || echo "RESULT io_timeout hidden"
mount -t debugfs none /sys/kernel/debug
dmesg -c > /dev/null
writer() {
    i=0; longest=0
    while [ "$(marker)" != STOP ]; do
        [ $i -ge 900 ] && { echo "RESULT out of room"; exit 23; }
        dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null
        start=$(now_ms)
        dd if=/tmp/p of=/dev/vda bs=4096 seek=$((1024 + i * 16)) conv=fsync 2>/dev/null \\
            || { echo "RESULT failed write $i"; exit 20; }
        took=$(($(now_ms) - start))
        [ $took -gt $longest ] && longest=$took
        md5 < /tmp/p > /tmp/sum$i
        i=$((i + 1))
    done
    echo "RESULT rounds $i"
    echo "RESULT longest $longest"
    j=0
    while [ $j -lt $i ]; do
        dd if=/dev/vda bs=4096 skip=$((1024 + j * 16)) count=16 iflag=direct 2>/dev/null \\
            | md5 > /tmp/back
        cmp -s /tmp/sum$j /tmp/back || { echo "RESULT lost $j"; exit 21; }
        j=$((j + 1))
    done
    echo "RESULT verified $i"
}
writer &
writer=$!
echo "HOST hang"
busiest=0
while kill -0 $writer 2>/dev/null; do
    busy=$(cat /sys/kernel/debug/block/vda/hctx*/busy | wc -l)
    [ $busy -gt $busiest ] && busiest=$busy
    sleep 0.2
done
wait $writer || exit 30
echo "RESULT busiest $busiest"
dmesg | sed 's/^/RESULT kmsg /'
"""


def test_hang_holds_the_guests_io_which_completes_and_verifies_after(tmp_path):
    with lab(tmp_path, WRITER_THROUGH_A_HANG) as (daemon, guest, turns):
        turns.wait("hang")
        # The writer is running: the daemon completes requests.
        before, _ = requests_served(daemon)
        deadline = time.monotonic() + 60
        while requests_served(daemon)[0] <= before:
            assert time.monotonic() < deadline, "the guest's writer never got going"
            time.sleep(0.2)
        control(daemon, "inject-add", kind="hang", ms=HANG_MS)
        hung_at = time.monotonic()
        time.sleep(1)  # what the ring had taken already completes
        rules = control(daemon, "inject-list")["rules"]
        assert [r["kind"] for r in rules] == ["hang"], (rules, time.monotonic() - hung_at)
        assert rules[0]["remaining_ms"] > 0
        during = []
        while time.monotonic() < hung_at + HANG_MS / 1000 - 1:
            during.append(requests_served(daemon))
            time.sleep(0.5)
        # After it: the device serves again and the writer goes on.
        deadline = time.monotonic() + 60
        while requests_served(daemon)[0] <= during[-1][0]:
            assert time.monotonic() < deadline, "no request served after the hang"
            time.sleep(0.2)
        resumed_after = time.monotonic() - hung_at
        assert control(daemon, "inject-list")["rules"] == []
        time.sleep(2)  # a few rounds more
        turns.go("STOP")
        run = finish(guest)
    kmsg = run.results.get("kmsg", [])
    print(f"served during the hang (completed, in flight): {during}")
    print(f"served again {resumed_after:.1f} s after the hang began")
    print("guest kernel log:\n" + "\n".join(kmsg))
    # None served during the hang, and none taken either: the device took no request.
    assert len(set(during)) == 1 and during[0][1] == 0, during
    assert resumed_after >= HANG_MS / 1000
    # The guest waited: an fsync took about as long as the hang, the block
    # layer had requests outstanding at the driver meanwhile, and the
    # hung-task detector reported the blocked writer.
    assert int(run.result("longest")) >= HANG_MS - 2000
    assert int(run.result("busiest")) >= 1
    assert run.result("hung_task_detector") == "yes"
    # The block layer shows io_timeout only for a driver with a timeout handler.
    assert run.result("io_timeout") == "hidden"
    assert any(re.search(r"INFO: task dd:\d+ blocked for more than \d+ seconds", k) for k in kmsg)
    # No request failed, and nothing else noticed: the 6.1 virtio-blk driver
    # has no timeout handler (so no io_timeout to set either); the block
    # layer's request timer (30 s) would only re-arm itself.
    assert not [k for k in kmsg if "I/O error" in k or "virtio" in k or "vda" in k], kmsg
    # Then every round, those before, during and after the hang, verified.
    assert run.result("verified") == run.result("rounds")
    assert int(run.result("rounds")) >= 3


# -- 4. trace --------------------------------------------------------------------------------

TRACED_SECTOR = 12345  # not on a page boundary: no page cache request could start there

# 4 KiB written at the traced sector before the trace; while tracing, a
# write 16 sectors further and an O_DIRECT read of the traced sector: the
# only requests the daemon sees then. (busybox dd's buffer is page-aligned
# only from bs=4096 on: below, its O_DIRECT fails with EINVAL and dd quietly
# retries through the page cache, so every O_DIRECT here uses bs=4096.)
WRITE_THEN_READ_A_SECTOR = f"""
direct() {{ dd bs=4096 count=1 "$@" 2>/dev/null; }}
dd if=/dev/urandom of=/tmp/p bs=4096 count=1 2>/dev/null
direct if=/tmp/p of=/dev/vda seek=$(({TRACED_SECTOR} * 512)) oflag=direct,seek_bytes || exit 10
echo "RESULT written $(md5 < /tmp/p)"
host_step tracing
direct if=/dev/zero of=/dev/vda seek=$(({TRACED_SECTOR + 16} * 512)) oflag=direct,seek_bytes \\
    || exit 11
direct if=/dev/vda of=/tmp/b skip=$(({TRACED_SECTOR} * 512)) iflag=direct,skip_bytes || exit 12
echo "RESULT read $(md5 < /tmp/b)"
host_step traced
"""


def test_trace_cli_shows_the_guests_requests_with_their_sectors(tmp_path):
    command = [sys.executable, "-m", "vfiouserd", "trace"]
    with lab(tmp_path, WRITE_THEN_READ_A_SECTOR) as (daemon, guest, turns):
        turns.wait("tracing")
        trace = subprocess.Popen(
            [*command, daemon.socket_path, "--events", "request", "--json", "--count", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            daemon.wait_for_log("event=control.trace_start", timeout=60)  # attached
            turns.go("tracing")
            output, errors = trace.communicate(timeout=120)
        finally:
            if trace.poll() is None:
                trace.kill()
                trace.wait()
        assert trace.returncode == 0, errors
        turns.wait("traced")
        turns.go("traced")
        run = finish(guest)
    print(output)
    write, read = (json.loads(line) for line in output.splitlines())
    for event in write, read:
        assert (event["kind"], event["event"], event["queue"]) == ("request", "complete", 0)
        assert "status" not in event and event["latency_us"] >= 0  # both succeeded
    assert (write["type"], write["sector"], write["sectors"]) == ("write", TRACED_SECTOR + 16, 8)
    assert (read["type"], read["sector"], read["sectors"]) == ("read", TRACED_SECTOR, 8)
    assert write["written"] == 1  # the status byte
    assert read["written"] == 4096 + 1  # the data and the status byte
    assert len(read["chain"]) == 3 and read["chain"][1].endswith("+4096w")  # header, data, status
    assert run.result("read") == run.result("written")
    assert image_md5(str(tmp_path / "disk.img"), TRACED_SECTOR * SECTOR, 4096) == run.result("read")
