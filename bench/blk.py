#!/usr/bin/env python3
"""Block I/O: vfiouserd's virtio-blk (vhost-user, vfio-user) and NVMe against qemu-storage-daemon.

Back ends: ``vfiouserd vhost-user-blk``; ``vfiouserd vfio-user-blk`` (the
same device as a virtio-pci function); ``vfiouserd vfio-user-nvme``, driven
as a guest's nvme driver drives it (bench/nvme.py, nvme_driver.c: doorbells
as posted REGION_WRITEs, shadow doorbells when offered, interrupts through
the MSI-X eventfds); qemu-storage-daemon's vhost-user-blk
export with aio=threads (its default) and aio=io_uring (its fastest), both
with cache.direct=off, and io_uring with the export in an iothread (which
polls). The vfiouserd daemons run jailed, with default options.

Workloads: 4 KiB random reads, 4 KiB random writes, 128 KiB sequential
reads; one or two queues (the queue depth is per queue). Every back end
serves the same page-cached raw image, and the same native front end drives
them all: the set-up in Python, the request loop in C (driver.c), one thread
per queue. Over vhost-user the project's front end shares guest RAM and
hands the ring and its kick/call eventfds to the loop; over vfio-user the
project's client maps the same memfd RAM (DMA_MAP with its fd), starts the
virtio-pci device with MSI-X and ioeventfds (GET_REGION_IO_FDS), and hands
the ring, the queue's ioeventfd (kick) and its MSI-X vector's eventfd (call)
to the same loop (NVMe has its own loop, same workloads, same
figures). Guest-side fio under TCG would measure the emulator, not
the back end, so no guest is involved. Runs are interleaved; every figure
comes with its ratios to the others measured in the same invocation, and,
for vfiouserd, the share of requests its native fast path served (from
``stats`` on the control socket).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import nvme
import trio
from common import (
    CACHE,
    CLOCK_TICKS,
    Workload,
    compile_driver,
    cpu_ticks,
    daemon_program,
    percentiles,
    process_tree,
    request_args,
    ring_args,
    stop,
)
from nvme import NVME

from vfiouserd.client.control import ControlClient
from vfiouserd.client.guest import DriverSplitRing, GuestRam
from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.devices.blk import BlkFeature
from vfiouserd.devices.virtio import Feature, bit

BLK_F_MQ = BlkFeature.MQ

MiB = 1 << 20
RAM_SIZE = 64 * MiB
QUEUE_SIZE = 256  # over vfio-user, the device's largest: 128 (room for QD 42)
VHOST, VFIO = "vhost-user-blk", "vfio-user-blk"
OURS = (VHOST, VFIO, NVME)  # vfiouserd's back ends
VFIO_USER = (VFIO, NVME)  # those issue 15 sets targets for


def load_driver() -> ModuleType:
    """driver.c, compiled into .cache/bench once."""
    return compile_driver(
        "_bench_driver",
        "driver.c",
        """
        struct bench_args {
            void *desc, *avail, *used;
            uint16_t queue_size;
            int kick_fd, call_fd;
            uint8_t *ram;
            uint64_t ram_gpa, slots_gpa, capacity_sectors;
            uint32_t block_size, depth;
            uint64_t duration_ns, seed;
            uint32_t slot_bytes;
            int write, sequential;
            uint64_t next_block;
            uint64_t *latencies;
            uint64_t max_latencies, completed, errors, elapsed_ns;
        };
        int run_reads(struct bench_args *a);
    """,
    )


@dataclass
class Sample:
    iops: float
    p50_us: float
    p99_us: float
    native: float | None = None  # vfiouserd: share of the requests the fast path served
    cpu_us: float | None = None  # the back end's user+sys per request (measure's daemon=)
    # vfio-user-nvme: doorbell messages (REGION_WRITEs) and interrupts per
    # command, whether shadow doorbells were on
    doorbells: float | None = None
    interrupts: float | None = None
    shadow: bool | None = None


@dataclass
class Drivers:
    blk: ModuleType  # driver.c: virtio-blk split rings
    nvme: ModuleType  # nvme_driver.c


WORKLOADS = {
    "randread": Workload("4 KiB random read", 4096, False, False),
    "randwrite": Workload("4 KiB random write", 4096, True, False),
    "seqread": Workload("128 KiB sequential read", 128 * 1024, False, True),
}


def prepare_image(size: int) -> Path:
    """A fully written (not sparse) image, then read once into the page cache."""
    image = CACHE / f"image-{size >> 20}M.raw"
    if not image.exists() or image.stat().st_size != size:
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(image, "wb") as f:
            chunk = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(chunk)
    with open(image, "rb") as f:
        while f.read(16 * MiB):
            pass
    return image


def wait_for_socket(path: str, process: subprocess.Popen) -> None:
    for _ in range(1000):
        if os.path.exists(path):
            return
        if process.poll() is not None:
            raise RuntimeError(f"back end exited with {process.returncode}")
        time.sleep(0.01)
    raise TimeoutError(f"{path} never appeared")


def qsd_command(kind: str, image: Path, sock: str, queues: int) -> list[str]:
    """qemu-storage-daemon with one vhost-user-blk export of ``image``;
    ``kind``: "qsd aio=MODE", or MODE+iothread (the export in an iothread)."""
    aio, _, iothread = kind.partition("=")[2].partition("+")
    return [
        "qemu-storage-daemon",
        *(["--object", "iothread,id=io0"] if iothread else []),
        "--blockdev",
        f"driver=file,node-name=file,filename={image},cache.direct=off,aio={aio}",
        "--blockdev",
        "driver=raw,node-name=raw,file=file",
        "--export",
        f"type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,"
        f"addr.path={sock},writable=on,num-queues={queues}" + (",iothread=io0" if iothread else ""),
    ]


def start_backend(kind: str, image: Path, sock: str, queues: int) -> subprocess.Popen:
    """``kind``: one of OURS, or "qsd aio=MODE" (MODE+iothread: the export
    in an iothread, which polls its queues, 32 us by default, as the main
    loop does not)."""
    if kind in OURS:
        # Jailed (the default), default options: only what the set-up needs.
        device = (
            ("--namespace", str(image))
            if kind == NVME
            else ("--blk-file", str(image), "--num-queues", str(queues))
        )
        command = [
            *(*daemon_program(), kind, "--socket-path", sock),
            *(*device, "--log-level", "warning"),
        ]
    else:
        command = qsd_command(kind, image, sock, queues)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_for_socket(sock, process)
    return process


@dataclass
class Queue:
    """What the C loop needs of a started queue."""

    ring: DriverSplitRing
    kick: int
    call: int


def wanted_features(queues: int) -> int:
    # Split ring, no EVENT_IDX, no indirect: what every back end serves alike.
    return bit(Feature.VERSION_1) | (bit(BLK_F_MQ) if queues > 1 else 0)


@asynccontextmanager
async def vhost_user_queues(sock: str, ram: GuestRam, queues: int) -> AsyncIterator[list[Queue]]:
    frontend = await VhostUserFrontend.connect(sock)
    try:
        await frontend.negotiate(want_features=wanted_features(queues))
        await frontend.set_features()
        await frontend.share_memory(ram)
        started = []
        for index in range(queues):
            ring = DriverSplitRing(ram, QUEUE_SIZE)
            queue = await frontend.start_queue(index, ring)
            started.append(Queue(ring, queue.kick, queue.call))
        yield started
    finally:
        await frontend.aclose()


@asynccontextmanager
async def vfio_user_queues(sock: str, ram: GuestRam, queues: int) -> AsyncIterator[list[Queue]]:
    """The device as a guest with KVM would drive it: RAM mapped with its fd,
    MSI-X (config on vector 0, queue i on vector i + 1), doorbells through
    the ioeventfds of GET_REGION_IO_FDS."""
    async with VfioUserClient.connect(sock, ram=ram) as client:
        await client.map_ram()
        driver = VirtioPciDriver(client, ram)
        try:
            started = await driver.start(
                want=wanted_features(queues),
                queue_size=QUEUE_SIZE,
                queue_count=queues,
                msix=True,
                ioeventfds=True,
            )
            usable = [
                Queue(q.ring, q.ioeventfd, q.call)
                for q in started
                if q.ioeventfd is not None and isinstance(q.ring, DriverSplitRing)
            ]
            if len(usable) != queues:
                raise RuntimeError(
                    f"{VFIO}: {len(usable)} split rings with ioeventfds, not {queues}"
                )
            yield usable
            # As a VMM does when its guest goes: the device state outlives the
            # connection, and the next client's RAM does not hold these rings.
            await client.reset()
        finally:
            driver.close()


def request_counts(control: str) -> tuple[int, int]:
    """(requests, of them served by the native loop) over all of a
    vfiouserd daemon's queues, from ``stats`` on its control socket."""
    with ControlClient(control, timeout=10) as client:
        queues = client.execute("stats")["queues"]
    return sum(q["requests"] for q in queues), sum(q["native_requests"] for q in queues)


