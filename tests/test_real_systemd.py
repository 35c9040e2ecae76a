"""vfiouserd under a real systemd (tests/real_systemd.py): the template unit
and socket unit as shipped, `vfiouserd systemd-run` for real, and restarts
through the fd store under QEMU guests that write and verify all along."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_helpers import (
    WAIT_FOR_GROWTH,
    WRITE_READ_VERIFY,
    assert_one_connection_across_restarts,
    blk_front_end,
    image_md5,
    qemu_messages,
    write_and_verify_across_restarts,
)
from net_peer import StreamPeer
from real_systemd import RealSystemd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guest import vm

pytestmark = pytest.mark.qemu

MiB = 1 << 20
IMAGES = "/var/lib/private/vfiouserd"  # StateDirectory= of a DynamicUser= unit


def kernel_log_lines() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


@pytest.fixture(scope="module")
def systemd(tmp_path_factory) -> Iterator[RealSystemd]:
    with RealSystemd(tmp_path_factory.mktemp("systemd")) as manager:
        yield manager


@pytest.fixture
def no_daemon_killed(systemd: RealSystemd) -> Iterator[None]:
    """Whatever a test does, no daemon dies by a signal: none by its own
    seccomp filter (the kernel logs those), none the jail's parent saw die."""
    before = len(kernel_log_lines())
    yield
    kills = [
        line for line in kernel_log_lines()[before:] if "type=1326" in line and "sig=31" in line
    ]
    assert kills == [], "\n".join(kills)
    journal = systemd.run("journalctl", "--no-pager", "-o", "cat", check=False).stdout
    assert "event=daemon.killed" not in journal, journal[-3000:]


def configure(systemd: RealSystemd, name: str, command: str, **options: object) -> None:
    lines = [f'command = "{command}"'] + [
        f"{key.replace('_', '-')} = {json.dumps(value)}" for key, value in options.items()
    ]
    systemd.write(f"/etc/vfiouserd/{name}.toml", "\n".join(lines) + "\n")


def socket_path(name: str) -> str:
    return f"/run/vfiouserd/{name}/vhost-user.sock"


def start(systemd: RealSystemd, name: str, command: str, **options: object) -> None:
    configure(systemd, name, command, socket_path=socket_path(name), **options)
    systemd.systemctl("start", f"vfiouserd@{name}.service")


def stop(systemd: RealSystemd, unit: str) -> None:
    """`systemctl stop`, which must end the daemon cleanly."""
    systemd.systemctl("stop", unit)
    assert systemd.show(unit, "Result") == "success"
    assert systemd.show(unit, "ExecMainStatus") == "0"


def test_the_service_runs_jailed_and_is_rated_ok_while_it_runs(systemd, no_daemon_killed):
    start(systemd, "disk0", "vhost-user-blk", blk_file="/var/lib/vfiouserd/disk0.img", size="64M")
    unit = "vfiouserd@disk0.service"
    try:
        assert systemd.show(unit, "ActiveState") == "active"
        assert systemd.show(unit, "Type") == "notify"
        main = systemd.show(unit, "MainPID")
        children = systemd.run("cat", f"/proc/{main}/task/{main}/children").stdout.split()
        assert len(children) == 1, children  # the jailed daemon
        status = systemd.run("cat", f"/proc/{children[0]}/status").stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1"
        assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
        assert fields["NSpid"].split()[-1] == "1"  # PID 1 of its own namespace
        # The main process is the jail's waiter (sandbox/waiter.c), confined too.
        assert systemd.run("cat", f"/proc/{main}/comm").stdout.strip() == "vfiouserd-wait"
        assert "Seccomp:\t2\n" in systemd.run("cat", f"/proc/{main}/status").stdout
        user = systemd.show(unit, "User")  # a dynamic user, not root
        assert systemd.run("id", "-u", user).stdout.strip() != "0"
        rating = systemd.run("systemd-analyze", "security", "--no-pager", unit).stdout
        exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", rating)
        assert exposure is not None and float(exposure.group(1)) <= 2.0, rating[-2000:]
    finally:
        stop(systemd, unit)
    assert not os.path.exists(systemd.path(socket_path("disk0")))


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
def test_systemctl_restart_under_a_writing_guest(systemd, no_daemon_killed, protocol, request):
    """Three restarts while a guest writes and verifies; QEMU's connection
    has no reconnection of any kind (vhost-user chardev without reconnect,
    vfio-user has none): only the fd store keeps it."""
    name = f"restart-{protocol}"
    unit = f"vfiouserd@{name}.service"
    start(systemd, name, f"{protocol}-blk", blk_file=f"/var/lib/vfiouserd/{name}.img", size="64M")
    qemu, devices = blk_front_end(
        protocol, systemd.path(socket_path(name)), lambda: request.getfixturevalue("qemu_new")
    )

    def restart() -> None:
        systemd.systemctl("restart", unit)
        assert systemd.show(unit, "ActiveState") == "active"

    try:
        write_and_verify_across_restarts(restart, qemu, devices)
    finally:
        stop(systemd, unit)
    assert_one_connection_across_restarts(systemd.journal(unit))


