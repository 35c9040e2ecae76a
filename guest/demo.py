#!/usr/bin/env python3
"""make demo: vfiouserd serving a disk and an RNG to a real QEMU guest.

Starts ``vfiouserd vhost-user-blk`` on a sparse 1 GiB image it creates and
``vfiouserd vhost-user-rng``, boots the tiny Debian guest against both, and
shows the guest writing, reading back and verifying data, then checks the
image from the host side.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / ".cache" / "demo" / "disk.img"

GUEST_SCRIPT = r"""
echo "guest: /dev/vda is $(( $(cat /sys/block/vda/size) / 2048 )) MiB, served by vfiouserd"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
echo "guest: writing 8 MiB of random data at offset 16 MiB"
dd if=/tmp/pattern of=/dev/vda bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null || exit 1
echo "guest: reading it back with O_DIRECT"
dd if=/dev/vda of=/tmp/back bs=1M skip=16 count=8 iflag=direct 2>/dev/null || exit 2
written=$(md5sum < /tmp/pattern | cut -d' ' -f1)
read=$(md5sum < /tmp/back | cut -d' ' -f1)
echo "guest: md5 written $written"
echo "guest: md5 read    $read"
[ "$written" = "$read" ] || { echo "guest: MISMATCH"; exit 3; }
echo "RESULT md5 $written"
echo "guest: 16 bytes from /dev/hwrng (virtio-rng, served by vfiouserd):"
head -c 16 /dev/hwrng | hexdump -C | head -1
echo "guest: verified"
"""


def show_guest_line(line: str) -> None:
    """Echo what the demo script says (and the hexdump), not the boot noise."""
    if line.startswith("guest:") or line.startswith("00000000"):
        print(f"  {line}", flush=True)


def main() -> int:
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vfiouserd-demo-") as tmp:
        blk_sock, rng_sock = f"{tmp}/blk.sock", f"{tmp}/rng.sock"
        daemons = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vfiouserd",
                    "vhost-user-blk",
                    "--socket-path",
                    blk_sock,
                    "--blk-file",
                    str(IMAGE),
                    "--size",
                    "1G",
                ]
            ),
            subprocess.Popen(
                [sys.executable, "-m", "vfiouserd", "vhost-user-rng", "--socket-path", rng_sock]
            ),
        ]
        try:
            for path in (blk_sock, rng_sock):
                for _ in range(500):
                    if Path(path).exists():
                        break
                    time.sleep(0.01)
            print(
                f"host: daemons listening on {blk_sock} and {rng_sock}; booting QEMU "
                f"({' '.join(vm.accelerator())})",
                flush=True,
            )
            run = vm.boot(
                GUEST_SCRIPT,
                on_line=show_guest_line,
                devices=vm.vhost_user_device("vhost-user-blk-pci", blk_sock, "blk")
                + vm.vhost_user_device("vhost-user-rng-pci", rng_sock, "rng"),
            )
        finally:
            for daemon in daemons:
                daemon.terminate()
                daemon.wait(10)
    if run.exit_statuses != [0]:
        print(run.output[-3000:])
        print("demo FAILED")
        return 1
    with open(IMAGE, "rb") as f:
        f.seek(16 << 20)
        on_disk = hashlib.md5(f.read(8 << 20)).hexdigest()
    print(f"host: md5 of the image at 16 MiB: {on_disk}")
    ok = on_disk == run.result("md5")
    allocated = IMAGE.stat().st_blocks * 512 >> 20
    print(f"host: {IMAGE} is sparse: {allocated} MiB allocated of 1024")
    print(
        "demo OK: the guest's data went through vfiouserd into the image"
        if ok
        else "demo FAILED: the image does not hold what the guest wrote"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
