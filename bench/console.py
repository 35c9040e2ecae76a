#!/usr/bin/env python3
"""virtio-console throughput, host to guest and guest to host, through the daemon.

Host to guest: a client writes --size bytes to the console's socket while
the project's front end (playing the VMM and the guest driver) keeps 64
receive buffers of 4 KiB posted, woken by the device's interrupt (the call
eventfd over vhost-user, the MSI-X eventfd over vfio-user), giving each
back as it is used. Guest to host: the front end writes --size bytes
through 64 transmit buffers of 4 KiB (Linux's page-sized buffers) while the
client reads. The daemon is the real, jailed process.

The reference, measured in the same invocation: the same bytes through a
UNIX socketpair within one trio process, the limit for any device that
copies between a host socket and guest memory. Figures are MB/s, min/median/
max over --runs; the ratio is of medians, to the reference.
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
from common import connect, stop

from vfiouserd.client.blk import QueuePort
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.devices.virtio import Feature, bit

MiB = 1 << 20
BUFFER = 4096
BUFFERS = 64
CHUNK = 64 << 10


async def write_all(sock: trio.socket.SocketType, size: int) -> None:
    chunk = memoryview(os.urandom(CHUNK))
    left = size
    while left:
        left -= await sock.send(chunk[: min(left, CHUNK)])


async def read_all(sock: trio.socket.SocketType, size: int) -> None:
    left = size
    while left:
        data = await sock.recv(min(left, CHUNK))
        if not data:
            raise EOFError("the other side closed")
        left -= len(data)


async def post_receive_buffers(ram: GuestRam, rx: QueuePort) -> None:
    """Once: each run gives every used buffer straight back."""
    for address in [ram.alloc(BUFFER, 64) for _ in range(BUFFERS)]:
        rx.ring.add([], [(address, BUFFER)], address)
    await rx.kick_async()


async def host_to_guest(rx: QueuePort, host: trio.socket.SocketType, size: int) -> float:
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_all, host, size)
        got = 0
        while got < size:
            done = rx.ring.collect()
            if not done:
                await rx.wait_call()
                continue
            for completion in done:
                got += completion.written
                rx.ring.add([], [(completion.token, BUFFER)], completion.token)
            await rx.kick_async()
    return size / (time.perf_counter() - started) / 1e6


async def guest_to_host(
    ram: GuestRam, tx: QueuePort, host: trio.socket.SocketType, size: int
) -> float:
    free = [ram.alloc(BUFFER, 64) for _ in range(BUFFERS)]
    for address in free:
        ram.write(address, os.urandom(BUFFER))
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, host, size)
        posted = 0
        outstanding = 0
        while posted < size or outstanding:
            batch = False
            while free and posted < size:
                address = free.pop()
                length = min(BUFFER, size - posted)
                tx.ring.add([(address, length)], [], address)
                posted += length
                outstanding += 1
                batch = True
            if batch:
                await tx.kick_async()
            done = tx.ring.collect()
            if not done:
                await tx.wait_call()
                continue
            for completion in done:
                free.append(completion.token)
                outstanding -= 1
    return size / (time.perf_counter() - started) / 1e6


async def through_the_device(
    workdir: Path, protocol: str, size: int, runs: int
) -> dict[str, list[float]]:
    console_path, device_path = str(workdir / f"{protocol}.hvc0"), str(workdir / f"{protocol}.sock")
    daemon = subprocess.Popen(
        [
            *(sys.executable, "-m", "vfiouserd", f"{protocol}-console"),
            *("--socket-path", device_path, "--console", console_path),
        ],
        stderr=subprocess.DEVNULL,
    )
    ram = GuestRam([(0, 64 * MiB)])
    results: dict[str, list[float]] = {"to guest": [], "to host": []}

    async def measure(rx: QueuePort, tx: QueuePort) -> None:
        host = await connect(console_path)
        await post_receive_buffers(ram, rx)
        for _ in range(runs):
            results["to guest"].append(await host_to_guest(rx, host, size))
            results["to host"].append(await guest_to_host(ram, tx, host, size))
        host.close()

    try:
        await connect(device_path)  # up and listening
        if protocol == "vhost-user":
            frontend = await VhostUserFrontend.connect(device_path)
            await frontend.negotiate(want_features=~bit(Feature.RING_PACKED))
            await frontend.set_features()
            await frontend.share_memory(ram)
            rx = await frontend.start_queue(0, frontend.make_ring(ram, 256))
            tx = await frontend.start_queue(1, frontend.make_ring(ram, 256))
            await measure(rx, tx)
            await frontend.aclose()
        else:
            async with VfioUserClient.connect(device_path, ram=ram) as client:
                await client.map_ram()
                driver = VirtioPciDriver(client, ram)
                rx, tx = await driver.start(queue_count=2, queue_size=256)
                await measure(rx, tx)
                driver.close()
    finally:
        stop(daemon, f"{protocol}-console")
        ram.close()
    return results


async def through_a_socketpair(size: int, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_all, a, size)
            await read_all(b, size)
        samples.append(size / (time.perf_counter() - started) / 1e6)
        a.close()
        b.close()
    return samples


def line(name: str, samples: list[float], reference: float) -> str:
    low, median, high = min(samples), statistics.median(samples), max(samples)
    return f"{name:34} {low:8.1f} {median:8.1f} {high:8.1f}   {median / reference:5.2f}x"


async def run(size: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vfiouserd-console-bench-") as tmp:
        workdir = Path(tmp)
        reference_samples = await through_a_socketpair(size, runs)
        results = {
            protocol: await through_the_device(workdir, protocol, size, runs)
            for protocol in ("vhost-user", "vfio-user")
        }
    reference = statistics.median(reference_samples)
    print(f"console throughput, {size // MiB} MiB x {runs} runs each way, in MB/s")
    print(f"{'':34} {'min':>8} {'median':>8} {'max':>8}   vs socketpair")
    print(line("socketpair copy (reference)", reference_samples, reference))
    for protocol, directions in results.items():
        for direction, samples in directions.items():
            print(line(f"{protocol}-console, {direction}", samples, reference))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16, help="MiB per run and direction")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trio.run(run, args.size * MiB, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