def assert_upgraded_in_place(systemd: RealSystemd, unit: str, mains: list[str]) -> None:
    """Each `systemctl reload` named a new main process, which took the
    session over; the VMM connected once, nothing went through the fd store,
    and systemd heard nothing from a process it does not listen to."""
    assert len(set(mains)) == len(mains), mains
    journal = systemd.journal(unit)
    assert journal.count("event=upgrade.taken_over") == len(mains) - 1, journal[-3000:]
    assert journal.count("event=session.start") == len(mains), journal[-3000:]
    assert "handover.restored" not in journal and "refused" not in journal, journal[-3000:]
    assert "reception only permitted" not in journal, journal[-3000:]
    assert "not our child" not in journal, journal[-3000:]


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user", "nvme"])
def test_systemctl_reload_upgrades_in_place_under_a_writing_guest(
    systemd, no_daemon_killed, protocol, request
):
    """Three `systemctl reload`s (ExecReload=: a new daemon takes the session
    over from the running one) while a guest writes and verifies: QEMU 7.2
    over vhost-user, QEMU 10.2 over vfio-user (virtio-blk and NVMe)."""
    name = f"reload-{protocol}"
    unit = f"vfiouserd@{name}.service"
    image = f"/var/lib/vfiouserd/{name}.img"
    if protocol == "nvme":
        start(systemd, name, "vfio-user-nvme", namespace=image, size="64M")
        qemu, devices = (
            request.getfixturevalue("qemu_new"),
            vm.vfio_user_device(systemd.path(socket_path(name))),
        )
    else:
        start(systemd, name, f"{protocol}-blk", blk_file=image, size="64M")
        qemu, devices = blk_front_end(
            protocol, systemd.path(socket_path(name)), lambda: request.getfixturevalue("qemu_new")
        )
    mains = [systemd.show(unit, "MainPID")]

    def reload() -> None:
        systemd.systemctl("reload", unit)
        assert systemd.show(unit, "ActiveState") == "active"
        mains.append(systemd.show(unit, "MainPID"))
        # The main process is the new daemon's waiter, which jailed it.
        assert systemd.run("cat", f"/proc/{mains[-1]}/comm").stdout.strip() == "vfiouserd-wait"

    disk = "/dev/nvme0n1" if protocol == "nvme" else "/dev/vda"
    try:
        write_and_verify_across_restarts(reload, qemu, devices, disk=disk)
    finally:
        stop(systemd, unit)
    assert_upgraded_in_place(systemd, unit, mains)


# After WRITE_VERIFY_ROUNDS on the NVMe disk: what the nvme driver logs when
# a command is lost (a timeout, an abort, a controller reset), and what the
# disk holds, to compare with the image.
NVME_AFTER_ROUNDS = """
echo "RESULT nvme_errors $(dmesg | grep -i nvme | grep -ci -e timeout -e abort -e reset -e fail)"
echo "RESULT disk $(dd if=/dev/nvme0n1 bs=1M count=$rounds iflag=direct 2>/dev/null | md5)"
"""


