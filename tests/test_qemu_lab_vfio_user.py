"""The device lab on a real vfio-user client: the project-built QEMU
(vfio-user-pci) attaches the example device, a guest drives its BAR with
busybox devmem, and ``vfiouserd trace`` (the CLI, as a user runs it) shows
exactly what the guest did: each register write and read with its value,
the device's DMA, its interrupt. ``vfiouserd inject`` then forces what a
register reads, in the guest's own devmem, until the rule goes."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from guest_helpers import qemu_messages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = pytest.mark.qemu

KNOWN_WARNING = "Could not enable error recovery for the device"  # see test_qemu_vfio_user
DEVICE_ID = 0x56460001
FORCED_ID = 0x1234ABCD
SRC, DST, LENGTH = 0x6000000, 0x6080000, 256  # in RAM the kernel leaves alone (memmap=)
PATTERN = b"".join(struct.pack("<I", (i * 2654435761 + 7) & 0xFFFFFFFF) for i in range(64))
# Every BAR0 write of the script, in order: (offset, value).
WRITES = [
    (0x04, 0x12345678),  # LIVENESS
    (0x08, 12),  # FACTORIAL
    (0x10, SRC),  # DMA_SRC low, high
    (0x14, 0),
    (0x18, DST),  # DMA_DST low, high
    (0x1C, 0),
    (0x20, LENGTH),  # DMA_LEN
    (0x24, 1),  # DMA_START
]

# The register part of test_qemu_vfio_user's EXAMPLE_SCRIPT, then the ID
# read until a fault rule forces it (the test adds the rule when it sees
# "phase force") and until it is real again (the rule removed on "forced").
SCRIPT = f"""
modprobe uio_pci_generic || exit 9
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x5646" ] && dev=$d
done
[ -n "$dev" ] || exit 10
bar=$(head -1 $dev/resource | cut -d' ' -f1)
printf '\\006\\000' | dd of=$dev/config bs=1 seek=4 count=2 conv=notrunc 2>/dev/null
echo "RESULT id $(devmem $((bar)) 32)"
devmem $((bar + 4)) 32 0x12345678
echo "RESULT liveness $(devmem $((bar + 4)) 32)"
devmem $((bar + 8)) 32 12
echo "RESULT factorial $(devmem $((bar + 8)) 32)"
echo "1234 5646" > /sys/bus/pci/drivers/uio_pci_generic/new_id
src={SRC}; dst={DST}
i=0
while [ $i -lt 64 ]; do
    devmem $((src + 4 * i)) 32 $(( (i * 2654435761 + 7) & 0xffffffff ))
    i=$((i + 1))
done
devmem $((bar + 0x10)) 32 $src
devmem $((bar + 0x14)) 32 0
devmem $((bar + 0x18)) 32 $dst
devmem $((bar + 0x1c)) 32 0
devmem $((bar + 0x20)) 32 {LENGTH}
devmem $((bar + 0x24)) 32 1
for i in $(seq 100); do
    crc=$(devmem $((bar + 0x28)) 32)
    [ "$crc" != "0x00000000" ] && break
    sleep 0.05
done
echo "RESULT crc $crc"
for i in $(seq 50); do grep -q uio_pci_generic /proc/interrupts && break; sleep 0.1; done
echo "RESULT interrupts $(grep uio_pci_generic /proc/interrupts | tr -s ' ' | cut -d' ' -f3)"
echo "RESULT phase force"
for i in $(seq 600); do
    id=$(devmem $((bar)) 32)
    [ "$id" != "0x56460001" ] && break
    sleep 0.1
done
echo "RESULT forced $id"
for i in $(seq 600); do
    id=$(devmem $((bar)) 32)
    [ "$id" = "0x56460001" ] && break
    sleep 0.1
