"""Upgrade in place: a new daemon takes the live session from the running
one, which keeps serving until the new one is ready to serve.

A restart through the fd store leaves the VMM waiting for the whole start-up
of the next daemon (interpreter, imports, jail). An upgrade does that
start-up first, beside the running daemon, and only then hands over:

1. ``systemctl reload`` runs ``vfiouserd ... --upgrade`` (the unit's
   ExecReload=). That process (``detach``) starts the successor in the
   unit's cgroup, its parent gone at once so that systemd adopts it, and
   exits with the outcome: the reload succeeds or fails with the upgrade.
2. The successor imports, opens its device, connects to the running
   daemon's control socket (``Predecessor.connect``), checks that it serves
   the same device over the same protocol, and jails itself.
3. It asks for the session (``Predecessor.take``, the control command
   ``upgrade``). The running daemon pauses it at a message boundary, stops
   the rings where they stand and sends what a restart would put in the fd
   store: the state (a ``vfiouserd.handover`` record in a memfd), the
   listening and control sockets, the connection and every fd the VMM gave.
4. The successor loads the state and sets the session up again, exactly as
   after a restart, and answers ``taken``, or ``refused`` with the reason.
   Taken: the running daemon tells systemd that the successor is now the
   main process (MAINPID=), replies ``released`` and exits; the successor
   serves. Refused: the running daemon sets its own session up again from
   the state it sent, and goes on serving; the reload fails.

Wire format, on the control connection after the greeting: the successor
sends the command line; the running daemon sends lines ``{"fds": [NAME,
...]}``, each with those fds attached (SCM_RIGHTS, at most FDS_PER_MESSAGE),
then ``{"handover": {"fds": COUNT, "socket_activated": BOOL}}`` (or the
command's error reply); the successor answers ``{"taken": true}`` or
``{"taken": false, "reason": TEXT}``; the running daemon answers
``{"released": BOOL}`` and the command's reply, for the record: the
successor serves without waiting for them.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from vfiouserd.systemd import PassedFd

FDS_PER_MESSAGE = 250  # SCM_MAX_FD is 253
MAX_LINE = 64 * 1024
TIMEOUT = 30.0  # seconds for one step of the exchange
# Seconds the running daemon waits, its session paused, for the successor's
# verdict (it only loads the state and maps memory): well within a stop's
# TimeoutStopSec=, should a stop come meanwhile.
VERDICT_TIMEOUT = 3.0
COMMAND = "upgrade"
PREDECESSOR = "predecessor="


class UpgradeError(Exception):
    """The upgrade cannot go on; the message says why."""


# -- the reload command: start the successor, report its outcome ---------------------


def detach() -> int:
    """In the process ExecReload= started: fork the successor, whose parent
    exits at once (systemd, not this short-lived process, becomes its
    parent, so it can be the service's main process), and wait for its
    outcome on a pipe. Returns the pipe's write end, in the successor;
    the reload process itself exits here with the outcome."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        os.setsid()  # nothing of the reload's session (a terminal) follows it
        if os.fork() != 0:
            os._exit(0)
        return write_end
    os.close(write_end)
    os.waitpid(middle, 0)
    _report_outcome(read_end)


def _report_outcome(read_end: int) -> NoReturn:
    """Exit as the upgrade went: 0 once the successor serves and the daemon
    it succeeds is gone (systemd then knows the new main process: the old
    one relays MAINPID= before it exits)."""
    lines: list[str] = []
    predecessor = None
    received = b""
    while chunk := os.read(read_end, 4096):
        received += chunk
        *complete, rest = received.split(b"\n")
        received = rest
        for line in complete:
            text = line.decode(errors="replace")
            if text.startswith(PREDECESSOR) and predecessor is None:
                # Watched from now on: its pid cannot be reused meanwhile.
                with contextlib.suppress(OSError, ValueError):
                    predecessor = os.pidfd_open(int(text.removeprefix(PREDECESSOR)))
            else:
                lines.append(text)
    outcome = lines[-1] if lines else ""
    if outcome == "ok":
        if predecessor is not None:
            select.select([predecessor], [], [], TIMEOUT)
        os._exit(0)
    print(f"vfiouserd: upgrade failed: {outcome or 'the new daemon exited'}", file=sys.stderr)
    os._exit(1)


def report(result_fd: int, outcome: str) -> None:
    """The successor's outcome for the reload command ("ok" or a reason)."""
    try:
        os.write(result_fd, outcome.encode()[:4000] + b"\n")
    except OSError:
        pass  # the reload command is gone: nobody to tell
    finally:
        os.close(result_fd)


def report_predecessor(result_fd: int, pid: int) -> None:
    """The running daemon's main process, which the reload command waits for."""
    with contextlib.suppress(OSError):
        os.write(result_fd, f"{PREDECESSOR}{pid}\n".encode())


# -- the successor's side -------------------------------------------------------------


@dataclass
class HandedOver:
    fds: list[PassedFd]  # with the names a restart's fd store would give them
    socket_activated: bool  # the listener is a socket unit's: not for the fd store


class Predecessor:
    """The running daemon, seen from its successor (blocking, before trio)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid: object = None  # its main process, as its greeting says
        self._buffer = bytearray()
        self._fds: list[int] = []

    @classmethod
    def connect(cls, path: str, device: str, protocol: str) -> Predecessor:
        """Connect to the running daemon's control socket (before the jail
        hides its path) and check that it serves ``device`` over ``protocol``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        predecessor = cls(sock)
        try:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            greeting = predecessor._line().get("vfiouserd")
            if not isinstance(greeting, dict):
                raise UpgradeError(f"{path} does not greet as a vfiouserd control socket")
            if COMMAND not in greeting.get("commands", []):
                raise UpgradeError("the running daemon cannot hand its session over (too old)")
            predecessor.pid = greeting.get("pid")
            served = (greeting.get("device"), greeting.get("transport"))
            if served != (device, protocol):
                raise UpgradeError(
                    f"the running daemon serves {served[0]} over {served[1]}, "
                    f"not {device} over {protocol}"
                )
        except OSError as exc:
            sock.close()
            raise UpgradeError(f"cannot reach the running daemon at {path}: {exc}") from exc
        except UpgradeError:
            sock.close()
            raise
        return predecessor

    def take(self, main_pid: int) -> HandedOver:
        """Ask for the session; main_pid is the process systemd is to
        supervise from now on (the successor's waiter)."""
        command = {"execute": COMMAND, "arguments": {"pid": main_pid}, "id": 1}
        self.sock.sendall(json.dumps(command).encode() + b"\n")
        names: list[str] = []
        while True:
            message = self._line()
            if "fds" in message:
                batch = message["fds"]
                if not isinstance(batch, list) or not all(isinstance(n, str) for n in batch):
                    raise UpgradeError("fds: not a list of names")
                names += batch
                continue
            if "error" in message:
                raise UpgradeError(f"the running daemon refused: {message['error'].get('desc')}")
            end = message.get("handover")
            if not isinstance(end, dict) or end.get("fds") != len(names):
                raise UpgradeError(f"unexpected message {message!r}")
            if len(self._fds) != len(names):
                raise UpgradeError(f"{len(names)} fds named, {len(self._fds)} came")
            fds, self._fds = self._fds, []
            passed = [PassedFd(fd, name) for fd, name in zip(fds, names, strict=True)]
            return HandedOver(passed, bool(end.get("socket_activated")))

    def answer(self, reason: str | None) -> None:
        """Tell the running daemon whether the session was taken (reason:
        None) or not. Its release is not awaited: it stopped serving the
        session when it paused it, and exits by itself."""
        verdict: dict[str, Any] = {"taken": reason is None}
        if reason is not None:
            verdict["reason"] = reason
        with contextlib.suppress(OSError):  # gone: it takes nothing back then
            self.sock.sendall(json.dumps(verdict).encode() + b"\n")

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()

    def _line(self) -> dict[str, Any]:
        """The next line as a JSON object, collecting the fds that came with it."""
        deadline = time.monotonic() + TIMEOUT
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise UpgradeError("a line too long from the running daemon")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpgradeError(f"no answer from the running daemon in {TIMEOUT:g} s")
            self.sock.settimeout(remaining)  # a poll: the jail has no select
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    MAX_LINE, socket.CMSG_SPACE(FDS_PER_MESSAGE * 4), socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError as exc:
                raise UpgradeError(f"no answer from the running daemon in {TIMEOUT:g} s") from exc
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self._fds += array.array("i", payload[: len(payload) - len(payload) % 4])
            if flags & socket.MSG_CTRUNC:
                raise UpgradeError("fds were lost in transit (MSG_CTRUNC)")
            if not data:
                raise UpgradeError("the running daemon closed the connection")
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise UpgradeError(f"not JSON from the running daemon: {exc}") from exc
        if not isinstance(message, dict):
            raise UpgradeError("not a JSON object from the running daemon")
        return message


