#!/usr/bin/env python3
"""virtio-blk over vhost-user: vfiouserd against qemu-storage-daemon, side by side.

Workloads: 4 KiB random reads, 4 KiB random writes, 128 KiB sequential
reads; one or two queues (the queue depth is per queue); qemu-storage-daemon
with aio=threads (its default) and aio=io_uring (its fastest), both with
cache.direct=off, and io_uring with the export in an iothread (which polls).
Both back ends serve the same page-cached raw image; the same native front
end drives them (vhost-user set-up in Python, the request loop in C, one
thread per queue, see driver.c). Guest-side fio under TCG would measure the
emulator, not the back end, so no guest is involved. Every figure comes with
the ratio to qemu-storage-daemon measured in the same invocation, runs
interleaved.
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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import trio
from common import CACHE, compile_driver, stop

from vfiouserd._native import ffi as native_ffi
from vfiouserd.client.guest import DriverSplitRing, GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.devices.blk import BlkFeature
from vfiouserd.devices.virtio import Feature, bit

BLK_F_MQ = BlkFeature.MQ

MiB = 1 << 20
RAM_SIZE = 64 * MiB
QUEUE_SIZE = 256


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


@dataclass(frozen=True)
class Workload:
    name: str
    block_size: int
    write: bool
    sequential: bool


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


def start_backend(kind: str, image: Path, sock: str, qsd_aio: str, queues: int) -> subprocess.Popen:
    if kind == "vfiouserd":
        command = [
            sys.executable,
            "-m",
            "vfiouserd",
            "vhost-user-blk",
            "--socket-path",
            sock,
            "--blk-file",
            str(image),
            "--num-queues",
            str(queues),
            "--log-level",
            "warning",
        ]
    else:
        # "io_uring+iothread": the export in an iothread, which polls its
        # queues (32 us by default) instead of the main loop, which does not.
        aio, _, iothread = qsd_aio.partition("+")
        command = [
            "qemu-storage-daemon",
            *(["--object", "iothread,id=io0"] if iothread else []),
            "--blockdev",
            f"driver=file,node-name=file,filename={image},cache.direct=off,aio={aio}",
            "--blockdev",
            "driver=raw,node-name=raw,file=file",
            "--export",
            f"type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues={queues}"
            + (",iothread=io0" if iothread else ""),
        ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_for_socket(sock, process)
    return process


async def measure(
    driver: ModuleType,
    sock: str,
    capacity_sectors: int,
    workload: Workload,
    queues: int,
    depth: int,
    seconds: float,
    seed: int,
) -> Sample:
    ram = GuestRam([(0, RAM_SIZE)])
    frontend = await VhostUserFrontend.connect(sock)
    try:
        # Split ring, no EVENT_IDX, no indirect: what both back ends serve alike.
        wanted = bit(Feature.VERSION_1) | (bit(BLK_F_MQ) if queues > 1 else 0)
        await frontend.negotiate(want_features=wanted)
        await frontend.set_features()
        await frontend.share_memory(ram)
        region = ram.memory.regions[0]
        base = int(native_ffi.cast("uintptr_t", region.mapping.base))
        slot_bytes = 4096 + workload.block_size
        runs = []
        for index in range(queues):
            ring = DriverSplitRing(ram, QUEUE_SIZE)
            queue = await frontend.start_queue(index, ring)
            latencies = driver.ffi.new("uint64_t[]", 4_000_000)
            args = driver.ffi.new("struct bench_args *")
            desc, avail, used = ring.areas
            args.desc = driver.ffi.cast("void *", base + desc)
            args.avail = driver.ffi.cast("void *", base + avail)
            args.used = driver.ffi.cast("void *", base + used)
            args.queue_size = QUEUE_SIZE
            args.kick_fd, args.call_fd = queue.kick, queue.call
            args.ram = driver.ffi.cast("uint8_t *", base)
            args.ram_gpa = 0
            args.slots_gpa = ram.alloc(slot_bytes * depth, 4096)
            args.slot_bytes = slot_bytes
            args.capacity_sectors = capacity_sectors
            args.block_size = workload.block_size
            args.write, args.sequential = int(workload.write), int(workload.sequential)
            # Sequential streams of the queues start far apart.
            args.next_block = index * capacity_sectors // (workload.block_size // 512) // queues
            args.depth = depth
            args.duration_ns = int(seconds * 1e9)
            args.seed = seed + index
            args.latencies = latencies
            args.max_latencies = 4_000_000
            runs.append((args, latencies, ring, queue))
        statuses: list[int] = []

        async def drive(args: object) -> None:
            statuses.append(await trio.to_thread.run_sync(driver.lib.run_reads, args))

        async with trio.open_nursery() as nursery:
            for args, *_ in runs:
                nursery.start_soon(drive, args)
        for status in statuses:
            if status != 0:
                raise OSError(-status, os.strerror(-status))
        all_latencies: list[int] = []
        iops = 0.0
        for args, latencies, *_ in runs:
            if args.errors:
                raise RuntimeError(f"{args.errors} requests failed")
            count = min(args.completed, args.max_latencies)
            all_latencies += [latencies[i] for i in range(count)]
            iops += args.completed / (args.elapsed_ns / 1e9)
        ordered = sorted(all_latencies)
        return Sample(
            iops=iops,
            p50_us=ordered[len(ordered) // 2] / 1000,
            p99_us=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
        )
    finally:
        await frontend.aclose()
        ram.close()


def summarize(samples: list[Sample], attribute: str) -> tuple[float, float, float]:
    values = [getattr(s, attribute) for s in samples]
    return min(values), statistics.median(values), max(values)


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
    args = parser.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon not found (Debian package qemu-system-common)")
        return 1
    driver = load_driver()
    image = prepare_image(args.image_size * MiB)
    capacity = image.stat().st_size // 512
    depths = [int(d) for d in args.depths.split(",")]
    queue_counts = [int(q) for q in args.queues.split(",")]
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    aio_modes = args.qsd_aio.split(",")
    # Back ends: vfiouserd, and qemu-storage-daemon once per aio mode.
    kinds = ["vfiouserd", *(f"qsd aio={aio}" for aio in aio_modes)]
    results: dict[tuple[str, str, int, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="vfiouserd-bench-") as tmp:
        for run in range(args.runs):
            for queues in queue_counts:
                for kind in kinds:  # interleaved: the same conditions for each
                    sock = f"{tmp}/{run}-{queues}.sock"
                    aio = kind.partition("=")[2] or "threads"
                    name = "vfiouserd" if kind == "vfiouserd" else "qemu-storage-daemon"
                    process = start_backend(name, image, sock, aio, queues)
                    try:
                        for workload in workloads:
                            for depth in depths:
                                sample = trio.run(
                                    measure,
                                    driver,
                                    sock,
                                    capacity,
                                    workload,
                                    queues,
                                    depth,
                                    args.seconds,
                                    run * 7919 + depth,
                                )
                                key = (kind, workload.name, queues, depth)
                                results.setdefault(key, []).append(sample)
                    finally:
                        stop(process, name)
                        if os.path.exists(sock):
                            os.unlink(sock)
    print(
        f"{args.runs} runs x {args.seconds:g} s, page-cached {args.image_size} MiB image, "
        "queue depth per queue; ratios: vfiouserd / qemu-storage-daemon (IOPS, p50 latency)"
    )
    print(
        f"{'workload':<26}{'Q':>2}{'QD':>4}{'back end':>27}{'IOPS (min/med/max)':>28}"
        f"{'MB/s':>8}{'p50 us':>9}{'p99 us':>9}{'IOPS x':>8}{'p50 x':>7}"
    )
    for workload in workloads:
        for queues in queue_counts:
            for depth in depths:
                ours = results[("vfiouserd", workload.name, queues, depth)]
                our_iops = summarize(ours, "iops")[1]
                our_p50 = summarize(ours, "p50_us")[1]
                for kind in kinds:
                    samples = results[(kind, workload.name, queues, depth)]
                    low, median, high = summarize(samples, "iops")
                    p50 = summarize(samples, "p50_us")[1]
                    p99 = summarize(samples, "p99_us")[1]
                    ratios = (
                        f"{our_iops / median:>8.2f}{our_p50 / p50:>7.2f}"
                        if kind != "vfiouserd"
                        else ""
                    )
                    print(
                        f"{workload.name:<26}{queues:>2}{depth:>4}{kind:>27}"
                        f"{low:>10.0f}/{median:>8.0f}/{high:>8.0f}"
                        f"{median * workload.block_size / 1e6:>8.0f}{p50:>9.1f}{p99:>9.1f}" + ratios
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