def test_systemctl_restart_under_an_nvme_guest(systemd, no_daemon_killed, qemu_new):
    """vfio-user-nvme under the shipped unit: three `systemctl restart`
    while a QEMU 10.2 guest's stock nvme driver writes and verifies
    /dev/nvme0n1 in rounds. QEMU's vfio-user client cannot reconnect; the fd
    store keeps its connection, and the next daemon takes the controller as
    it stood (queues, commands in flight, held AERs): no I/O error, no
    command timed out, no controller reset, the data in the image."""
    name = "restart-nvme"
    unit = f"vfiouserd@{name}.service"
    start(systemd, name, "vfio-user-nvme", namespace=f"/var/lib/vfiouserd/{name}.img", size="64M")

    def restart() -> None:
        systemd.systemctl("restart", unit)
        assert systemd.show(unit, "ActiveState") == "active"

    devices = vm.vfio_user_device(systemd.path(socket_path(name)))
    try:
        run = write_and_verify_across_restarts(
            restart, qemu_new, devices, disk="/dev/nvme0n1", after=NVME_AFTER_ROUNDS
        )
    finally:
        stop(systemd, unit)
    assert run.result("nvme_errors") == "0", run.output[-3000:]
    rounds = int(run.result("verified"))
    image = systemd.path(f"{IMAGES}/{name}.img")
    assert run.result("disk") == image_md5(image, 0, rounds * MiB)
    journal = systemd.journal(unit)
    assert_one_connection_across_restarts(journal)
    assert "controller.fatal" not in journal and "device.failed" not in journal, journal[-3000:]


