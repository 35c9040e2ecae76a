#!/usr/bin/env python3
"""4 KiB random reads: vfiouserd against qemu-storage-daemon, side by side.

Both back ends serve the same page-cached raw image; the same native front
end drives them (vhost-user set-up in Python, the request loop in C, see
driver.c). Guest-side fio under TCG would measure the emulator, not the back
end, so no guest is involved. Every figure comes with the ratio to
qemu-storage-daemon measured in the same invocation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import trio
from cffi import FFI

from vfiouserd._native import ffi as native_ffi
from vfiouserd.client.guest import DriverSplitRing, GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.devices.virtio import Feature, bit

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
MiB = 1 << 20
RAM_SIZE = 64 * MiB
QUEUE_SIZE = 256


def load_driver() -> ModuleType:
    """Compile driver.c (cffi API mode) into .cache/bench once."""
    builder = FFI()
    builder.cdef("""
        struct bench_args {
            void *desc, *avail, *used;
            uint16_t queue_size;
            int kick_fd, call_fd;
            uint8_t *ram;
            uint64_t ram_gpa, slots_gpa, capacity_sectors;
            uint32_t block_size, depth;
            uint64_t duration_ns, seed;
            uint64_t *latencies;
            uint64_t max_latencies, completed, errors, elapsed_ns;
        };
        int run_reads(struct bench_args *a);
    """)
    source = (Path(__file__).parent / "driver.c").read_text()
    builder.set_source("_bench_driver", source, extra_compile_args=["-O2"])
    CACHE.mkdir(parents=True, exist_ok=True)
    builder.compile(tmpdir=str(CACHE), verbose=False)
    sys.path.insert(0, str(CACHE))
    import _bench_driver

    return _bench_driver


@dataclass
class Sample:
    iops: float
    p50_us: float
    p99_us: float


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


def start_backend(kind: str, image: Path, sock: str, qsd_aio: str) -> subprocess.Popen:
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
            "--log-level",
            "warning",
        ]
    else:
        command = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file,filename={image},cache.direct=off,aio={qsd_aio}",
            "--blockdev",
            "driver=raw,node-name=raw,file=file",
            "--export",
            f"type=vhost-user-blk,id=exp,node-name=raw,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues=1",
        ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    wait_for_socket(sock, process)
    return process


async def measure(
    driver: ModuleType,
    sock: str,
    capacity_sectors: int,
    depth: int,
    seconds: float,
    seed: int,
) -> Sample:
    ram = GuestRam([(0, RAM_SIZE)])
    frontend = await VhostUserFrontend.connect(sock)
    try:
        # Split ring, no EVENT_IDX, no indirect: what both back ends serve alike.
        await frontend.negotiate(want_features=bit(Feature.VERSION_1))
        await frontend.set_features()
        await frontend.share_memory(ram)
        ring = DriverSplitRing(ram, QUEUE_SIZE)
        queue = await frontend.start_queue(0, ring)
        slots = ram.alloc(3 * 4096 * depth, 4096)
        region = ram.memory.regions[0]
        base = int(native_ffi.cast("uintptr_t", region.mapping.base))
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
        args.slots_gpa = slots
        args.capacity_sectors = capacity_sectors
        args.block_size = 4096
        args.depth = depth
        args.duration_ns = int(seconds * 1e9)
        args.seed = seed
        args.latencies = latencies
        args.max_latencies = 4_000_000
        status = driver.lib.run_reads(args)
        if status != 0:
            raise OSError(-status, os.strerror(-status))
        if args.errors:
            raise RuntimeError(f"{args.errors} requests failed")
        count = min(args.completed, args.max_latencies)
        ordered = sorted(latencies[i] for i in range(count))
        return Sample(
            iops=args.completed / (args.elapsed_ns / 1e9),
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
    parser.add_argument("--depths", default="1,32")
    parser.add_argument("--image-size", type=int, default=1024, help="MiB")
    parser.add_argument("--qsd-aio", default="threads", choices=["threads", "io_uring"])
    args = parser.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon not found (Debian package qemu-system-common)")
        return 1
    driver = load_driver()
    image = prepare_image(args.image_size * MiB)
    capacity = image.stat().st_size // 512
    depths = [int(d) for d in args.depths.split(",")]
    results: dict[tuple[str, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="vfiouserd-bench-") as tmp:
        for run in range(args.runs):
            for kind in ("qemu-storage-daemon", "vfiouserd"):  # interleaved: same conditions
                sock = f"{tmp}/{kind}.sock"
                process = start_backend(kind, image, sock, args.qsd_aio)
                try:
                    for depth in depths:
                        sample = trio.run(
                            measure, driver, sock, capacity, depth, args.seconds, run * 7919 + depth
                        )
                        results.setdefault((kind, depth), []).append(sample)
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(10)
                    if os.path.exists(sock):
                        os.unlink(sock)
    print(
        f"4 KiB random read, 1 queue, {args.runs} runs x {args.seconds:g} s, page-cached "
        f"{args.image_size} MiB image; reference: qemu-storage-daemon aio={args.qsd_aio}"
    )
    print(
        f"{'back end':<22}{'QD':>4}{'IOPS (min/med/max)':>28}{'p50 us':>10}{'p99 us':>10}"
        f"{'IOPS ratio':>12}{'p50 ratio':>11}"
    )
    for depth in depths:
        reference = results[("qemu-storage-daemon", depth)]
        ref_iops = summarize(reference, "iops")[1]
        ref_p50 = summarize(reference, "p50_us")[1]
        for kind in ("qemu-storage-daemon", "vfiouserd"):
            samples = results[(kind, depth)]
            low, median, high = summarize(samples, "iops")
            p50 = summarize(samples, "p50_us")[1]
            p99 = summarize(samples, "p99_us")[1]
            print(
                f"{kind:<22}{depth:>4}{low:>10.0f}/{median:>8.0f}/{high:>8.0f}"
                f"{p50:>10.1f}{p99:>10.1f}{median / ref_iops:>12.2f}{p50 / ref_p50:>11.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
