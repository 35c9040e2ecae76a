"""Command line: ``vfiouserd <subcommand>``.

Subcommands are generated from the installed device plugins:
``vhost-user-<device>`` serves a virtio device over vhost-user,
``vfio-user-<device>`` serves any device over vfio-user (a virtio device
through the virtio-pci transport). All follow the back-end program
conventions (--socket-path/--fd, no daemonizing, prompt exit on SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import trio

from vfiouserd import (
    __version__,
    control,
    descriptors,
    faults,
    generated_code,
    handover,
    module_code,
    state,
    systemd,
    upgrade,
)
from vfiouserd import log as logging
from vfiouserd.devices.virtio import TRANSPORT_FEATURES, Feature, VirtioDevice
from vfiouserd.plugins import DeviceClass, device_plugin, device_plugins
from vfiouserd.sandbox import jail
from vfiouserd.server import LiveSession, Service
from vfiouserd.signals import hold_stop_signals, run_until_signalled
from vfiouserd.sockets import SocketFile, is_listening, listen_on_path, socket_from_fd
from vfiouserd.systemd import PassedFd
from vfiouserd.trace import Filter, Subscription, tracer

# A daemon imports only what its device and protocol use (see _session_type
# and build_parser): the rest would cost every device start-up time and memory.
if TYPE_CHECKING:
    from pathlib import Path

    from vfiouserd.devices.pci import PciDevice
    from vfiouserd.vfio_user.session import VfioUserSession
    from vfiouserd.vhost_user.backend import VhostUserBackend

log = logging.get_logger("cli")

Device: TypeAlias = "VirtioDevice | PciDevice"
# What a subcommand makes: the device served, and the virtio device in it.
MakeDevice = Callable[[], "tuple[Device, VirtioDevice | None]"]


def _feature_list(device: type[VirtioDevice]) -> list[str]:
    names = [name for bit, name in sorted(device.feature_names.items())]
    names += [f.name for f in Feature if TRANSPORT_FEATURES & (1 << f)]
    return names


def _subcommands(name: str, device: DeviceClass) -> list[str]:
    if issubclass(device, VirtioDevice):
        return [f"vhost-user-{name}", f"vfio-user-{name}"]
    return [f"vfio-user-{name}"]


def _list_devices(args: argparse.Namespace) -> int:
    plugins = device_plugins()
    listing = {}
    for name, device in plugins.items():
        entry: dict[str, object] = {
            "description": device.description,
            "subcommands": _subcommands(name, device),
        }
        if issubclass(device, VirtioDevice):
            entry.update(
                virtio_device_id=int(device.device_id),
                vhost_user_type=device.vhost_user_type,
                features=_feature_list(device),
                protocols=["vhost-user", "vfio-user"],
            )
        else:
            entry.update(
                pci_id=f"{device.vendor_id:04x}:{device.device_id:04x}",
                msi_vectors=device.msi_vectors,
                msix_vectors=device.msix_vectors,
                interrupt_pin=device.interrupt_pin,
                protocols=["vfio-user"],
            )
        listing[name] = entry
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for name, entry in listing.items():
        print(f"{name}: {entry['description']}")
        print(f"  subcommands: {' '.join(entry['subcommands'])}")  # type: ignore[arg-type]
        if "features" in entry:
            print(
                f"  virtio device id {entry['virtio_device_id']}, features: "
                f"{' '.join(entry['features'])}"
            )  # type: ignore[arg-type]
        else:
            print(f"  PCI {entry['pci_id']}, {_interrupt_kinds(entry)}")
    return 0


def _interrupt_kinds(entry: dict[str, object]) -> str:
    """The interrupts a PCI plugin declares, as its config space offers them."""
    kinds = [
        f"{kind} vectors {entry[key]}"
        for kind, key in (("MSI", "msi_vectors"), ("MSI-X", "msix_vectors"))
        if entry[key]
    ]
    return ", ".join(kinds) or ("INTx only" if entry["interrupt_pin"] else "no interrupts")


def _add_common(parser: argparse.ArgumentParser, *, capabilities: bool) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this UNIX socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="serve an inherited socket (listening or connected)"
    )
    if capabilities:
        parser.add_argument(
            "--print-capabilities",
            action="store_true",
            help="print the back end's capabilities as JSON and exit",
        )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["trace", "debug", "info", "warning", "error"],
        help="'trace' logs every guest request",
    )
    parser.add_argument(
        "--sandbox",
        default="strict",
        choices=jail.MODES,
        help="strict: namespaces, no capabilities and a seccomp allowlist (default); "
        "namespace: the same without seccomp; none: no jail at all",
    )
    parser.add_argument(
        "--fdstore",
        action="store_true",
        help="on SIGTERM, keep the live session in systemd's fd store (FDSTORE=1) so the "
        "next start of the service carries on with it: a restart the VMM never notices "
        "(the unit needs FileDescriptorStoreMax=)",
    )
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="take the live session over from the daemon running with the same arguments "
        "(through its control socket), then serve: an upgrade the VMM feels as a pause of a "
        "few milliseconds (the unit's ExecReload=); exits 0 once it serves, 1 if it did not "
        "take over (the running daemon then serves on)",
    )
    control = parser.add_mutually_exclusive_group()
    control.add_argument(
        "--control-socket",
        metavar="PATH",
        help="the control socket for vfiouserd stats/top/trace/inject (default: beside the "
        "VMM socket, PATH.sock -> PATH.control.sock, or control.sock in systemd's "
        "RUNTIME_DIRECTORY)",
    )
    control.add_argument("--no-control", action="store_true", help="open no control socket")
    parser.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="accept fault rules on the control socket (vfiouserd inject): for testing "
        "drivers, never in production",
    )
    parser.add_argument(
        "--seccomp",
        default="kill",
        choices=jail.SECCOMP_ACTIONS,
        help="what a system call outside the allowlist does (log and trap are for debugging)",
    )


def _add_virtio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-fast-path",
        action="store_true",
        help="serve every request in Python, not in the native fast path (to compare, to debug)",
    )


def _make_virtio(device: type[VirtioDevice], args: argparse.Namespace) -> VirtioDevice:
    made = device.from_args(args)
    made.use_fast_path = not args.no_fast_path
    return made


def _make_vhost_user(
    device: type[VirtioDevice], args: argparse.Namespace
) -> tuple[Device, VirtioDevice]:
    virtio = _make_virtio(device, args)
    return virtio, virtio


def _make_virtio_pci(
    device: type[VirtioDevice], args: argparse.Namespace
) -> tuple[Device, VirtioDevice]:
    from vfiouserd.virtio_pci import VirtioPciDevice  # vfio-user only; before the jail

    virtio = _make_virtio(device, args)
    return VirtioPciDevice(virtio, packed_ring=args.packed_ring), virtio


def _session_type(protocol: str) -> type[VhostUserBackend] | type[VfioUserSession]:
    """The session class of ``protocol``: only that protocol's modules are
    imported (before the jail, which has no file system to import from)."""
    if protocol == "vhost-user":
        from vfiouserd.vhost_user.backend import VhostUserBackend

        return VhostUserBackend
    from vfiouserd.vfio_user.session import VfioUserSession

    return VfioUserSession


def _print_capabilities(device: type[VirtioDevice]) -> int:
    print(json.dumps({"type": device.vhost_user_type, "features": device.capabilities()}))
    return 0


def _run(args: argparse.Namespace, protocol: str, make_device: MakeDevice) -> int:
    if args.upgrade:
        if args.fd is not None:
            print("error: --upgrade takes over a listening socket, not --fd", file=sys.stderr)
            return 2
        # The reload command waits there for the outcome and exits with it.
        successor = Successor(upgrade.detach())
        status = _serve(args, protocol, make_device, successor)
        successor.report("the new daemon exited" if status else "ok")
        return status
    return _serve(args, protocol, make_device, None)


class Successor:
    """This daemon's part in an upgrade in place (vfiouserd.upgrade)."""

    def __init__(self, result_fd: int) -> None:
        self.result_fd: int | None = result_fd
        self.predecessor: upgrade.Predecessor | None = None
        self.socket_activated = False
        self.took_over = False

    def fds(self) -> list[int]:
        kept = [] if self.result_fd is None else [self.result_fd]
        return kept + ([] if self.predecessor is None else [self.predecessor.sock.fileno()])

    def tell_predecessor(self) -> None:
        pid = self.predecessor.pid if self.predecessor is not None else None
        if self.result_fd is not None and type(pid) is int:
            upgrade.report_predecessor(self.result_fd, pid)

    def report(self, outcome: str) -> None:
        """The outcome for the reload command (once)."""
        if self.result_fd is not None:
            upgrade.report(self.result_fd, outcome)
            self.result_fd = None

    def refuse(self, reason: str) -> None:
        log.error("upgrade.refused", reason=reason)
        if self.predecessor is not None:
            self.predecessor.answer(reason)  # it takes its session back and serves on
            self.predecessor.close()
            self.predecessor = None
        self.report(reason)