def test_socket_activation_reload_and_stop(systemd, no_daemon_killed):
    """The VMM connects to the socket unit's socket first; systemd starts the
    service. `systemctl reload` grows the disk under the running guest."""
    name = "activated"
    configure(
        systemd, name, "vhost-user-blk", blk_file=f"/var/lib/vfiouserd/{name}.img", size="64M"
    )
    systemd.systemctl("start", f"vfiouserd@{name}.socket")
    unit = f"vfiouserd@{name}.service"
    assert systemd.show(unit, "ActiveState") == "inactive"
    script = WRITE_READ_VERIFY + WAIT_FOR_GROWTH
    image = systemd.path(f"{IMAGES}/{name}.img")

    def on_line(line: str) -> None:
        if line.startswith("RESULT before"):
            assert systemd.show(unit, "ActiveState") == "active"  # started by the connection
            os.truncate(image, 128 * MiB)
            systemd.systemctl("reload", unit)

    try:
        run = vm.boot(
            script,
            on_line=on_line,
            devices=vm.vhost_user_device(
                "vhost-user-blk-pci", systemd.path(f"/run/vfiouserd/{name}.sock"), "b"
            ),
        )
    finally:
        stop(systemd, unit)
        systemd.systemctl("stop", f"vfiouserd@{name}.socket")
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("written") == run.result("read")
    assert run.result("before") == str(64 * MiB // 512)
    assert run.result("after") == str(128 * MiB // 512)
    assert "event=config.change_announced" in systemd.journal(unit)


def test_vfiouserd_systemd_run_for_real(systemd, no_daemon_killed):
    """`vfiouserd systemd-run` starts a transient unit confined like the
    template and returns once the daemon is ready; a guest then uses it."""
    done = systemd.run(
        "/usr/local/bin/vfiouserd",
        *("systemd-run", "rng0", "--", "vhost-user-rng"),
        f"--socket-path={socket_path('rng0')}",
    )
    unit = "vfiouserd-rng0.service"
    try:
        assert systemd.show(unit, "ActiveState") == "active", done.stdout + done.stderr
        assert systemd.show(unit, "DynamicUser") == "yes"
        assert systemd.show(unit, "NoNewPrivileges") == "yes"
        script = """
        head -c 4096 /dev/hwrng > /tmp/a || exit 10
        echo "RESULT size $(wc -c < /tmp/a)"
        """
        run = vm.boot(
            script,
            devices=vm.vhost_user_device(
                "vhost-user-rng-pci", systemd.path(socket_path("rng0")), "r"
            ),
        )
    finally:
        stop(systemd, unit)
    assert run.result("size") == "4096"
    assert qemu_messages(run.output) == []


def test_a_unit_that_cannot_start_says_why_in_the_journal(systemd):
    name = "broken"
    configure(
        systemd,
        name,
        "vhost-user-blk",
        socket_path=socket_path(name),
        blk_file="/var/lib/vfiouserd/no-such.img",
    )
    unit = f"vfiouserd@{name}.service"
    assert systemd.systemctl("start", unit, check=False).returncode != 0
    deadline = time.monotonic() + 10
    while "give --size to create it" not in (journal := systemd.journal(unit)):
        assert time.monotonic() < deadline, journal
        time.sleep(0.1)
    assert systemd.show(unit, "ActiveState") in ("failed", "activating")
    systemd.systemctl("stop", unit, check=False)
    systemd.systemctl("reset-failed", unit, check=False)


def test_image_data_written_by_the_guest_is_in_the_image(systemd, no_daemon_killed):
    name = "data"
    start(systemd, name, "vhost-user-blk", blk_file=f"/var/lib/vfiouserd/{name}.img", size="64M")
    unit = f"vfiouserd@{name}.service"
    try:
        run = vm.boot(
            WRITE_READ_VERIFY,
            devices=vm.vhost_user_device(
                "vhost-user-blk-pci", systemd.path(socket_path(name)), "b"
            ),
        )
    finally:
        stop(systemd, unit)
    assert run.result("written") == run.result("read")
    assert image_md5(systemd.path(f"{IMAGES}/{name}.img"), MiB, 4 * MiB) == run.result("written")


def readme_domain() -> str:
    """The libvirt domain the README shows, as it is."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("**libvirt**") :]
    return section.split("```xml\n", 1)[1].split("```", 1)[0]


LIBVIRT_GUEST = """
marker=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 6)
if [ "$marker" != "PHASE1" ]; then
    dd if=/dev/urandom of=/tmp/p bs=1M count=2 2>/dev/null
    dd if=/tmp/p of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null || exit 10
    echo "RESULT before $(md5 < /tmp/p)"
    printf 'PHASE1' | dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null
    echo "RESULT phase 1"
    sleep 600  # virsh destroy ends this boot
fi
echo "RESULT phase 2"
echo "RESULT after $(dd if=/dev/vda bs=1M skip=1 count=2 iflag=direct 2>/dev/null | md5)"
ip link set eth0 up
ip addr add 198.51.100.1/24 dev eth0
echo "RESULT mac $(cat /sys/class/net/eth0/address)"
for i in $(seq 60); do ping -c 1 -W 1 198.51.100.2 > /dev/null 2>&1 && break; done
echo "RESULT ping $(ping -c 3 -W 2 198.51.100.2 | grep -c 'bytes from')"
"""
LIBVIRT_MAC = "52:54:00:be:ef:01"  # the README's
LIBVIRT_PEER = ("52:54:00:be:ef:02", "198.51.100.2")  # the test, a host on that link


def connect_peer(path: str, timeout: float = 60) -> StreamPeer:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return StreamPeer(path, host=LIBVIRT_PEER)
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {path}"
            time.sleep(0.2)


def test_libvirt_domain_with_a_vhostuser_disk_and_interface_on_socket_units(
    systemd, no_daemon_killed
):
    """libvirtd under the real systemd defines and starts the README's domain;
    its disk is vfiouserd@vm1-disk and its network interface vfiouserd@vm1-net,
    each started by its socket unit when QEMU connects. `virsh destroy`, then
    `virsh start`: the same daemons serve the new QEMU, the data of the first
    boot is there, and the guest pings the test on the network daemon's
    stream (which answers ARP and ping as a host on the link)."""
    from guest.build import build, script_archive
    from guest.vm import SCRIPT_PRELUDE

    configure(
        systemd, "vm1-disk", "vhost-user-blk", blk_file="/var/lib/vfiouserd/vm1.img", size="64M"
    )
    configure(systemd, "vm1-net", "vhost-user-net", **readme_net_settings())
    systemd.systemctl(
        "start", "vfiouserd@vm1-disk.socket", "vfiouserd@vm1-net.socket", "libvirtd.service"
    )
    kernel, initramfs = build()
    systemd.run("mkdir", "-p", "/var/lib/libvirt/images")
    Path(systemd.path("/var/lib/libvirt/images/vm1-vmlinuz")).write_bytes(kernel.read_bytes())
    Path(systemd.path("/var/lib/libvirt/images/vm1-initrd.img")).write_bytes(
        initramfs.read_bytes() + script_archive(SCRIPT_PRELUDE + LIBVIRT_GUEST)
    )
    systemd.write("/etc/libvirt/qemu/vm1-test.xml", readme_domain())
    virsh = ("virsh", "-c", "qemu:///system")
    console = Path(systemd.path("/var/log/libvirt/qemu/vm1-console.log"))
    service = "vfiouserd@vm1-disk.service"
    network = "vfiouserd@vm1-net.service"
    peer: StreamPeer | None = None

    def wait_for(text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            output = console.read_text(errors="replace") if console.exists() else ""
            if text in output:
                return output
            assert time.monotonic() < deadline, f"{text!r} never came:\n{output[-3000:]}"
            time.sleep(0.2)

    try:
        systemd.run(*virsh, "define", "/etc/libvirt/qemu/vm1-test.xml")
        systemd.run(*virsh, "start", "vm1")
        first = wait_for("RESULT phase 1")
        pids = systemd.show(service, "MainPID"), systemd.show(network, "MainPID")
        peer = connect_peer(systemd.path(readme_net_settings()["stream_listen"]))
        systemd.run(*virsh, "destroy", "vm1")
        console.unlink()
        systemd.run(*virsh, "start", "vm1")
        second = wait_for("VFIOUSERD-GUEST-EXIT")
        # The same daemons all along.
        assert (systemd.show(service, "MainPID"), systemd.show(network, "MainPID")) == pids
    finally:
        systemd.run(*virsh, "destroy", "vm1", check=False)
        systemd.run(*virsh, "undefine", "vm1", check=False)
        if peer is not None:
            peer.close()
        network_log = systemd.journal(network)
        stop(systemd, service)
        stop(systemd, network)
        systemd.systemctl("stop", "vfiouserd@vm1-disk.socket", "vfiouserd@vm1-net.socket")
    before = vm.parse_results(first)["before"][-1]
    assert vm.parse_results(second)["after"][-1] == before
    assert "VFIOUSERD-GUEST-EXIT 0" in second, second[-3000:]
    assert image_md5(systemd.path(f"{IMAGES}/vm1.img"), MiB, 2 * MiB) == before
    assert systemd.journal(service).count("event=session.start") == 2
    results = vm.parse_results(second)
    assert results["mac"][-1] == LIBVIRT_MAC
    frames = [] if peer is None else peer.frames()
    why = f"{second[-2000:]}\n{len(frames)} frames on the stream\n{network_log[-3000:]}"
    assert results["ping"][-1] == "3", why
    assert peer is not None and peer.error is None
    assert peer.frames_from(LIBVIRT_MAC)  # the guest's frames reached the stream


def readme_net_settings() -> dict[str, str]:
    """The network daemon's settings file the README shows, as options."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("`vfiouserd@vm1-net.socket` with") :]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = dict(
        (key.strip().replace("-", "_"), json.loads(value.strip()))
        for key, value in (line.split("=", 1) for line in text.splitlines() if "=" in line)
    )
    assert settings.pop("command") == "vhost-user-net"
    return settings


