"""Run vfiouserd as a real subprocess, the way systemd or a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class Daemon:
    def __init__(
        self,
        subcommand: str,
        *args: str,
        workdir: Path,
        socket_path: str | None = None,
        name: str = "daemon",
        wrap: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **env} if env else None
        self.socket_path = socket_path or str(workdir / f"{name}.sock")
        self.log_path = workdir / f"{name}.log"
        # wrap: a command the daemon runs under (strace, when recording)
        self.wrapped = bool(wrap)
        self.command = [
            *(wrap or []),
            sys.executable,
            "-m",
            "vfiouserd",
            subcommand,
            "--socket-path",
            self.socket_path,
            *args,
        ]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the daemon
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=self._log, env=self.env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if os.path.exists(self.socket_path):
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(self.socket_path)
                except OSError:
                    pass
                else:
                    probe.close()
                    return self
                finally:
                    probe.close()
            time.sleep(0.02)
        raise TimeoutError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        """The daemon's main process (not the wrapper's)."""
        assert self.process is not None
        if not self.wrapped:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return int(children.read_text().split()[0])

    def jailed_pid(self) -> int:
        """The jailed daemon, child of the main process (PID 1 in its namespace)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.send(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL if exc[0] else signal.SIGTERM)
