"""The device's own state in a migration: SET_DEVICE_STATE_FD opens a
transfer over the front end's pipe, CHECK_DEVICE_STATE says how it went."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio

from vfiouserd import state
from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.log import get_logger
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import Message
from vfiouserd.vhost_user.messages import RequestFailed, u64_reply
from vfiouserd.virtqueue import QueueSet

log = get_logger("vhost_user")

MAX_STATE_SIZE = 16 << 20  # a device-state blob is small; refuse to buffer more
TRANSFER_TIMEOUT = 30.0  # a front end that never closes its end of the state pipe


@dataclass
class Transfer:
    """A device-state transfer over the front end's pipe (SET_DEVICE_STATE_FD)."""

    direction: vu.TransferDirection
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    error: str | None = None


class DeviceState:
    def __init__(self, device: VirtioDevice, queue_set: QueueSet) -> None:
        self.device = device
        self.queue_set = queue_set
        self.transfer: Transfer | None = None
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Transfers run in ``nursery`` (the session's)."""
        self._nursery = nursery

    async def until_transfer_over(self) -> None:
        """The answer to CHECK_DEVICE_STATE is due once the transfer is over:
        the front end closed its end of the pipe (or gave up)."""
        if self.transfer is not None:
            with trio.move_on_after(TRANSFER_TIMEOUT):
                await self.transfer.done.wait()

    def set_device_state_fd(self, message: Message) -> bytes:
        request = message.parse(vu.DeviceStateTransfer)
        if request.phase != vu.MigrationPhase.STOPPED:
            raise RequestFailed(f"migration phase {request.phase} is not supported")
        try:
            direction = vu.TransferDirection(request.direction)
        except ValueError:
            raise RequestFailed(f"transfer direction {request.direction}") from None
        if any(queue.started for queue in self.queue_set.queues):
            raise RequestFailed("device state moves only while every ring is stopped")
        if self.transfer is not None and not self.transfer.done.is_set():
            raise RequestFailed("a device-state transfer is already under way")
        fd = message.fds.pop()
        os.set_blocking(fd, False)
        self.transfer = Transfer(direction)
        assert self._nursery is not None
        if direction is vu.TransferDirection.SAVE:
            self._nursery.start_soon(self._send_state, self.transfer, fd, state.save(self.device))
        else:
            self._nursery.start_soon(self._receive_state, self.transfer, fd)
        log.info("device_state.transfer", direction=direction.name)
        # Success, and no fd of our own: the front end's pipe carries the state.
        return u64_reply(vu.DEVICE_STATE_NOFD_FLAG)

    async def _send_state(self, transfer: Transfer, fd: int, blob: bytes) -> None:
        try:
            view = memoryview(blob)
            with transfer.scope, trio.fail_after(TRANSFER_TIMEOUT):
                while view:
                    await trio.lowlevel.wait_writable(fd)
                    try:
                        view = view[os.write(fd, view) :]
                    except BlockingIOError:
                        continue
        except (OSError, trio.TooSlowError) as exc:
            transfer.error = f"writing the state: {exc}"
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
            transfer.done.set()

    async def _receive_state(self, transfer: Transfer, fd: int) -> None:
        chunks: list[bytes] = []
        received = 0
        try:
            with transfer.scope, trio.fail_after(TRANSFER_TIMEOUT):
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > MAX_STATE_SIZE:
                        raise state.StateError(f"more than {MAX_STATE_SIZE} bytes of state")
                    chunks.append(chunk)
                state.load(self.device, b"".join(chunks))
                log.info("device_state.loaded", size=received)
        except (OSError, trio.TooSlowError, state.StateError) as exc:
            transfer.error = f"loading the state: {exc}"
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
            transfer.done.set()

    def check_device_state(self, message: Message) -> bytes:
        transfer, self.transfer = self.transfer, None
        if transfer is None:
            raise RequestFailed("no device-state transfer to check")
        if not transfer.done.is_set():
            transfer.scope.cancel()  # nothing may be loaded after a failed check
            transfer.error = f"the front end kept the pipe open for {TRANSFER_TIMEOUT:g} s"
        if transfer.error is not None:
            log.error("device_state.failed", reason=transfer.error)
            return u64_reply(1)
        return u64_reply(0)