@pytest.mark.parametrize("protocol", ["vhost-user", "vfio-user"])
def test_systemctl_restart_resets_a_guests_vsock_connections(
    systemd, no_daemon_killed, protocol, request
):
    """The vsock device under the shipped unit (a dynamic user, its own jail
    inside systemd's sandbox, the runtime directory bound into that jail):
    a guest's connection to a host program, then `systemctl restart`: the
    connection ends cleanly in the guest and a new one works at once."""
    from test_qemu_vsock import CID, ECHO_PORT, HELD_PORT, RESTART_SCRIPT, echo, serve

    name = f"vsock-{protocol}"
    unit = f"vfiouserd@{name}.service"
    uds = f"/run/vfiouserd/{name}/v.sock"
    start(systemd, name, f"{protocol}-vsock", guest_cid=CID, uds_path=uds)
    held = []

    def hold(conn) -> None:
        conn.sendall(b"before the restart\n")
        held.append(conn)  # open until the daemon goes

    # The host programs, in the runtime directory systemd made for the unit.
    listeners = [
        serve(systemd.path(f"{uds}_{ECHO_PORT}"), echo),
        serve(systemd.path(f"{uds}_{HELD_PORT}"), hold),
    ]
    if protocol == "vhost-user":
        qemu = vm.QEMU
        devices = vm.vhost_user_device("vhost-user-vsock-pci", systemd.path(socket_path(name)), "v")
    else:
        qemu = request.getfixturevalue("qemu_new")
        devices = vm.vfio_user_device(systemd.path(socket_path(name)))
    restarted = []

    def on_line(line: str) -> None:
        if line.startswith("RESULT phase connected"):
            systemd.systemctl("restart", unit)
            assert systemd.show(unit, "ActiveState") == "active"
            restarted.append(line)

    try:
        run = vm.boot(RESTART_SCRIPT, devices=devices, qemu=qemu, on_line=on_line, timeout=300)
    finally:
        stop(systemd, unit)
        for listener in listeners:
            listener.close()
    assert restarted
    assert run.exit_statuses == [0], run.output[-3000:]
    ended = run.result("held")
    assert ended == "0" or "reset" in ended or "not connected" in ended, ended
    assert run.result("again") == "0 after the restart"
    journal = systemd.journal(unit)
    assert journal.count("event=handover.restored") == 1, journal[-3000:]


