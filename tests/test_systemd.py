"""systemd integration: the units as systemd itself judges them, and the
daemon's side of sd_notify and socket activation, driven by a harness that
speaks those protocols (PID 1 here is not systemd)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from daemon import Daemon

from conftest import MiB, start_device
from vfiouserd.cli import build_parser
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.config import arguments_from_file
from vfiouserd.devices.blk import BlkStatus, RequestType
from vfiouserd.systemd import service_settings, template_unit

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
VFIOUSERD = [sys.executable, "-m", "vfiouserd"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def installed(tmp_path: Path, name: str, text: str | None = None) -> Path:
    """A copy of a unit whose ExecStart names a program that exists here."""
    text = (UNITS / name).read_text() if text is None else text
    program = Path(sys.executable).parent / "vfiouserd"
    path = tmp_path / name
    path.write_text(text.replace("/usr/local/bin/vfiouserd", str(program)))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def exposure(unit: Path) -> float:
    done = analyze("security", "--offline=true", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


# -- the units ------------------------------------------------------------------------


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    service = installed(tmp_path, "vfiouserd@.service")
    sock = installed(tmp_path, "vfiouserd@.socket")
    for template in (service, sock):  # an instance of each, as systemd loads them
        instance = template.with_name(template.name.replace("@.", "@disk0."))
        instance.symlink_to(template.name)
        done = analyze("verify", "--man=no", str(instance))
        assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


@needs_analyze
def test_verify_would_notice_a_broken_unit(tmp_path):
    broken = (UNITS / "vfiouserd@.service").read_text().replace("NoNewPrivileges", "NoNewPrivilege")
    unit = installed(tmp_path, "vfiouserd@.service", broken)
    done = analyze("verify", "--man=no", str(unit))
    assert "Unknown key" in done.stderr


@needs_analyze
def test_the_service_is_rated_ok_by_systemd_analyze_security(tmp_path):
    score = exposure(installed(tmp_path, "vfiouserd@.service"))
    assert score <= 2.0
    # and the rating moves: without the hardening it is poor
    bare = "[Service]\nType=notify\nExecStart=/usr/local/bin/vfiouserd --config /etc/x.toml\n"
    assert exposure(installed(tmp_path, "bare@.service", bare)) > 8.0


@needs_analyze
def test_systemd_run_gives_a_transient_unit_the_same_hardening(tmp_path):
    daemon_args = ["vhost-user-rng", "--socket-path", "/run/vfiouserd/rng0/vhost-user.sock"]
    done = subprocess.run(
        [*VFIOUSERD, "systemd-run", "--dry-run", "rng0", "--", *daemon_args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    assert command[:2] == ["systemd-run", "--unit=vfiouserd-rng0"]
    split = command.index("--")
    assert command[split + 1 :] == [*VFIOUSERD, *daemon_args]
    properties = [arg.removeprefix("--property=") for arg in command if arg.startswith("--prop")]
    expected = [
        f"{key}={value.replace('%i', 'rng0')}"
        for key, value in service_settings(template_unit())
        if key not in ("ExecStart", "ExecReload")
    ]
    assert properties == expected
    assert "RuntimeDirectory=vfiouserd/rng0" in properties
    # Written back as a unit, those properties rate as well as the template.
    unit = tmp_path / "vfiouserd-rng0.service"
    lines = ["[Service]", f"ExecStart={shlex.join(command[split + 1 :])}", *properties]
    unit.write_text("\n".join(lines) + "\n")
    assert exposure(unit) <= 2.0


def test_systemd_run_refuses_a_bad_instance_name():
    done = subprocess.run(
        [*VFIOUSERD, "systemd-run", "--dry-run", "../x", "--", "vhost-user-rng"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "instance name" in done.stderr


# -- the unit's confinement and the daemon's jail together ------------------------------


@needs_analyze
async def test_the_daemon_jails_itself_inside_the_units_confinement():
    """The unit's system call filter, address families, user and namespaces
    leave room for the daemon's own jail: it starts, jails and serves."""
    workdir = Path(tempfile.mkdtemp(prefix="vfiouserd-unit-"))
    workdir.chmod(0o777)  # the unit's user must reach it
    try:
        unit = installed(workdir, "vfiouserd@.service")
        wrap = [sys.executable, str(ROOT / "tests" / "unit_sandbox.py"), str(unit), "--"]
        daemon = Daemon(
            "vhost-user-blk",
            "--blk-file",
            str(workdir / "disk.img"),
            "--size",
            "8M",
            workdir=workdir,
            wrap=wrap,
            wrap_forks=False,
        )
        with daemon:
            await write_and_read(daemon.socket_path)
            assert daemon.stop() == 0
        log = daemon.log()
        assert "event=sandbox.entered" in log and "uid=65534" in log, log
    finally:
        shutil.rmtree(workdir)