@asynccontextmanager
async def attach(
    drivers: Drivers, kind: str, sock: str, ram: GuestRam, queues: int, shadow: bool
) -> AsyncIterator[tuple[Any, list[Any]]]:
    """The C loop's function and its arguments for each queue of a back end
    set up (the workload's fields left to fill)."""
    if kind == NVME:
        async with nvme.attach(sock, ram, queues, shadow=shadow) as controller:
            runs = [nvme.queue_args(drivers.nvme, ram, controller, i) for i in range(queues)]
            yield drivers.nvme.lib.run_nvme, runs
        return
    attach_rings = vfio_user_queues if kind == VFIO else vhost_user_queues
    async with attach_rings(sock, ram, queues) as started:
        runs = [ring_args(drivers.blk, ram, q.ring, q.kick, q.call) for q in started]
        yield drivers.blk.lib.run_reads, runs


async def measure(
    drivers: Drivers,
    kind: str,
    sock: str,
    capacity_sectors: int,
    workload: Workload,
    queues: int,
    depth: int,
    seconds: float,
    seed: int,
    shadow: bool = True,
    daemon: int | None = None,
) -> Sample:
    """One run of ``workload``; with ``daemon`` (the back end's pid), its
    processes' CPU time over the run, per completed request."""
    ram = GuestRam([(0, RAM_SIZE)])
    control = sock.removesuffix(".sock") + ".control.sock" if kind in OURS else None
    try:
        async with attach(drivers, kind, sock, ram, queues, shadow) as (function, runs):
            buffers = []  # the latencies, kept alive while the loops write them
            blocks = capacity_sectors // (workload.block_size // 512)
            for index, args in enumerate(runs):
                buffers.append(
                    request_args(
                        drivers.nvme if kind == NVME else drivers.blk,
                        args,
                        ram,
                        workload,
                        depth=depth,
                        seconds=seconds,
                        seed=seed + index,
                        capacity_sectors=capacity_sectors,
                        # Sequential streams of the queues start far apart.
                        first_block=index * blocks // queues,
                    )
                )
            statuses: list[int] = []

            async def drive(args: object) -> None:
                statuses.append(await trio.to_thread.run_sync(function, args))

            counts = []  # around the run, while connected
            if control is not None:
                counts.append(await trio.to_thread.run_sync(request_counts, control))
            ticks = [] if daemon is None else [cpu_ticks(process_tree(daemon))]
            async with trio.open_nursery() as nursery:
                for args in runs:
                    nursery.start_soon(drive, args)
            if daemon is not None:
                ticks.append(cpu_ticks(process_tree(daemon)))
            if control is not None:
                counts.append(await trio.to_thread.run_sync(request_counts, control))
    finally:
        ram.close()
    for status in statuses:
        if status != 0:
            raise OSError(-status, os.strerror(-status))
    all_latencies: list[int] = []
    iops = 0.0
    for args, latencies in zip(runs, buffers, strict=True):
        if args.errors:
            raise RuntimeError(f"{kind}: {args.errors} requests failed")
        count = min(args.completed, args.max_latencies)
        all_latencies += list(latencies[0:count])
        iops += args.completed / (args.elapsed_ns / 1e9)
    p50_us, p99_us = percentiles(all_latencies)
    native = None
    if counts and counts[1][0] > counts[0][0]:
        (requests, native_before), (requests_after, native_after) = counts
        native = (native_after - native_before) / (requests_after - requests)
    sample = Sample(iops=iops, p50_us=p50_us, p99_us=p99_us, native=native)
    completed = sum(args.completed for args in runs)
    if ticks:
        sample.cpu_us = (ticks[1] - ticks[0]) / CLOCK_TICKS / completed * 1e6
    if kind == NVME:
        sample.doorbells = sum(args.doorbells for args in runs) / completed
        sample.interrupts = sum(args.interrupts for args in runs) / completed
        sample.shadow = bool(runs[0].shadow)
    return sample


