"""vfio-user-nvme under a real client: the QEMU >= 10.1 the project builds
(guest/qemu_build.py) attaches it with ``vfio-user-pci`` and the Debian
guest's stock ``nvme`` driver (built into its 6.1 kernel) binds and does
I/O on two namespaces, from two vCPUs, across a controller reset and a
reboot; with shared guest RAM and with plain RAM (DMA messages only)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from daemon import Daemon
from guest_helpers import REBOOT_AND_VERIFY, image_md5, qemu_messages

import vfiouserd.devices.nvme.formats as nvme
from vfiouserd.client.control import ControlClient
from vfiouserd.devices.nvme.errors import ELPE
from vfiouserd.devices.nvme.io import MDTS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = pytest.mark.qemu

MiB = 1 << 20
KNOWN_WARNING = "Could not enable error recovery for the device"
ZEROS_MD5 = hashlib.md5(bytes(MiB)).hexdigest()

# Namespace 1: 4 MiB at 1 MiB written and read back with O_DIRECT; a
# discard; each vCPU writes and verifies its own 2 MiB; namespace 2; the
# controller reset from sysfs; I/O again.
NVME_SCRIPT = """
n=/dev/nvme0n1
echo "RESULT driver $(basename $(readlink /sys/class/nvme/nvme0/device/driver))"
echo "RESULT model $(cat /sys/class/nvme/nvme0/model)"
echo "RESULT namespaces $(ls /sys/class/nvme/nvme0 | grep -c '^nvme0n')"
echo "RESULT size1 $(cat /sys/block/nvme0n1/size)"
echo "RESULT size2 $(cat /sys/block/nvme0n2/size)"
echo "RESULT ro2 $(cat /sys/block/nvme0n2/ro)"
echo "RESULT hw_queues $(ls /sys/block/nvme0n1/mq | wc -l)"
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
dd if=/tmp/p of=$n bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null || exit 10
dd if=$n of=/tmp/b bs=1M skip=1 count=4 iflag=direct 2>/dev/null || exit 11
echo "RESULT written $(md5 < /tmp/p)"
echo "RESULT read $(md5 < /tmp/b)"
echo "RESULT discard_max $(cat /sys/block/nvme0n1/queue/discard_max_bytes)"
blkdiscard -o $((8 * 1024 * 1024)) -l $((1024 * 1024)) $n || exit 12
dd if=/dev/urandom of=/tmp/d bs=1M count=1 2>/dev/null
dd if=/tmp/d of=$n bs=1M seek=9 oflag=direct 2>/dev/null || exit 13
blkdiscard -o $((9 * 1024 * 1024)) -l $((1024 * 1024)) $n || exit 14
echo "RESULT discarded $(dd if=$n bs=1M skip=9 count=1 iflag=direct 2>/dev/null | md5)"
for cpu in 0 1; do
    dd if=/dev/urandom of=/tmp/p$cpu bs=1M count=2 2>/dev/null
    at=$((16 + cpu * 2))
    taskset -c $cpu dd if=/tmp/p$cpu of=$n bs=1M seek=$at oflag=direct 2>/dev/null || exit 15
    taskset -c $cpu dd if=$n of=/tmp/b$cpu bs=1M skip=$at count=2 iflag=direct 2>/dev/null \\
        || exit 16
    cmp /tmp/p$cpu /tmp/b$cpu || exit 17
done
echo "RESULT vcpus verified"
dd if=/dev/urandom of=/tmp/q bs=64k count=4 2>/dev/null
dd if=/tmp/q of=/dev/nvme0n2 bs=64k seek=2 oflag=direct 2>/dev/null || exit 18
echo "RESULT ns2 $(md5 < /tmp/q)"
echo "RESULT ns2_back $(dd if=/dev/nvme0n2 bs=64k skip=2 count=4 iflag=direct 2>/dev/null | md5)"
echo 1 > /sys/class/nvme/nvme0/reset_controller || exit 19
for i in $(seq 100); do
    [ "$(cat /sys/class/nvme/nvme0/state)" = live ] && break
    sleep 0.1
