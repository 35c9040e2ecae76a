"""vfio-user migration (VFIO's v2 protocol): the device state machine, the
data stream, and dirty-page tracking of the client's memory.

States and arcs are the kernel uAPI's (``linux/vfio.h``), without the P2P
states: a request for a state that is not adjacent follows the shortest
path, where the saving states (PRE_COPY, STOP_COPY) may only begin or end a
path; STOP_COPY to PRE_COPY is refused. The data is the device-state blob of
``vfiouserd.state``: PRE_COPY offers none (the state is small and changes
while the device runs), STOP_COPY all of it, and the RESUMING to STOP step
checks it before anything is applied.
"""

from __future__ import annotations

import base64
import errno
import weakref
from collections import deque
from typing import Any, ClassVar

from vfiouserd import state
from vfiouserd.devices.pci import PciDevice
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemory
from vfiouserd.protocol.vfio_user import MigrationState as S

log = get_logger("migration")

MAX_INCOMING = 16 << 20  # a device-state blob is small; refuse to buffer more

ARCS: dict[S, set[S]] = {
    S.STOP: {S.RUNNING, S.STOP_COPY, S.RESUMING},
    S.RUNNING: {S.STOP, S.PRE_COPY},
    S.STOP_COPY: {S.STOP},
    S.RESUMING: {S.STOP},
    S.PRE_COPY: {S.RUNNING, S.STOP_COPY},
}
SAVING = {S.PRE_COPY, S.STOP_COPY}


