#!/usr/bin/env python3
"""Input event latency: from the host writing an event to the driver seeing it.

One event at a time is written to the daemon's events socket; the time is
taken when the project's front end (playing the VMM and the guest driver)
finds it in the used ring, woken by the device's interrupt (the call
eventfd over vhost-user, the MSI-X eventfd over vfio-user). The daemon is
the real, jailed process.

The reference, measured in the same invocation: the same 8 bytes through a
relay process (a trio program of the same Python that reads them from one
UNIX socket and writes them to another), the floor for any device fed by a
host socket. Figures are min/median/max in microseconds over --events; the
ratio is of medians, to the reference.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from common import connect, stop  # noqa: E402

from conftest import start_device  # noqa: E402
from vfiouserd.client.blk import QueuePort  # noqa: E402
from vfiouserd.client.guest import GuestRam  # noqa: E402
from vfiouserd.client.vfio_user import VfioUserClient  # noqa: E402
from vfiouserd.client.vhost_user import VhostUserFrontend  # noqa: E402
from vfiouserd.client.virtio_pci import VirtioPciDriver  # noqa: E402
from vfiouserd.devices.input import EV_REL, EVENT  # noqa: E402

MiB = 1 << 20
RELAY = """
import sys, trio
async def main(listen_path, out_path):
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(listen_path); listener.listen(1)
    out = trio.socket.socket(trio.socket.AF_UNIX); await out.connect(out_path)
    conn, _ = await listener.accept()
    while data := await conn.recv(4096):
        await out.send(data)
trio.run(main, sys.argv[1], sys.argv[2])
"""


async def through_the_device(workdir: Path, protocol: str, count: int) -> list[float]:
    events_path, device_path = (
        str(workdir / f"{protocol}.events"),
        str(workdir / f"{protocol}.sock"),
    )
    daemon = subprocess.Popen(
        [
            *(sys.executable, "-m", "vfiouserd", f"{protocol}-input"),
            *("--socket-path", device_path, "--events-socket", events_path),
        ],
        stderr=subprocess.DEVNULL,
    )
    ram = GuestRam([(0, 8 * MiB)])
    samples: list[float] = []
    try:
        if protocol == "vhost-user":
            await connect(device_path)  # up and listening
            frontend = await VhostUserFrontend.connect(device_path)
            events, _ = await start_device(frontend, ram, queues=2, size=64)
            samples = await measure(ram, events.queue, events_path, count)
            await frontend.aclose()
        else:
            await connect(device_path)
            async with VfioUserClient.connect(device_path, ram=ram) as client:
                await client.map_ram()
                driver = VirtioPciDriver(client, ram)
                queue, _ = await driver.start(queue_count=2, queue_size=64)
                samples = await measure(ram, queue, events_path, count)
                driver.close()
    finally:
        stop(daemon, "the input daemon")
        ram.close()
    return samples


async def measure(ram: GuestRam, queue: QueuePort, events_path: str, count: int) -> list[float]:
    buffers = [ram.alloc(8, 64) for _ in range(32)]
    for address in buffers:
        queue.ring.add([], [(address, 8)], address)
    await queue.kick_async()
    host = await connect(events_path)
    samples = []
    for number in range(count):
        started = time.perf_counter()
        await host.send(EVENT.pack(EV_REL, 0, number))
        while True:
            done = queue.ring.collect()
            if done:
                break
            await queue.wait_call()
        samples.append(time.perf_counter() - started)
        for completion in done:  # the buffer goes back to the device
            queue.ring.add([], [(completion.token, 8)], completion.token)
        await queue.kick_async()
    host.close()
    return samples


async def through_a_relay(workdir: Path, count: int) -> list[float]:
    listen_path, out_path = str(workdir / "relay.in"), str(workdir / "relay.out")
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await receiver.bind(out_path)
    receiver.listen(1)
    relay = subprocess.Popen([sys.executable, "-c", RELAY, listen_path, out_path])
    try:
        inbound, _ = await receiver.accept()
        host = await connect(listen_path)
        samples = []
        for number in range(count):
            started = time.perf_counter()
            await host.send(EVENT.pack(EV_REL, 0, number))
            got = b""
            while len(got) < EVENT.size:
                got += await inbound.recv(EVENT.size - len(got))
            samples.append(time.perf_counter() - started)
        host.close()
    finally:
        stop(relay, "the relay")
    return samples


def line(name: str, samples: list[float], reference: float) -> str:
    us = [s * 1e6 for s in samples]
    median = statistics.median(us)
    return f"{name:28} {min(us):9.1f} {median:9.1f} {max(us):9.1f}   {median / reference:5.2f}x"


async def run(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vfiouserd-input-bench-") as tmp:
        workdir = Path(tmp)
        relay = await through_a_relay(workdir, count)
        results = {
            "vhost-user-input": await through_the_device(workdir, "vhost-user", count),
            "vfio-user-input": await through_the_device(workdir, "vfio-user", count),
        }
    reference = statistics.median(relay) * 1e6
    print(f"input event latency, {count} events, in microseconds (host write to used ring)")
    print(f"{'':28} {'min':>9} {'median':>9} {'max':>9}   vs relay")
    print(line("relay process (reference)", relay, reference))
    for name, samples in results.items():
        print(line(name, samples, reference))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trio.run(run, args.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
