#!/usr/bin/env python3
"""virtio-net over vhost-user: frames through the daemon and back, against the socket's own limit.

A native guest driver (net_driver.c) sends frames on the transmit ring of
``vfiouserd vhost-user-net --stream-listen``; a native peer on the stream
socket sends every byte back; the driver counts the frames that come back on
its receive ring, keeping ``--window`` frames in flight. The limit is the
same frames, length-prefixed, written to a UNIX stream socket whose other end
echoes them: what the stream alone costs, with no virtio on the way. Frames
of 64 and 1500 bytes; packets per second and throughput of the round trip,
the ratio to the limit measured in the same invocation, min/median/max over
the runs (interleaved).

passt is not measured side by side: it is a NAT to the host's network, not
an echo, so it cannot carry these frames; a TCP flow through it measures
the guest's network stack more than the back end.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass
from types import ModuleType

import trio
from common import compile_driver, connect, stop

from vfiouserd._native import ffi as native_ffi
from vfiouserd.client.guest import DriverSplitRing, GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.devices.net import F_MRG_RXBUF
from vfiouserd.devices.virtio import Feature, bit

MiB = 1 << 20
QUEUE_SIZE = 256
SLOT = 2048
DAEMONS = {"vfiouserd": (), "python": ("--no-fast-path",)}


def load_driver() -> ModuleType:
    """net_driver.c, compiled into .cache/bench once."""
    return compile_driver(
        "_bench_net_driver",
        "net_driver.c",
        """
        struct net_args {
            void *rx_desc, *rx_avail, *rx_used;
            void *tx_desc, *tx_avail, *tx_used;
            uint16_t queue_size;
            int rx_kick, rx_call, tx_kick, tx_call;
            uint8_t *ram;
            uint64_t rx_gpa, tx_gpa;
            uint32_t frame_size, window;
            uint64_t duration_ns;
            uint64_t sent, received, errors, elapsed_ns;
        };
        int run_guest(struct net_args *a);
        int run_echo(int fd);
        int run_socket(struct net_args *a, int fd);
    """,
    )


@dataclass
class Sample:
    pps: float
    errors: int


def echo(driver: ModuleType, sock: socket.socket) -> threading.Thread:
    """The peer: every byte back, on a thread (the C loop releases the GIL)."""
    thread = threading.Thread(target=driver.lib.run_echo, args=(sock.fileno(),), daemon=True)
    thread.start()
    return thread


def check(status: int, args: object) -> Sample:
    if status != 0:
        raise OSError(-status, os.strerror(-status))
    return Sample(args.received / (args.elapsed_ns / 1e9), int(args.errors))  # type: ignore[attr-defined]


async def through_the_daemon(
    driver: ModuleType, sock: str, wire: str, frame_size: int, window: int, seconds: float
) -> Sample:
    ram = GuestRam([(0, 16 * MiB)])
    frontend = await VhostUserFrontend.connect(sock)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Split ring, no EVENT_IDX, no indirect descriptors: the common case.
        await frontend.negotiate(want_features=bit(Feature.VERSION_1) | bit(F_MRG_RXBUF))
        await frontend.set_features()
        await frontend.share_memory(ram)
        base = int(native_ffi.cast("uintptr_t", ram.memory.regions[0].mapping.base))
        args = driver.ffi.new("struct net_args *")
        for index, name in ((0, "rx"), (1, "tx")):
            ring = DriverSplitRing(ram, QUEUE_SIZE)
            queue = await frontend.start_queue(index, ring)
            for area, address in zip(("desc", "avail", "used"), ring.areas, strict=True):
                setattr(args, f"{name}_{area}", driver.ffi.cast("void *", base + address))
            setattr(args, f"{name}_kick", queue.kick)
            setattr(args, f"{name}_call", queue.call)
            setattr(args, f"{name}_gpa", ram.alloc(QUEUE_SIZE * SLOT, 4096))
        args.queue_size = QUEUE_SIZE
        args.ram = driver.ffi.cast("uint8_t *", base)
        args.frame_size, args.window = frame_size, window
        args.duration_ns = int(seconds * 1e9)
        peer.connect(wire)
        echo(driver, peer)
        await trio.sleep(0.2)  # the daemon takes the peer: the link is up
        status = await trio.to_thread.run_sync(driver.lib.run_guest, args)
        return check(status, args)
    finally:
        peer.close()
        await frontend.aclose()
        ram.close()


def through_a_socket(driver: ModuleType, frame_size: int, window: int, seconds: float) -> Sample:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        thread = echo(driver, theirs)
        args = driver.ffi.new("struct net_args *")
        args.frame_size, args.window = frame_size, window
        args.duration_ns = int(seconds * 1e9)
        status = driver.lib.run_socket(args, ours.fileno())
        ours.shutdown(socket.SHUT_WR)
        thread.join(10)
        return check(status, args)
    finally:
        ours.close()
        theirs.close()


def start_daemon(sock: str, wire: str, *extra: str) -> object:
    import subprocess

    command = [
        sys.executable,
        *("-m", "vfiouserd", "vhost-user-net"),
        *("--socket-path", sock, "--stream-listen", wire, "--log-level", "warning", *extra),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)

    async def ready() -> None:  # listening
        (await connect(sock)).close()

    try:
        trio.run(ready)
    except BaseException:
        stop(process, "vfiouserd")
        raise
    return process


def summarize(samples: list[Sample]) -> tuple[float, float, float]:
    values = [s.pps for s in samples]
    return min(values), statistics.median(values), max(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="64,1500", help="frame sizes, bytes")
    parser.add_argument("--window", type=int, default=128, help="frames in flight")
    args = parser.parse_args()
    driver = load_driver()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[str, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="vfiouserd-bench-net-") as tmp:
        for run in range(args.runs):
            for size in sizes:  # interleaved: the same conditions for each
                for kind, extra in DAEMONS.items():
                    sock, wire = (
                        f"{tmp}/{kind}-{run}-{size}.sock",
                        f"{tmp}/{kind}-{run}-{size}.wire",
                    )
                    process = start_daemon(sock, wire, *extra)
                    try:
                        sample = trio.run(
                            through_the_daemon, driver, sock, wire, size, args.window, args.seconds
                        )
                    finally:
                        stop(process, "vfiouserd")  # type: ignore[arg-type]
                    results.setdefault((kind, size), []).append(sample)
                reference = through_a_socket(driver, size, args.window, args.seconds)
                results.setdefault(("socket", size), []).append(reference)
    print(
        f"{args.runs} runs x {args.seconds:g} s, {args.window} frames in flight, each frame "
        "there and back; ratio: vfiouserd / the stream socket alone (median packets/s)"
    )
    print(
        f"{'frame':<7}{'path':<38}{'packets/s (min/med/max)':>28}{'MB/s':>8}{'errors':>8}{'x':>7}"
    )
    for size in sizes:
        limit = summarize(results[("socket", size)])[1]
        for kind, label in (
            ("vfiouserd", "guest, vfiouserd, peer and back"),
            ("python", "the same, --no-fast-path"),
            ("socket", "stream socket, peer and back (limit)"),
        ):
            samples = results[(kind, size)]
            low, median, high = summarize(samples)
            errors = sum(s.errors for s in samples)
            print(
                f"{size:<7}{label:<38}{low:>10.0f}/{median:>8.0f}/{high:>8.0f}"
                f"{median * size / 1e6:>8.1f}{errors:>8}{median / limit:>7.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
