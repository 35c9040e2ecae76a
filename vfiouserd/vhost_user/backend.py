"""A vhost-user back-end session: one front-end connection serving one device.

The session checks every message against the wire rules (size, fds, feature
gating), applies it to the device's queues and guest memory, and answers:
the request's own reply, a REPLY_ACK when NEED_REPLY asks for one, or, for
a fatal protocol violation, a closed connection. Extra fds are always closed.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import trio
from construct import ConstructError, Container

from vfiouserd import handover, state
from vfiouserd.changes import Changes, Watched
from vfiouserd.devices.virtio import ConfigWriteError, Feature, VirtioDevice, bit
from vfiouserd.handover import CONNECTION, FdNames, Received
from vfiouserd.inflight import PackedInflight, SplitInflight
from vfiouserd.log import get_logger
from vfiouserd.memory import (
    GuestMemory,
    GuestMemoryError,
    Mapping,
    MemoryRegion,
    RegionSpec,
    SharedDirtyLog,
    memory_faults,
)
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.framing import ConnectionClosed, FramingError, close_fds
from vfiouserd.protocol.vhost_user import FrontendRequest as R
from vfiouserd.protocol.vhost_user import Message, ProtocolFeature
from vfiouserd.vhost_user import records
from vfiouserd.virtqueue import (
    MAX_QUEUE_SIZE,
    AddressSpace,
    QueueSet,
    RingError,
    Virtqueue,
)

log = get_logger("vhost_user")

FIRST_MESSAGE_TIMEOUT = 10.0  # an idle peer must not hold the device from its VMM
MAX_STATE_SIZE = 16 << 20  # a device-state blob is small; refuse to buffer more
MAX_MEM_SLOTS = 509  # what libvhost-user and rust-vmm advertise; QEMU allows 512


class RequestFailed(Exception):
    """The request is refused; the front end gets an error reply if it asked."""


class ProtocolViolation(Exception):
    """The front end broke the protocol in a way no reply can express."""


def _pf(*features: ProtocolFeature) -> int:
    return sum(bit(f) for f in features)


TRANSFER_TIMEOUT = 30.0  # a front end that never closes its end of the state pipe


@dataclass
class Transfer:
    """A device-state transfer over the front end's pipe (SET_DEVICE_STATE_FD)."""

    direction: vu.TransferDirection
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    error: str | None = None


@dataclass
class WithFds:
    """A reply payload that carries fds (closed here once sent)."""

    payload: bytes
    fds: list[int]


