from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vfiouserd import log
from vfiouserd.client.blk import BlkClient, RngClient
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.vhost_user import VhostUserFrontend
from vfiouserd.devices.blk import VirtioBlk, open_image
from vfiouserd.devices.rng import VirtioRng
from vfiouserd.devices.virtio import Feature, VirtioDevice, bit
from vfiouserd.vhost_user.backend import VhostUserBackend

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # guest/: the test guest and the QEMU the project builds

# Two regions with a hole between them, and user addresses that differ from
# guest-physical ones, so address-space mix-ups show.
DEFAULT_LAYOUT = [(0x0, 32 * MiB), (0x1_0000_0000, 16 * MiB)]


def pytest_configure(config: pytest.Config) -> None:
    log.configure(os.environ.get("VFIOUSERD_TEST_LOG", "warning"))


# Events that only a bug of ours logs: an unexpected exception that ended a
# session, broke a queue or failed a device. Any test that sees one fails
# unless it is marked crash_expected (a test of the containment itself).
CRASH_EVENTS = ("session.crashed", "ring.crashed", "device.failed")


class _CrashRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() in CRASH_EVENTS:
            self.lines.append(log.LogfmtFormatter().format(record))


@pytest.fixture(autouse=True)
def no_crash_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    recorder = _CrashRecorder()
    logger = logging.getLogger("vfiouserd")
    logger.addHandler(recorder)
    try:
        yield
    finally:
        logger.removeHandler(recorder)
    if recorder.lines and request.node.get_closest_marker("crash_expected") is None:
        pytest.fail("a bug was logged:\n" + "\n".join(recorder.lines), pytrace=False)


def open_fds() -> set[int]:
    # Garbage of earlier tests (a socket in a reference cycle) closes its fd
    # whenever the collector runs: collected first, a comparison of two sets
    # sees what the code under test opened and closed, nothing else (a CI
    # run saw an earlier test's fd close during a fuzzed vfio-user session).
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(scope="session")
def qemu_new() -> str:
    """The QEMU >= 10.1 the project builds from Debian's source package (it has
    vfio-user-pci); built on first use, then cached outside the clone."""
    from guest import qemu_build

    return str(qemu_build.ensure())


@pytest.fixture(params=["7.2", "new"], ids=["qemu-7.2", "qemu-new"])
def vhost_user_qemu(request) -> str:
    """Each vhost-user front end the project tests: Debian's QEMU 7.2 and the
    project-built QEMU >= 10.1."""
    from guest import vm

    return vm.QEMU if request.param == "7.2" else request.getfixturevalue("qemu_new")


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    guest = GuestRam(DEFAULT_LAYOUT)
    yield guest
    guest.close()


@pytest.fixture
def image(tmp_path) -> str:
    return str(tmp_path / "disk.img")


def make_blk(path: str, size: int = 16 * MiB, **kwargs: object) -> VirtioBlk:
    read_only = bool(kwargs.get("read_only", False))
    if read_only and not os.path.exists(path):
        os.close(open_image(path, size, False))
    return VirtioBlk(open_image(path, size, read_only), **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def served(device: VirtioDevice) -> AsyncIterator[VhostUserFrontend]:
    """An in-process back end on one end of a socketpair, a front end on the other."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        backend = VhostUserBackend(device, theirs)
        nursery.start_soon(backend.serve)
        frontend = VhostUserFrontend(ours)
        try:
            yield frontend
        finally:
            await frontend.aclose()
    theirs.close()


@dataclass
class Setup:
    frontend: VhostUserFrontend
    queues: list


async def start_device(
    frontend: VhostUserFrontend,
    ram: GuestRam,
    *,
    client: type = BlkClient,
    queues: int = 1,
    size: int = 64,
    packed: bool = False,
    event_idx: bool = True,
    indirect: bool = True,
    ring_region: int = 0,
    inflight: bool = False,
) -> list:
    """Negotiate like QEMU and start ``queues`` rings; returns request clients.
    With ``inflight`` the rings are tracked in an inflight region, as QEMU's
    vhost-user-blk does."""
    drop = 0
    if not packed:
        drop |= bit(Feature.RING_PACKED)
    if not event_idx:
        drop |= bit(Feature.RING_EVENT_IDX)
    if not indirect:
        drop |= bit(Feature.RING_INDIRECT_DESC)
    await frontend.negotiate(want_features=~drop)
    await frontend.set_features()
    if inflight:
        region = await frontend.get_inflight(queues, size)
        await frontend.set_inflight(region)
        region.close()
    await frontend.share_memory(ram)
    clients = []
    for index in range(queues):
        ring = frontend.make_ring(ram, size, region=ring_region)
        handle = await frontend.start_queue(index, ring)
        clients.append(client(ram, handle, arena=2 * MiB))
    return clients


__all__ = [
    "MiB",
    "RngClient",
    "Setup",
    "VirtioRng",
    "make_blk",
    "open_fds",
    "served",
    "start_device",
]


@asynccontextmanager
async def vfio_served(device, *, ram=None, **client_options) -> AsyncIterator:
    """An in-process vfio-user session and a connected client."""
    from vfiouserd.client.vfio_user import VfioUserClient
    from vfiouserd.vfio_user.session import VfioUserSession

    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        session = VfioUserSession(device, theirs)
        nursery.start_soon(session.serve)
        async with VfioUserClient.over(ours, ram=ram, **client_options) as client:
            client.session = session
            yield client
