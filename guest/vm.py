"""Boot the test guest in QEMU with vhost-user or vfio-user devices and
collect its output.

The guest runs a shell script and reports on its serial console; results are
lines ``RESULT key value`` and ``VFIOUSERD-GUEST-EXIT <status>``. Guest RAM is
a shared memfd by default (vhost-user needs it; vfio-user maps it too), or
plain anonymous RAM that a vfio-user server reaches only through DMA
messages. ``qemu`` picks the binary: Debian's QEMU 7.2 by default, or the
project-built one with ``vfio-user-pci`` (``guest/qemu_build.py``). KVM is
used only if a guest really boots with it on this machine; otherwise TCG.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guest.build import OUT, build, script_archive

QEMU = "qemu-system-x86_64"
# Shell helpers every test script can use.
SCRIPT_PRELUDE = """#!/bin/sh
set -u
md5() { md5sum | cut -d' ' -f1; }
"""


@dataclass
class GuestRun:
    output: str
    returncode: int
    results: dict[str, list[str]] = field(default_factory=dict)
    callback_errors: list[Exception] = field(default_factory=list)  # from on_line

    @property
    def exit_statuses(self) -> list[int]:
        return [
            int(line.split()[1])
            for line in self.output.splitlines()
            if line.startswith("VFIOUSERD-GUEST-EXIT ")
        ]

    def result(self, key: str) -> str:
        values = self.results.get(key)
        if not values:
            raise KeyError(f"guest reported no {key!r}; console:\n{self.output[-3000:]}")
        return values[-1]


def parse_results(output: str) -> dict[str, list[str]]:
    results: dict[str, list[str]] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            _, key, *value = line.split(maxsplit=2)
            results.setdefault(key, []).append(value[0] if value else "")
    return results


def qemu_version(qemu: str = QEMU) -> tuple[int, int]:
    """(major, minor) of a QEMU binary, from ``-version``."""
    if qemu not in _VERSIONS:
        out = subprocess.run([qemu, "-version"], capture_output=True, text=True, check=True)
        numbers = out.stdout.split("version", 1)[1].split()[0].split(".")
        _VERSIONS[qemu] = (int(numbers[0]), int(numbers[1]))
    return _VERSIONS[qemu]


_VERSIONS: dict[str, tuple[int, int]] = {}


def reconnect_option(qemu: str = QEMU, seconds: int = 1) -> str:
    """The chardev option that makes QEMU reconnect to a back end: ``reconnect``
    (seconds) up to 9.1, ``reconnect-ms`` from 9.2 on; QEMU 10 refuses the old one."""
    if qemu_version(qemu) >= (9, 2):
        return f"reconnect-ms={seconds * 1000}"
    return f"reconnect={seconds}"


def _cpu_has_virtualization() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return (" vmx" in flags or " svm" in flags) and os.access("/dev/kvm", os.R_OK | os.W_OK)


def accelerator() -> list[str]:
    """QEMU arguments for the fastest accelerator a guest really boots with."""
    cache = OUT / "accelerator.json"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("boot_id") == boot_id:
            return saved["args"]
    args = ["-accel", "tcg"]
    if _cpu_has_virtualization():
        probe = boot(
            "echo RESULT probe ok", accel=["-accel", "kvm", "-cpu", "host"], timeout=30, check=False
        )
        if probe.results.get("probe") == ["ok"]:
            args = ["-accel", "kvm", "-cpu", "host"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"boot_id": boot_id, "args": args}))
    return args


class Guest:
    """One QEMU process running the test guest.

    Console lines are collected as they arrive (and shown to ``on_line``);
    with ``monitor`` QEMU's human monitor is reachable through ``command``,
    for what a management layer does (migration, for one), and its QMP
    socket through ``qmp``. ``extra`` adds QEMU arguments, such as
    ``-incoming`` for a migration destination. ``shared_memory=False``
    gives the guest plain RAM that QEMU shares with no one.
    """

    def __init__(
        self,
        script: str,
        *,
        devices: list[str] | None = None,
        smp: int = 1,
        memory_mb: int = 256,
        reboot: bool = False,
        accel: list[str] | None = None,
        on_line: Callable[[str], None] | None = None,
        monitor: bool = False,
        extra: list[str] | None = None,
        qemu: str = QEMU,
        shared_memory: bool = True,
        append: str = "",
    ) -> None:
        kernel, initramfs = build()
        self._workdir = tempfile.TemporaryDirectory(prefix="vfiouserd-guest-")
        initrd = Path(self._workdir.name) / "initrd.cpio"
        initrd.write_bytes(initramfs.read_bytes() + script_archive(SCRIPT_PRELUDE + script + "\n"))
        self.monitor_path = str(Path(self._workdir.name) / "monitor.sock") if monitor else None
        self.qmp_path = str(Path(self._workdir.name) / "qmp.sock") if monitor else None
        backend = (
            f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on"
            if shared_memory
            else f"memory-backend-ram,id=mem,size={memory_mb}M"
        )
        command = [
            qemu,
            *(accel if accel is not None else accelerator()),
            "-machine",
            "q35,memory-backend=mem",
            "-object",
            backend,
            "-m",
            f"{memory_mb}M",
            "-smp",
            str(smp),
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            f"console=ttyS0 quiet panic=-1 reboot=t {append}".strip(),
            *([] if reboot else ["-no-reboot"]),
            *(["-monitor", f"unix:{self.monitor_path},server=on,wait=off"] if monitor else []),
            *(["-qmp", f"unix:{self.qmp_path},server=on,wait=off"] if monitor else []),
            *(devices or []),
            *(extra or []),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        self.lines: list[str] = []
        self.events: list[dict] = []  # QMP events seen while waiting for answers
        self.callback_errors: list[Exception] = []  # raised by on_line
        self._qmp: Any = None
        self._qmp_lock = threading.Lock()
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:  # closed at its end: this thread is its only reader
            for line in self.process.stdout:
                self.lines.append(line)
                if self._on_line is not None and not self.callback_errors:
                    try:
                        self._on_line(line.rstrip("\n"))
                    except Exception as exc:  # kept for wait(); the console is read to its end
                        self.callback_errors.append(exc)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def command(self, text: str, timeout: float = 30) -> str:
        """One human-monitor command; returns what QEMU answered."""
        assert self.monitor_path is not None, "started without monitor=True"
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.monitor_path):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"no QEMU monitor; console:\n{self.output[-2000:]}")
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(self.monitor_path)
            answer = self._until_prompt(sock)  # the banner
            sock.sendall(text.encode() + b"\n")
            answer = self._until_prompt(sock)
        # The monitor echoes the command line (with terminal escapes) first.
        return answer.split("\n", 1)[1] if "\n" in answer else ""

    def qmp(self, command: str, timeout: float = 30, **arguments: object) -> object:
        """One QMP command on the guest's QMP connection (opened, with the
        capabilities handshake, at the first); returns its ``return`` value,
        raises RuntimeError with QEMU's error. Events seen meanwhile are
        kept in ``events``."""
        assert self.qmp_path is not None, "started without monitor=True"
        with self._qmp_lock:
            if self._qmp is None:
                deadline = time.monotonic() + timeout
                while not os.path.exists(self.qmp_path):
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise TimeoutError(f"no QMP socket; console:\n{self.output[-2000:]}")
                    time.sleep(0.02)
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(timeout)
                sock.connect(self.qmp_path)
                self._qmp = sock.makefile("rwb")
                json.loads(self._qmp.readline())  # the greeting
                self._qmp_call("qmp_capabilities", {})
            return self._qmp_call(command, arguments)

    def _qmp_call(self, command: str, arguments: dict[str, object]) -> object:
        assert self._qmp is not None
        self._qmp.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self._qmp.flush()
        while True:
            answer = json.loads(self._qmp.readline())
            if "event" not in answer:
                break
            self.events.append(answer)
        if "error" in answer:
            raise RuntimeError(f"QMP {command}: {answer['error']}")
        return answer["return"]

    @staticmethod
    def _until_prompt(sock: socket.socket) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").replace("\r", "")

    def wait(self, timeout: float = 180, check: bool = True) -> GuestRun:
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise TimeoutError(
                f"guest did not finish in {timeout}s; console:\n{self.output[-3000:]}"
            ) from exc
        self._reader.join(10)
        self._close_qmp()
        self._workdir.cleanup()
        output = self.output
        run = GuestRun(output, returncode, parse_results(output), list(self.callback_errors))
        if check and self.callback_errors:
            raise self.callback_errors[0]
        if check and (returncode != 0 or not run.exit_statuses):
            raise RuntimeError(f"QEMU exited with {returncode}; console:\n{output[-3000:]}")
        return run

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._close_qmp()
        self._workdir.cleanup()

    def _close_qmp(self) -> None:
        with self._qmp_lock:
            if self._qmp is not None:
                with contextlib.suppress(OSError):  # QEMU may be gone
                    self._qmp.close()
                self._qmp = None


def boot(
    script: str,
    *,
    devices: list[str] | None = None,
    smp: int = 1,
    memory_mb: int = 256,
    reboot: bool = False,
    timeout: float = 180,
    accel: list[str] | None = None,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
    qemu: str = QEMU,
    shared_memory: bool = True,
    append: str = "",
) -> GuestRun:
    """Boot the guest once (or until it powers off, with ``reboot``).

    ``on_line`` sees each console line as it arrives, so a test can act on
    the host while the guest runs.
    """
    guest = Guest(
        script,
        devices=devices,
        smp=smp,
        memory_mb=memory_mb,
        reboot=reboot,
        accel=accel,
        on_line=on_line,
        qemu=qemu,
        shared_memory=shared_memory,
        append=append,
    )
    return guest.wait(timeout, check=check)


def vfio_user_device(socket_path: str, name: str | None = None, **properties: str) -> list[str]:
    """-device for QEMU's vfio-user client (QEMU >= 10.1; JSON form only)."""
    device: dict[str, object] = {
        "driver": "vfio-user-pci",
        "socket": {"path": socket_path, "type": "unix"},
        **properties,
    }
    if name is not None:
        device["id"] = name
    return ["-device", json.dumps(device)]


def vhost_user_device(driver: str, socket_path: str, name: str, **properties: object) -> list[str]:
    """-chardev/-device arguments for one vhost-user device."""
    extra = "".join(f",{key.replace('_', '-')}={value}" for key, value in properties.items())
    return [
        "-chardev",
        f"socket,id={name},path={socket_path}",
        "-device",
        f"{driver},chardev={name}{extra}",
    ]
