"""The vhost-user JSON descriptors and program names: made from the plugin
registry, they agree with QEMU's schema and with the programs they name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vfiouserd import descriptors
from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.plugins import device_plugins

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
# VHostUserBackendType in QEMU's docs/interop/vhost-user.json
BACKEND_TYPES = {
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
}
DESCRIPTORS = sorted(SYSTEMD.glob("*.json"))


def test_the_shipped_descriptors_are_what_the_registry_makes():
    """One per virtio plugin, as `make descriptors` writes them."""
    made = descriptors.descriptors(device_plugins(), "/usr/local/bin")
    assert {"50-vfiouserd-blk.json", "50-vfiouserd-rng.json"} <= set(made)
    assert {p.name: p.read_text() for p in DESCRIPTORS} == made, "run make descriptors"


@pytest.mark.parametrize(
    ("program", "subcommand"),
    [
        ("/usr/local/bin/vfiouserd-vhost-user-blk", "vhost-user-blk"),
        ("vfiouserd-vfio-user-rng", "vfio-user-rng"),
        ("/usr/bin/vfiouserd", None),
        ("vfiouserd-", None),
        ("python3", None),
    ],
)
def test_a_program_name_implies_its_subcommand(program, subcommand):
    assert descriptors.subcommand_of_program(program) == subcommand


def test_linked_programs_serve_their_device(tmp_path):
    """`vfiouserd descriptors --link-programs` gives every virtio plugin its
    program (a link to vfiouserd), and the descriptor written beside names it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vfiouserd").symlink_to(Path(sys.executable).parent / "vfiouserd")
    subprocess.run(
        [
            str(bin_dir / "vfiouserd"),
            "descriptors",
            "--link-programs",
            "--output",
            str(tmp_path / "vhost-user"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name, plugin in device_plugins().items():
        program = bin_dir / descriptors.program_name(name)
        if not issubclass(plugin, VirtioDevice):  # a PCI device: vfio-user only
            assert not program.exists()
            continue
        written = json.loads(
            (tmp_path / "vhost-user" / descriptors.descriptor_file(name)).read_text()
        )
        assert written["binary"] == str(program)
        done = subprocess.run(
            [str(program), "--print-capabilities"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(done.stdout)["type"] == plugin.vhost_user_type == written["type"]


@pytest.mark.parametrize("path", DESCRIPTORS, ids=lambda p: p.name)
def test_descriptor_matches_schema_and_binary(path):
    descriptor = json.loads(path.read_text())
    assert set(descriptor) <= {"description", "type", "binary", "tags"}
    assert {"description", "type", "binary"} <= set(descriptor)
    assert descriptor["type"] in BACKEND_TYPES
    assert descriptor["binary"].startswith("/")
    assert all(isinstance(tag, str) for tag in descriptor.get("tags", []))
    # The installed entry point of that name reports the same type.
    script = Path(sys.executable).parent / Path(descriptor["binary"]).name
    done = subprocess.run(
        [str(script), "--print-capabilities"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(done.stdout)["type"] == descriptor["type"]
