"""The virtio device API: what a virtio device plugin implements.

A device declares its virtio device ID, feature bits, config space and number
of queues, and handles requests. A request is one descriptor chain, already
translated into ``memoryview`` slices of guest memory: the buffers the driver
filled (``readable``) and the buffers the device fills (``writable``). The
device never sees sockets, rings or addresses; the same object is served
over vhost-user and, through the virtio-pci transport, over vfio-user.
"""

from __future__ import annotations

import argparse
import enum
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import trio

from vfiouserd.log import get_logger
from vfiouserd.state import Schema


class DeviceId(enum.IntEnum):
    """Virtio device IDs (virtio 1.3, section 5 "Device Types")."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON_TRADITIONAL = 5
    IO_MEMORY = 6
    RPMSG = 7
    SCSI_HOST = 8
    NINE_P = 9  # 9P transport
    MAC80211_WLAN = 10
    RPROC_SERIAL = 11
    CAIF = 12
    BALLOON = 13
    GPU = 16
    CLOCK = 17  # timer/clock
    INPUT = 18
    SOCKET = 19  # vsock
    CRYPTO = 20
    SIGNAL_DISTRIBUTION = 21
    PSTORE = 22
    IOMMU = 23
    MEMORY = 24
    SOUND = 25
    FILE_SYSTEM = 26
    PMEM = 27
    RPMB = 28
    MAC80211_HWSIM = 29
    VIDEO_ENCODER = 30
    VIDEO_DECODER = 31
    SCMI = 32
    NITRO_SECURE_MODULE = 33
    I2C_ADAPTER = 34
    WATCHDOG = 35
    CAN = 36
    PARAMETER_SERVER = 38
    AUDIO_POLICY = 39
    BLUETOOTH = 40
    GPIO = 41
    RDMA = 42
    CAMERA = 43
    ISM = 44
    SPI_CONTROLLER = 45


class Feature(enum.IntEnum):
    """Device-independent feature bits (virtio 1.2, section 6)."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38