class VhostUserBackend:
    """Serves one connection; device state outside the queues survives it."""

    # What a handover's pause waits for (between messages, no config change
    # being announced, or the connection over): each assignment wakes it.
    _idle = Watched[bool]()
    _announcing = Watched[bool]()
    ending = Watched[bool]()

    def __init__(self, device: VirtioDevice, sock: trio.socket.SocketType) -> None:
        self.device = device
        self.sock = sock
        self.memory = GuestMemory(max_regions=MAX_MEM_SLOTS)
        self.queue_set = QueueSet(device, self.memory, AddressSpace.USER)
        self.acked_features = 0
        self.protocol_features = 0
        self.status = 0
        self.backend_channel: trio.socket.SocketType | None = None
        self.inflight: Mapping | None = None  # the front end's inflight region
        self.dirty_log: SharedDirtyLog | None = None  # SET_LOG_BASE, for migration
        self._log_kick_fd: int | None = None
        self.transfer: Transfer | None = None
        self._nursery: trio.Nursery | None = None
        self._inflight_views: list[memoryview] = []
        # mmap size and offset, queues and their size: for a handover
        self._inflight_description: tuple[int, int, int, int] | None = None
        self._log_description: tuple[int, int] | None = None  # size, offset
        # Handover: the loop parks between messages; queues a previous
        # daemon had running start with the session.
        self._changes = Changes()  # what a handover's pause waits on changed
        self._idle = False
        self._idle_scope: trio.CancelScope | None = None
        self._announcing = False
        self._parked = False
        self.ending = False
        self._finished = trio.Event()
        self._restored_queues: list[tuple[Virtqueue, bool]] = []
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
        self._config_wakeup = trio.Event()
        self._handlers: dict[R, Callable[[Message], bytes | WithFds | None]] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset_owner,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.RESET_DEVICE: self._reset_device,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
            R.GET_INFLIGHT_FD: self._get_inflight_fd,
            R.SET_INFLIGHT_FD: self._set_inflight_fd,
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: self._set_log_fd,
            R.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            R.CHECK_DEVICE_STATE: self._check_device_state,
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
        self.device.add_config_listener(self._config_wakeup.set)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.queue_set.bind(nursery)
                nursery.start_soon(self._announce_config_changes)
                if self._restored_queues:
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
        first = not self._restored_queues and self.acked_features == 0
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
                await self._dispatch(message)
            if memory_faults() != faults:
                raise ProtocolViolation("the front end truncated memory it shared")

    # -- handover (restart without disconnect) ------------------------------------

    async def pause(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self._changes.until(lambda: self.ending or (self._idle and not self._announcing))
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
        """Everything the front end set up, for the next daemon. The rings
        stopped between two requests, so their bases are exact."""
        queues = []
        for queue in self.queue_set.queues:
            started = queue.started
            base = self.queue_set.stop(queue)
            queues.append(
                records.Queue(
                    size=queue.size,
                    desc=queue.desc_address,
                    avail=queue.avail_address,
                    used=queue.used_address,
                    log=queue.log_address,
                    flags=queue.flags,
                    addresses_set=queue.addresses_set,
                    base=base,
                    enabled=queue.enabled,
                    started=started,
                    broken=queue.broken,
                    kick=names.name(queue.kick_fd),
                    call=names.name(queue.call_fd),
                    err=names.name(queue.err_fd),
                )
            )
        if self.transfer is not None:
            log.warning("handover.transfer_dropped", reason="a device-state transfer was open")
        dirty_log = None
        if self.dirty_log is not None and self._log_description is not None:
            size, offset = self._log_description
            dirty_log = records.DirtyLog(names.name(self.dirty_log.mapping.fd), size, offset)
        inflight = None
        if self.inflight is not None and self._inflight_description is not None:
            inflight = records.Inflight(names.name(self.inflight.fd), *self._inflight_description)
        kick = self.dirty_log.kick_fd if self.dirty_log is not None else self._log_kick_fd
        channel = self.backend_channel
        record = records.Session(
            connection=names.name(self.sock.fileno(), CONNECTION),
            acked_features=self.acked_features,
            protocol_features=self.protocol_features,
            status=self.status,
            memory=[
                records.Region(
                    region.guest_address,
                    region.size,
                    region.user_address,
                    region.mmap_offset,
                    names.name(region.spec.fd),
                )
                for region in self.memory.regions
            ],
            queues=queues,
            inflight=inflight,
            dirty_log=dirty_log,
            log_kick=names.name(kick),
            backend_channel=names.name(channel.fileno() if channel is not None else None),
        )
        return handover.record_to_document(record)

    @classmethod
    def restore(
        cls, device: VirtioDevice, document: dict[str, Any], received: Received
    ) -> VhostUserBackend:
        """The session a previous daemon handed over, set up again on the fds
        it stored; HandoverError if that cannot be done."""
        return handover.restore(lambda sock: cls(device, sock), document, received, "vhost-user")

    def take_over(self, document: dict[str, Any], fd: handover.FdByName) -> None:
        """Set up what ``document`` describes, on the fds ``fd`` gives by name."""
        record = handover.record_from_document(records.Session, document)
        self.protocol_features = record.protocol_features
        self.status = record.status
        self.memory.replace(
            [
                RegionSpec(
                    region.guest_address,
                    region.size,
                    fd(region.fd),
                    user_address=region.user_address,
                    mmap_offset=region.mmap_offset,
                )
                for region in record.memory
            ]
        )
        features = record.acked_features
        if features & ~self.offered_features:
            raise ValueError(f"features {features:#x} this device does not offer")
        self.acked_features = features
        self.queue_set.set_features(
            features & ~bit(vu.VHOST_USER_F_PROTOCOL_FEATURES) & ~bit(vu.VHOST_F_LOG_ALL)
        )
        if len(record.queues) != len(self.queue_set.queues):
            raise ValueError(f"{len(record.queues)} queues for {len(self.queue_set.queues)}")
        for queue, saved in zip(self.queue_set.queues, record.queues, strict=True):
            queue.size = saved.size
            queue.desc_address, queue.avail_address = saved.desc, saved.avail
            queue.used_address, queue.log_address = saved.used, saved.log
            queue.flags = saved.flags
            queue.addresses_set = saved.addresses_set
            queue.base = saved.base
            queue.enabled = saved.enabled
            queue.set_kick(fd(saved.kick))
            queue.set_call(fd(saved.call))
            queue.set_err(fd(saved.err))
            if saved.started:
                self._restored_queues.append((queue, saved.broken))
        inflight = record.inflight
        if inflight is not None:
            inflight_fd = fd(inflight.fd)
            if inflight_fd is None:
                raise ValueError("an inflight region without its fd")
            self._map_inflight(
                inflight_fd,
                inflight.mmap_size,
                inflight.mmap_offset,
                inflight.num_queues,
                inflight.queue_size,
            )
        if record.dirty_log is not None:
            log_fd = fd(record.dirty_log.fd)
            if log_fd is None:
                raise ValueError("a dirty log without its fd")
            self._map_log(log_fd, record.dirty_log.size, record.dirty_log.offset)
        kick = fd(record.log_kick)
        if kick is not None:
            if self.dirty_log is not None:
                self.dirty_log.kick_fd = kick
            else:
                self._log_kick_fd = kick
        self._update_logging()
        channel = fd(record.backend_channel)
        if channel is not None:
            self.backend_channel = trio.socket.from_stdlib_socket(socket.socket(fileno=channel))

    def _start_restored_queues(self) -> None:
        for queue, broken in self._restored_queues:
            try:
                self.queue_set.start(queue)
            except RingError as exc:
                queue.fail(f"cannot start again: {exc}")
            queue.broken = queue.broken or broken
        self._restored_queues.clear()

    def close(self) -> None:
        """Stop the rings, close every fd and the connection, unmap memory;
        the device stays."""
        self.device.remove_config_listener(self._config_wakeup.set)
        self.sock.close()
        self.queue_set.reset()
        self._drop_inflight()
        self._drop_log()
        self.memory.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None

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
        if message.request == R.CHECK_DEVICE_STATE and self.transfer is not None:
            # The answer is due once the transfer is over: the front end
            # closed its end of the pipe (or gave up).
            with trio.move_on_after(TRANSFER_TIMEOUT):
                await self.transfer.done.wait()
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
                await vu.write_message(
                    self.sock, vu.encode(message.request, reply.payload, reply=True), reply.fds
                )
            finally:
                close_fds(reply.fds)
        elif reply is not None:
            await self._send_reply(message.request, reply)
        elif message.need_reply:
            await self._send_reply(message.request, vu.U64.build({"value": 0}))

    async def _reply_for_failure(self, message: Message) -> None:
        """Express a failure in the request's own reply where it has a way to."""
        try:
            rule = vu.FRONTEND_RULES[R(message.request)]
        except ValueError:
            rule = None
        if rule is None or rule.reply is None:
            if message.need_reply:
                await self._send_reply(message.request, vu.U64.build({"value": 1}))
        elif rule.reply is vu.U64:
            await self._send_reply(message.request, vu.U64.build({"value": 1}))
        elif rule.reply is vu.Payload.CONFIG:
            await self._send_reply(message.request, b"")  # empty payload: error
        elif rule.reply is vu.InflightDescription:
            # No region (size 0, no fd): QEMU then runs without inflight tracking.
            await self._send_reply(message.request, bytes(vu.InflightDescription.sizeof()))
        else:
            raise ProtocolViolation(f"{R(message.request).name} failed and has no error reply")

    async def _send_reply(self, request: int, payload: bytes) -> None:
        await vu.write_message(self.sock, vu.encode(request, payload, reply=True))

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
        if gate is not None and not self.protocol_features & bit(gate):
            raise RequestFailed(f"needs protocol feature {gate.name}, not negotiated")
        handler = self._handlers.get(request)
        if handler is None:
            raise RequestFailed("not supported by this back end")
        try:
            return handler(message)
        except ConstructError as exc:
            raise RequestFailed(f"malformed payload: {exc}") from exc

    # -- helpers ------------------------------------------------------------------

    def _queue(self, index: int) -> Virtqueue:
        if index >= len(self.queue_set.queues):
            raise RequestFailed(
                f"vring index {index} out of range (device has {len(self.queue_set.queues)})"
            )
        return self.queue_set.queues[index]

    def _u64(self, message: Message) -> int:
        return int(message.parse(vu.U64).value)

    @staticmethod
    def _u64_reply(value: int) -> bytes:
        return vu.U64.build({"value": value})

    # -- features and ownership ----------------------------------------------

    def _get_features(self, message: Message) -> bytes:
        return self._u64_reply(self.offered_features)

    def _set_features(self, message: Message) -> None:
        features = self._u64(message)
        unknown = features & ~self.offered_features
        if unknown:
            raise RequestFailed(f"features {unknown:#x} were never offered")
        self.acked_features = features
        self.queue_set.set_features(
            features & ~bit(vu.VHOST_USER_F_PROTOCOL_FEATURES) & ~bit(vu.VHOST_F_LOG_ALL)
        )
        self._update_logging()
        if not features & bit(vu.VHOST_USER_F_PROTOCOL_FEATURES):
            for queue in self.queue_set.queues:  # no SET_VRING_ENABLE will come
                queue.enabled = True
                queue.wake()
        log.info("features.set", features=f"{features:#x}")

    def _get_protocol_features(self, message: Message) -> bytes:
        return self._u64_reply(self.offered_protocol_features)

    def _set_protocol_features(self, message: Message) -> None:
        features = self._u64(message)
        unknown = features & ~self.offered_protocol_features
        if unknown:
            raise RequestFailed(f"protocol features {unknown:#x} were never offered")
        self.protocol_features = features
        log.info("protocol_features.set", features=f"{features:#x}")

    def _set_owner(self, message: Message) -> None:
        return None

    def _reset_owner(self, message: Message) -> None:
        # Deprecated; the spec suggests treating it as "disable all rings".
        for queue in self.queue_set.queues:
            queue.enabled = False

    def _get_queue_num(self, message: Message) -> bytes:
        return self._u64_reply(len(self.queue_set.queues))

    def _reset_device(self, message: Message) -> None:
        self.queue_set.reset()
        self._drop_inflight()  # a reset front end starts a new region
        self.acked_features = 0
        self.status = 0
        log.info("device.reset")

    def _set_status(self, message: Message) -> None:
        status = self._u64(message)
        if status > 0xFF:
            raise RequestFailed(f"device status {status:#x} does not fit in 8 bits")
        # Recorded only: QEMU sends 0 before it stops the rings, and the rings
        # must keep their state for GET_VRING_BASE.
        self.status = status

    def _get_status(self, message: Message) -> bytes:
        return self._u64_reply(self.status)

    # -- memory -----------------------------------------------------------------

    def _set_mem_table(self, message: Message) -> None:
        (count,) = struct.unpack_from("=I", message.payload)
        if count > vu.MAX_TABLE_REGIONS:
            raise RequestFailed(f"{count} regions exceed {vu.MAX_TABLE_REGIONS}")
        exact = 8 + vu.MemoryRegion.sizeof() * count
        full = 8 + vu.MemoryRegion.sizeof() * vu.MAX_TABLE_REGIONS
        if len(message.payload) not in (exact, full):
            raise RequestFailed(f"memory table of {len(message.payload)} bytes for {count} regions")
        if len(message.fds) != count:
            raise RequestFailed(f"{len(message.fds)} fds for {count} regions")
        table = vu.MemoryTable.parse(message.payload[:exact])
        specs = [
            RegionSpec(
                r.guest_address, r.size, fd, user_address=r.user_address, mmap_offset=r.mmap_offset
            )
            for r, fd in zip(table.regions, message.fds, strict=True)
        ]
        try:
            self.memory.replace(specs)
        except (GuestMemoryError, OSError) as exc:
            raise RequestFailed(f"memory table refused: {exc}") from exc
        message.fds.clear()  # now owned by the mappings
        for region in self.memory.regions:
            self._log_region("memory.region", region)
        self.queue_set.memory_changed()

    @staticmethod
    def _log_region(event: str, region: MemoryRegion | Container) -> None:
        log.info(
            event,
            guest=f"{region.guest_address:#x}",
            size=region.size,
            user=f"{region.user_address:#x}",
            offset=region.mmap_offset,
        )

    def _get_max_mem_slots(self, message: Message) -> bytes:
        return self._u64_reply(MAX_MEM_SLOTS)

    def _add_mem_reg(self, message: Message) -> None:
        region = message.parse(vu.SingleMemoryRegion).region
        try:
            self.memory.add_region(
                RegionSpec(
                    region.guest_address,
                    region.size,
                    message.fds[0],
                    user_address=region.user_address,
                    mmap_offset=region.mmap_offset,
                )
            )
        except (GuestMemoryError, OSError) as exc:
            raise RequestFailed(f"region refused: {exc}") from exc
        message.fds.clear()
        self._log_region("memory.add", region)
        self.queue_set.memory_changed()

    def _rem_mem_reg(self, message: Message) -> None:
        close_fds(message.fds)  # tolerated for old front ends, never used
        region = message.parse(vu.SingleMemoryRegion).region
        try:
            self.memory.remove(
                self.memory.find_exact(region.guest_address, region.size, region.user_address)
            )
        except GuestMemoryError as exc:
            raise RequestFailed(str(exc)) from exc
        log.info("memory.remove", guest=f"{region.guest_address:#x}", size=region.size)
        self.queue_set.memory_changed()

    # -- rings ------------------------------------------------------------------

    def _set_vring_num(self, message: Message) -> None:
        state = message.parse(vu.VringState)
        queue = self._queue(state.index)
        if queue.started:
            raise RequestFailed(f"vring {state.index} is running")
        limit = min(MAX_QUEUE_SIZE, self.device.max_queue_size)
        if not 1 <= state.num <= limit:
            raise RequestFailed(f"vring size {state.num} not in 1..{limit}")
        queue.size = state.num

    def _set_vring_addr(self, message: Message) -> None:
        addr = message.parse(vu.VringAddr)
        queue = self._queue(addr.index)
        if addr.flags & ~vu.VRING_FLAG_LOG:
            raise RequestFailed(f"unknown vring flags {addr.flags:#x}")
        if addr.flags & vu.VRING_FLAG_LOG and not self.protocol_features & bit(
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

    def _set_vring_base(self, message: Message) -> None:
        state = message.parse(vu.VringState)
        queue = self._queue(state.index)
        if queue.started:
            raise RequestFailed(f"vring {state.index} is running")
        queue.base = state.num
        queue.ring = None

    def _get_vring_base(self, message: Message) -> bytes:
        state = message.parse(vu.VringState)
        if state.index >= len(self.queue_set.queues):
            raise ProtocolViolation(f"GET_VRING_BASE for vring {state.index}, which does not exist")
        queue = self.queue_set.queues[state.index]
        base = self.queue_set.stop(queue)
        queue.set_kick(None)
        return vu.VringState.build({"index": state.index, "num": base})

    def _vring_fd(self, message: Message) -> tuple[Virtqueue, int | None]:
        value = self._u64(message)
        if value & ~(vu.VRING_INDEX_MASK | vu.VRING_NOFD_FLAG):
            raise RequestFailed(f"reserved bits set in {value:#x}")
        queue = self._queue(value & vu.VRING_INDEX_MASK)
        nofd = bool(value & vu.VRING_NOFD_FLAG)
        if nofd != (not message.fds):
            raise RequestFailed("the invalid-fd flag disagrees with the fds sent")
        fd = None if nofd else message.fds.pop()
        return queue, fd

    def _set_vring_kick(self, message: Message) -> None:
        queue, fd = self._vring_fd(message)
        queue.set_kick(fd)
        try:
            self.queue_set.start(queue)  # also serves what is already available
        except RingError as exc:
            raise RequestFailed(f"vring {queue.index} cannot start: {exc}") from exc

    def _set_vring_call(self, message: Message) -> None:
        queue, fd = self._vring_fd(message)
        queue.set_call(fd)
        if queue.started and queue.enabled:
            queue.signal_call()  # harmless, and un-sticks a driver after reconnection

    def _set_vring_err(self, message: Message) -> None:
        queue, fd = self._vring_fd(message)
        queue.set_err(fd)

    def _set_vring_enable(self, message: Message) -> None:
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

    # -- dirty logging (migration) ---------------------------------------------

    def _set_log_base(self, message: Message) -> bytes:
        description = message.parse(vu.LogDescription)
        if not message.fds:
            raise RequestFailed("SET_LOG_BASE without the log's fd")
        self._map_log(message.fds.pop(), description.size, description.offset)
        return self._u64_reply(0)

    def _map_log(self, fd: int, size: int, offset: int) -> None:
        try:
            mapping = Mapping.map_fd(fd, size, file_offset=offset)
        except GuestMemoryError as exc:
            os.close(fd)
            raise RequestFailed(f"dirty log: {exc}") from exc
        # The log fd (SET_LOG_FD) stays with whichever log is current.
        kick_fd, self._log_kick_fd = self._log_kick_fd, None
        if self.dirty_log is not None:
            kick_fd, self.dirty_log.kick_fd = self.dirty_log.kick_fd, None
        self._drop_log()  # QEMU sends a new, bigger log when memory grows
        self.dirty_log = SharedDirtyLog(mapping, size)
        self.dirty_log.kick_fd = kick_fd
        self._log_description = (size, offset)
        self._update_logging()
        log.info("dirty_log.set", size=size)

    def _set_log_fd(self, message: Message) -> None:
        fd = message.fds.pop()
        os.set_blocking(fd, False)
        if self.dirty_log is not None:
            if self.dirty_log.kick_fd is not None:
                os.close(self.dirty_log.kick_fd)
            self.dirty_log.kick_fd = fd
        else:
            if self._log_kick_fd is not None:
                os.close(self._log_kick_fd)
            self._log_kick_fd = fd

    def _update_logging(self) -> None:
        """Writes are logged while the front end asks (LOG_ALL) and a log exists."""
        logging = bool(self.acked_features & bit(vu.VHOST_F_LOG_ALL)) and self.dirty_log
        self.memory.dirty = self.dirty_log if logging else None
        self.queue_set.memory_changed()  # the fast path does not log: rings look again

    def _drop_log(self) -> None:
        self.memory.dirty = None
        if self.dirty_log is not None:
            if self.dirty_log.beyond:
                log.warning("dirty_log.too_small", pages_not_logged=self.dirty_log.beyond)
            self.dirty_log.close()
            self.dirty_log = None
            self._log_description = None
        if self._log_kick_fd is not None:
            os.close(self._log_kick_fd)
            self._log_kick_fd = None

    # -- device state (migration of the device's own state) ----------------------

    def _set_device_state_fd(self, message: Message) -> bytes:
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
        return self._u64_reply(vu.DEVICE_STATE_NOFD_FLAG)

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

    def _check_device_state(self, message: Message) -> bytes:
        transfer, self.transfer = self.transfer, None
        if transfer is None:
            raise RequestFailed("no device-state transfer to check")
        if not transfer.done.is_set():
            transfer.scope.cancel()  # nothing may be loaded after a failed check
            transfer.error = f"the front end kept the pipe open for {TRANSFER_TIMEOUT:g} s"
        if transfer.error is not None:
            log.error("device_state.failed", reason=transfer.error)
            return self._u64_reply(1)
        return self._u64_reply(0)

    # -- inflight I/O tracking -------------------------------------------------

    def _inflight_request(self, message: Message) -> tuple[Container, int]:
        request = message.parse(vu.InflightDescription)
        if not 1 <= request.num_queues <= len(self.queue_set.queues):
            raise RequestFailed(
                f"{request.num_queues} queues; the device has {len(self.queue_set.queues)}"
            )
        if not 1 <= request.queue_size <= min(MAX_QUEUE_SIZE, self.device.max_queue_size):
            raise RequestFailed(f"queue size {request.queue_size}")
        packed = bool(self.acked_features & bit(Feature.RING_PACKED))
        return request, vu.inflight_region_size(request.queue_size, packed)

    def _get_inflight_fd(self, message: Message) -> WithFds:
        request, per_queue = self._inflight_request(message)
        size = per_queue * request.num_queues
        fd = os.memfd_create("vfiouserd-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # zero-filled: a fresh region
            if self.acked_features & bit(Feature.RING_PACKED):
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

    def _set_inflight_fd(self, message: Message) -> None:
        request, per_queue = self._inflight_request(message)
        if any(queue.started for queue in self.queue_set.queues):
            raise RequestFailed("rings are running")
        if request.mmap_size < per_queue * request.num_queues:
            raise RequestFailed(
                f"{request.mmap_size} bytes for {request.num_queues} queues of "
                f"{request.queue_size}: {per_queue * request.num_queues} needed"
            )
        self._map_inflight(
            message.fds.pop(),
            request.mmap_size,
            request.mmap_offset,
            request.num_queues,
            request.queue_size,
        )

    def _map_inflight(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        packed = bool(self.acked_features & bit(Feature.RING_PACKED))
        per_queue = vu.inflight_region_size(queue_size, packed)
        try:
            mapping = Mapping.map_fd(fd, mmap_size, file_offset=mmap_offset)
        except GuestMemoryError as exc:
            os.close(fd)
            raise RequestFailed(f"inflight region: {exc}") from exc
        self._drop_inflight()
        self.inflight = mapping
        self._inflight_description = (mmap_size, mmap_offset, num_queues, queue_size)
        start = mapping.lead
        for index in range(num_queues):
            view = mapping.buffer[start + index * per_queue : start + (index + 1) * per_queue]
            self._inflight_views.append(view)
            tracker = PackedInflight if packed else SplitInflight
            self.queue_set.queues[index].inflight = tracker(view, queue_size)
        log.info("inflight.set", size=mmap_size, queues=num_queues, packed=packed)

    def _drop_inflight(self) -> None:
        """Forget the region (rings stopped first: they must not touch it)."""
        for queue in self.queue_set.queues:
            queue.inflight = None
        for view in self._inflight_views:
            view.release()
        self._inflight_views.clear()
        self._inflight_description = None
        if self.inflight is not None:
            self.inflight.unmap()
            self.inflight = None

    # -- config space and back-end channel -------------------------------------

    @staticmethod
    def _config_header(message: Message) -> tuple[int, int, int]:
        header = vu.ConfigHeader.parse(message.payload)
        if len(message.payload) != vu.ConfigHeader.sizeof() + header.size:
            raise RequestFailed("config size field disagrees with the payload")
        if header.offset + header.size > vu.MAX_CONFIG_SIZE:
            raise RequestFailed(
                f"config access {header.offset}+{header.size} beyond {vu.MAX_CONFIG_SIZE} bytes"
            )
        if header.flags & ~vu.CONFIG_FLAG_MIGRATION:
            raise RequestFailed(f"unknown config flags {header.flags:#x}")
        return header.offset, header.size, header.flags

    def _get_config(self, message: Message) -> bytes:
        offset, size, _ = self._config_header(message)
        space = self.device.config().ljust(vu.MAX_CONFIG_SIZE, b"\0")
        return message.payload[: vu.ConfigHeader.sizeof()] + space[offset : offset + size]

    def _set_config(self, message: Message) -> None:
        offset, _, flags = self._config_header(message)
        try:
            self.device.write_config(
                offset,
                message.payload[vu.ConfigHeader.sizeof() :],
                migration=bool(flags & vu.CONFIG_FLAG_MIGRATION),
            )
        except ConfigWriteError as exc:
            raise RequestFailed(str(exc)) from exc

    async def _announce_config_changes(self) -> None:
        """Tell the front end when the device's config changed (e.g. a disk grew)."""
        while True:
            await self._config_wakeup.wait()
            self.device.remove_config_listener(self._config_wakeup.set)
            self._config_wakeup = trio.Event()
            self.device.add_config_listener(self._config_wakeup.set)
            self._announcing = True  # a handover waits for the reply
            try:
                await self._send_config_change()
            finally:
                self._announcing = False

    async def _send_config_change(self) -> None:
        channel = self.backend_channel
        if channel is None:
            log.warning("config.change_not_announced", reason="no back-end channel")
            return
        need_reply = bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))
        request = vu.BackendRequest.CONFIG_CHANGE_MSG
        try:
            await vu.write_message(channel, vu.encode(request, need_reply=need_reply))
            if need_reply:
                with trio.fail_after(5):
                    reply = await vu.read_message(channel)
                reply.close_fds()
                status = vu.U64.parse(reply.payload).value if len(reply.payload) == 8 else -1
                if reply.request != request or not reply.is_reply or status != 0:
                    log.warning("config.change_refused", request=reply.request, status=status)
                    return
        except (ConnectionClosed, FramingError, OSError, trio.TooSlowError) as exc:
            log.warning("backend_channel.failed", reason=str(exc) or type(exc).__name__)
            channel.close()
            self.backend_channel = None
            return
        log.info("config.change_announced")

    def _set_backend_req_fd(self, message: Message) -> None:
        # Checked before the fd changes hands: a socket object refuses a
        # file or a pipe, and the fd must then stay the message's to close.
        if not stat.S_ISSOCK(os.fstat(message.fds[-1]).st_mode):
            raise RequestFailed("the back-end channel fd is not a socket")
        fd = message.fds.pop()
        channel = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = channel