# -- the running daemon's side --------------------------------------------------------


def fd_batches(named: dict[str, int]) -> list[tuple[bytes, list[int]]]:
    """The messages carrying ``named`` fds: a line of names, the fds attached."""
    items = list(named.items())
    batches = []
    for start in range(0, len(items), FDS_PER_MESSAGE):
        chunk = items[start : start + FDS_PER_MESSAGE]
        line = json.dumps({"fds": [name for name, _ in chunk]}).encode() + b"\n"
        batches.append((line, [fd for _, fd in chunk]))
    return batches


def end_line(count: int, socket_activated: bool) -> bytes:
    return (
        json.dumps({"handover": {"fds": count, "socket_activated": socket_activated}}).encode()
        + b"\n"
    )


def released_line(released: bool) -> bytes:
    return json.dumps({"released": released}).encode() + b"\n"


def parse_verdict(line: bytes) -> str | None:
    """None if the successor took the session, else why not."""
    try:
        verdict = json.loads(line)
    except ValueError:
        return f"not JSON: {line[:80]!r}"
    if not isinstance(verdict, dict) or not isinstance(verdict.get("taken"), bool):
        return f"not a verdict: {line[:80]!r}"
    if verdict["taken"]:
        return None
    return str(verdict.get("reason") or "no reason given")


def successor_pid(arguments: dict[str, Any]) -> int:
    pid = arguments.get("pid")
    if type(pid) is not int or pid <= 1:
        raise ValueError("pid: the successor's main process id, an integer above 1")
    return pid
