"""The README's "Writing a device" tutorial, run as written: its device module
is taken from the README, installed as a plugin (one module, one entry
point) and served over both protocols."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from daemon import Daemon

from conftest import MiB, RngClient, served, start_device, vfio_served
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.client.virtio_pci import VirtioPciDriver
from vfiouserd.device_harness import DeviceHarness
from vfiouserd.virtio_pci import VirtioPciDevice

README = Path(__file__).resolve().parent.parent / "README.md"
TUTORIAL = re.compile(r"<!-- tutorial-device -->\n```python\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """The tutorial's module and a dist-info declaring its entry point, as
    ``pip install`` of a package holding it would leave them."""
    source = TUTORIAL.search(README.read_text())
    assert source is not None, "the README lost its tutorial device"
    directory = tmp_path_factory.mktemp("plugin")
    (directory / "seeded_rng.py").write_text(source.group(1))
    info = directory / "seeded_rng_tutorial-1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: seeded-rng-tutorial\nVersion: 1\n")
    (info / "entry_points.txt").write_text(
        "[vfiouserd.devices]\nseeded-rng = seeded_rng:SeededRng\n"
    )
    return directory


@pytest.fixture(scope="module")
def tutorial(plugin_dir) -> ModuleType:
    spec = importlib.util.spec_from_file_location("seeded_rng", plugin_dir / "seeded_rng.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_stream(seed: bytes, blocks: range) -> bytes:
    return b"".join(hashlib.blake2b(n.to_bytes(8, "little"), key=seed).digest() for n in blocks)


def test_the_stream_is_the_seeds_and_goes_on_after_a_migration(tutorial):
    harness = DeviceHarness(tutorial.SeededRng(b"seed"))
    assert harness.request(0, writable=[128]).data == expected_stream(b"seed", range(2))
    moved = harness.migrate(lambda: tutorial.SeededRng(b"seed"))
    assert moved.request(0, writable=[64]).data == expected_stream(b"seed", range(2, 3))
    other = DeviceHarness(tutorial.SeededRng(b"other"))
    assert other.request(0, writable=[64]).data != expected_stream(b"seed", range(1))


def test_a_request_is_bounded(tutorial):
    done = DeviceHarness(tutorial.SeededRng()).request(0, writable=[200_000])
    assert done.written == tutorial.MAX_BYTES


async def test_served_over_vhost_user(tutorial):
    ram = GuestRam([(0, 8 * MiB)])
    try:
        async with served(tutorial.SeededRng(b"vhost")) as frontend:
            (rng,) = await start_device(frontend, ram, client=RngClient)
            assert await rng.read(100) == expected_stream(b"vhost", range(2))[:100]
    finally:
        ram.close()


async def test_served_over_vfio_user(tutorial):
    ram = GuestRam([(0, 8 * MiB)])
    try:
        device = VirtioPciDevice(tutorial.SeededRng(b"pci"))
        async with vfio_served(device, ram=ram) as client:
            await client.map_ram()
            driver = VirtioPciDriver(client, ram)
            (queue,) = await driver.start(queue_count=1, queue_size=16)
            rng = RngClient(ram, queue, arena=MiB)
            assert await rng.read(64) == expected_stream(b"pci", range(1))
            driver.close()
    finally:
        ram.close()


def test_one_module_and_one_entry_point_make_the_subcommands(plugin_dir, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(plugin_dir)}
    vfiouserd = [sys.executable, "-m", "vfiouserd"]

    def run(*arguments: str) -> str:
        done = subprocess.run(
            [*vfiouserd, *arguments],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout

    listing = json.loads(run("devices", "--json"))["seeded-rng"]
    assert listing["subcommands"] == ["vhost-user-seeded-rng", "vfio-user-seeded-rng"]
    assert "--seed" in run("vhost-user-seeded-rng", "--help")
    assert "--seed" in run("vfio-user-seeded-rng", "--help")
    assert json.loads(run("vhost-user-seeded-rng", "--print-capabilities"))["type"] == "rng"
    descriptors = json.loads(run("descriptors", "--bin-dir", "/usr/local/bin"))
    assert descriptors["50-vfiouserd-seeded-rng.json"]["binary"] == (
        "/usr/local/bin/vfiouserd-vhost-user-seeded-rng"
    )


async def test_served_by_a_jailed_daemon(plugin_dir, tmp_path):
    """Installed as a plugin and run as a real, jailed daemon: the jail's
    allowlist is enough for it (it declares no system calls)."""
    daemon = Daemon(
        "vhost-user-seeded-rng",
        "--seed",
        "jailed",
        workdir=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(plugin_dir), *sys.path])},
    )
    daemon.start()
    ram = GuestRam([(0, 8 * MiB)])
    try:
        frontend = await VhostUserFrontend.connect(daemon.socket_path)
        try:
            (rng,) = await start_device(frontend, ram, client=RngClient)
            assert await rng.read(64) == expected_stream(b"jailed", range(1))
        finally:
            await frontend.aclose()
    finally:
        ram.close()
        assert daemon.stop() == 0
