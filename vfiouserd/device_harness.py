"""Drive a virtio device as a driver would, without a ring, a session or a socket.

For device authors' tests (as rust-vmm's devices are tested on a mock
queue)::

    harness = DeviceHarness(VirtioRng())
    done = harness.request(0, writable=[64])
    assert done.written == 64 and len(done.data) == 64

The harness holds the device to the rules its transports rely on: the
driver's features are a subset of the offer, a request's queue exists, a
device never reports more bytes written than the driver gave it, and its
state survives the daemon's own save/load (``migrate``). What the device
does with the buffers is the test's to check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from vfiouserd import state
from vfiouserd.devices.virtio import Request, VirtioDevice

D = TypeVar("D", bound=VirtioDevice)


class HarnessError(AssertionError):
    """The device broke a rule its transports rely on."""


@dataclass
class Completion:
    written: int  # what the device reported
    buffers: list[bytes]  # the writable buffers as the device left them

    @property
    def data(self) -> bytes:
        """The bytes written, across the writable buffers."""
        return b"".join(self.buffers)[: self.written]


class DeviceHarness(Generic[D]):
    def __init__(self, device: D, *, features: int | None = None) -> None:
        """``features``: what the driver accepts (default: everything offered)."""
        self.device = device
        self.config_changes = 0  # config_changed() calls seen
        device.add_config_listener(self._count_config_change)
        self.negotiate(device.features if features is None else features)

    def _count_config_change(self) -> None:
        self.config_changes += 1

    def negotiate(self, features: int) -> None:
        """FEATURES_OK with ``features``, which must be offered."""
        if features & ~self.device.features:
            raise HarnessError(f"features {features & ~self.device.features:#x} were not offered")
        self.device.set_driver_features(features)

    def request(
        self, queue: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()
    ) -> Completion:
        """One descriptor chain: ``readable`` buffers with these contents,
        then writable buffers of these sizes (filled with 0xAA, so a test sees
        what the device did not write)."""
        if not 0 <= queue < self.device.num_queues:
            raise HarnessError(f"queue {queue}: the device has {self.device.num_queues}")
        if queue in self.device.host_fed_queues:
            raise HarnessError(f"queue {queue} is host-fed: its buffers go to fill(), see take()")
        areas = [bytearray(b"\xaa" * size) for size in writable]
        request = Request(
            [memoryview(bytes(data)) for data in readable],
            [memoryview(area) for area in areas],
            ndescs=max(len(readable) + len(writable), 1),
        )
        written = self.device.handle(queue, request)
        if not isinstance(written, int) or not 0 <= written <= request.writable_size:
            raise HarnessError(
                f"handle() reported {written!r} bytes written of {request.writable_size}"
            )
        return Completion(written, [bytes(area) for area in areas])

    def take(self, queue: int, *sizes: int, readable: Sequence[bytes] = ()) -> Completion | None:
        """Offer a host-fed queue one buffer, as the daemon offers the oldest
        waiting one: ``readable`` buffers with these contents (a transmit
        queue), then writable ones of these sizes. What the device filled,
        or None if it is not ready for it (or kept the buffer)."""
        if queue not in self.device.host_fed_queues:
            raise HarnessError(f"queue {queue} is not host-fed")
        if not self.device.has_data(queue):
            return None
        areas = [bytearray(b"\xaa" * size) for size in sizes]
        request = Request(
            [memoryview(bytes(data)) for data in readable],
            [memoryview(area) for area in areas],
            ndescs=max(len(readable) + len(sizes), 1),
        )
        written = self._fill(queue, request)
        if written is None:
            return None
        return Completion(written, [bytes(area) for area in areas])

    def take_merged(self, queue: int, *sizes: int) -> list[Completion] | None:
        """Offer a queue that merges buffers (``merged_queues``) one waiting
        buffer of each size, as the daemon does: what the device wrote in
        each buffer it used, or None if it kept them all."""
        if queue not in self.device.merged_queues:
            raise HarnessError(f"queue {queue} does not merge buffers")
        if not self.device.has_data(queue):
            return None
        areas = [bytearray(b"\xaa" * size) for size in sizes]
        request = Request([], [memoryview(area) for area in areas])
        request.parts = list(sizes)
        written = self._fill(queue, request)
        if written is None:
            return None
        completions, left = [], written
        for area in areas[: request.buffers_used(written)]:
            share = min(left, len(area))
            completions.append(Completion(share, [bytes(area)]))
            left -= share
        return completions

    def _fill(self, queue: int, request: Request) -> int | None:
        written = self.device.fill(queue, request)
        if written is not None and (
            not isinstance(written, int) or not 0 <= written <= request.writable_size
        ):
            raise HarnessError(
                f"fill() reported {written!r} bytes written of {request.writable_size}"
            )
        return written

    def config(self, offset: int = 0, size: int | None = None) -> bytes:
        data = self.device.config()
        return data[offset:] if size is None else data[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        self.device.write_config(offset, data)

    def reset(self) -> None:
        """A driver reset (status 0); features are negotiated again."""
        self.device.reset()
        self.negotiate(self.device.features)

    def migrate(self, new_device: Callable[[], D]) -> DeviceHarness[D]:
        """Save the device's state as the daemon does, load it into
        ``new_device()`` (the destination) and return a harness for it, with
        the same features negotiated."""
        blob = state.save(self.device)
        destination = new_device()
        state.load(destination, blob)
        harness = DeviceHarness(destination, features=self.device.driver_features)
        return harness
