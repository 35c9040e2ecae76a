"""A stand-in for systemd's service manager, speaking its real protocols.

PID 1 on the test machines is not systemd, so this plays its part for one
service: it listens on a notify socket (NOTIFY_SOCKET) for READY=1,
MAINPID=, FDSTORE=1 (with FDNAME= and the fds attached), FDSTOREREMOVE=1
and FDPOLL=, from the main process and an ExecReload= command only
(NotifyAccess=exec: the sender's pid comes with each message, SO_PASSCRED);
it runs ExecReload= commands;
it is the subreaper of what the service leaves behind (as systemd is) and
keeps the fd store across restarts like FileDescriptorStoreMax= does (one
entry per open file, as systemd keeps them), and
starts the service with the stored fds at 3, 4, ... and LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID set to the service's own pid (a small
program places the fds and execs the daemon, so the pid is the daemon's).
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import prctl
import trio
from daemon import assert_no_bug_logged

from vfiouserd.handover import same_file

# FileDescriptorStoreMax= of the unit the project ships.
FD_STORE_MAX = int(
    re.search(
        r"^FileDescriptorStoreMax=(\d+)$",
        (Path(__file__).resolve().parent.parent / "systemd" / "vfiouserd@.service").read_text(),
        re.MULTILINE,
    ).group(1)  # type: ignore[union-attr]
)

# What systemd does between fork and exec: the fds to 3, 4, ... (moved out
# of the way first, as sources and targets may overlap), LISTEN_FDS and
# LISTEN_PID (the pid stays the same through exec).
PLACE_FDS_AND_EXEC = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",") if fd]
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(parked):
    os.dup2(fd, 3 + index)  # inheritable
    os.close(fd)
if sources:
    os.environ["LISTEN_FDS"] = str(len(sources))
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class FakeSystemd:
    def __init__(self, workdir: Path, command: list[str], name: str = "service") -> None:
        self.command = command
        self.workdir = workdir
        self.name = name
        self.notify_path = str(workdir / f"{name}.notify")
        self.store: list[tuple[str, int]] = []  # in the order systemd keeps them
        self.messages: list[str] = []
        self.starts = 0
        self.process: subprocess.Popen | None = None
        self.main_pid: int | None = None  # ExecStart='s process, or whom MAINPID= named
        self.ignored: list[str] = []  # notifications from another process than the main one
        self.control_pid: int | None = None  # an ExecReload= command while it runs
        self._ready = trio.Event()
        self._sock: trio.socket.SocketType | None = None

    async def __aenter__(self) -> FakeSystemd:
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        await self._sock.bind(self.notify_path)
        # A main process that a reload started is adopted, not our child.
        self._was_subreaper = prctl.get_child_subreaper()
        prctl.set_child_subreaper(True)
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(self._receive)
        self._nursery = nursery
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self._adopted():  # a reload's new daemon, even one a failed test left
            for process in reversed(self._tree(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        prctl.set_child_subreaper(self._was_subreaper)
        self._nursery.cancel_scope.cancel()
        await self._nursery_manager.__aexit__(None, None, None)
        assert self._sock is not None
        self._sock.close()
        for _, fd in self.store:
            os.close(fd)
        self.store.clear()

    # -- the notify socket -------------------------------------------------------------

    async def _receive(self) -> None:
        assert self._sock is not None
        space = socket.CMSG_SPACE(FD_STORE_MAX * 4)
        while True:
            space += socket.CMSG_SPACE(12)  # the sender's pid, uid and gid
            data, ancillary, _, _ = await self._sock.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
            fds: list[int] = []
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = array.array("i", payload[:12])[0]
            if sender not in (self.main_pid, self.control_pid):  # NotifyAccess=exec
                self.ignored.append(data.decode())
                for fd in fds:
                    os.close(fd)
                continue
            self._handle(data.decode(), fds)

    def _handle(self, text: str, fds: list[int]) -> None:
        self.messages.append(text)
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if len(self.store) >= FD_STORE_MAX:
                    os.close(fd)  # what systemd does beyond FileDescriptorStoreMax=
                elif any(same_file(fd, stored) for _, stored in self.store):
                    os.close(fd)  # systemd keeps an open file once (its same_fd())
                else:
                    self.store.append((name, fd))
            fds = []
        if fields.get("FDSTOREREMOVE") == "1":
            for stored, fd in [entry for entry in self.store if entry[0] == name]:
                self.store.remove((stored, fd))
                os.close(fd)
        for fd in fds:  # fds sent without FDSTORE=1 are dropped
            os.close(fd)
        if "MAINPID" in fields:
            self.main_pid = int(fields["MAINPID"])
        if fields.get("READY") == "1":
            self._ready.set()

    def stored_names(self) -> list[str]:
        return [name for name, _ in self.store]

    # -- the service's life ------------------------------------------------------------

    async def start(self, timeout: float = 20) -> None:
        """ExecStart=: the stored fds go to the new process, READY=1 awaited."""
        self._ready = trio.Event()
        sources = [fd for _, fd in self.store]
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115
        self.starts += 1
        log.write(f"--- start {self.starts} ---\n".encode())
        log.flush()
        environment = {**os.environ, "NOTIFY_SOCKET": self.notify_path}
        if sources:
            environment["LISTEN_FDNAMES"] = ":".join(self.stored_names())
        self.process = subprocess.Popen(
            [sys.executable, "-c", PLACE_FDS_AND_EXEC, ",".join(map(str, sources)), *self.command],
            pass_fds=sources,
            stdout=log,
            stderr=log,
            env=environment,
        )
        log.close()
        self.main_pid = self.process.pid
        with trio.fail_after(timeout):
            while not self._ready.is_set():
                if self.process.poll() is not None:
                    raise RuntimeError(f"exited with {self.process.returncode}:\n{self.log()}")
                await trio.sleep(0.01)

    def _adopted(self) -> list[int]:
        """This service's processes that we adopted as their subreaper."""
        adopted = []
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError, ValueError):
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
                pid = int(status.parent.name)
                if int(fields["PPid"]) != os.getpid() or self._is_started_process(pid):
                    continue
                arguments = (status.parent / "cmdline").read_bytes()
                if str(self.workdir).encode() in arguments or b"vfiouserd-waiter" in arguments:
                    adopted.append(pid)
        return adopted

    def _processes(self) -> list[int]:
        """The service's processes, main first (its cgroup, as systemd sees it)."""
        assert self.main_pid is not None
        return self._tree(self.main_pid)

    @staticmethod
    def _tree(root: int) -> list[int]:
        found, index = [root], 0
        while index < len(found):
            pid = found[index]
            index += 1
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    found += [int(c) for c in (task / "children").read_text().split()]
        return found

    def _is_started_process(self, pid: int) -> bool:
        return self.process is not None and pid == self.process.pid

    async def stop(self, timeout: float = 20) -> int:
        """ExecStop= by signal: SIGTERM to every process of the service
        (KillMode=control-group, systemd's default), then the exit status."""
        assert self.process is not None and self.main_pid is not None
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with trio.fail_after(timeout):
            status = await self._reaped(self.main_pid)
        await trio.sleep(0.05)  # notifications sent just before the exit
        assert_no_bug_logged(self.log())
        return status

    async def reload(self, command: list[str], timeout: float = 30) -> int:
        """ExecReload=: ``command`` runs beside the service (the notify
        socket set, no fds passed); its exit status."""
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115
        log.write(b"--- reload ---\n")
        log.flush()
        reloading = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": self.notify_path},
        )
        log.close()
        previous = self.main_pid
        self.control_pid = reloading.pid
        with trio.fail_after(timeout):
            while reloading.poll() is None:
                await trio.sleep(0.005)
            self.control_pid = None
            if reloading.returncode == 0 and previous is not None:
                # Once the old main process is gone (the reload command
                # waits for it), its MAINPID= is in the notify socket.
                while self.main_pid == previous:
                    await trio.sleep(0.001)
                await self._reaped(previous)  # adopted, or our child: ours to reap
            elif reloading.returncode != 0:  # a new daemon that gave up exits by itself
                while adopted := self._adopted():
                    for pid in adopted:
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(pid, os.WNOHANG)
                    await trio.sleep(0.005)
        return reloading.returncode

    async def _reaped(self, pid: int) -> int:
        if self._is_started_process(pid):
            assert self.process is not None
            while self.process.poll() is None:
                await trio.sleep(0.005)
            return self.process.returncode
        while (reaped := os.waitpid(pid, os.WNOHANG))[0] == 0:
            await trio.sleep(0.005)
        return os.waitstatus_to_exitcode(reaped[1])

    async def restart(self) -> float:
        """systemctl restart; returns the seconds the service was down."""
        started = trio.current_time()
        status = await self.stop()
        if status != 0:
            raise RuntimeError(f"stopped with {status}:\n{self.log()}")
        await self.start()
        return trio.current_time() - started

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
