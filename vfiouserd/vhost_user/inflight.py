"""The inflight region (GET_INFLIGHT_FD, SET_INFLIGHT_FD): memory the front
end keeps across back-end restarts, where each ring records the requests it
has taken and not yet completed (their layout: vfiouserd/inflight.py)."""

from __future__ import annotations

import os

from construct import Container

from vfiouserd.devices.virtio import Feature, VirtioDevice
from vfiouserd.inflight import PackedInflight, SplitInflight
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError, Mapping
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import Message
from vfiouserd.protocol.vhost_user_inflight import inflight_region_size
from vfiouserd.vhost_user.features import Features
from vfiouserd.vhost_user.messages import RequestFailed, WithFds
from vfiouserd.virtqueue import MAX_QUEUE_SIZE, QueueSet

log = get_logger("vhost_user")


class InflightRegion:
    def __init__(self, device: VirtioDevice, queue_set: QueueSet, features: Features) -> None:
        self.device = device
        self.queue_set = queue_set
        self.features = features
        self.mapping: Mapping | None = None  # the front end's region
        # mmap size and offset, queues and their size: for a handover
        self.description: tuple[int, int, int, int] | None = None
        self._views: list[memoryview] = []

    def _request(self, message: Message) -> tuple[Container, int]:
        request = message.parse(vu.InflightDescription)
        if not 1 <= request.num_queues <= len(self.queue_set.queues):
            raise RequestFailed(
                f"{request.num_queues} queues; the device has {len(self.queue_set.queues)}"
            )
        if not 1 <= request.queue_size <= min(MAX_QUEUE_SIZE, self.device.max_queue_size):
            raise RequestFailed(f"queue size {request.queue_size}")
        packed = self.features.has(Feature.RING_PACKED)
        return request, inflight_region_size(request.queue_size, packed)

    def get_inflight_fd(self, message: Message) -> WithFds:
        request, per_queue = self._request(message)
        size = per_queue * request.num_queues
        fd = os.memfd_create("vfiouserd-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # zero-filled: a fresh region
            if self.features.has(Feature.RING_PACKED):
                mapping = Mapping.map_fd(fd, size)
                try:
                    for index in range(request.num_queues):
                        view = mapping.buffer[index * per_queue : (index + 1) * per_queue]
                        PackedInflight.initialize(view, request.queue_size)
                        view.release()
                finally:
                    mapping.unmap(close_fd=False)
        except BaseException:
            os.close(fd)
            raise
        log.info("inflight.created", size=size, queues=request.num_queues)
        reply = vu.InflightDescription.build(
            {
                "mmap_size": size,
                "mmap_offset": 0,
                "num_queues": request.num_queues,
                "queue_size": request.queue_size,
            }
        )
        return WithFds(reply, [fd])

    def set_inflight_fd(self, message: Message) -> None:
        request, per_queue = self._request(message)
        if any(queue.started for queue in self.queue_set.queues):
            raise RequestFailed("rings are running")
        if request.mmap_size < per_queue * request.num_queues:
            raise RequestFailed(
                f"{request.mmap_size} bytes for {request.num_queues} queues of "
                f"{request.queue_size}: {per_queue * request.num_queues} needed"
            )
        self.map(
            message.fds.pop(),
            request.mmap_size,
            request.mmap_offset,
            request.num_queues,
            request.queue_size,
        )

    def map(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        packed = self.features.has(Feature.RING_PACKED)
        per_queue = inflight_region_size(queue_size, packed)
        try:
            mapping = Mapping.map_fd(fd, mmap_size, file_offset=mmap_offset)
        except GuestMemoryError as exc:
            os.close(fd)
            raise RequestFailed(f"inflight region: {exc}") from exc
        self.drop()
        self.mapping = mapping
        self.description = (mmap_size, mmap_offset, num_queues, queue_size)
        start = mapping.lead
        for index in range(num_queues):
            view = mapping.buffer[start + index * per_queue : start + (index + 1) * per_queue]
            self._views.append(view)
            tracker = PackedInflight if packed else SplitInflight
            self.queue_set.queues[index].inflight = tracker(view, queue_size)
        log.info("inflight.set", size=mmap_size, queues=num_queues, packed=packed)

    def drop(self) -> None:
        """Forget the region (rings stopped first: they must not touch it)."""
        for queue in self.queue_set.queues:
            queue.inflight = None
        for view in self._views:
            view.release()
        self._views.clear()
        self.description = None
        if self.mapping is not None:
            self.mapping.unmap()
            self.mapping = None