done
echo "RESULT restored $id"
"""


def lab(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``vfiouserd ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "vfiouserd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


class Trace:
    """``vfiouserd trace TARGET --json --output FILE``, its stdout read as it comes."""

    def __init__(self, daemon: Daemon, target: str, output: Path) -> None:
        options = ["--json", "--data-bytes", "16", "--output", str(output)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vfiouserd", "trace", target, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            daemon.wait_for_log("event=control.trace_start", timeout=30)
        except TimeoutError:
            self.process.kill()
            raise AssertionError(f"trace did not start: {self.process.communicate()}") from None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def stop(self, after: str, timeout: float = 30) -> tuple[list[dict[str, Any]], str]:
        """Ctrl-C, the way a user ends it, once a line with ``after`` is
        printed (nothing comes after it: no event is cut in half); the
        events printed and what it said on stderr."""
        deadline = time.monotonic() + timeout
        while not any(after in line for line in self.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.process.send_signal(signal.SIGINT)
        _, stderr = self.process.communicate(timeout=20)
        self.reader.join(10)
        return [json.loads(line) for line in self.lines], stderr


def bar0(events: list[dict[str, Any]], direction: str) -> list[tuple[int, int]]:
    return [
        (e["offset"], e["value"])
        for e in events
        if e["kind"] == "pci" and e["event"] == direction and e["region"] == "bar0"
    ]


def test_a_guests_register_accesses_dma_and_interrupt_traced_and_a_register_forced(
    tmp_path, qemu_new
):
    """The trace shows the guest's BAR0 writes exactly (offset and value, in
    order, nothing else), the reads with what the device returned, the DMA
    copy the guest programmed and the interrupt after it; ``--replay``
    prints the recording again. A ``register`` rule on the ID register is
    what the guest's devmem reads while it is in force, and the real ID
    once it is removed."""
    recording = tmp_path / "trace.jsonl"
    rules: list[dict[str, Any]] = []
    with Daemon(
        "vfio-user-example", "--allow-fault-injection", workdir=tmp_path, name="example"
    ) as daemon:
        target = daemon.socket_path  # the VMM socket: the control socket is found beside it

        def on_line(line: str) -> None:
            if line.startswith("RESULT phase force"):
                rule = ("register", "region=bar0", "offset=0x0", f"value={FORCED_ID:#x}")
                added = lab("inject", target, *rule)
                rules.append(json.loads(added.stdout))
            elif line.startswith("RESULT forced"):
                listed = json.loads(lab("inject", target, "--list").stdout)
                rules.append(listed)
                removed = lab("inject", target, "--remove", str(rules[0]["id"]))
                rules.append(json.loads(removed.stdout))

        tracer = Trace(daemon, target, recording)
        try:
            run = vm.boot(
                SCRIPT,
                devices=vm.vfio_user_device(daemon.socket_path),
                qemu=qemu_new,
                append="memmap=1M$0x6000000",
                on_line=on_line,
                check=False,
            )
        finally:
            # QEMU is gone: the session's end is the last event.
            events, stderr = tracer.stop(after='"kind": "session", "event": "end"')
        assert daemon.stop() == 0
    assert run.callback_errors == [], run.callback_errors
    assert run.exit_statuses == [0], run.output[-3000:]
    assert tracer.process.returncode == 0, stderr
    assert qemu_messages(run.output, KNOWN_WARNING) == []

    # What the guest saw.
    crc = zlib.crc32(PATTERN)
    assert run.result("id") == f"0x{DEVICE_ID:08X}"
    assert run.result("liveness") == "0xEDCBA987"
    assert run.result("factorial") == f"0x{479001600:08X}"
    assert run.result("crc") == f"0x{crc:08X}"
    assert int(run.result("interrupts")) >= 1

    # The trace: stdout (--json: one event a line) and the recording (the
    # greeting, then the events as the daemon sent them) say the same.
    recorded = [json.loads(line) for line in recording.read_text().splitlines()]
    assert recorded[0]["vfiouserd"]["device"] == "example"
    assert not [m for m in recorded[1:] if m["event"] != "TRACE"]  # none lost
    assert [m["data"] for m in recorded[1:]] == events

    assert bar0(events, "write") == WRITES
    # The same writes as the protocol messages that carried them (decoded).
    carried = [
        (e["fields"]["offset"], int.from_bytes(bytes.fromhex(e["data"]), "little"))
        for e in events
        if e["kind"] == "message"
        and e["event"] == "in"
        and e["name"] == "REGION_WRITE"
        and e["fields"]["region"] == 0
    ]
    assert carried == WRITES
    reads = bar0(events, "read")
    # ID, LIVENESS (~written), FACTORIAL (12!), the CRC polled until it is
    # there, then the ID polled: the real one, the forced one, the real one.
    assert reads[:3] == [(0x00, DEVICE_ID), (0x04, 0xEDCBA987), (0x08, 479001600)]
    polled = [value for offset, value in reads[3:] if offset == 0x28]
    assert polled[-1] == crc and set(polled[:-1]) <= {0}
    ids = [value for offset, value in reads[3:] if offset == 0x00]
    assert ids[0] == DEVICE_ID and ids[-1] == DEVICE_ID and FORCED_ID in ids
    assert set(ids) == {DEVICE_ID, FORCED_ID}
    assert {offset for offset, _ in reads} == {0x00, 0x04, 0x08, 0x28}
    assert all(e["size"] == 4 for e in events if e["kind"] == "pci" and e["region"] == "bar0")

    # The copy the guest programmed: a read of SRC, a write of DST, LENGTH
    # bytes each, the data (its first 16 bytes shown) the pattern; then
    # the interrupt; all after DMA_START and before the CRC was there.
    start = next(i for i, e in enumerate(events) if e["kind"] == "pci" and e.get("offset") == 0x24)
    dma = [e for e in events if e["kind"] == "dma"]
    assert [(e["event"], e["address"], e["size"]) for e in dma] == [
        ("read", SRC, LENGTH),
        ("write", DST, LENGTH),
    ]
    assert dma[0]["data"] == dma[1]["data"] == PATTERN[:16].hex()
    irqs = [(i, e) for i, e in enumerate(events) if e["kind"] == "irq"]
    assert irqs, "no interrupt traced"
    first_irq, irq = irqs[0]
    assert irq["event"] == "raise" and irq["vector"] == 0 and irq["type"] in ("INTX", "MSI")
    dma_read, dma_write = (events.index(e) for e in dma)
    crc_seen = next(
        i
        for i, e in enumerate(events)
        if e["kind"] == "pci" and e.get("offset") == 0x28 and e["value"] == crc
    )
    assert start < dma_read < dma_write < first_irq and dma_write < crc_seen

    # The rule: added with the default size, listed, removed; its hits are
    # fault events in the trace.
    added, listed, removed = rules
    assert added["kind"] == "register" and added["region"] == "bar0"
    assert added["offset"] == 0 and added["value"] == FORCED_ID
    assert listed["allowed"] is True and [r["id"] for r in listed["rules"]] == [added["id"]]
    assert removed["id"] == added["id"]
    faults = [e for e in events if e["kind"] == "fault"]
    assert faults and all(e["event"] == "register" and e["rule"] == added["id"] for e in faults)
    assert len(faults) == ids.count(FORCED_ID)
    assert run.result("forced") == f"0x{FORCED_ID:08X}"
    assert run.result("restored") == f"0x{DEVICE_ID:08X}"

    # --replay prints the recording: one line per event, as text ...
    replayed = lab("trace", "--replay", str(recording)).stdout.splitlines()
    assert len(replayed) == len(events)
    writes = [line for line in replayed if " pci " in line and " write " in line and "bar0" in line]
    assert len(writes) == len(WRITES)
    assert "offset=0x24" in writes[-1] and "value=1" in writes[-1]
    assert any(" dma " in line and f"address={SRC:#x}" in line for line in replayed)
    # ... and as JSON, the same events as the live trace.
    again = lab("trace", "--replay", str(recording), "--json").stdout.splitlines()
    assert [json.loads(line) for line in again] == events
    assert not os.path.exists(str(tmp_path / "example.control.sock"))
