"""Boot the test guest in QEMU with vhost-user devices and collect its output.

The guest runs a shell script and reports on its serial console; results are
lines ``RESULT key value`` and ``VFIOUSERD-GUEST-EXIT <status>``. Guest RAM is
a shared memfd (vhost-user needs it). KVM is used only if a guest really
boots with it on this machine; otherwise TCG.
"""

from __future__ import annotations

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


def _parse(output: str) -> dict[str, list[str]]:
    results: dict[str, list[str]] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            _, key, *value = line.split(maxsplit=2)
            results.setdefault(key, []).append(value[0] if value else "")
    return results


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
    for what a management layer does (migration, for one). ``extra`` adds
    QEMU arguments, such as ``-incoming`` for a migration destination.
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
    ) -> None:
        kernel, initramfs = build()
        self._workdir = tempfile.TemporaryDirectory(prefix="vfiouserd-guest-")
        initrd = Path(self._workdir.name) / "initrd.cpio"
        initrd.write_bytes(initramfs.read_bytes() + script_archive(SCRIPT_PRELUDE + script + "\n"))
        self.monitor_path = str(Path(self._workdir.name) / "monitor.sock") if monitor else None
        command = [
            QEMU,
            *(accel if accel is not None else accelerator()),
            "-machine",
            "q35,memory-backend=mem",
            "-object",
            f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
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
            "console=ttyS0 quiet panic=-1 reboot=t",
            *([] if reboot else ["-no-reboot"]),
            *(["-monitor", f"unix:{self.monitor_path},server=on,wait=off"] if monitor else []),
            *(devices or []),
            *(extra or []),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        self.lines: list[str] = []
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line.rstrip("\n"))

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
        self._workdir.cleanup()
        output = self.output
        run = GuestRun(output, returncode, _parse(output))
        if check and (returncode != 0 or not run.exit_statuses):
            raise RuntimeError(f"QEMU exited with {returncode}; console:\n{output[-3000:]}")
        return run

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._workdir.cleanup()


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
    )
    return guest.wait(timeout, check=check)


def vhost_user_device(driver: str, socket_path: str, name: str, **properties: object) -> list[str]:
    """-chardev/-device arguments for one vhost-user device."""
    extra = "".join(f",{key.replace('_', '-')}={value}" for key, value in properties.items())
    return [
        "-chardev",
        f"socket,id={name},path={socket_path}",
        "-device",
        f"{driver},chardev={name}{extra}",
    ]