async def write_and_read(path: str) -> None:
    ram = GuestRam([(0, 8 * MiB)])
    frontend = await VhostUserFrontend.connect(path)
    (blk,) = await start_device(frontend, ram)
    await blk.write(0, b"s" * 4096)
    assert await blk.read(0, 4096) == b"s" * 4096
    await frontend.aclose()
    ram.close()


# -- sd_notify ------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_ready_is_sent_once_the_socket_listens(tmp_path, sandbox):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    socket_path = str(tmp_path / "rng.sock")
    process = subprocess.Popen(
        [
            *VFIOUSERD,
            "vhost-user-blk",
            "--socket-path",
            socket_path,
            "--sandbox",
            sandbox,
            "--blk-file",
            str(tmp_path / "d.img"),
            "--size",
            "8M",
        ],
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
        stderr=subprocess.DEVNULL,
    )
    try:
        notify.settimeout(10)
        message = dict(line.split("=", 1) for line in notify.recv(1024).decode().splitlines())
        assert message["READY"] == "1"
        assert int(message["MAINPID"]) == process.pid  # the process systemd started
        await write_and_read(socket_path)  # served as soon as READY=1 arrived
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        notify.close()
    assert not os.path.exists(socket_path)


def test_an_abstract_notify_socket_works(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"vfiouserd-test-{os.getpid()}"
    notify.bind("\0" + name)
    with Daemon("vhost-user-rng", workdir=tmp_path, env={"NOTIFY_SOCKET": "@" + name}) as daemon:
        notify.settimeout(10)
        assert notify.recv(1024).startswith(b"READY=1")
        assert daemon.stop() == 0
    notify.close()


# -- socket activation ------------------------------------------------------------------


def activated(listener: socket.socket, *args: str) -> subprocess.Popen:
    """Start the daemon as systemd does for a socket unit: the socket as fd 3,
    LISTEN_FDS=1 and LISTEN_PID set to the daemon's own pid."""
    fd = listener.fileno()
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    script = f'{move}LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=vfiouserd exec "$@"'
    return subprocess.Popen(
        ["bash", "-c", script, "bash", *VFIOUSERD, *args], pass_fds=[fd], stderr=subprocess.PIPE
    )


async def test_socket_activation(tmp_path):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    process = activated(
        listener, "vhost-user-blk", "--blk-file", str(tmp_path / "d.img"), "--size", "8M"
    )
    listener.close()  # systemd keeps its copy; the daemon has its own
    try:
        for _ in range(2):  # connection after connection on the inherited socket
            await write_and_read(path)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert b"event=sandbox.entered" in stderr
    assert os.path.exists(path)  # systemd's socket: not the daemon's to remove


def test_socket_activation_for_another_process_is_ignored(tmp_path):
    done = subprocess.run(
        [*VFIOUSERD, "vhost-user-rng"],
        env={**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--socket-path or --fd is required" in done.stderr


# -- configuration files ----------------------------------------------------------------


async def test_a_configuration_file_stands_for_the_command_line(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(b"c" * MiB)
    config = tmp_path / "disk0.toml"
    socket_path = tmp_path / "disk0.sock"
    config.write_text(
        f'command = "vhost-user-blk"\nsocket-path = "{socket_path}"\n'
        f'blk-file = "{image}"\nread-only = true\nnum-queues = 2\n'
    )
    log = open(tmp_path / "log", "wb")  # noqa: SIM115
    process = subprocess.Popen([*VFIOUSERD, "--config", str(config)], stderr=log)
    try:
        with trio.fail_after(10):
            while not socket_path.exists():
                await trio.sleep(0.02)
        ram = GuestRam([(0, 8 * MiB)])
        frontend = await VhostUserFrontend.connect(str(socket_path))
        (blk,) = await start_device(frontend, ram)
        assert await frontend.queue_count() == 2
        status = (await blk.request(RequestType.OUT, 0, out=b"x" * 512)).status
        assert status == BlkStatus.IOERR  # read-only from the file
        assert await blk.read(0, 512) == b"c" * 512
        await frontend.aclose()
        ram.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        log.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('socket-path = "/x"\n', "'command'"),
        ("command = [\n", "Invalid value"),
        ('command = "vhost-user-rng"\nrng-file = ["a"]\n', "must be a string"),
        ('command = "vhost-user-rng"\nno-such-option = 1\n', "unrecognized arguments"),
    ],
)
def test_configuration_errors_are_clear(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    done = subprocess.run(
        [*VFIOUSERD, "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


def test_the_shipped_example_configuration_is_valid():
    argv = arguments_from_file(str(UNITS / "example.toml"))
    args = build_parser().parse_args(argv)
    assert args.command == "vhost-user-blk" and args.num_queues == 2 and not args.read_only


def test_an_unreachable_notify_socket_stops_the_daemon_before_it_listens(tmp_path):
    socket_path = tmp_path / "rng.sock"
    done = subprocess.run(
        [*VFIOUSERD, "vhost-user-rng", "--socket-path", str(socket_path)],
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "nobody-listens")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "event=startup.failed" in done.stderr
    assert not socket_path.exists()
