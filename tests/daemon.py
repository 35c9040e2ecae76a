"""Run vfiouserd as a real subprocess, the way systemd or a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Logged only for a bug of ours (see conftest.CRASH_EVENTS).
CRASH_MARKS = ("event=session.crashed", "event=ring.crashed", "event=device.failed")


def assert_no_bug_logged(log: str) -> None:
    """A daemon must never die by its own seccomp filter (SIGSYS), nor log a
    bug: whatever else a test expects of a stop, this fails it."""
    if "event=daemon.killed signal=SIGSYS" in log:
        raise AssertionError(f"the daemon was killed by its own seccomp filter:\n{log[-3000:]}")
    for mark in CRASH_MARKS:
        if mark in log:
            raise AssertionError(f"the daemon logged a bug ({mark}):\n{log[-3000:]}")


class Daemon:
    def __init__(
        self,
        subcommand: str,
        *args: str,
        workdir: Path,
        socket_path: str | None = None,
        name: str = "daemon",
        wrap: list[str] | None = None,
        wrap_forks: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **env} if env else None
        self.socket_path = socket_path or str(workdir / f"{name}.sock")
        self.log_path = workdir / f"{name}.log"
        # wrap: a command the daemon runs under (strace, when recording)
        # (a wrapper that execs the daemon keeps its pid; strace forks it)
        self.wrapped = bool(wrap) and wrap_forks
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
                self._log.close()  # no stop() follows
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            # Logged once jailed and serving (the socket listens earlier).
            if "event=listening" in self.log():
                return self
            time.sleep(0.02)
        raise TimeoutError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10) -> str:
        """The log once ``text`` is in it ``count`` times (events are logged
        asynchronously to what a client sees)."""
        deadline = time.monotonic() + timeout
        while (log := self.log()).count(text) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged {count} times:\n{log}")
            time.sleep(0.02)
        return log

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
            status = self.process.wait(timeout)
        finally:
            self._log.close()
        assert_no_bug_logged(self.log())
        return status

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL if exc[0] else signal.SIGTERM)
        elif self.process is not None:  # exited already: stop() did not close it
            self._log.close()