done
echo "RESULT state $(cat /sys/class/nvme/nvme0/state)"
dd if=/dev/urandom of=/tmp/r bs=1M count=1 2>/dev/null
dd if=/tmp/r of=$n bs=1M seek=24 oflag=direct 2>/dev/null || exit 20
echo "RESULT after_reset $(md5 < /tmp/r)"
echo "RESULT after_reset_back $(dd if=$n bs=1M skip=24 count=1 iflag=direct 2>/dev/null | md5)"
sync
echo "RESULT errors $(dmesg | grep -ci -e 'i/o error' -e 'timeout' -e 'nvme.*fail')"
dmesg | grep -i nvme | head -20
"""


def nvme_daemon(tmp_path: Path, *args: str) -> tuple[Daemon, list[str]]:
    images = [str(tmp_path / "ns1.img"), str(tmp_path / "ns2.img")]
    daemon = Daemon(
        "vfio-user-nvme",
        "--namespace",
        images[0],
        "--namespace",
        images[1],
        "--size",
        "64M",
        *args,
        workdir=tmp_path,
        name="nvme",
    )
    return daemon, images


@pytest.mark.parametrize("shared", [True, False], ids=["memfd", "plain-ram"])
def test_nvme_driver_binds_and_does_io(tmp_path, qemu_new, shared):
    daemon, images = nvme_daemon(tmp_path)
    with daemon:
        run = vm.boot(
            NVME_SCRIPT,
            smp=2,
            devices=vm.vfio_user_device(daemon.socket_path),
            qemu=qemu_new,
            shared_memory=shared,
            timeout=400,
        )
        with ControlClient(daemon.socket_path.removesuffix(".sock") + ".control.sock") as client:
            queues = {q["queue"]: q for q in client.execute("stats")["queues"]}
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.exit_statuses == [0], run.output[-4000:]
    # Guest memory the daemon maps: the I/O queues were the native loop's,
    # their doorbells mostly in the shadow page; else all of it is Python's.
    io_queues = [q for index, q in queues.items() if index]
    native = sum(q["native_requests"] for q in io_queues)
    if shared:
        assert native > 0.9 * sum(q["requests"] for q in io_queues), queues
        assert "event=doorbell_buffer.set" in log
    else:
        assert native == 0 and "event=doorbell_buffer.set" not in log, queues
    assert run.result("driver") == "nvme"
    assert run.result("model") == "vfiouserd NVMe"
    assert run.result("namespaces") == "2"
    assert run.result("size1") == run.result("size2") == str(64 * MiB // 512)
    assert run.result("hw_queues") == "2"  # one I/O queue per vCPU
    assert run.result("written") == run.result("read")
    assert image_md5(images[0], MiB, 4 * MiB) == run.result("written")
    assert int(run.result("discard_max")) > 0
    assert run.result("discarded") == ZEROS_MD5
    assert image_md5(images[0], 8 * MiB, 2 * MiB) == hashlib.md5(bytes(2 * MiB)).hexdigest()
    assert run.result("vcpus") == "verified"
    assert (
        run.result("ns2") == run.result("ns2_back") == image_md5(images[1], 128 * 1024, 256 * 1024)
    )
    assert run.result("state") == "live"
    assert run.result("after_reset") == run.result("after_reset_back")
    assert image_md5(images[0], 24 * MiB, MiB) == run.result("after_reset")
    assert run.result("errors") == "0", run.output[-4000:]
    assert qemu_messages(run.output, KNOWN_WARNING) == []
    assert "event=controller.fatal" not in log and "device.failed" not in log, log[-3000:]
    assert log.count("event=controller.enabled") >= 2  # probe, then the reset
    assert ("event=dma.layout layout=qemu" in log) == (not shared), log[-3000:]


def test_guest_reboot(tmp_path, qemu_new):
    daemon, images = nvme_daemon(tmp_path)
    with daemon:
        run = vm.boot(
            REBOOT_AND_VERIFY.replace("/dev/vda", "/dev/nvme0n1"),
            reboot=True,
            devices=vm.vfio_user_device(daemon.socket_path),
            qemu=qemu_new,
        )
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.results["phase"] == ["1", "2"], run.output[-3000:]
    assert run.result("before") == run.result("after")
    assert run.result("written") == run.result("read")
    assert image_md5(images[0], MiB, 4 * MiB) == run.result("written")
    assert log.count("event=device.reset") >= 2
    assert "event=controller.fatal" not in log, log[-3000:]


# nvme-cli (Debian's, in the initramfs) against the controller: Identify,
# then three errors the driver cannot avoid: a read the host's fault rule
# fails, a read past the end and an unknown opcode (both passed through);
# the SMART log before and after, the error log. Kernel messages stay off
# the console, so the one-line JSON results arrive whole.
FAULT_BLOCK = 5000  # 4 KiB blocks: sectors 40000-40008, never read at boot
PAST_END = 64 * MiB // 512 + 100
SERIAL = "VFU-NVME-CLI-0001"
NVME_CLI_SCRIPT = f"""
dmesg -n 1
c=/dev/nvme0
one_line() {{ tr -d '\\n'; }}
echo "RESULT id_ctrl $(nvme id-ctrl $c -o json | one_line)"
echo "RESULT smart_before $(nvme smart-log $c -o json | one_line)"
dd if=/dev/nvme0n1 of=/dev/null bs=1M skip=1 count=4 iflag=direct 2>/dev/null || exit 10
dd if=/dev/nvme0n1 of=/dev/null bs=4k skip={FAULT_BLOCK} count=1 iflag=direct 2>/dev/null && exit 11
nvme read /dev/nvme0n1 --start-block={PAST_END} --block-count=0 --data-size=512 \\
    --data=/tmp/x && exit 12