def _serve(
    args: argparse.Namespace, protocol: str, make_device: MakeDevice, successor: Successor | None
) -> int:
    received, activated = handover.take(systemd.listen_fds())
    listener_fd = received.fds.pop(handover.LISTENER, None) if received is not None else None
    control_fd = received.fds.pop(handover.CONTROL, None) if received is not None else None
    if (
        args.socket_path is None
        and args.fd is None
        and not activated
        and listener_fd is None
        and successor is None
    ):
        print(
            "error: one of --socket-path or --fd is required (or socket activation)",
            file=sys.stderr,
        )
        return 2
    session_type = _session_type(protocol)
    logging.configure(args.log_level)
    started = _process_start()
    _timeline("imported", started)  # the interpreter, the plugin and protocol, the arguments
    if args.log_level == "trace":  # every trace event in the log
        tracer.subscribe(Subscription(_log_trace_event, Filter()))
    hold_stop_signals()
    jailed = args.sandbox != "none"
    if jailed:  # nothing but what the daemon is given on purpose goes into the jail
        kept = [p.fd for p in activated] + ([args.fd] if args.fd is not None else [])
        if received is not None:
            kept += received.fds.values()
        kept += [fd for fd in (listener_fd, control_fd) if fd is not None]
        kept += successor.fds() if successor is not None else []
        jail.close_inherited_fds(kept)
    device: Device | None = None
    virtio: VirtioDevice | None = None
    sock: socket.socket | None = None
    control_sock: socket.socket | None = None
    notify_fd = socket_file = control_file = None
    options = None
    restored = None
    try:
        notify_fd = systemd.notify_socket()
        if args.fdstore and notify_fd is None:
            raise ValueError("--fdstore needs systemd's NOTIFY_SOCKET (Type=notify)")
        device, virtio = make_device()  # opens the image or whatever the device needs
        _timeline("opened", started)
        if successor is not None:
            # Its sockets come from the running daemon, once jailed; their
            # files are the running daemon's, this one's from then on.
            control_path = control.socket_path(args.control_socket, args.socket_path)
            if control_path is None:
                raise ValueError("--upgrade: where is the running daemon? give --control-socket")
            successor.predecessor = upgrade.Predecessor.connect(control_path, device.name, protocol)
            successor.tell_predecessor()
            control_file = SocketFile.created_at(control_path)
            if args.socket_path is not None:
                socket_file = SocketFile.created_at(args.socket_path)
        else:
            if listener_fd is not None:
                sock = socket_from_fd(listener_fd)
                log.info("handover.listener", address=sock.getsockname() or f"fd {listener_fd}")
            else:
                sock = open_listening_socket(args, activated)
            if args.fdstore and not is_listening(sock):
                raise ValueError("--fdstore needs a listening socket, not a connected one")
            if args.socket_path is not None:
                socket_file = SocketFile.created_at(args.socket_path)
            if control_fd is not None:
                control_sock = socket_from_fd(control_fd)
            elif not args.no_control:
                control_path = control.socket_path(args.control_socket, sock.getsockname())
                if control_path is None:
                    log.warning("control.none", reason="no path: give --control-socket")
                else:
                    control_sock = control.listen(control_path)
                    control_file = SocketFile.created_at(control_path)
        faults.rules.allowed = args.allow_fault_injection
        # A virtio disk, or a PCI device with sectors of its own (NVMe).
        faults.rules.sector_kinds = getattr(virtio or device, "has_sectors", False)
        log.info(
            "startup", device=device.name, protocol=protocol, pid=os.getpid(), version=__version__
        )
        restored = _take_handover(received, protocol, device, virtio)
        if received is not None and notify_fd is not None:
            # Taken (before READY=1): what stayed in the store would come
            # back at the next start as well.
            store = systemd.FdStore(lambda m, fds: systemd.send_notification(notify_fd, m, fds))
            for name in received.names:
                store.remove(name)
        options = jail.JailOptions(
            mode=args.sandbox,
            seccomp=args.seccomp,
            device_syscalls=device.syscalls,
            directories=device.jail_directories,
            notify_fd=notify_fd,
            socket_files=[f for f in (socket_file, control_file) if f is not None],
            announce_ready=successor is None,
        )
        launched_pid = os.getpid()  # the process outside the jail, a unit's main process
        _imports_done()
        jail.enter(options)
        _timeline("jailed", started)
        if successor is not None:
            sock, control_sock, restored = _take_over(
                successor, launched_pid, protocol, device, virtio
            )
    except (jail.JailError, OSError, ValueError, upgrade.UpgradeError) as exc:
        event = "sandbox.failed" if isinstance(exc, jail.JailError) else "startup.failed"
        log.error(event, error=str(exc))
        if successor is not None:
            successor.refuse(str(exc))
        for opened in (sock, control_sock):
            if opened is not None:
                opened.close()
        taken_over = listener_fd is not None or successor is not None
        if socket_file is not None and not taken_over:  # through the directory
            socket_file.remove()
        if control_file is not None and successor is None:
            control_file.remove()
        if notify_fd is not None:
            os.close(notify_fd)
        if received is not None:
            received.close_unused()
        if device is not None:
            device.close()
        return 1
    assert sock is not None

    def new_session(conn: trio.socket.SocketType) -> LiveSession:
        return session_type(device, conn)  # the device _add_device made for this protocol

    socket_activated = bool(activated) or (successor is not None and successor.socket_activated)
    service = Service(
        sock,
        protocol,
        new_session,
        lambda: state.save(device),
        store=options.store if args.fdstore else None,
        store_listener=not socket_activated,
        host_fds=dict if virtio is None else virtio.host_fds,
        control=control_sock,
    )
    service.notify = options.store.notify if options.store is not None else None

    def take_back(record: bytes, fds: dict[str, int]) -> LiveSession | None:
        """The session a successor refused, set up again here."""
        received = handover.Received(None, fds, sorted(fds))
        try:
            received.handover = handover.Handover.decode(record)
            document, _ = _load_handover(received, protocol, device, virtio, adopt=False)
            session = _set_up_session(session_type, device, document, received)
        except (handover.HandoverError, state.StateError) as exc:
            log.error("upgrade.take_back_failed", reason=str(exc))
            received.close_unused()
            return None
        log.info("upgrade.taken_back", protocol=protocol)
        return session

    service.take_back = take_back
    control_server = None
    if control_sock is not None:
        info = {
            "version": __version__,
            "device": device.name,
            "transport": protocol,
            "pid": launched_pid,
            "socket": sock.getsockname() or None,
            "fault_injection": args.allow_fault_injection,
        }

        def device_statistics() -> dict[str, Any]:
            own = (virtio or device).statistics()
            return {"name": device.name, **own}

        control_server = control.ControlServer(control_sock, info, device_statistics)
        control_server.enable_upgrade(service.upgrade)

    async def main() -> None:
        session = None
        if restored is not None:
            if successor is not None:
                try:
                    session = _set_up_session(session_type, device, *restored)
                except handover.HandoverError as exc:
                    successor.refuse(str(exc))
                    return
                _taken_over(successor, options)
            else:
                session = _restore_session(protocol, session_type, device, *restored)
        elif successor is not None:
            _taken_over(successor, options)
        async with trio.open_nursery() as nursery:
            if control_server is not None:
                nursery.start_soon(control_server.run)
            if successor is not None and session is not None and virtio is not None:
                nursery.start_soon(_reload_once_serving, service, session, virtio)
            _timeline("serving", started)
            await service.run(session)
            nursery.cancel_scope.cancel()

    reload = None if virtio is None else virtio.reload
    try:
        trio.run(run_until_signalled, main, reload, service.hand_over)
    finally:
        sock.close()
        if control_sock is not None:
            control_sock.close()
        ours = successor is None or successor.took_over  # else the running daemon's
        for created in (socket_file, control_file):
            if created is not None and not jailed:  # jailed: the parent's
                if not service.handed_over and ours:  # the next daemon listens on it
                    created.remove()
                created.close()
        device.close()
        log.info("exit", handed_over=service.handed_over)
    if successor is not None and not successor.took_over:
        return 1  # the running daemon serves on
    return 0


