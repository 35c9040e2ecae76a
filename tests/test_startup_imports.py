"""What a daemon imports before it serves: only its device and its protocol.

Every module costs each device process start-up time and memory (one process
per device), so the daemon must not load the clients, the other protocol,
the other device plugins or heavy standard modules it never uses. Not timed:
the modules themselves are checked, in a process started like the daemon and
stopped where it would enter the jail (after which it can import nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vfiouserd import plugins

# The daemon up to jail.enter: then the modules it holds, and out.
PROBE = """
import json, os, sys
from vfiouserd.cli import main
from vfiouserd.sandbox import jail

def enter(options):
    sys.stdout.write(json.dumps(sorted(sys.modules)))
    sys.stdout.flush()
    os._exit(0)

jail.enter = enter
sys.exit(main(sys.argv[1:]))
"""

# Never needed to serve, whatever the device: the clients, and standard
# modules only a configuration file or a tool reads (importlib.metadata and
# the email package it loads: plugins.entry_points reads entry points itself).
NEVER = (
    "vfiouserd.client",
    "vfiouserd.config",
    "tomllib",
    "shlex",
    "importlib.metadata",
    "importlib.resources",
    "email",
)
VHOST_USER = ("vfiouserd.vhost_user", "vfiouserd.protocol.vhost_user")
VFIO_USER = ("vfiouserd.vfio_user", "vfiouserd.protocol.vfio_user", "vfiouserd.devices.pci")
PLUGINS = ("blk", "rng", "input", "console", "vsock", "net", "example", "nvme")


def modules_before_the_jail(tmp_path, subcommand: str, *options: str) -> set[str]:
    command = [sys.executable, "-c", PROBE, subcommand, "--socket-path", str(tmp_path / "s")]
    done = subprocess.run(
        [*command, "--no-control", *options], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def other_plugins(*served: str) -> tuple[str, ...]:
    return tuple(f"vfiouserd.devices.{name}" for name in PLUGINS if name not in served)


@pytest.mark.parametrize(
    ("subcommand", "options", "needed", "not_needed"),
    [
        (
            "vhost-user-blk",
            ("--size", "1M"),
            ("vfiouserd.devices.blk", "vfiouserd.vhost_user.backend"),
            (*VFIO_USER, "vfiouserd.virtio_pci", *other_plugins("blk")),
        ),
        (
            "vhost-user-rng",
            (),
            ("vfiouserd.devices.rng", "vfiouserd.vhost_user.backend"),
            (*VFIO_USER, "vfiouserd.virtio_pci", *other_plugins("rng")),
        ),
        (
            "vfio-user-blk",
            ("--size", "1M"),
            ("vfiouserd.devices.blk", "vfiouserd.vfio_user.session", "vfiouserd.virtio_pci"),
            (*VHOST_USER, *other_plugins("blk")),
        ),
        (
            # NVMe reuses the disk's image handling (devices.blk), no rings.
            "vfio-user-nvme",
            ("--namespace", "{tmp}/disk.img", "--size", "1M"),
            ("vfiouserd.devices.nvme.controller", "vfiouserd.vfio_user.session"),
            (
                *VHOST_USER,
                "vfiouserd.virtio_pci",
                "vfiouserd.virtqueue",
                *other_plugins("nvme", "blk"),
            ),
        ),
    ],
)
def test_a_daemon_imports_only_its_device_and_protocol(
    tmp_path, subcommand, options, needed, not_needed
):
    options = [option.format(tmp=tmp_path) for option in options]
    modules = modules_before_the_jail(tmp_path, subcommand, *options)
    assert loaded(modules, needed) == sorted(needed)  # the probe stopped where it should
    assert loaded(modules, NEVER + not_needed) == []


def test_plugins_are_the_entry_points_importlib_metadata_finds(tmp_path, monkeypatch):
    # A distribution shadowing the installed vfiouserd (the first on the path
    # wins, whatever the spelling of its name) and a third-party plugin.
    shadow = tmp_path / "first" / "VFIOUSERD-9.0.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: VFIOUSERD\nVersion: 9.0\n")
    (shadow / "entry_points.txt").write_text("[vfiouserd.devices]\nblk = elsewhere:Blk\n")
    third = tmp_path / "last" / "third_party-1.0.dist-info"
    third.mkdir(parents=True)
    (third / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party\nVersion: 1.0\n")
    (third / "entry_points.txt").write_text(
        "[console_scripts]\nx = a:b\n\n# a comment\n[vfiouserd.devices]\n"
        "mine = third.party:Device [extra]\n  spaced=third.party : Other\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "first"))
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path / "last")])
    expected = [(e.name, e.value) for e in entry_points(group=plugins.ENTRY_POINT_GROUP)]
    assert plugins.entry_points() == expected
    assert ("blk", "elsewhere:Blk") in expected
    assert ("mine", "third.party:Device [extra]") in expected