def summarize(samples: list[Sample], attribute: str) -> tuple[float, float, float]:
    values = [getattr(s, attribute) for s in samples]
    return min(values), statistics.median(values), max(values)


def ratios(ours: list[Sample], theirs: list[Sample], attribute: str) -> tuple[float, float, float]:
    """min/median/max over the runs of ours / theirs, each run's against
    the same run's (measured minutes apart at most, not a whole bench apart)."""
    values = [
        getattr(a, attribute) / getattr(b, attribute) for a, b in zip(ours, theirs, strict=True)
    ]
    return min(values), statistics.median(values), max(values)


def spread(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


# Issue 15's targets for vfio-user-blk and vfio-user-nvme: IOPS at QD32 at least 0.9x
# vhost-user-blk's and 1.0x qemu-storage-daemon io_uring's; p50 at QD1 at most 1.3x
# vhost-user-blk's.
TARGET_IOPS_VHOST, TARGET_IOPS_QSD, TARGET_P50_VHOST = 0.9, 1.0, 1.3


def report_vfio_user(
    results: dict[tuple[str, str, int, int], list[Sample]],
    workloads: list[Workload],
    queue_counts: list[int],
    depths: list[int],
    kinds: list[str],
    qsd_kinds: list[str],
) -> None:
    """Each vfio-user back end against vhost-user-blk and each
    qemu-storage-daemon set-up, then against the issue's targets."""
    ours_kinds = [kind for kind in VFIO_USER if kind in kinds]
    print()
    print("vfio-user back end / another back end, each run against the same run's (min/med/max)")
    print(
        f"{'workload':<26}{'Q':>2}{'QD':>4}{'back end':>16}{'against':>27}"
        f"{'IOPS ratio':>18}{'p50 ratio':>18}"
    )
    for workload in workloads:
        for queues in queue_counts:
            for depth in depths:
                for our_kind in ours_kinds:
                    ours = results[(our_kind, workload.name, queues, depth)]
                    for kind in (VHOST, *qsd_kinds):
                        theirs = results[(kind, workload.name, queues, depth)]
                        print(
                            f"{workload.name:<26}{queues:>2}{depth:>4}{our_kind:>16}{kind:>27}"
                            f"{spread(ratios(ours, theirs, 'iops')):>18}"
                            f"{spread(ratios(ours, theirs, 'p50_us')):>18}"
                        )
    randread = WORKLOADS["randread"]
    if randread not in workloads or not {1, 32} <= set(depths):
        return
    print()
    print("issue 15's targets, 4 KiB random read, on medians of the per-run ratios")
    checks = [
        (f"QD32 IOPS >= {TARGET_IOPS_VHOST}x {VHOST}", VHOST, "iops", 32, TARGET_IOPS_VHOST),
        *(
            (f"QD32 IOPS >= {TARGET_IOPS_QSD}x {kind}", kind, "iops", 32, TARGET_IOPS_QSD)
            for kind in qsd_kinds
            if "io_uring" in kind
        ),
        (f"QD1 p50 <= {TARGET_P50_VHOST}x {VHOST}", VHOST, "p50_us", 1, TARGET_P50_VHOST),
    ]
    for our_kind in ours_kinds:
        for queues in queue_counts:
            for label, kind, attribute, depth, target in checks:
                ours = results[(our_kind, randread.name, queues, depth)]
                theirs = results[(kind, randread.name, queues, depth)]
                median = ratios(ours, theirs, attribute)[1]
                met = median >= target if attribute == "iops" else median <= target
                print(
                    f"  {our_kind:<15}Q{queues} {label:<50}{median:>6.2f}  "
                    + ("met" if met else "NOT met")
                )


def report_nvme_doorbells(
    results: dict[tuple[str, str, int, int], list[Sample]],
    workloads: list[Workload],
    queue_counts: list[int],
    depths: list[int],
    shadow_wanted: bool,
) -> None:
    """What the NVMe driver sent: doorbell messages, and interrupts it woke on."""
    used = {s.shadow for samples in results.values() for s in samples if s.shadow is not None}
    if used == {True}:
        shadow = "on"
    elif not shadow_wanted:
        shadow = "off (--no-shadow)"
    elif used == {False}:
        shadow = "off: not offered (Identify Controller OACS bit 8 clear)"
    else:
        shadow = "on in some runs only"
    print()
    print(f"{NVME}: per command, min/med/max over the runs; shadow doorbells {shadow}")
    print(f"{'workload':<26}{'Q':>2}{'QD':>4}{'doorbell messages':>22}{'interrupts':>20}")
    for workload in workloads:
        for queues in queue_counts:
            for depth in depths:
                samples = results[(NVME, workload.name, queues, depth)]
                print(
                    f"{workload.name:<26}{queues:>2}{depth:>4}"
                    f"{spread(summarize(samples, 'doorbells')):>22}"
                    f"{spread(summarize(samples, 'interrupts')):>20}"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--depths", default="1,32", help="per queue")
    parser.add_argument("--queues", default="1,2")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--image-size", type=int, default=1024, help="MiB")
    parser.add_argument(
        "--qsd-aio",
        default="threads,io_uring,io_uring+iothread",
        help="qemu-storage-daemon set-ups to compare with ('+iothread': export in an iothread)",
    )
    parser.add_argument(
        "--no-vfio-user",
        action="store_true",
        help=f"leave {VFIO} and {NVME} out (vhost-user only)",
    )
    parser.add_argument(
        "--no-shadow",
        action="store_true",
        help=f"{NVME}: no shadow doorbells even when the controller offers them",
    )
    args = parser.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon not found (Debian package qemu-system-common)")
        return 1
    drivers = Drivers(load_driver(), nvme.load_driver())
    image = prepare_image(args.image_size * MiB)
    capacity = image.stat().st_size // 512
    depths = [int(d) for d in args.depths.split(",")]
    queue_counts = [int(q) for q in args.queues.split(",")]
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    qsd_kinds = [f"qsd aio={aio}" for aio in args.qsd_aio.split(",")]
    kinds = [VHOST, *([] if args.no_vfio_user else VFIO_USER), *qsd_kinds]
    results: dict[tuple[str, str, int, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="vfiouserd-bench-") as tmp:
        for run in range(args.runs):
            for queues in queue_counts:
                for kind in kinds:  # interleaved: the same conditions for each
                    sock = f"{tmp}/{run}-{queues}.sock"
                    name = kind if kind in OURS else "qemu-storage-daemon"
                    process = start_backend(kind, image, sock, queues)
                    try:
                        for workload in workloads:
                            for depth in depths:
                                sample = trio.run(
                                    measure,
                                    drivers,
                                    kind,
                                    sock,
                                    capacity,
                                    workload,
                                    queues,
                                    depth,
                                    args.seconds,
                                    run * 7919 + depth,
                                    not args.no_shadow,
                                )
                                key = (kind, workload.name, queues, depth)
                                results.setdefault(key, []).append(sample)
                    finally:
                        stop(process, name)
                        if os.path.exists(sock):
                            os.unlink(sock)
    print(
        f"{args.runs} runs x {args.seconds:g} s, page-cached {args.image_size} MiB image, "
        f"queue depth per queue; ratios: {VHOST} / qemu-storage-daemon (IOPS, p50 latency); "
        "native: requests the fast path served"
    )
    print(
        f"{'workload':<26}{'Q':>2}{'QD':>4}{'back end':>27}{'IOPS (min/med/max)':>28}"
        f"{'MB/s':>8}{'p50 us':>9}{'p99 us':>9}{'native':>8}{'IOPS x':>8}{'p50 x':>7}"
    )
    for workload in workloads:
        for queues in queue_counts:
            for depth in depths:
                ours = results[(VHOST, workload.name, queues, depth)]
                our_iops = summarize(ours, "iops")[1]
                our_p50 = summarize(ours, "p50_us")[1]
                for kind in kinds:
                    samples = results[(kind, workload.name, queues, depth)]
                    low, median, high = summarize(samples, "iops")
                    p50 = summarize(samples, "p50_us")[1]
                    p99 = summarize(samples, "p99_us")[1]
                    shares = [s.native for s in samples if s.native is not None]
                    native = f"{100 * min(shares):>7.1f}%" if shares else f"{'-':>8}"
                    ratios_text = (
                        f"{our_iops / median:>8.2f}{our_p50 / p50:>7.2f}"
                        if kind in qsd_kinds
                        else ""
                    )
                    print(
                        f"{workload.name:<26}{queues:>2}{depth:>4}{kind:>27}"
                        f"{low:>10.0f}/{median:>8.0f}/{high:>8.0f}"
                        f"{median * workload.block_size / 1e6:>8.0f}{p50:>9.1f}{p99:>9.1f}"
                        + native
                        + ratios_text
                    )
    if VFIO in kinds:
        report_vfio_user(results, workloads, queue_counts, depths, kinds, qsd_kinds)
        report_nvme_doorbells(results, workloads, queue_counts, depths, not args.no_shadow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