class MigrationError(Exception):
    def __init__(self, error: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = error


def path(current: S, target: S) -> list[S]:
    """The states to go through, ``target`` last; MigrationError if none."""
    if target in (S.ERROR, S.RUNNING_P2P, S.PRE_COPY_P2P):
        raise MigrationError(errno.EINVAL, f"{target.name} cannot be asked for")
    if current is S.ERROR:
        raise MigrationError(errno.EINVAL, "the device is in ERROR: reset it")
    if current is S.STOP_COPY and target is S.PRE_COPY:
        raise MigrationError(errno.EINVAL, "STOP_COPY cannot go back to PRE_COPY")
    if current is target:
        return []
    previous: dict[S, S] = {}
    queue: deque[S] = deque([current])
    while queue:
        state_ = queue.popleft()
        for following in ARCS[state_]:
            if following in previous or following is current:
                continue
            if following in SAVING and following is not target:
                continue  # a saving state only ends a path
            previous[following] = state_
            if following is target:
                steps: list[S] = [target]
                while steps[-1] is not current and previous[steps[-1]] is not current:
                    steps.append(previous[steps[-1]])
                return steps[::-1]
            queue.append(following)
    raise MigrationError(errno.EINVAL, f"no way from {current.name} to {target.name}")


class Migration:
    """One device's migration state and data stream. It belongs to the
    device, not to a connection: a client that comes back finds it."""

    _of_device: ClassVar[weakref.WeakKeyDictionary[PciDevice, Migration]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def of(cls, device: PciDevice) -> Migration:
        migration = cls._of_device.get(device)
        if migration is None:
            migration = cls._of_device[device] = cls(device)
        return migration

    def __init__(self, device: PciDevice) -> None:
        self.device = device
        self.state = S.RUNNING
        self.outgoing = memoryview(b"")
        self.incoming = bytearray()

    def set_state(self, target: int) -> None:
        try:
            wanted = S(target)
        except ValueError:
            raise MigrationError(errno.EINVAL, f"no device state {target}") from None
        for step in path(self.state, wanted):
            self._step(step)
            log.info("migration.state", state=step.name)

    def _step(self, following: S) -> None:
        current = self.state
        if following is S.STOP:
            if current in (S.RUNNING, S.PRE_COPY):
                self.device.quiesce()
            elif current is S.RESUMING:
                data, self.incoming = bytes(self.incoming), bytearray()
                try:
                    state.load(self.device, data)
                except state.StateError as exc:
                    raise MigrationError(errno.EINVAL, f"state refused: {exc}") from exc
                log.info("migration.loaded", size=len(data))
            self.outgoing = memoryview(b"")
        elif following is S.RUNNING:
            self.outgoing = memoryview(b"")
            if current is S.STOP:
                self.device.resume()
        elif following is S.PRE_COPY:
            self.outgoing = memoryview(b"")  # everything comes in STOP_COPY
        elif following is S.STOP_COPY:
            if current is S.PRE_COPY:
                self.device.quiesce()
            self.outgoing = memoryview(state.save(self.device))
        elif following is S.RESUMING:
            self.incoming = bytearray()
        self.state = following

    def read(self, size: int) -> bytes:
        if self.state not in SAVING:
            raise MigrationError(errno.EINVAL, f"no data to read in {self.state.name}")
        chunk, self.outgoing = self.outgoing[:size], self.outgoing[size:]
        return bytes(chunk)

    def write(self, data: bytes) -> None:
        if self.state is not S.RESUMING:
            raise MigrationError(errno.EINVAL, f"no data to write in {self.state.name}")
        if len(self.incoming) + len(data) > MAX_INCOMING:
            raise MigrationError(errno.EFBIG, f"more than {MAX_INCOMING} bytes of state")
        self.incoming += data

    def reset(self) -> None:
        """DEVICE_RESET (after the device's own reset): back to RUNNING from
        any state, as a reset does in the kernel's uAPI; it is also the way
        to abort a RESUMING or a saving session. Partial state is dropped."""
        self.outgoing = memoryview(b"")
        self.incoming = bytearray()
        if self.device.stopped:
            self.device.resume()  # nothing starts: the reset cleared DRIVER_OK
        if self.state is not S.RUNNING:
            log.info("migration.state", state=S.RUNNING.name, reason="device reset")
        self.state = S.RUNNING


class DirtyBitmaps:
    """DMA logging: a bit per ``page_size`` page of each logged range of
    client memory; REPORT hands out a range's bits and clears them.

    The client chooses the ranges (QEMU asks for the span of guest memory,
    holes included), so the bits are kept in chunks made when the device
    first writes to them: memory is spent on what the device dirtied, not on
    what was asked for. Past ``MAX_BITMAP_BYTES`` of chunks the log
    saturates: every page reads as dirty until logging stops, which costs a
    migration some copying but never misses a page.
    """

    CHUNK_BYTES = 4096  # the bits of 32768 pages
    MAX_BITMAP_BYTES = 64 << 20  # 2 TiB written at 4 KiB pages

    def __init__(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        self.page_size = page_size
        self.ranges = sorted(ranges)
        self.chunks: dict[tuple[int, int], bytearray] = {}  # (range, chunk) -> bits
        self.saturated = False

    def _bits_of(self, index: int, page: int, create: bool) -> tuple[bytearray | None, int]:
        chunk, bit = divmod(page, self.CHUNK_BYTES * 8)
        bits = self.chunks.get((index, chunk))
        if bits is None and create and not self.saturated:
            if (len(self.chunks) + 1) * self.CHUNK_BYTES > self.MAX_BITMAP_BYTES:
                self.saturated = True
                self.chunks.clear()
                log.warning("dma_logging.saturated", limit=self.MAX_BITMAP_BYTES)
            else:
                bits = self.chunks[(index, chunk)] = bytearray(self.CHUNK_BYTES)
        return bits, bit

    def mark(self, address: int, length: int) -> None:
        if length <= 0 or self.saturated:
            return
        end = address + length
        for index, (start, size) in enumerate(self.ranges):
            low, high = max(address, start), min(end, start + size)
            if low >= high:
                continue
            first, last = (low - start) // self.page_size, (high - 1 - start) // self.page_size
            for page in range(first, last + 1):
                bits, bit = self._bits_of(index, page, create=True)
                if bits is None:
                    return  # saturated: everything is dirty now
                bits[bit // 8] |= 1 << bit % 8

    def kick(self) -> None:
        pass

    def _take_dirty(self, index: int, first: int, last: int) -> list[int]:
        """The dirty pages ``first..last`` of range ``index``, cleared. Only
        chunks the device wrote exist, so this costs what was dirtied, not
        what was asked for."""
        per_chunk = self.CHUNK_BYTES * 8
        pages = []
        for (range_index, chunk), bits in self.chunks.items():
            low = chunk * per_chunk
            if range_index != index or low + per_chunk <= first or low > last:
                continue
            for at, byte in enumerate(bits):
                if not byte:
                    continue
                for bit in range(8):
                    page = low + at * 8 + bit
                    if byte >> bit & 1 and first <= page <= last:
                        pages.append(page)
                        bits[at] &= ~(1 << bit) & 0xFF
        return pages

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The dirty bits of ``[iova, iova+length)`` at ``page_size``
        granularity (u64 words, least significant bit first), cleared here."""
        holding = [
            i
            for i, (start, size) in enumerate(self.ranges)
            if start <= iova <= iova + length <= start + size
        ]
        if not holding:
            raise MigrationError(errno.EINVAL, f"{iova:#x}+{length:#x} is not a logged range")
        index = holding[0]
        start = self.ranges[index][0]
        pages = (length + page_size - 1) // page_size
        out = bytearray((pages + 63) // 64 * 8)
        if self.saturated:  # every page counts as dirty
            _set_bits(out, 0, pages - 1)
            return bytes(out)
        first = (iova - start) // self.page_size
        last = (iova + length - 1 - start) // self.page_size
        for page in self._take_dirty(index, first, last):
            address = start + page * self.page_size
            low = max(address, iova) - iova
            high = min(address + self.page_size, iova + length) - 1 - iova
            _set_bits(out, low // page_size, high // page_size)
        return bytes(out)

    # -- handover ------------------------------------------------------------------------

    def to_document(self) -> dict[str, object]:
        return {
            "page_size": self.page_size,
            "ranges": self.ranges,
            "saturated": self.saturated,
            "chunks": [
                [i, c, base64.b64encode(bits).decode()] for (i, c), bits in self.chunks.items()
            ],
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> DirtyBitmaps:
        bitmaps = cls(int(document["page_size"]), [(int(a), int(b)) for a, b in document["ranges"]])
        bitmaps.saturated = bool(document.get("saturated", False))
        for index, chunk, bits in document.get("chunks", []):
            bitmaps.chunks[(int(index), int(chunk))] = bytearray(base64.b64decode(bits))
        # A daemon before sparse bitmaps handed over one dense bitmap per range.
        for index, dense in enumerate(document.get("bitmaps", [])):
            data = base64.b64decode(dense)
            for offset in range(0, len(data), cls.CHUNK_BYTES):
                bits = bytearray(
                    data[offset : offset + cls.CHUNK_BYTES].ljust(cls.CHUNK_BYTES, b"\0")
                )
                if any(bits):
                    bitmaps.chunks[(index, offset // cls.CHUNK_BYTES)] = bits
        return bitmaps


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (least significant bit first)."""
    while first <= last and first % 8:
        bitmap[first // 8] |= 1 << first % 8
        first += 1
    whole = (last + 1 - first) // 8
    if whole > 0:
        bitmap[first // 8 : first // 8 + whole] = b"\xff" * whole
        first += whole * 8
    while first <= last:
        bitmap[first // 8] |= 1 << first % 8
        first += 1


def logged_ranges(memory: GuestMemory, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What START logs: the ranges asked for, or every mapped region."""
    if ranges:
        return ranges
    return [(region.guest_address, region.size) for region in memory.regions]
