"""A vhost-user back-end session: one front-end connection serving one device.

The session checks every message against the wire rules (size, fds, feature
gating), applies it to the device's queues and guest memory, and answers:
the request's own reply, a REPLY_ACK when NEED_REPLY asks for one, or, for
a fatal protocol violation, a closed connection. Extra fds are always closed.

The back end keeps the connection, the request table, features and
ownership, and the lifecycle (serve, pause for a handover, close); the
requests are applied in memory.py, rings.py, dirty_log.py,
device_state.py, inflight.py, config.py and backend_channel.py, and
handover.py writes and reads the record.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import trio
from construct import ConstructError

from vfiouserd import handover
from vfiouserd.changes import Changes, Watched
from vfiouserd.devices.virtio import VirtioDevice, bit
from vfiouserd.handover import FdNames, Received
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemory, memory_faults
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError, close_fds
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.protocol.vhost_user import Message, ProtocolFeature
from vfiouserd.trace import tracer
from vfiouserd.vhost_user import handover as session_handover
from vfiouserd.vhost_user.backend_channel import BackendChannel
from vfiouserd.vhost_user.config import ConfigSpace
from vfiouserd.vhost_user.device_state import DeviceState
from vfiouserd.vhost_user.dirty_log import DirtyLog
from vfiouserd.vhost_user.features import Features
from vfiouserd.vhost_user.inflight import InflightRegion
from vfiouserd.vhost_user.memory import MAX_MEM_SLOTS, MemoryTable
from vfiouserd.vhost_user.messages import (
    ProtocolViolation,
    RequestFailed,
    WithFds,
    trace_received,
    trace_sent,
    u64,
    u64_reply,
)
from vfiouserd.vhost_user.rings import Rings
from vfiouserd.virtqueue import AddressSpace, QueueSet, RingError, Virtqueue

__all__ = ["ProtocolViolation", "RequestFailed", "VhostUserBackend", "WithFds"]

log = get_logger("vhost_user")

FIRST_MESSAGE_TIMEOUT = 10.0  # an idle peer must not hold the device from its VMM
# GET_INFLIGHT_FD's error reply, size 0 and no fd: QEMU then runs without
# inflight tracking.
NO_INFLIGHT_REGION = bytes(vu.InflightDescription.sizeof())


def _pf(*features: ProtocolFeature) -> int:
    return sum(bit(f) for f in features)


class VhostUserBackend:
    """Serves one connection; device state outside the queues survives it."""

    # What a handover's pause waits for (between messages, no config change
    # being announced, or the connection over): each assignment wakes it.
    _idle = Watched[bool]()
    ending = Watched[bool]()

    def __init__(self, device: VirtioDevice, sock: trio.socket.SocketType) -> None:
        self.device = device
        self.sock = sock
        self.memory = GuestMemory(max_regions=MAX_MEM_SLOTS)
        self.queue_set = QueueSet(device, self.memory, AddressSpace.USER)
        self.features = Features()
        self.status = 0
        # Handover: the loop parks between messages; queues a previous
        # daemon had running start with the session.
        self._changes = Changes()  # what a handover's pause waits on changed
        self._idle = False
        self._idle_scope: trio.CancelScope | None = None
        self._parked = False
        self.ending = False
        self._finished = trio.Event()
        self.restored_queues: list[tuple[Virtqueue, bool]] = []
        self.memory_table = MemoryTable(self.memory, self.queue_set)
        self.rings = Rings(device, self.queue_set, self.features)
        self.dirty_log = DirtyLog(self.memory, self.queue_set, self.features)
        self.device_state = DeviceState(device, self.queue_set)
        self.inflight = InflightRegion(device, self.queue_set, self.features)
        self.config_space = ConfigSpace(device)
        self.backend_channel = BackendChannel(device, self.features, self._changes)
        self.offered_protocol_features = _pf(
            ProtocolFeature.MQ,
            ProtocolFeature.REPLY_ACK,
            ProtocolFeature.CONFIGURE_MEM_SLOTS,
            ProtocolFeature.RESET_DEVICE,
            ProtocolFeature.STATUS,
            ProtocolFeature.INFLIGHT_SHMFD,
            ProtocolFeature.LOG_SHMFD,
            ProtocolFeature.DEVICE_STATE,
        )
        if device.config():  # QEMU warns of CONFIG for a device without a config space
            self.offered_protocol_features |= bit(ProtocolFeature.CONFIG)
        if device.config_can_change:
            self.offered_protocol_features |= bit(ProtocolFeature.BACKEND_REQ)
        if device.announces:
            self.offered_protocol_features |= bit(ProtocolFeature.RARP)
        memory, rings = self.memory_table, self.rings
        self._handlers: dict[R, Callable[[Message], bytes | WithFds | None]] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.SET_MEM_TABLE: memory.set_mem_table,
            R.SET_VRING_NUM: rings.set_vring_num,
            R.SET_VRING_ADDR: rings.set_vring_addr,
            R.SET_VRING_BASE: rings.set_vring_base,
            R.GET_VRING_BASE: rings.get_vring_base,
            R.SET_VRING_KICK: rings.set_vring_kick,
            R.SET_VRING_CALL: rings.set_vring_call,
            R.SET_VRING_ERR: rings.set_vring_err,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_VRING_ENABLE: rings.set_vring_enable,
            R.SET_BACKEND_REQ_FD: self.backend_channel.set_backend_req_fd,
            R.GET_CONFIG: self.config_space.get_config,
            R.SET_CONFIG: self.config_space.set_config,
            R.RESET_DEVICE: self._reset_device,
            R.GET_MAX_MEM_SLOTS: memory.get_max_mem_slots,
            R.ADD_MEM_REG: memory.add_mem_reg,
            R.REM_MEM_REG: memory.rem_mem_reg,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
            R.GET_INFLIGHT_FD: self.inflight.get_inflight_fd,
            R.SET_INFLIGHT_FD: self.inflight.set_inflight_fd,
            R.SET_LOG_BASE: self.dirty_log.set_log_base,
            R.SET_LOG_FD: self.dirty_log.set_log_fd,
            R.SET_DEVICE_STATE_FD: self.device_state.set_device_state_fd,
            R.CHECK_DEVICE_STATE: self.device_state.check_device_state,
            R.SEND_RARP: self._send_rarp,
        }
        # Requests legal only once a protocol feature is negotiated.
        self._gates: dict[R, ProtocolFeature] = {
            R.GET_QUEUE_NUM: ProtocolFeature.MQ,
            R.GET_CONFIG: ProtocolFeature.CONFIG,
            R.SET_CONFIG: ProtocolFeature.CONFIG,
            R.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
            R.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
            R.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
            R.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
            R.SET_STATUS: ProtocolFeature.STATUS,
            R.GET_STATUS: ProtocolFeature.STATUS,
            R.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
            R.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
            R.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
            R.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,
            R.SET_LOG_FD: ProtocolFeature.LOG_SHMFD,
            R.SET_DEVICE_STATE_FD: ProtocolFeature.DEVICE_STATE,
            R.CHECK_DEVICE_STATE: ProtocolFeature.DEVICE_STATE,
            R.SEND_RARP: ProtocolFeature.RARP,
        }

    @property
    def offered_features(self) -> int:
        # LOG_ALL is vhost's, never the guest's: the front end sets it while
        # it migrates, to have every write to guest memory logged.
        return (
            self.device.features | bit(vu.VHOST_USER_F_PROTOCOL_FEATURES) | bit(vu.VHOST_F_LOG_ALL)
        )

    # -- connection loop ------------------------------------------------------

    async def serve(self) -> None:
        self.backend_channel.listen()
        try:
            async with trio.open_nursery() as nursery:
                self.device_state.start(nursery)
                self.queue_set.bind(nursery)
                nursery.start_soon(self.backend_channel.announce_config_changes)
                if self.restored_queues:
                    self._start_restored_queues()
                try:
                    await self._message_loop()
                except ConnectionClosed as exc:
                    self.ending = True  # even if a handover parked it meanwhile
                    log.info("session.closed", reason=str(exc) or "end of stream")
                except (FramingError, ProtocolViolation) as exc:
                    self.ending = True
                    log.error("session.fatal", reason=str(exc))
                except trio.TooSlowError:
                    self.ending = True
                    log.error(
                        "session.fatal",
                        reason=f"no message within {FIRST_MESSAGE_TIMEOUT:g} s of connecting",
                    )
                self.ending = self.ending or not self._parked
                nursery.cancel_scope.cancel()
        finally:
            self.ending = self.ending or not self._parked
            self._finished.set()
            if self.ending:
                self.close()

    async def _message_loop(self) -> None:
        faults = memory_faults()
        first = not self.restored_queues and self.features.acked == 0
        while not self._parked:
            # Between messages: the only place a handover may stop the session.
            self._idle = True
            deadline = trio.fail_after(FIRST_MESSAGE_TIMEOUT) if first else nullcontext()
            with trio.CancelScope() as self._idle_scope, deadline:
                await trio.lowlevel.wait_readable(self.sock)
            self._idle = False
            if self._idle_scope.cancelled_caught:
                continue
            first = False
            # A message is read and answered whole, whatever else happens.
            with trio.CancelScope(shield=True):
                message = await vu.read_message(self.sock)
                if tracer.wants("message"):
                    trace_received(message)
                await self._dispatch(message)
            if memory_faults() != faults:
                raise ProtocolViolation("the front end truncated memory it shared")

    # -- handover (restart without disconnect) ------------------------------------

    async def pause(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self._changes.until(
                lambda: self.ending or (self._idle and not self.backend_channel.announcing)
            )
            if self.ending:
                return False
            self._parked = True
            if self._idle_scope is not None:
                self._idle_scope.cancel()
            await self._finished.wait()
            if self.ending:  # the VMM hung up just then: nothing to hand over
                return False
            log.info("session.paused")
            return True
        return False

    def snapshot(self, names: FdNames) -> dict[str, Any]:
        """Everything the front end set up, for the next daemon."""
        return session_handover.snapshot(self, names)

    @classmethod
    def restore(
        cls, device: VirtioDevice, document: dict[str, Any], received: Received
    ) -> VhostUserBackend:
        """The session a previous daemon handed over, set up again on the fds
        it stored; HandoverError if that cannot be done."""
        return handover.restore(lambda sock: cls(device, sock), document, received, "vhost-user")

    def take_over(self, document: dict[str, Any], fd: handover.FdByName) -> None:
        """Set up what ``document`` describes, on the fds ``fd`` gives by name."""
        session_handover.take_over(self, document, fd)

    def _start_restored_queues(self) -> None:
        for queue, broken in self.restored_queues:
            try:
                self.queue_set.start(queue)
            except RingError as exc:
                queue.fail(f"cannot start again: {exc}")
            queue.broken = queue.broken or broken
        self.restored_queues.clear()

    def close(self) -> None:
        """Stop the rings, close every fd and the connection, unmap memory;
        the device stays."""
        self.backend_channel.stop_listening()
        self.sock.close()
        self.queue_set.reset()
        self.inflight.drop()
        self.dirty_log.drop()
        self.memory.clear()
        self.backend_channel.close()

    # -- requests -------------------------------------------------------------

    async def _dispatch(self, message: Message) -> None:
        try:
            name = R(message.request).name
        except ValueError:
            name = f"unknown({message.request})"
        log.debug(
            "request",
            request=name,
            size=len(message.payload),
            fds=len(message.fds),
            need_reply=message.need_reply,
        )
        if message.request == R.CHECK_DEVICE_STATE:
            await self.device_state.until_transfer_over()
        try:
            reply = self._handle(message)
        except RequestFailed as exc:
            message.close_fds()
            log.warning("request.failed", request=name, reason=str(exc))
            await self._reply_for_failure(message)
            return
        except BaseException:
            message.close_fds()
            raise
        if isinstance(reply, WithFds):
            try:
                data = vu.encode(message.request, reply.payload, reply=True)
                if tracer.wants("message"):
                    trace_sent(data, len(reply.fds))
                await vu.write_message(self.sock, data, reply.fds)
            finally:
                close_fds(reply.fds)
        elif reply is not None:
            await self._send_reply(message.request, reply)
        elif message.need_reply:
            await self._send_reply(message.request, u64_reply(0))

    async def _reply_for_failure(self, message: Message) -> None:
        """Express a failure in the request's own reply where it has a way to."""
        try:
            rule = vu.FRONTEND_RULES[R(message.request)]
        except ValueError:
            rule = None
        if rule is None or rule.reply is None:
            if message.need_reply:
                await self._send_reply(message.request, u64_reply(1))
        elif rule.reply is vu.U64:
            await self._send_reply(message.request, u64_reply(1))
        elif rule.reply is vu.Payload.CONFIG:
            await self._send_reply(message.request, b"")  # empty payload: error
        elif rule.reply is vu.InflightDescription:
            await self._send_reply(message.request, NO_INFLIGHT_REGION)
        else:
            raise ProtocolViolation(f"{R(message.request).name} failed and has no error reply")

    async def _send_reply(self, request: int, payload: bytes) -> None:
        data = vu.encode(request, payload, reply=True)
        if tracer.wants("message"):
            trace_sent(data, 0)
        await vu.write_message(self.sock, data)

    def _handle(self, message: Message) -> bytes | WithFds | None:
        if message.is_reply:
            raise RequestFailed("front end sent a message with the REPLY flag")
        try:
            request = R(message.request)
        except ValueError:
            raise RequestFailed(f"unknown request {message.request}") from None
        rule = vu.FRONTEND_RULES[request]
        if message.fds_truncated:
            raise RequestFailed("more fds than the back end accepts in one message")
        if not rule.min_fds <= len(message.fds) <= rule.max_fds:
            raise RequestFailed(f"{len(message.fds)} fds, expected {rule.min_fds}-{rule.max_fds}")
        if not rule.payload_size_ok(len(message.payload)):
            raise RequestFailed(f"payload of {len(message.payload)} bytes")
        gate = self._gates.get(request)
        if gate is not None and not self.features.has_protocol(gate):
            raise RequestFailed(f"needs protocol feature {gate.name}, not negotiated")
        handler = self._handlers.get(request)
        if handler is None:
            raise RequestFailed("not supported by this back end")
        try:
            return handler(message)
        except ConstructError as exc:
            raise RequestFailed(f"malformed payload: {exc}") from exc

    # -- features, ownership, status ------------------------------------------

    def _get_features(self, message: Message) -> bytes:
        return u64_reply(self.offered_features)

    def _set_features(self, message: Message) -> None:
        features = u64(message)
        unknown = features & ~self.offered_features
        if unknown:
            raise RequestFailed(f"features {unknown:#x} were never offered")
        self.features.acked = features
        self.queue_set.set_features(self.features.device_bits)
        self.dirty_log.update()
        if not features & bit(vu.VHOST_USER_F_PROTOCOL_FEATURES):
            for queue in self.queue_set.queues:  # no SET_VRING_ENABLE will come
                queue.enabled = True
                queue.wake()
        log.info("features.set", features=f"{features:#x}")

    def _send_rarp(self, message: Message) -> None:
        # The MAC in the payload's first six bytes (QEMU copies it there).
        self.device.announce(message.payload[:6])

    def _get_protocol_features(self, message: Message) -> bytes:
        return u64_reply(self.offered_protocol_features)

    def _set_protocol_features(self, message: Message) -> None:
        features = u64(message)
        unknown = features & ~self.offered_protocol_features
        if unknown:
            raise RequestFailed(f"protocol features {unknown:#x} were never offered")
        self.features.protocol = features
        log.info("protocol_features.set", features=f"{features:#x}")

    def _set_owner(self, message: Message) -> None:
        return None

    def _reset_owner(self, message: Message) -> None:
        # Deprecated; the spec suggests treating it as "disable all rings".
        for queue in self.queue_set.queues:
            queue.enabled = False

    def _get_queue_num(self, message: Message) -> bytes:
        return u64_reply(len(self.queue_set.queues))

    def _reset_device(self, message: Message) -> None:
        self.queue_set.reset()
        self.inflight.drop()  # a reset front end starts a new region
        self.features.acked = 0
        self.status = 0
        log.info("device.reset")

    def _set_status(self, message: Message) -> None:
        status = u64(message)
        if status > 0xFF:
            raise RequestFailed(f"device status {status:#x} does not fit in 8 bits")
        # Recorded only: QEMU sends 0 before it stops the rings, and the rings
        # must keep their state for GET_VRING_BASE.
        self.status = status

    def _get_status(self, message: Message) -> bytes:
        return u64_reply(self.status)
