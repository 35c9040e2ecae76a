"""The vhost-user JSON descriptors agree with the schema and the binaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_there_is_a_descriptor_per_device():
    assert {p.name for p in DESCRIPTORS} == {"50-vfiouserd-blk.json", "50-vfiouserd-rng.json"}


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
