"""The rings: SET_VRING_NUM/ADDR/BASE, GET_VRING_BASE, the kick, call and
err fds, and SET_VRING_ENABLE, applied to the device's queues."""

from __future__ import annotations

from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.log import get_logger
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import Message, ProtocolFeature
from vfiouserd.vhost_user.features import Features
from vfiouserd.vhost_user.messages import ProtocolViolation, RequestFailed, u64
from vfiouserd.virtqueue import MAX_QUEUE_SIZE, QueueSet, RingError, Virtqueue

log = get_logger("vhost_user")


class Rings:
    def __init__(self, device: VirtioDevice, queue_set: QueueSet, features: Features) -> None:
        self.device = device
        self.queue_set = queue_set
        self.features = features

    def _queue(self, index: int) -> Virtqueue:
        if index >= len(self.queue_set.queues):
            raise RequestFailed(
                f"vring index {index} out of range (device has {len(self.queue_set.queues)})"
            )
        return self.queue_set.queues[index]

    def set_vring_num(self, message: Message) -> None:
        state = message.parse(vu.VringState)
        queue = self._queue(state.index)
        if queue.started:
            raise RequestFailed(f"vring {state.index} is running")
        limit = min(MAX_QUEUE_SIZE, self.device.max_queue_size)
        if not 1 <= state.num <= limit:
            raise RequestFailed(f"vring size {state.num} not in 1..{limit}")
        queue.size = state.num

    def set_vring_addr(self, message: Message) -> None:
        addr = message.parse(vu.VringAddr)
        queue = self._queue(addr.index)
        if addr.flags & ~vu.VRING_FLAG_LOG:
            raise RequestFailed(f"unknown vring flags {addr.flags:#x}")
        if addr.flags & vu.VRING_FLAG_LOG and not self.features.has_protocol(
            ProtocolFeature.LOG_SHMFD
        ):
            raise RequestFailed("used-ring logging needs LOG_SHMFD, not negotiated")
        queue.desc_address = addr.descriptor
        queue.used_address = addr.used
        queue.avail_address = addr.available
        queue.log_address = addr.log
        queue.flags = addr.flags
        queue.addresses_set = True
        if queue.started:
            queue.invalidate()
            queue.wake()

    def set_vring_base(self, message: Message) -> None:
        state = message.parse(vu.VringState)
        queue = self._queue(state.index)
        if queue.started:
            raise RequestFailed(f"vring {state.index} is running")
        queue.base = state.num
        queue.ring = None

    def get_vring_base(self, message: Message) -> bytes:
        state = message.parse(vu.VringState)
        if state.index >= len(self.queue_set.queues):
            raise ProtocolViolation(f"GET_VRING_BASE for vring {state.index}, which does not exist")
        queue = self.queue_set.queues[state.index]
        base = self.queue_set.stop(queue)
        queue.set_kick(None)
        reply: bytes = vu.VringState.build({"index": state.index, "num": base})
        return reply

    def _vring_fd(self, message: Message) -> tuple[Virtqueue, int | None]:
        value = u64(message)
        if value & ~(vu.VRING_INDEX_MASK | vu.VRING_NOFD_FLAG):
            raise RequestFailed(f"reserved bits set in {value:#x}")
        queue = self._queue(value & vu.VRING_INDEX_MASK)
        nofd = bool(value & vu.VRING_NOFD_FLAG)
        if nofd != (not message.fds):
            raise RequestFailed("the invalid-fd flag disagrees with the fds sent")
        fd = None if nofd else message.fds.pop()
        return queue, fd

    def set_vring_kick(self, message: Message) -> None:
        queue, fd = self._vring_fd(message)
        queue.set_kick(fd)
        try:
            self.queue_set.start(queue)  # also serves what is already available
        except RingError as exc:
            raise RequestFailed(f"vring {queue.index} cannot start: {exc}") from exc

    def set_vring_call(self, message: Message) -> None:
        queue, fd = self._vring_fd(message)
        queue.set_call(fd)
        if queue.started and queue.enabled:
            queue.signal_call()  # harmless, and un-sticks a driver after reconnection

    def set_vring_err(self, message: Message) -> None:
        queue, fd = self._vring_fd(message)
        queue.set_err(fd)

    def set_vring_enable(self, message: Message) -> None:
        state = message.parse(vu.VringState)
        queue = self._queue(state.index)
        # Legal whenever VHOST_USER_F_PROTOCOL_FEATURES is offered (always here);
        # QEMU may send it before SET_FEATURES.
        if state.num not in (0, 1):
            raise RequestFailed(f"enable value {state.num}")
        queue.enabled = bool(state.num)
        log.info("ring.enable", queue=state.index, enabled=queue.enabled)
        if queue.enabled and queue.started:
            queue.wake()