class Status(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


def bit(n: int) -> int:
    return 1 << n


# Ring features the shared virtqueue implementation provides to every device.
TRANSPORT_FEATURES = (
    bit(Feature.VERSION_1)
    | bit(Feature.RING_INDIRECT_DESC)
    | bit(Feature.RING_EVENT_IDX)
    | bit(Feature.RING_PACKED)
)


class ConfigWriteError(ValueError):
    """A config-space write touched a field the driver may not change."""


class Request:
    """One descriptor chain: device-readable buffers, then device-writable ones."""

    __slots__ = (
        "chain",
        "details",
        "dirty_ranges",
        "head",
        "inflight_entry",
        "ndescs",
        "parts",
        "readable",
        "size_read",
        "status",
        "taken",
        "writable",
        "writeback",
    )

    def __init__(
        self,
        readable: list[memoryview],
        writable: list[memoryview],
        head: int = 0,
        ndescs: int = 1,
        writeback: list[tuple[int, memoryview]] | None = None,
    ) -> None:
        self.readable = readable
        self.writable = writable
        self.head = head  # the ring's handle for this chain
        self.ndescs = ndescs  # ring slots the chain used (packed rings)
        self.inflight_entry = 0  # where an inflight region tracks it (packed rings)
        # Guest-physical (address, length) of the writable buffers, kept only
        # while the VMM logs dirty pages; the ring marks what was written.
        self.dirty_ranges: list[tuple[int, int]] | None = None
        # Bounce buffers for memory the daemon could not map, written back
        # by the ring after the device is done (devices never look at it).
        self.writeback = writeback
        # The chain's (guest address, length, device-writable) descriptors,
        # kept by rings whose buffers wait for the host: no view of guest
        # memory outlives a walk, so a waiting buffer is looked up again.
        self.chain: list[tuple[int, int, bool]] | None = None
        # On a queue whose fill spans several buffers (``merged_queues``):
        # the writable size of each of the driver's buffers, in order.
        self.parts: list[int] | None = None
        # For statistics and tracing: when the ring took it (ns, monotonic),
        # its readable size, the device's reading of it while someone traces
        # requests or fault rules look at them (``describe``), and the error
        # status the device completed it with, if any.
        self.taken = 0
        self.size_read = 0
        self.details: dict[str, Any] | None = None
        self.status: str | None = None

    def describe(self, **fields: Any) -> None:
        """What the request is, in the device's terms (type, sector, ...),
        for the trace and for fault rules; free when nobody looks."""
        if self.details is not None:
            self.details.update(fields)

    @property
    def readable_size(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_size(self) -> int:
        return sum(len(b) for b in self.writable)

    def buffers_used(self, size: int) -> int:
        """How many of the driver's buffers the first ``size`` writable bytes
        take (at least one; always one unless the queue merges buffers)."""
        if self.parts is None:
            return 1
        count, capacity = 0, 0
        for part in self.parts:
            count, capacity = count + 1, capacity + part
            if capacity >= size:
                break
        return max(count, 1)

    def read(self, size: int, offset: int = 0) -> bytes:
        """Copy up to ``size`` readable bytes starting at ``offset``."""
        return b"".join(bytes(b) for b in split_buffers(self.readable, offset, size)[1])

    def write(self, data: bytes, offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers at ``offset``; returns bytes written."""
        done = 0
        for view in split_buffers(self.writable, offset, len(data))[1]:
            view[:] = data[done : done + len(view)]
            done += len(view)
        return done


def adopt_socket(
    fds: dict[str, int], name: str, holding: bool, device: str
) -> trio.socket.SocketType | None:
    """The one host connection a device hands over as ``name`` (see
    ``host_fds``), for trio; any other fd, or this one when the device
    holds a connection already, is closed and logged."""
    adopted = None
    for key, fd in fds.items():
        if key != name or holding or adopted is not None:
            get_logger(device).warning(f"{device}.handover_fd_unknown", name=key)
            os.close(fd)
            continue
        adopted = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    return adopted


def split_buffers(
    buffers: Iterable[memoryview], offset: int, size: int | None = None
) -> tuple[list[memoryview], list[memoryview], list[memoryview]]:
    """Cut a scatter list at ``offset`` and ``offset + size`` without copying.

    Returns (before, middle, after); ``size=None`` means "to the end".
    """
    before: list[memoryview] = []
    middle: list[memoryview] = []
    after: list[memoryview] = []
    start = offset
    end = None if size is None else offset + size
    position = 0
    for view in buffers:
        lo, hi = position, position + len(view)
        position = hi
        cut_a = min(max(start - lo, 0), len(view))
        cut_b = len(view) if end is None else min(max(end - lo, 0), len(view))
        cut_b = max(cut_b, cut_a)
        if cut_a:
            before.append(view[:cut_a])
        if cut_b > cut_a:
            middle.append(view[cut_a:cut_b])
        if cut_b < len(view):
            after.append(view[cut_b:])
    return before, middle, after


@dataclass(frozen=True)
class NativeHandler:
    """A device's C request handler for the split-ring fast path (see
    vfiouserd/fastpath.c): ``check`` says whether it serves a request,
    ``serve`` serves it, ``device`` is their first argument. A host-fed
    queue's handler also has ``ready`` (whether the host has something for
    the next buffer; the ring's ``data_ready`` wakes the loop); ``batch_done``
    runs after each batch of requests."""

    check: Any
    serve: Any
    device: Any
    ready: Any = None
    batch_done: Any = None


class VirtioDevice:
    """Base class of virtio device plugins.

    Subclasses set the class attributes, implement ``handle`` and, where the
    device has one, ``config``. Everything else has a working default.
    """

    # Fault rules by sector (ioerr, corrupt) apply to it (vfiouserd.faults).
    has_sectors: ClassVar[bool] = False
    name: ClassVar[str]  # plugin name, e.g. "blk"
    description: ClassVar[str]
    device_id: ClassVar[DeviceId]
    vhost_user_type: ClassVar[str]  # VHostUserBackendType in QEMU's vhost-user.json
    feature_names: ClassVar[dict[int, str]] = {}  # device-specific bits, for listings
    max_queues: ClassVar[int] = 1
    max_queue_size: ClassVar[int] = 32768
    # System calls the device makes while serving, beyond the daemon's own
    # (the jail's seccomp allowlist adds them).
    syscalls: ClassVar[frozenset[str]] = frozenset()
    # Host directories the device reaches by path after the jail, bound
    # into its empty root read-write at the same path (set by from_args).
    jail_directories: tuple[str, ...] = ()
    # Device state for migration and restarts (vfiouserd.state): what the
    # guest can have changed, declared once. ``abi_version`` pins what the
    # guest sees of the device: raise it when that changes.
    abi_version: ClassVar[int] = 1
    state: ClassVar[Schema] = Schema(1)

    def __init__(self, *, features: int = 0, num_queues: int = 1) -> None:
        self.device_features = features  # device-specific bits offered
        self.num_queues = num_queues
        self.driver_features = 0
        self._config_listeners: list[Callable[[], None]] = []
        # Where data_ready goes: the rings of the session serving the device
        # now (one at a time, so one slot: an ended session is not kept).
        self._data_sink: Callable[[int], None] | None = None
        # The run() tasks' "look again": set on the loop, asked for from anywhere.
        self._host_loop: trio.lowlevel.TrioToken | None = None
        self._host_wakeup = trio.Event()

    # -- plugin wiring ------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the device's own command-line options."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls()

    @classmethod
    def capabilities(cls) -> list[str]:
        """Feature names for ``--print-capabilities`` (vhost-user.json)."""
        return []

    # -- virtio device --------------------------------------------------------

    @property
    def features(self) -> int:
        """Everything offered to the driver: device bits plus ring features."""
        return self.device_features | TRANSPORT_FEATURES

    def config(self) -> bytes:
        """The current device config space (little-endian fields)."""
        return b""

    def write_config(self, offset: int, data: bytes, *, migration: bool = False) -> None:
        """Driver write to the config space. By default every field is
        read-only; with ``migration`` a write that changes nothing is accepted
        (the destination of a migration replaying the source's config)."""
        current = self.config()
        if migration and current[offset : offset + len(data)] == data:
            return
        raise ConfigWriteError(f"config bytes {offset}..{offset + len(data)} are read-only")

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features

    def has_feature(self, feature: int) -> bool:
        return bool(self.driver_features & bit(feature))

    def handle(self, queue: int, request: Request) -> int:
        """Serve one request; return how many bytes were written to
        ``request.writable``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Device reset: forget driver-negotiated state."""
        self.driver_features = 0

    # -- buffers that wait for the host --------------------------------------

    # Queues whose buffers wait for the host: receive and event queues until
    # it has something for them, transmit queues (where the device applies
    # backpressure) until it has room. The daemon keeps what the driver
    # gives them, in order, and while ``has_data`` says so calls ``fill``
    # with the oldest. ``handle`` is never called for them. A stop, a
    # migration or a handover gives the buffers back to the ring unfilled;
    # a reset drops them.
    host_fed_queues: frozenset[int] = frozenset()  # a device may set its own per instance
    # Host-fed queues whose fill may spread what it writes over several of
    # the driver's buffers (virtio-net's mergeable receive buffers): ``fill``
    # sees the waiting buffers as one request (``request.parts`` gives each
    # one's size, ``request.buffers_used(n)`` how many n bytes take), at most
    # ``merged_fill_bytes`` of them; the buffers it wrote into are completed
    # together, published to the driver at once. None if it needs more
    # buffers than are waiting: they all stay.
    merged_queues: frozenset[int] = frozenset()
    merged_fill_bytes: ClassVar[int] = 1 << 16

    def has_data(self, queue: int) -> bool:
        """Whether ``fill`` takes a buffer of host-fed ``queue`` now."""
        return False

    def fill(self, queue: int, request: Request) -> int | None:
        """Write what the host has for the driver into ``request.writable``
        (or take what the driver wrote in ``request.readable``) of the
        oldest buffer the driver gave ``queue``; return the bytes written,
        or None to keep the buffer for later. Runs where ``handle`` runs."""
        return None

    def data_ready(self, queue: int) -> None:
        """The host has something for host-fed ``queue``: the daemon looks at
        its buffers again. Call it on the event loop (the device's tasks)."""
        if self._data_sink is not None:
            self._data_sink(queue)

    def serve_data_ready(self, sink: Callable[[int], None]) -> None:
        """The transport's side: ``data_ready`` calls ``sink`` from now on."""
        self._data_sink = sink

    async def run(self) -> None:
        """The device's own work while a driver runs it, such as waiting on
        host event sources (fds opened before the jail). Started with the
        first ring, cancelled at a device reset or when every ring stopped
        (then started again with the next ring)."""

    # Whether the device announces the guest after a migration (virtio-net:
    # a RARP from its MAC; vhost-user SEND_RARP calls ``announce``).
    announces: ClassVar[bool] = False

    def announce(self, mac: bytes) -> None:
        """Tell the network where the guest with ``mac`` is now."""
        raise NotImplementedError

    def host_side_wakeup(self) -> trio.Event:
        """For ``run()``'s tasks: the event the next ``wake_host_side`` sets.
        Take it *before* looking at what to wait for, then wait on it, and
        no wake-up falls between the look and the wait."""
        self._host_loop = trio.lowlevel.current_trio_token()
        return self._host_wakeup

    def wake_host_side(self) -> None:
        """Wake ``run()``'s waiting tasks to look again: what they wait for
        (room, data, a flag) changed. Safe from any thread; ``fill`` and
        ``handle`` may run on a ring's worker."""
        loop = self._host_loop
        if loop is None:
            return  # nothing has waited yet
        try:
            loop.run_sync_soon(self._wake_host_tasks)
        except trio.RunFinishedError:
            self._host_loop = None

    def _wake_host_tasks(self) -> None:
        self._host_wakeup.set()
        self._host_wakeup = trio.Event()

    # -- host-side changes -------------------------------------------------

    # Whether the config space can change under a running driver (the
    # transport then sets up a way to tell it: BACKEND_REQ, a config IRQ).
    config_can_change: ClassVar[bool] = False
    # Whether rings may use the device's native handler (off: everything in
    # Python, for comparison and debugging).
    use_fast_path: bool = True

    def statistics(self) -> dict[str, Any]:
        """The device's own figures for ``vfiouserd stats`` (the queues'
        are counted by the rings)."""
        return {}

    def native_handler(self, queue: int) -> NativeHandler | None:
        """The device's C handler for ``queue``'s fast path, if it has one."""
        return None

    def reload(self) -> None:
        """Re-read host-side state (the daemon got SIGHUP); call
        ``config_changed`` if the driver must look at the config again."""

    def config_changed(self) -> None:
        for listener in list(self._config_listeners):
            listener()

    def add_config_listener(self, listener: Callable[[], None]) -> None:
        self._config_listeners.append(listener)

    def remove_config_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._config_listeners:
            self._config_listeners.remove(listener)

    # -- a restart through the fd store ------------------------------------------

    def host_fds(self) -> dict[str, int]:
        """Host fds the next daemon takes over when this one restarts through
        the fd store (connections host clients keep open across it), by
        names the device chooses. Asked once the rings stopped and ``run()``
        was cancelled; the device still closes its own copies at exit."""
        return {}

    def adopt_host_fds(self, fds: dict[str, int]) -> None:
        """In the next daemon, after its state was loaded: the fds
        ``host_fds`` named, now the device's to keep and close."""
        for fd in fds.values():
            os.close(fd)

    # -- state ----------------------------------------------------------------

    def state_sections(self) -> dict[str, Schema]:
        return {"device": self.state}

    def save_state(self) -> dict[str, dict[str, Any]]:
        return {"device": {f.name: getattr(self, f.name) for f in self.state.fields}}

    def check_state(self, values: dict[str, Any]) -> None:
        """Raise StateError if this device cannot take ``values``."""

    def load_state(self, sections: dict[str, dict[str, Any]]) -> None:
        values = sections["device"]
        self.check_state(values)
        for name, value in values.items():
            setattr(self, name, value)

    def close(self) -> None:
        """Release host resources at exit."""