def _take_over(
    successor: Successor, main_pid: int, protocol: str, device: Device, virtio: VirtioDevice | None
) -> tuple[socket.socket, socket.socket | None, tuple[dict[str, Any], handover.Received] | None]:
    """In the jail: the running daemon's sockets and session, its device
    state loaded (the session is set up in the event loop)."""
    assert successor.predecessor is not None
    handed = successor.predecessor.take(main_pid)
    successor.socket_activated = handed.socket_activated
    received, others = handover.take(handed.fds)
    for other in others:
        os.close(other.fd)
    if received is None:
        raise upgrade.UpgradeError("the running daemon sent nothing of its own")
    try:
        listener = received.fds.pop(handover.LISTENER, None)
        control_fd = received.fds.pop(handover.CONTROL, None)
        if listener is None:
            raise upgrade.UpgradeError("the running daemon sent no listening socket")
        sock = socket_from_fd(listener, inherited=False)  # MSG_CMSG_CLOEXEC
        control_sock = socket_from_fd(control_fd, False) if control_fd is not None else None
        restored = None
        if handover.STATE in received.names:
            if received.handover is None:
                raise upgrade.UpgradeError(
                    "its session state cannot be read (see handover.refused)"
                )
            restored = _load_handover(received, protocol, device, virtio, adopt=True)
    except (handover.HandoverError, state.StateError) as exc:
        received.close_unused()
        raise upgrade.UpgradeError(f"cannot take its session: {exc}") from exc
    except BaseException:
        received.close_unused()
        raise
    return sock, control_sock, restored


