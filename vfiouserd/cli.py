"""Command line: ``vfiouserd <subcommand>``.

Subcommands are generated from the installed device plugins:
``vhost-user-<device>`` serves a virtio device over vhost-user. Each follows
QEMU's back-end program conventions (--socket-path/--fd, --print-capabilities,
no daemonizing, prompt exit on SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

import trio

from vfiouserd import __version__
from vfiouserd import log as logging
from vfiouserd.devices.virtio import TRANSPORT_FEATURES, Feature, VirtioDevice
from vfiouserd.plugins import device_plugins
from vfiouserd.server import listen_on_path, run_until_signalled, serve, socket_from_fd
from vfiouserd.vhost_user.backend import VhostUserBackend

log = logging.get_logger("cli")


def _feature_list(device: type[VirtioDevice]) -> list[str]:
    names = [name for bit, name in sorted(device.feature_names.items())]
    names += [f.name for f in Feature if TRANSPORT_FEATURES & (1 << f)]
    return names


def _list_devices(args: argparse.Namespace) -> int:
    plugins = device_plugins()
    if args.json:
        print(
            json.dumps(
                {
                    name: {
                        "description": device.description,
                        "virtio_device_id": int(device.device_id),
                        "vhost_user_type": device.vhost_user_type,
                        "features": _feature_list(device),
                        "protocols": ["vhost-user"],
                    }
                    for name, device in plugins.items()
                },
                indent=2,
            )
        )
        return 0
    for name, device in plugins.items():
        print(f"{name}: {device.description}")
        print(
            f"  virtio device id {int(device.device_id)}, vhost-user type "
            f"{device.vhost_user_type!r}, up to {device.max_queues} queue(s)"
        )
        print(f"  subcommands: vhost-user-{name}")
        print(f"  features: {' '.join(_feature_list(device))}")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this UNIX socket")
    where.add_argument(
        "--fd", type=int, metavar="FDNUM", help="serve an inherited socket (listening or connected)"
    )
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


def _print_capabilities(device: type[VirtioDevice]) -> int:
    print(json.dumps({"type": device.vhost_user_type, "features": device.capabilities()}))
    return 0


def _serve_vhost_user(device_class: type[VirtioDevice], args: argparse.Namespace) -> int:
    if args.socket_path is None and args.fd is None:
        print("error: one of --socket-path or --fd is required", file=sys.stderr)
        return 2
    logging.configure(args.log_level)
    try:
        device = device_class.from_args(args)
        sock = socket_from_fd(args.fd) if args.fd is not None else listen_on_path(args.socket_path)
    except (OSError, ValueError) as exc:
        log.error("startup.failed", device=device_class.name, error=str(exc))
        return 1
    log.info(
        "startup",
        device=device_class.name,
        protocol="vhost-user",
        pid=os.getpid(),
        queues=device.num_queues,
        version=__version__,
    )

    async def session(conn: trio.socket.SocketType) -> None:
        await VhostUserBackend(device, conn).serve()

    try:
        trio.run(run_until_signalled, lambda: serve(sock, session), device.reload)
    finally:
        sock.close()
        if args.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.socket_path)
        device.close()
        log.info("exit")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiouserd",
        description="Out-of-process device emulation over vhost-user and vfio-user.",
    )
    parser.add_argument("--version", action="version", version=f"vfiouserd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("devices", help="list device plugins and their features")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list_devices)
    for name, device in device_plugins().items():
        sub = commands.add_parser(
            f"vhost-user-{name}", help=f"vhost-user back end: {device.description}"
        )
        _add_common(sub)
        device.add_arguments(sub)
        sub.set_defaults(
            run=lambda args, device=device: _serve_vhost_user(device, args), device=device
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The conventions say --print-capabilities ignores every other argument.
    if "--print-capabilities" in argv and argv and argv[0].startswith("vhost-user-"):
        plugins = device_plugins()
        device = plugins.get(argv[0].removeprefix("vhost-user-"))
        if device is not None:
            return _print_capabilities(device)
    args = parser.parse_args(argv)
    return int(args.run(args))


def vhost_user_blk_main() -> int:
    return main(["vhost-user-blk", *sys.argv[1:]])


def vhost_user_rng_main() -> int:
    return main(["vhost-user-rng", *sys.argv[1:]])
