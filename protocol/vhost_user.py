"""vhost-user wire format (QEMU docs/interop/vhost-user.rst).

Bytes only: the 12-byte header, every front-end request (1-43) and back-end
request (1-8) with its payload layouts, the protocol feature bits, and the
per-request rules a receiver checks before it looks at the contents: payload
size, number of file descriptors, and whether a reply is always due.

All numbers are in the host's native byte order, as the spec says.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import trio
from construct import (
    Array,
    Bytes,
    Construct,
    Container,
    Int8un,
    Int16un,
    Int32un,
    Int64un,
    Padding,
    Struct,
    this,
)

from vfiouserd.protocol.framing import FramingError, Received, close_fds, receive_exactly, send_all

VERSION = 0x1
VERSION_MASK = 0x3
REPLY_FLAG = 0x4
NEED_REPLY_FLAG = 0x8
HEADER_SIZE = 12

# No legitimate payload is near this (the largest is a config access of
# 12 + 256 bytes); a bigger size is a fatal framing error.
MAX_PAYLOAD_SIZE = 4096
MAX_CONFIG_SIZE = 256
MAX_TABLE_REGIONS = 8  # regions in one SET_MEM_TABLE
VRING_INDEX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR: bits 0-7 index
VRING_NOFD_FLAG = 0x100  # ... bit 8: no fd attached (polling)
VRING_FLAG_LOG = 0x1  # SET_VRING_ADDR flags: log used-ring writes
CONFIG_FLAG_MIGRATION = 0x1  # GET/SET_CONFIG flags
DEVICE_STATE_NOFD_FLAG = 0x100  # SET_DEVICE_STATE_FD reply: no fd returned
VHOST_USER_F_PROTOCOL_FEATURES = 30  # virtio feature bit reused by vhost-user
VHOST_F_LOG_ALL = 26
LOG_PAGE_SIZE = 0x1000


class FrontendRequest(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


# --- payload layouts -------------------------------------------------------

Header = Struct("request" / Int32un, "flags" / Int32un, "size" / Int32un)

U64 = Struct("value" / Int64un)

VringState = Struct("index" / Int32un, "num" / Int32un)

VringAddr = Struct(
    "index" / Int32un,
    "flags" / Int32un,
    "descriptor" / Int64un,
    "used" / Int64un,
    "available" / Int64un,
    "log" / Int64un,
)

MemoryRegion = Struct(
    "guest_address" / Int64un,
    "size" / Int64un,
    "user_address" / Int64un,
    "mmap_offset" / Int64un,
)

# With VHOST_USER_PROTOCOL_F_XEN_MMAP each region carries two more fields.
XenMemoryRegion = Struct(
    "guest_address" / Int64un,
    "size" / Int64un,
    "user_address" / Int64un,
    "mmap_offset" / Int64un,
    "xen_mmap_flags" / Int32un,
    "domid" / Int32un,
)

MemoryTable = Struct(
    "num_regions" / Int32un,
    Padding(4),
    "regions" / Array(this.num_regions, MemoryRegion),
)

SingleMemoryRegion = Struct(Padding(8), "region" / MemoryRegion)

LogDescription = Struct("size" / Int64un, "offset" / Int64un)

# struct vhost_iotlb_msg, with the C compiler's tail padding.
IotlbMessage = Struct(
    "iova" / Int64un,
    "size" / Int64un,
    "user_address" / Int64un,
    "permissions" / Int8un,
    "type" / Int8un,
    Padding(6),
)

ConfigHeader = Struct("offset" / Int32un, "size" / Int32un, "flags" / Int32un)
ConfigAccess = Struct(
    "offset" / Int32un,
    "size" / Int32un,
    "flags" / Int32un,
    "payload" / Bytes(this.size),
)

VringArea = Struct("index_and_flags" / Int64un, "size" / Int64un, "offset" / Int64un)

# VhostUserInflight is not packed in C: 20 bytes of fields, 24 on the wire.
InflightDescription = Struct(
    "mmap_size" / Int64un,
    "mmap_offset" / Int64un,
    "num_queues" / Int16un,
    "queue_size" / Int16un,
    Padding(4),
)

# The inflight region itself (shared memory, not a message): vhost_user_inflight.

SharedObject = Struct("uuid" / Bytes(16))

DeviceStateTransfer = Struct("direction" / Int32un, "phase" / Int32un)


class TransferDirection(enum.IntEnum):
    SAVE = 0
    LOAD = 1


class MigrationPhase(enum.IntEnum):
    STOPPED = 0


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


# --- per-request rules -----------------------------------------------------


class Payload(enum.Enum):
    """Payload shapes whose size is not one fixed struct size."""

    NONE = "none"
    MEMORY_TABLE = "memory table"
    CONFIG = "config access"
    OPAQUE = "opaque"  # crypto sessions: QEMU-internal, version-dependent layout


@dataclass(frozen=True)
class RequestRule:
    payload: Construct | Payload
    reply: Construct | Payload | None  # None: no reply unless NEED_REPLY asks
    min_fds: int = 0
    max_fds: int = 0

    def payload_size_ok(self, size: int, num_regions: int | None = None) -> bool:
        if self.payload is Payload.NONE:
            return size == 0
        if self.payload is Payload.OPAQUE:
            return True
        if self.payload is Payload.CONFIG:
            return bool(size >= ConfigHeader.sizeof())
        if self.payload is Payload.MEMORY_TABLE:
            return size >= 8
        assert isinstance(self.payload, Construct)
        return bool(size == self.payload.sizeof())


_N = Payload.NONE

FRONTEND_RULES: dict[FrontendRequest, RequestRule] = {
    FrontendRequest.GET_FEATURES: RequestRule(_N, U64),
    FrontendRequest.SET_FEATURES: RequestRule(U64, None),
    FrontendRequest.SET_OWNER: RequestRule(_N, None),
    FrontendRequest.RESET_OWNER: RequestRule(_N, None),
    FrontendRequest.SET_MEM_TABLE: RequestRule(
        Payload.MEMORY_TABLE, None, min_fds=0, max_fds=MAX_TABLE_REGIONS
    ),
    # The fd comes only with LOG_SHMFD; the reply is due in that case too.
    FrontendRequest.SET_LOG_BASE: RequestRule(LogDescription, U64, min_fds=0, max_fds=1),
    FrontendRequest.SET_LOG_FD: RequestRule(_N, None, min_fds=1, max_fds=1),
    FrontendRequest.SET_VRING_NUM: RequestRule(VringState, None),
    FrontendRequest.SET_VRING_ADDR: RequestRule(VringAddr, None),
    FrontendRequest.SET_VRING_BASE: RequestRule(VringState, None),
    FrontendRequest.GET_VRING_BASE: RequestRule(VringState, VringState),
    FrontendRequest.SET_VRING_KICK: RequestRule(U64, None, min_fds=0, max_fds=1),
    FrontendRequest.SET_VRING_CALL: RequestRule(U64, None, min_fds=0, max_fds=1),
    FrontendRequest.SET_VRING_ERR: RequestRule(U64, None, min_fds=0, max_fds=1),
    FrontendRequest.GET_PROTOCOL_FEATURES: RequestRule(_N, U64),
    FrontendRequest.SET_PROTOCOL_FEATURES: RequestRule(U64, None),
    FrontendRequest.GET_QUEUE_NUM: RequestRule(_N, U64),
    FrontendRequest.SET_VRING_ENABLE: RequestRule(VringState, None),
    FrontendRequest.SEND_RARP: RequestRule(U64, None),
    FrontendRequest.NET_SET_MTU: RequestRule(U64, None),
    FrontendRequest.SET_BACKEND_REQ_FD: RequestRule(_N, None, min_fds=1, max_fds=1),
    FrontendRequest.IOTLB_MSG: RequestRule(IotlbMessage, U64),
    FrontendRequest.SET_VRING_ENDIAN: RequestRule(VringState, None),
    FrontendRequest.GET_CONFIG: RequestRule(Payload.CONFIG, Payload.CONFIG),
    FrontendRequest.SET_CONFIG: RequestRule(Payload.CONFIG, None),
    FrontendRequest.CREATE_CRYPTO_SESSION: RequestRule(Payload.OPAQUE, Payload.OPAQUE),
    FrontendRequest.CLOSE_CRYPTO_SESSION: RequestRule(U64, None),
    FrontendRequest.POSTCOPY_ADVISE: RequestRule(_N, _N),  # reply carries a userfaultfd
    FrontendRequest.POSTCOPY_LISTEN: RequestRule(_N, None),
    FrontendRequest.POSTCOPY_END: RequestRule(_N, U64),
    FrontendRequest.GET_INFLIGHT_FD: RequestRule(InflightDescription, InflightDescription),
    FrontendRequest.SET_INFLIGHT_FD: RequestRule(InflightDescription, None, min_fds=1, max_fds=1),
    FrontendRequest.GPU_SET_SOCKET: RequestRule(_N, None, min_fds=1, max_fds=1),
    FrontendRequest.RESET_DEVICE: RequestRule(_N, None),
    FrontendRequest.VRING_KICK: RequestRule(VringState, None),
    FrontendRequest.GET_MAX_MEM_SLOTS: RequestRule(_N, U64),
    FrontendRequest.ADD_MEM_REG: RequestRule(SingleMemoryRegion, None, min_fds=1, max_fds=1),
    # The spec lets a back end accept (and close) one stray fd here.
    FrontendRequest.REM_MEM_REG: RequestRule(SingleMemoryRegion, None, min_fds=0, max_fds=1),
    FrontendRequest.SET_STATUS: RequestRule(U64, None),
    FrontendRequest.GET_STATUS: RequestRule(_N, U64),
    FrontendRequest.GET_SHARED_OBJECT: RequestRule(SharedObject, U64),
    FrontendRequest.SET_DEVICE_STATE_FD: RequestRule(
        DeviceStateTransfer, U64, min_fds=1, max_fds=1
    ),
    FrontendRequest.CHECK_DEVICE_STATE: RequestRule(_N, U64),
}

# Requests the back end sends on the back-end channel, and what comes back.
BACKEND_RULES: dict[BackendRequest, RequestRule] = {
    BackendRequest.IOTLB_MSG: RequestRule(IotlbMessage, None),
    BackendRequest.CONFIG_CHANGE_MSG: RequestRule(_N, None),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: RequestRule(VringArea, None, min_fds=0, max_fds=1),
    BackendRequest.VRING_CALL: RequestRule(VringState, None),
    BackendRequest.VRING_ERR: RequestRule(VringState, None),
    BackendRequest.SHARED_OBJECT_ADD: RequestRule(SharedObject, None),
    BackendRequest.SHARED_OBJECT_REMOVE: RequestRule(SharedObject, None),
    BackendRequest.SHARED_OBJECT_LOOKUP: RequestRule(SharedObject, U64),
}


# --- messages on the wire --------------------------------------------------


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY_FLAG)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY_FLAG)

    def parse(self, layout: Construct) -> Container:
        return layout.parse(self.payload)

    def close_fds(self) -> None:
        close_fds(self.fds)


def encode(
    request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False
) -> bytes:
    flags = VERSION | (REPLY_FLAG if reply else 0) | (NEED_REPLY_FLAG if need_reply else 0)
    return bytes(Header.build({"request": request, "flags": flags, "size": len(payload)})) + payload


def encode_u64(request: int, value: int, *, reply: bool = False, need_reply: bool = False) -> bytes:
    return encode(request, U64.build({"value": value}), reply=reply, need_reply=need_reply)


async def read_message(sock: trio.socket.SocketType) -> Message:
    """Read one message. FramingError means the stream is unusable.

    Fds that arrive with the header or the payload all belong to the message;
    on any error they are closed before raising.
    """
    head: Received = await receive_exactly(sock, HEADER_SIZE)
    fds = head.fds
    try:
        header = Header.parse(head.data)
        if header.flags & VERSION_MASK != VERSION:
            raise FramingError(f"unsupported vhost-user version {header.flags & VERSION_MASK}")
        if header.size > MAX_PAYLOAD_SIZE:
            raise FramingError(f"payload of {header.size} bytes exceeds {MAX_PAYLOAD_SIZE}")
        payload = b""
        truncated = head.fds_truncated
        if header.size:
            body = await receive_exactly(sock, header.size)
            fds.extend(body.fds)
            truncated = truncated or body.fds_truncated
            payload = body.data
    except BaseException:
        close_fds(fds)
        raise
    return Message(header.request, header.flags, payload, fds, truncated)


async def write_message(
    sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None
) -> None:
    await send_all(sock, data, fds)


# --- description (for traces) ------------------------------------------------------


def _plain(value: object) -> object:
    """A parsed construct as JSON-friendly values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def describe(data: bytes, fds: int, backend_channel: bool = False) -> dict[str, object]:
    """A whole message (header and payload) as a name and its fields, as far
    as they can be decoded; never raises for bad bytes."""
    if len(data) < HEADER_SIZE:
        return {"name": "truncated", "size": len(data)}
    header = Header.parse(data[:HEADER_SIZE])
    payload = data[HEADER_SIZE:]
    names = BackendRequest if backend_channel else FrontendRequest
    rules: dict[int, RequestRule] = BACKEND_RULES if backend_channel else FRONTEND_RULES  # type: ignore[assignment]
    reply = bool(header.flags & REPLY_FLAG)
    try:
        name = names(header.request).name
    except ValueError:
        name = f"unknown({header.request})"
    described: dict[str, object] = {"name": name, "size": len(payload)}
    if reply:
        described["reply"] = True
    if header.flags & NEED_REPLY_FLAG:
        described["need_reply"] = True
    if fds:
        described["fds"] = fds
    rule = rules.get(header.request)
    layout = None if rule is None else (rule.reply if reply else rule.payload)
    if reply and rule is not None and layout is None and len(payload) == U64.sizeof():
        layout = U64  # a REPLY_ACK
    try:
        if layout is Payload.MEMORY_TABLE:
            described["fields"] = _plain(MemoryTable.parse(payload))
        elif layout is Payload.CONFIG and len(payload) >= ConfigHeader.sizeof():
            described["fields"] = _plain(ConfigHeader.parse(payload))
        elif isinstance(layout, Construct) and len(payload) == layout.sizeof():
            described["fields"] = _plain(layout.parse(payload))
    except Exception:  # a description is best effort: the session checks the message
        described["undecodable"] = True
    return described