async def _reload_once_serving(
    service: Service, session: LiveSession, virtio: VirtioDevice
) -> None:
    """What changed while the old daemon served (an image grown), as SIGHUP
    would: once the taken-over session serves, so that it hears of it."""
    with trio.move_on_after(10):
        while service.session is not session:
            await trio.sleep(0.001)
        virtio.reload()


def _taken_over(successor: Successor, options: jail.JailOptions) -> None:
    """The session is this daemon's: the running one lets go of it and
    names this one's waiter the service's main process; the socket files
    are this daemon's from now on (its waiter's to remove at the end)."""
    assert successor.predecessor is not None
    successor.predecessor.answer(None)
    successor.predecessor.close()
    successor.predecessor = None
    successor.took_over = True
    options.ready()
    log.info("upgrade.taken_over")
    successor.report("ok")


def _process_start() -> float:
    """When this process started, on the time.monotonic() clock: the kernel
    keeps it in clock ticks (10 ms) since boot; suspend aside, the boot-time
    and monotonic clocks advance together."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rpartition(")")[2].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return now
    return now - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


def _imports_done() -> None:
    """Nothing is imported in the jail: the code caches have done their part."""
    modules = module_code.finish()
    if modules is not None:
        log.debug("startup.module_code", used=modules[0], stale=modules[1])
    result = generated_code.finish()
    if result is not None:
        hits, misses, saved = result
        log.debug("startup.generated_code", hits=hits, misses=misses, saved=saved)


def _timeline(stage: str, started: float) -> None:
    """A start-up step done, in ms since the process started: where a slow
    start-up spends its time (--log-level=debug)."""
    log.debug("startup.timeline", stage=stage, ms=round((time.monotonic() - started) * 1000))


def _log_trace_event(event: dict[str, Any]) -> None:
    fields = {k: v for k, v in event.items() if k not in ("kind", "event", "time")}
    log.trace(f"{event['kind']}.{event['event']}", **fields)


def _take_handover(
    received: handover.Received | None, protocol: str, device: Device, virtio: VirtioDevice | None
) -> tuple[dict[str, Any], handover.Received] | None:
    """Check what a previous daemon handed over and load its device state;
    None (the VMM's connection closed) if it cannot be taken back."""
    if received is None or received.handover is None:
        return None
    try:
        return _load_handover(received, protocol, device, virtio, adopt=True)
    except (handover.HandoverError, state.StateError) as exc:
        log.error("handover.refused", reason=str(exc))
        received.close_unused()  # the VMM sees the connection close, and may reconnect
        return None


def _load_handover(
    received: handover.Received,
    protocol: str,
    device: Device,
    virtio: VirtioDevice | None,
    adopt: bool,
) -> tuple[dict[str, Any], handover.Received]:
    """The device state of a handed-over session loaded; its host fds
    adopted by the device (``adopt``), or closed: a daemon taking its own
    session back still holds them."""
    record = received.handover
    if record is None:
        raise handover.HandoverError("no session state came")
    if record.protocol != protocol:
        raise handover.HandoverError(f"a {record.protocol} session, this is {protocol}")
    state.load(device, record.device_blob)
    fds = {name: received.fd(stored) for name, stored in record.host_fds.items()}
    opened = {name: fd for name, fd in fds.items() if fd is not None}
    if virtio is not None and adopt:
        virtio.adopt_host_fds(opened)
    else:
        for fd in opened.values():
            os.close(fd)
    return record.session, received


def _restore_session(
    protocol: str,
    session_type: type[VhostUserBackend] | type[VfioUserSession],
    device: Device,
    document: dict[str, Any],
    received: handover.Received,
) -> LiveSession | None:
    try:
        session = _set_up_session(session_type, device, document, received)
    except handover.HandoverError as exc:
        log.error("handover.refused", reason=str(exc))
        return None
    log.info("handover.restored", protocol=protocol)
    return session


def _set_up_session(
    session_type: type[VhostUserBackend] | type[VfioUserSession],
    device: Device,
    document: dict[str, Any],
    received: handover.Received,
) -> LiveSession:
    try:
        session: LiveSession = session_type.restore(device, document, received)
    finally:
        received.close_unused()
    return session


def open_listening_socket(args: argparse.Namespace, activated: list[PassedFd]) -> socket.socket:
    if args.fd is not None:
        return socket_from_fd(args.fd)
    if args.socket_path is not None:
        return listen_on_path(args.socket_path)
    if not activated:
        raise ValueError("socket activation passed no socket")
    for extra in activated[1:]:
        log.warning("socket_activation.extra_fd", fd=extra.fd, name=extra.name, action="closed")
        os.close(extra.fd)
    return socket_from_fd(activated[0].fd)


def _systemd_run(args: argparse.Namespace) -> int:
    daemon_args = args.daemon_args
    if not daemon_args:
        print("error: give the subcommand after --, e.g. -- vhost-user-rng ...", file=sys.stderr)
        return 2
    executable = os.path.realpath(sys.executable)
    if executable.startswith(systemd.HIDDEN_BY_PROTECT_HOME):
        print(
            f"warning: {executable} is under a directory ProtectHome= hides from the unit; "
            "install vfiouserd system-wide (for example under /usr/local or /opt)",
            file=sys.stderr,
        )
    try:
        daemon = [sys.executable, "-m", "vfiouserd", *daemon_args]
        command = systemd.transient_command(args.instance, daemon, systemd.template_unit())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        import shlex

        print(shlex.join(command))
        return 0
    os.execvp(command[0], command)


def _probe(args: argparse.Namespace) -> int:
    from vfiouserd.client.probe import probe  # the client is not needed to serve

    logging.configure("warning")
    return trio.run(probe, args.socket, args.json)


def _descriptors(args: argparse.Namespace) -> int:
    from pathlib import Path  # not for a daemon (see build_parser)

    plugins = device_plugins()
    if args.link_programs:
        bin_dir = Path(args.bin_dir)
        target = bin_dir / "vfiouserd"
        if not target.exists():
            print(f"vfiouserd: no {target} to link to", file=sys.stderr)
            return 1
        for link in descriptors.link_programs(plugins, bin_dir, target):
            print(f"linked {link} -> {target}", file=sys.stderr)
    if args.output is not None:
        for path in descriptors.write(plugins, args.bin_dir, args.output):
            print(f"wrote {path}", file=sys.stderr)
    elif not args.link_programs:
        documents = descriptors.descriptors(plugins, args.bin_dir)
        print(json.dumps({name: json.loads(text) for name, text in documents.items()}, indent=2))
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, as wide as the terminal, measured without shutil: argparse
    makes a formatter for every option added, and shutil would load bz2 and
    lzma into every daemon."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:  # as shutil.get_terminal_size() finds it
            try:
                columns = int(os.environ.get("COLUMNS", "0"))
            except ValueError:
                columns = 0
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    columns = 0
            width = (columns or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """Every parser of the program, its subcommands' too, with that formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _path(text: str) -> Path:
    from pathlib import Path  # not for a daemon (see build_parser)

    return Path(text)


def build_parser(only: tuple[str, DeviceClass] | None = None) -> argparse.ArgumentParser:
    """Every subcommand; with ``only`` (the plugin a daemon serves, by name),
    that plugin's alone: the daemon imports no other plugin and no client."""
    parser = _Parser(
        prog="vfiouserd",
        description="Out-of-process device emulation over vhost-user and vfio-user.",
    )
    parser.add_argument("--version", action="version", version=f"vfiouserd {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    if only is not None:
        _add_device(commands, *only)
        return parser
    listing = commands.add_parser("devices", help="list device plugins and their features")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list_devices)
    described = commands.add_parser(
        "descriptors",
        help="vhost-user back-end descriptors (JSON) and program names for the device plugins",
        description="Prints, or writes into --output, a QEMU vhost-user descriptor for every "
        "virtio device plugin; install them in /usr/share/qemu/vhost-user/ or "
        "/etc/qemu/vhost-user/. Each names the program vfiouserd-vhost-user-DEVICE in "
        "--bin-dir, which --link-programs creates there (links to vfiouserd).",
    )
    described.add_argument(
        "--bin-dir",
        default=os.path.dirname(os.path.abspath(sys.argv[0])),
        help="where the programs are (default: this program's directory)",
    )
    described.add_argument("--output", type=_path, help="write one file per device here")
    described.add_argument(
        "--link-programs", action="store_true", help="make the program links in --bin-dir"
    )
    described.set_defaults(run=_descriptors)
    probe = commands.add_parser(
        "probe", help="connect to a vfio-user server and describe its device like lspci -vv"
    )
    probe.add_argument("socket", help="the server's UNIX socket")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(run=_probe)
    from vfiouserd.client import lab

    lab.add_commands(commands)
    transient = commands.add_parser(
        "systemd-run",
        usage="vfiouserd systemd-run [--dry-run] INSTANCE -- COMMAND [ARGS...]",
        help="start a device in a transient systemd unit confined like vfiouserd@.service",
        description="Runs systemd-run with every [Service] setting of the packaged "
        "vfiouserd@.service except its command line, then the given subcommand, e.g. "
        "vfiouserd systemd-run disk0 -- vhost-user-blk --socket-path "
        "/run/vfiouserd/disk0/vhost-user.sock --blk-file /var/lib/vfiouserd/disk0.img",
    )
    transient.add_argument("instance", help="unit vfiouserd-INSTANCE; %%i in the settings")
    transient.add_argument("--dry-run", action="store_true", help="print the command only")
    # The daemon's own arguments follow "--"; main() splits them off first.
    transient.set_defaults(run=_systemd_run, daemon_args=[])
    for name, device in device_plugins().items():
        _add_device(commands, name, device)
    return parser


def _add_device(commands: Any, name: str, device: DeviceClass) -> None:
    """The subcommands serving one plugin."""
    if issubclass(device, VirtioDevice):
        sub = commands.add_parser(
            f"vhost-user-{name}", help=f"vhost-user back end: {device.description}"
        )
        _add_common(sub, capabilities=True)
        _add_virtio(sub)
        device.add_arguments(sub)
        sub.set_defaults(
            run=lambda args, d=device: _run(args, "vhost-user", lambda: _make_vhost_user(d, args))
        )
        sub = commands.add_parser(
            f"vfio-user-{name}", help=f"vfio-user virtio-pci device: {device.description}"
        )
        _add_common(sub, capabilities=False)
        _add_virtio(sub)
        sub.add_argument(
            "--packed-ring",
            action="store_true",
            help="offer VIRTIO_F_RING_PACKED (off by default, as in QEMU's virtio-pci "
            "devices: the native fast path serves split rings only)",
        )
        device.add_arguments(sub)
        sub.set_defaults(
            run=lambda args, d=device: _run(args, "vfio-user", lambda: _make_virtio_pci(d, args))
        )
    else:
        sub = commands.add_parser(
            f"vfio-user-{name}", help=f"vfio-user PCI device: {device.description}"
        )
        _add_common(sub, capabilities=False)
        device.add_arguments(sub)
        sub.set_defaults(
            run=lambda args, d=device: _run(args, "vfio-user", lambda: (d.from_args(args), None))
        )


def _served_plugin(argv: Sequence[str]) -> tuple[str, DeviceClass] | None:
    """The plugin a daemon's subcommand (vhost-user-NAME, vfio-user-NAME)
    serves, if that protocol can serve it; else None (the full parser then
    says what there is)."""
    command = argv[0] if argv else ""
    for prefix, virtio_only in (("vhost-user-", True), ("vfio-user-", False)):
        if command.startswith(prefix):
            name = command.removeprefix(prefix)
            device = device_plugin(name)
            if device is None or (virtio_only and not issubclass(device, VirtioDevice)):
                return None
            return name, device
    return None


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        # Run as vfiouserd-vhost-user-DEVICE (a vhost-user descriptor's
        # program, which gets no subcommand): that subcommand.
        implied = descriptors.subcommand_of_program(sys.argv[0])
        argv = [implied, *sys.argv[1:]] if implied else sys.argv[1:]
    argv = list(argv)
    # The conventions say --print-capabilities ignores every other argument.
    if "--print-capabilities" in argv and argv and argv[0].startswith("vhost-user-"):
        device = device_plugin(argv[0].removeprefix("vhost-user-"))
        if device is not None and issubclass(device, VirtioDevice):
            return _print_capabilities(device)
    if argv and (argv[0] == "--config" or argv[0].startswith("--config=")):
        from vfiouserd.config import ConfigError, arguments_from_file

        path = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "")
        rest = argv[1:] if "=" in argv[0] else argv[2:]
        try:
            argv = arguments_from_file(path) + rest  # later arguments win
        except ConfigError as exc:
            print(f"vfiouserd: {exc}", file=sys.stderr)
            return 2
    daemon_args: list[str] = []
    if argv[:1] == ["systemd-run"] and "--" in argv:
        split = argv.index("--")
        argv, daemon_args = argv[:split], argv[split + 1 :]
    args = build_parser(_served_plugin(argv)).parse_args(argv)
    if daemon_args:
        args.daemon_args = daemon_args
    return int(args.run(args))