nvme io-passthru /dev/nvme0n1 --opcode=0x7f --namespace-id=1 && exit 13
echo "RESULT smart_after $(nvme smart-log $c -o json | one_line)"
echo "RESULT error_log $(nvme error-log $c -o json | one_line)"
nvme error-log $c --log-entries=3
"""


def test_nvme_cli_identify_smart_and_error_log(tmp_path, qemu_new):
    daemon, _ = nvme_daemon(tmp_path, "--serial", SERIAL, "--allow-fault-injection")
    with daemon:
        control = daemon.socket_path.removesuffix(".sock") + ".control.sock"
        with ControlClient(control) as client:
            rule = {"kind": "ioerr", "sectors": f"{FAULT_BLOCK * 8}-{FAULT_BLOCK * 8 + 8}"}
            client.execute("inject-add", **rule, type="read", count=1)
        run = vm.boot(
            NVME_CLI_SCRIPT,
            devices=vm.vfio_user_device(daemon.socket_path),
            qemu=qemu_new,
            timeout=400,
        )
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.exit_statuses == [0], run.output[-4000:]

    identity = json.loads(run.result("id_ctrl"))
    assert identity["mn"].rstrip() == "vfiouserd NVMe"
    assert identity["sn"].rstrip() == SERIAL
    assert (identity["mdts"], identity["elpe"]) == (MDTS, ELPE)
    assert identity["ver"] == 0x00010400

    before = json.loads(run.result("smart_before"))
    after = json.loads(run.result("smart_after"))
    errors = [e for e in json.loads(run.result("error_log"))["errors"] if e["error_count"]]
    # nvme-cli gives the SMART log's 128-bit counters as strings.
    grew = {
        key: int(after[key]) - int(before[key]) for key in before if isinstance(before[key], str)
    }
    assert grew["num_err_log_entries"] == 3, (before, after)
    assert int(after["num_err_log_entries"]) == errors[0]["error_count"] == len(errors)
    assert grew["media_errors"] == 1
    # 4 MiB read: 8192 blocks in units of 1000 (rounded up), commands of at
    # most 256 KiB (MDTS); the failed reads count nowhere.
    assert grew["data_units_read"] in (8, 9) and grew["host_read_commands"] >= 16, grew
    assert grew["data_units_written"] == grew["host_write_commands"] == 0

    unknown_opcode, past_end, media = errors[:3]
    generic, dnr = nvme.Sct.GENERIC << 8, nvme.DNR  # status_field: the CQE's, without phase
    assert unknown_opcode["status_field"] == dnr | generic | nvme.Generic.INVALID_OPCODE
    assert (unknown_opcode["nsid"], unknown_opcode["parm_error_location"]) == (1, 0)
    assert past_end["status_field"] == dnr | generic | nvme.Generic.LBA_OUT_OF_RANGE
    assert (past_end["lba"], past_end["nsid"], past_end["parm_error_location"]) == (PAST_END, 1, 40)
    assert media["status_field"] == nvme.status(nvme.Sct.MEDIA, nvme.Media.UNRECOVERED_READ_ERROR)
    assert (media["lba"], media["nsid"]) == (FAULT_BLOCK * 8, 1)
    assert all(e["sqid"] >= 1 for e in errors[:3])  # from I/O queues
    assert len({e["cmdid"] for e in errors[:2]}) == 2
    assert "status_field\t: 0x4080(LBA Out of Range" in run.output  # the human form
    assert "event=fault.added" in log and "device.failed" not in log, log[-3000:]


# 128 KiB O_DIRECT writes and reads through SGLs. Linux's nvme driver uses
# an SGL for a request whose average physical segment is at least its
# sgl_threshold (32 KiB by default): dd's 128 KiB buffer is 4 KiB pages
# scattered in guest memory, so at the default it gets PRPs (1 MiB ones, in
# huge pages, get SGLs). The parameter is writable at run time: at one page,
# every 128 KiB request goes as an SGL (a Last Segment of Data Blocks, or
# one Data Block if its pages happen to adjoin).
SGL_SCRIPT = """
n=/dev/nvme0n1
echo "RESULT default_threshold $(cat /sys/module/nvme/parameters/sgl_threshold)"
echo 4096 > /sys/module/nvme/parameters/sgl_threshold || exit 10
dd if=/dev/urandom of=/tmp/p bs=128k count=32 2>/dev/null
dd if=/tmp/p of=$n bs=128k seek=8 oflag=direct 2>/dev/null || exit 11
dd if=$n of=/tmp/b bs=128k skip=8 count=32 iflag=direct 2>/dev/null || exit 12
echo "RESULT written $(md5 < /tmp/p)"
echo "RESULT read $(md5 < /tmp/b)"
echo "RESULT errors $(dmesg | grep -ci -e 'i/o error' -e 'timeout' -e 'nvme.*fail')"
dmesg | grep -i -e 'i/o error' -e 'timeout' -e 'nvme.*fail' | head -20
"""


@pytest.mark.parametrize("shared", [True, False], ids=["memfd", "plain-ram"])
def test_direct_io_through_sgls(tmp_path, qemu_new, shared):
    daemon, images = nvme_daemon(tmp_path)
    with daemon:
        run = vm.boot(
            SGL_SCRIPT,
            devices=vm.vfio_user_device(daemon.socket_path),
            qemu=qemu_new,
            shared_memory=shared,
            timeout=400,
        )
        with ControlClient(daemon.socket_path.removesuffix(".sock") + ".control.sock") as client:
            device = client.execute("stats")["device"]
        assert daemon.stop() == 0
        log = daemon.log()
    assert run.exit_statuses == [0], run.output[-4000:]
    assert run.result("default_threshold") == "32768"
    assert run.result("written") == run.result("read") == image_md5(images[0], MiB, 4 * MiB)
    assert run.result("errors") == "0", run.output[-4000:]
    # 32 writes and 32 reads of 128 KiB (MDTS is 256 KiB), each an SGL
    # command; the kernel's own small reads at boot take PRPs.
    assert device["sgl_commands"] == 64, device
    assert "command.failed" not in log and "device.failed" not in log, log[-3000:]