LAB_GUEST = """
dd if=/dev/urandom of=/tmp/p bs=4k count=1 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4k seek=256 oflag=direct 2>/dev/null || exit 10
echo "RESULT written $(md5 < /tmp/p)"
read_block() { dd if=/dev/vda bs=4k skip=256 count=1 iflag=direct 2>/dev/null; }
echo "RESULT phase io"
i=0
while [ $i -lt 600 ] && read_block > /dev/null; do i=$((i + 1)); sleep 0.1; done
echo "RESULT failed after $i reads"
i=0
while [ $i -lt 600 ] && ! read_block > /dev/null; do i=$((i + 1)); sleep 0.1; done
echo "RESULT recovered after $i failures"
i=0
while [ $i -lt 30 ]; do read_block > /dev/null || exit 11; i=$((i + 1)); sleep 0.2; done
echo "RESULT read $(read_block | md5)"
"""


def test_the_device_lab_on_a_socket_activated_unit_by_its_name(systemd, no_daemon_killed):
    """A socket-activated vhost-user-blk unit as shipped (a dynamic user,
    jailed, the VMM socket /run/vfiouserd/NAME.sock in a directory it cannot
    write) keeps its control socket in its RuntimeDirectory; from inside
    the namespace, `vfiouserd stats|trace|inject vfiouserd@NAME` find it by
    the unit's name while a QEMU 7.2 guest reads: counters, a trace of the
    guest's requests, an I/O error rule the guest's reads meet until it is
    removed. The control socket goes on across `systemctl restart` (found
    again, by the unit and by the VMM socket) and is gone once the unit stops."""
    name = "lab"
    unit = f"vfiouserd@{name}.service"
    control = f"/run/vfiouserd/{name}/control.sock"
    configure(
        systemd,
        name,
        "vhost-user-blk",
        blk_file=f"/var/lib/vfiouserd/{name}.img",
        size="64M",
        allow_fault_injection=True,
    )
    systemd.systemctl("start", f"vfiouserd@{name}.socket")
    seen: dict[str, Any] = {}

    def lab(*args: str) -> str:
        return systemd.run("vfiouserd", *args, timeout=60).stdout

    def on_line(line: str) -> None:
        if line.startswith("RESULT phase io"):
            seen["main"] = int(systemd.show(unit, "MainPID"))
            seen["mode"] = systemd.run("stat", "-c", "%a %U", control).stdout.split()
            seen["user"] = systemd.show(unit, "User")
            seen["stats"] = json.loads(lab("stats", unit, "--json", "--interval", "0.5"))
            seen["text"] = lab("stats", f"vfiouserd@{name}")
            seen["trace"] = lab("trace", f"vfiouserd@{name}", "--count", "6", "--json")
            seen["added"] = json.loads(
                lab("inject", f"vfiouserd@{name}", "ioerr", "sectors=2048+8", "type=read")
            )
            seen["listed"] = json.loads(lab("inject", f"vfiouserd@{name}", "--list"))
        elif line.startswith("RESULT failed"):
            seen["errors"] = json.loads(lab("stats", unit, "--json", "--interval", "0.1"))
            rule = str(seen["added"]["id"])
            seen["removed"] = json.loads(lab("inject", unit, "--remove", rule))
            seen["left"] = json.loads(lab("inject", unit, "--list"))
        elif line.startswith("RESULT recovered"):
            before = systemd.run("stat", "-c", "%i", control).stdout
            systemd.systemctl("restart", unit)
            assert systemd.show(unit, "ActiveState") == "active"
            seen["same_file"] = systemd.run("stat", "-c", "%i", control).stdout == before
            seen["restarted"] = int(systemd.show(unit, "MainPID"))
            seen["again"] = json.loads(lab("stats", unit, "--json", "--interval", "0.1"))
            vmm_socket = f"/run/vfiouserd/{name}.sock"
            seen["by_socket"] = json.loads(lab("stats", vmm_socket, "--json", "--interval", "0.1"))

    try:
        run = vm.boot(
            LAB_GUEST,
            on_line=on_line,
            devices=vm.vhost_user_device(
                "vhost-user-blk-pci", systemd.path(f"/run/vfiouserd/{name}.sock"), "b"
            ),
            timeout=300,
        )
    finally:
        stop(systemd, unit)
        systemd.systemctl("stop", f"vfiouserd@{name}.socket")
    assert not os.path.exists(systemd.path(control))  # removed with the unit's stop
    assert run.exit_statuses == [0], run.output[-3000:]
    assert run.result("read") == run.result("written")
    assert qemu_messages(run.output) == []

    # The control socket: in the unit's RuntimeDirectory, the dynamic user's only.
    assert seen["mode"] == ["600", seen["user"]]
    # stats: the greeting names the unit's main process; the guest's writes
    # and reads are counted on queue 0.
    stats = seen["stats"]
    assert stats["daemon"]["pid"] == seen["main"]
    assert stats["daemon"]["device"] == "blk" and stats["daemon"]["transport"] == "vhost-user"
    assert stats["daemon"]["fault_injection"] is True
    assert stats["stats"]["queues"][0]["requests"] >= 2
    assert stats["stats"]["device"]["sectors"] == 64 * MiB // 512
    assert f"blk over vhost-user, pid {seen['main']}" in seen["text"]
    # trace: exactly six events, the guest's reads of its block completing
    # and the interrupts that tell it so, all on queue 0.
    events = [json.loads(line) for line in seen["trace"].splitlines()]
    assert len(events) == 6, events
    requests = [e for e in events if e["kind"] == "request"]
    assert len(requests) >= 2, events
    assert {(e["event"], e["type"], e["sector"], e["sectors"]) for e in requests} == {
        ("complete", "read", 2048, 8)
    }, events
    assert all("status" not in e for e in requests)
    assert {(e["kind"], e["event"]) for e in events} <= {("request", "complete"), ("irq", "queue")}
    assert {e["queue"] for e in events} == {0}
    # inject: the rule, listed; the guest's reads fail (counted as errors)
    # until it is removed, then work again.
    added = seen["added"]
    assert added["kind"] == "ioerr" and added["sectors"] == "2048-2056" and added["type"] == "read"
    assert seen["listed"]["allowed"] is True
    assert [r["id"] for r in seen["listed"]["rules"]] == [added["id"]]
    assert seen["errors"]["stats"]["queues"][0]["errors"] >= 1
    assert seen["removed"]["id"] == added["id"] and seen["removed"]["hits"] >= 1
    assert seen["left"]["rules"] == []
    assert run.result("recovered").startswith("after ")
    # Across the restart: the same control socket, served by the next daemon.
    assert seen["same_file"] is True
    assert seen["restarted"] != seen["main"]
    assert seen["again"]["daemon"]["pid"] == seen["restarted"]
    assert seen["by_socket"]["daemon"]["pid"] == seen["restarted"]
    journal = systemd.journal(unit)
    assert "event=fault.added" in journal and "event=fault.removed" in journal
