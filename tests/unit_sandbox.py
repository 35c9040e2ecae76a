"""Run a command confined the way a systemd unit file says, without systemd.

PID 1 here is not systemd, so this stands in for the parts of a unit's
sandbox that can stop vfiouserd's own jail from working:

* SystemCallFilter= (groups expanded by ``systemd-analyze syscall-filter``)
  with SystemCallErrorNumber=, RestrictAddressFamilies=, and
  MemoryDenyWriteExecute=, as one seccomp filter;
* DynamicUser= (uid 65534 inside a user namespace, so the daemon takes the
  same unprivileged path through its jail as under systemd, while files
  stay as readable as for the caller), CapabilityBoundingSet= (empty),
  NoNewPrivileges=;
* PrivateUsers=, PrivateMounts=, PrivateNetwork=, PrivateIPC= and
  ProtectHostname= (new user, mount, network, IPC and UTS namespaces).

Usage: python unit_sandbox.py UNIT_FILE -- COMMAND [ARGS...]
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys

import prctl
import pyseccomp as sc

DYNAMIC_UID = 65534
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PROT_WRITE, PROT_EXEC = 0x2, 0x4


def service_settings(path: str) -> list[tuple[str, str]]:
    from vfiouserd.systemd import service_settings as parse

    with open(path) as f:
        return parse(f.read())


def syscall_groups() -> dict[str, list[str]]:
    output = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def allowed_syscalls(settings: list[tuple[str, str]]) -> set[str]:
    groups = syscall_groups()
    allowed: set[str] | None = None
    for key, value in settings:
        if key != "SystemCallFilter":
            continue
        if value.startswith("~"):
            assert allowed is not None, "a deny list first is not emulated"
            allowed -= expand(value[1:].split(), groups)
        else:
            allowed = (allowed or set()) | expand(value.split(), groups)
    assert allowed is not None, "the unit has no SystemCallFilter="
    return allowed


def build_filter(settings: list[tuple[str, str]]) -> sc.SyscallFilter:
    values = dict(settings)
    error = getattr(errno, values.get("SystemCallErrorNumber", "EPERM"))
    f = sc.SyscallFilter(defaction=sc.ERRNO(error))
    allowed = allowed_syscalls(settings)
    conditional: dict[str, list[sc.Arg]] = {}
    families = values.get("RestrictAddressFamilies", "").split()
    if families:
        assert len(families) == 1, "one family is emulated"
        for call in ("socket", "socketpair"):
            conditional[call] = [sc.Arg(0, sc.EQ, getattr(socket, families[0]))]
    if values.get("MemoryDenyWriteExecute") == "yes":
        # mmap: never writable and executable at once; mprotect: never executable.
        for number, prot in enumerate((0, PROT_WRITE, PROT_EXEC)):
            conditional[f"mmap-{number}"] = [sc.Arg(2, sc.MASKED_EQ, PROT_WRITE | PROT_EXEC, prot)]
        conditional["mprotect"] = [sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, 0)]
    for name in sorted(allowed):
        rules = [(name, args) for key, args in conditional.items() if key.split("-")[0] == name]
        try:
            if not rules:
                f.add_rule(sc.ALLOW, name)
            for call, args in rules:
                f.add_rule(sc.ALLOW, call, *args)
        except (RuntimeError, ValueError, OSError):
            pass  # a name this architecture does not have (e.g. the *32 variants)
    return f


def enter_namespaces(inside_uid: int, inside_gid: int) -> None:
    """PrivateUsers= and the other namespaces; the caller's ids become
    ``inside_uid``/``inside_gid`` inside (for DynamicUser=, a plain user)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{inside_uid} {uid} 1\n")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{inside_gid} {gid} 1\n")


def main() -> None:
    split = sys.argv.index("--")
    unit, command = sys.argv[1], sys.argv[split + 1 :]
    settings = service_settings(unit)
    values = dict(settings)
    seccomp_filter = build_filter(settings)  # needs systemd-analyze: before anything is dropped
    if values.get("DynamicUser") == "yes":
        # A plain user inside; outside it stays the caller, so the interpreter
        # and the project remain readable wherever they are installed.
        enter_namespaces(DYNAMIC_UID, DYNAMIC_UID)
    else:
        enter_namespaces(os.getuid(), os.getgid())
    if values.get("CapabilityBoundingSet") == "":
        for cap in prctl.ALL_CAPS:
            prctl.capbset_drop(cap)
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.cap_inheritable.limit()
    if values.get("NoNewPrivileges") == "yes":
        prctl.set_no_new_privs(True)
    seccomp_filter.load()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
