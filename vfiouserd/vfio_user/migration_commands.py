"""DEVICE_FEATURE and MIG_DATA: the client's side of migration.py, the
device state machine and its data, and DMA logging of the client's memory."""

from __future__ import annotations

import errno
import itertools
from typing import ClassVar

from construct import Container

from vfiouserd.devices.pci import PciDevice
from vfiouserd.log import get_logger
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.vfio_user.messages import Reply, RequestError, parse, parse_data
from vfiouserd.vfio_user.migration import DirtyBitmaps, Migration, MigrationError, logged_ranges
from vfiouserd.vfio_user.negotiation import Terms

log = get_logger("vfio_user")


class MigrationCommands:
    # What each feature allows besides PROBE.
    FEATURE_OPERATIONS: ClassVar[dict[int, int]] = {
        vfu.DeviceFeature.MIGRATION: vfu.FEATURE_GET,
        vfu.DeviceFeature.MIG_DEVICE_STATE: vfu.FEATURE_GET | vfu.FEATURE_SET,
        vfu.DeviceFeature.DMA_LOGGING_START: vfu.FEATURE_SET,
        vfu.DeviceFeature.DMA_LOGGING_STOP: vfu.FEATURE_SET,
        vfu.DeviceFeature.DMA_LOGGING_REPORT: vfu.FEATURE_GET,
    }

    def __init__(self, device: PciDevice, migration: Migration, terms: Terms) -> None:
        self.device = device
        self.migration = migration
        self.terms = terms
        self.dirty: DirtyBitmaps | None = None  # DMA logging of this client's memory

    async def device_feature(self, message: Message) -> Reply:
        head_size = vfu.DeviceFeatureHead.sizeof()
        head = parse(message, vfu.DeviceFeatureHead, "DEVICE_FEATURE")
        self.terms.check_argsz(head.argsz, head_size, "DEVICE_FEATURE")
        index = head.flags & vfu.FEATURE_INDEX_MASK
        operations = head.flags & (vfu.FEATURE_GET | vfu.FEATURE_SET | vfu.FEATURE_PROBE)
        if head.flags & ~(vfu.FEATURE_INDEX_MASK | operations):
            raise RequestError(errno.EINVAL, f"unknown DEVICE_FEATURE flags {head.flags:#x}")
        allowed = self.FEATURE_OPERATIONS.get(index)
        if allowed is None:
            # What the kernel answers for a feature it does not have.
            raise RequestError(errno.ENOTTY, f"device feature {index} is not supported")
        wanted = operations & ~vfu.FEATURE_PROBE
        if wanted & ~allowed or (
            wanted == vfu.FEATURE_GET | vfu.FEATURE_SET and not (operations & vfu.FEATURE_PROBE)
        ):
            raise RequestError(errno.EINVAL, f"feature {index} does not allow {operations:#x}")
        if operations & vfu.FEATURE_PROBE:
            return Reply(bytes(message.payload))  # supported: the request comes back
        if wanted == 0:
            raise RequestError(errno.EINVAL, "DEVICE_FEATURE without GET, SET or PROBE")
        data = message.payload[head_size:]
        try:
            if index == vfu.DeviceFeature.MIGRATION:
                flags = vfu.MigrationFlag.STOP_COPY | vfu.MigrationFlag.PRE_COPY
                return self._feature_reply(head, vfu.MigrationInfo.build({"flags": flags}))
            if index == vfu.DeviceFeature.MIG_DEVICE_STATE:
                if wanted == vfu.FEATURE_GET:
                    current = {"device_state": self.migration.state, "data_fd": 0}
                    return self._feature_reply(head, vfu.MigDeviceState.build(current))
                request = parse_data(data, vfu.MigDeviceState, "MIG_DEVICE_STATE")
                self.migration.set_state(request.device_state)
                return Reply(bytes(message.payload))
            if index == vfu.DeviceFeature.DMA_LOGGING_START:
                self._dma_logging_start(data)
                return Reply(bytes(message.payload))
            if index == vfu.DeviceFeature.DMA_LOGGING_STOP:
                self.device.memory.dirty = None
                self.dirty = None
                log.info("dma_logging.stop")
                return Reply(bytes(message.payload))
            return self._dma_logging_report(head, data)
        except MigrationError as exc:
            raise RequestError(exc.errno, str(exc)) from exc

    def _feature_reply(self, head: Container, data: bytes) -> Reply:
        size = vfu.DeviceFeatureHead.sizeof() + len(data)
        self.terms.check_argsz(head.argsz, size, "DEVICE_FEATURE")
        return Reply(vfu.DeviceFeatureHead.build({"argsz": size, "flags": head.flags}) + data)

    def _dma_logging_start(self, data: bytes) -> None:
        control = parse_data(data, vfu.DmaLoggingControl, "DMA_LOGGING_START")
        page_size = control.page_size
        if page_size < 4096 or page_size & (page_size - 1):
            raise RequestError(errno.EINVAL, f"page size {page_size}")
        table = data[vfu.DmaLoggingControl.sizeof() :]
        entry = vfu.DmaLoggingRange.sizeof()
        if len(table) != control.num_ranges * entry:
            raise RequestError(errno.EINVAL, f"{control.num_ranges} ranges, {len(table)} bytes")
        ranges = [
            (r.iova, r.length)
            for r in (
                vfu.DmaLoggingRange.parse(table[i * entry :]) for i in range(control.num_ranges)
            )
        ]
        for iova, length in ranges:
            if length == 0 or iova % page_size or length % page_size:
                raise RequestError(errno.EINVAL, f"range {iova:#x}+{length:#x}")
        ranges = logged_ranges(self.device.memory, ranges)
        ordered = sorted(ranges)
        for (start_a, size_a), (start_b, _) in itertools.pairwise(ordered):
            if start_a + size_a > start_b:
                raise RequestError(errno.EINVAL, "overlapping ranges")
        if self.dirty is not None and self.dirty.page_size != page_size:
            raise RequestError(errno.EINVAL, "logging already runs with another page size")
        self.dirty = DirtyBitmaps(page_size, ranges)
        self.device.memory.dirty = self.dirty
        log.info("dma_logging.start", page_size=page_size, ranges=len(ranges))

    def _dma_logging_report(self, head: Container, data: bytes) -> Reply:
        request = parse_data(data, vfu.DmaLoggingReport, "DMA_LOGGING_REPORT")
        if self.dirty is None:
            raise RequestError(errno.EINVAL, "DMA logging was not started")
        page_size, length = request.page_size, request.length
        if page_size == 0 or page_size & (page_size - 1) or length == 0 or page_size > length:
            raise RequestError(errno.EINVAL, f"report of {length} bytes in pages of {page_size}")
        pages = (length + page_size - 1) // page_size
        bitmap_size = (pages + 63) // 64 * 8
        chunk = self.terms.dma_chunk
        if bitmap_size > chunk:  # the reply must fit a message
            raise RequestError(
                errno.E2BIG, f"a bitmap of {bitmap_size} bytes: report at most {chunk}"
            )
        self.terms.check_argsz(
            head.argsz,
            vfu.DeviceFeatureHead.sizeof() + vfu.DmaLoggingReport.sizeof() + bitmap_size,
            "DMA_LOGGING_REPORT",
        )
        bitmap = self.dirty.report(request.iova, length, page_size)
        return self._feature_reply(head, vfu.DmaLoggingReport.build(request) + bitmap)

    async def mig_data(self, message: Message) -> Reply:
        head = parse(message, vfu.MigDataHead, "MIG_DATA")
        size = vfu.MigDataHead.sizeof()
        # Data travels to the client on reads, to us on writes: each side's limit.
        reading = message.command == Command.MIG_DATA_READ
        terms = self.terms
        limit = terms.client.max_data_xfer_size if reading else terms.config.max_data_xfer_size
        if head.size > limit:
            raise RequestError(errno.EINVAL, f"{head.size} bytes exceed transfers of {limit}")
        terms.check_argsz(head.argsz, size + head.size, "MIG_DATA")
        try:
            if message.command == Command.MIG_DATA_READ:
                data = self.migration.read(head.size)
                return Reply(
                    vfu.MigDataHead.build({"argsz": size + len(data), "size": len(data)}) + data
                )
            if len(message.payload) != size + head.size:
                raise RequestError(
                    errno.EINVAL, f"{len(message.payload) - size} bytes for a size of {head.size}"
                )
            self.migration.write(message.payload[size:])
            return Reply()
        except MigrationError as exc:
            raise RequestError(exc.errno, str(exc)) from exc
