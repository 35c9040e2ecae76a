"""vfio-user wire format (QEMU docs/interop/vfio-user.rst, protocol 0.x).

Bytes only: the 16-byte header, the 17 commands (1-13 and 15-18; 14, the
old dirty-page command, is retired) with their request and reply layouts,
the VFIO constants they carry (Linux include/uapi/linux/vfio.h), the JSON
capabilities of VERSION, and message framing with SCM_RIGHTS fds.

All numbers are in the host's native byte order, as the spec says.

Where implementations disagree, the choice made here:
- DMA_READ/DMA_WRITE: the spec (and libvfio-user) lay both out as
  ``address`` u64, ``count`` u64, data at payload offset 16. QEMU's client
  (checked in 10.2) uses a C struct of address u64, count u32 and the data
  at offset 12, padded to 16 bytes: its DMA_READ reply is the same length as
  the spec's (data at 12, then 4 zero bytes), and it takes a DMA_WRITE only
  if the message is 4 bytes longer than its data needs, reading the data at
  12 (``QemuDmaAccess``, ``QEMU_DMA_PAD``). The lengths cannot tell the two
  apart, so the server asks once per connection (``DMA_LAYOUT_PROBE``): a
  DMA_READ whose u64 count is 8 plus 2**32, at the start of a region the
  client mapped without an fd. A client that reads a u32 count sees 8 and
  answers; one that reads the spec's u64 refuses a transfer that large. (At
  an address the client does not serve, both refuse: the probe never goes
  where a guest pointed.) It only matters when guest RAM has no fd.
- DMA_MAP flags: the spec defines READ and WRITE; libvfio-user also takes
  MMAP (4) and FILE_IO (8). We refuse bits the spec does not define (QEMU
  never sends them) and map whenever an fd comes with the request.
- DMA_MAP over an existing mapping: EEXIST, as the spec says (libvfio-user
  answers EINVAL, or success for an identical map).
- IRQ info: MSI and MSI-X report EVENTFD only, not NORESIZE: vectors can be
  set one at a time, which QEMU then does (the kernel's vfio-pci reports
  NORESIZE and QEMU re-enables the whole set instead).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

import trio
from construct import Array, Bytes, Int8un, Int16un, Int32un, Int64un, Padding, Struct, this

from vfiouserd.protocol.framing import (
    FramingError,
    Received,
    close_fds,
    receive_exactly,
    send_all,
)

HEADER_SIZE = 16
MAJOR = 0
MINOR = 1  # the highest minor we speak; we accept any minor from a client
PAGE_SIZE = 4096
DEFAULT_MAX_DATA_XFER = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_MAX_MSG_FDS = 1
# A message may carry up to max_data_xfer_size bytes of data plus its
# command structure; anything far above that is a framing error.
MAX_MESSAGE_SLACK = 64 * 1024

FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
FLAGS_KNOWN = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# --- VFIO constants (linux/vfio.h) ----------------------------------------------


class DeviceFlag(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class PciRegion(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class RegionFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


REGION_CAP_SPARSE_MMAP = 1
REGION_CAP_TYPE = 2


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


# Plain ints: ``~`` of an IntFlag only covers its defined bits (Python 3.11),
# and these masks are complemented to find unknown bits.
IRQ_SET_DATA_MASK = int(IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD)
IRQ_SET_ACTION_MASK = int(
    IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER
)


class DmaFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


DMA_FLAGS_KNOWN = int(DmaFlag.READ | DmaFlag.WRITE)


DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1


FEATURE_INDEX_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18


class DeviceFeature(enum.IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlag(enum.IntFlag):
    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class MigrationState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


# --- layouts ---------------------------------------------------------------------

Header = Struct(
    "msg_id" / Int16un,
    "command" / Int16un,
    "msg_size" / Int32un,
    "flags" / Int32un,
    "error" / Int32un,
)

VersionHead = Struct("major" / Int16un, "minor" / Int16un)

DmaMap = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "offset" / Int64un,
    "address" / Int64un,
    "size" / Int64un,
)

DmaUnmap = Struct("argsz" / Int32un, "flags" / Int32un, "address" / Int64un, "size" / Int64un)

DeviceInfo = Struct(
    "argsz" / Int32un, "flags" / Int32un, "num_regions" / Int32un, "num_irqs" / Int32un
)

RegionInfo = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "cap_offset" / Int32un,
    "size" / Int64un,
    "offset" / Int64un,
)

CapHeader = Struct("id" / Int16un, "version" / Int16un, "next" / Int32un)
SparseMmapArea = Struct("offset" / Int64un, "size" / Int64un)
SparseMmapCap = Struct(
    "header" / CapHeader,
    "nr_areas" / Int32un,
    Padding(4),
    "areas" / Array(this.nr_areas, SparseMmapArea),
)

RegionIoFds = Struct("argsz" / Int32un, "flags" / Int32un, "index" / Int32un, "count" / Int32un)
SubRegionIoFd = Struct(
    "offset" / Int64un,
    "size" / Int64un,
    "fd_index" / Int32un,
    "type" / Int32un,
    "flags" / Int32un,
    Padding(4),
    "datamatch" / Int64un,  # user_data for IOREGIONFD
)

IrqInfo = Struct("argsz" / Int32un, "flags" / Int32un, "index" / Int32un, "count" / Int32un)

IrqSetHead = Struct(
    "argsz" / Int32un,
    "flags" / Int32un,
    "index" / Int32un,
    "start" / Int32un,
    "count" / Int32un,
)

RegionAccess = Struct("offset" / Int64un, "region" / Int32un, "count" / Int32un)

DmaAccess = Struct("address" / Int64un, "count" / Int64un)
QemuDmaAccess = Struct("address" / Int64un, "count" / Int32un)  # QEMU's client, see above
QEMU_DMA_PAD = 4  # QEMU's struct is 16 bytes with its padding; its data starts at 12


def dma_access_layout(qemu: bool) -> tuple[Struct, int]:
    """The head of a DMA_READ/DMA_WRITE message carrying data, and the padding
    after the data: the spec's, or QEMU's client's (see above)."""
    return (QemuDmaAccess, QEMU_DMA_PAD) if qemu else (DmaAccess, 0)


# A DMA_READ count only a client that reads 32 bits of it serves: 8 bytes.
DMA_LAYOUT_PROBE = (1 << 32) | 8
DmaWriteReply = Struct("address" / Int64un, "count" / Int32un)

WriteMultiHead = Struct("wr_cnt" / Int64un)
WriteMultiEntry = Struct(
    "offset" / Int64un, "region" / Int32un, "count" / Int32un, "data" / Bytes(8)
)
WRITE_MULTI_MAX = 200  # entries QEMU's client puts in one message

DeviceFeatureHead = Struct("argsz" / Int32un, "flags" / Int32un)
MigrationInfo = Struct("flags" / Int64un)
MigDeviceState = Struct("device_state" / Int32un, "data_fd" / Int32un)
DmaLoggingControl = Struct(
    "page_size" / Int64un,
    "num_ranges" / Int32un,
    Padding(4),
)
DmaLoggingRange = Struct("iova" / Int64un, "length" / Int64un)
DmaLoggingReport = Struct("iova" / Int64un, "length" / Int64un, "page_size" / Int64un)

MigDataHead = Struct("argsz" / Int32un, "size" / Int32un)

U8 = Int8un  # for DATA_BOOL arrays


# --- VERSION capabilities ------------------------------------------------------------


class VersionError(ValueError):
    """A VERSION message that cannot be accepted; the connection closes."""


@dataclass
class Capabilities:
    """What one side said it supports in VERSION, with the spec's defaults."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = PAGE_SIZE
    twin_socket: bool = False
    twin_socket_fd_index: int | None = None
    write_multiple: bool = False
    present: set[str] = field(default_factory=set)
    unknown: dict[str, Any] = field(default_factory=dict)


def _positive_int(name: str, value: Any, limit: int = 1 << 63) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise VersionError(f"capability {name} must be a positive integer, not {value!r}")
    return value


def parse_version_data(data: bytes) -> Capabilities:
    """Parse the JSON of a VERSION message (empty data: all defaults)."""
    caps = Capabilities()
    if not data:
        return caps
    if not data.endswith(b"\0"):
        raise VersionError("version data lacks its terminating NUL")
    data = data[:-1]
    if b"\0" in data:
        raise VersionError("NUL inside the version data")
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, too deep, too many digits
        raise VersionError(f"version data is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(document, dict):
        raise VersionError("version data is not a JSON object")
    offered = document.get("capabilities", {})
    if not isinstance(offered, dict):
        raise VersionError("'capabilities' is not a JSON object")
    for name, value in offered.items():
        caps.present.add(name)
        if name == "max_msg_fds":
            caps.max_msg_fds = _positive_int(name, value, 1 << 16)
        elif name == "max_data_xfer_size":
            caps.max_data_xfer_size = _positive_int(name, value, 1 << 31)
        elif name == "max_dma_maps":
            caps.max_dma_maps = _positive_int(name, value, 1 << 31)
        elif name == "pgsizes":
            caps.pgsizes = _positive_int(name, value)
        elif name == "write_multiple":
            if not isinstance(value, bool):
                raise VersionError("capability write_multiple must be a boolean")
            caps.write_multiple = value
        elif name == "twin_socket":
            if not isinstance(value, dict):
                raise VersionError("capability twin_socket must be an object")
            supported = value.get("supported", False)
            if not isinstance(supported, bool):
                raise VersionError("twin_socket.supported must be a boolean")
            caps.twin_socket = supported
            if "fd_index" in value:
                index = value["fd_index"]
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise VersionError("twin_socket.fd_index must be an index")
                caps.twin_socket_fd_index = index
        else:
            # e.g. the legacy "migration" object QEMU's client still sends
            caps.unknown[name] = value
    return caps


def encode_version_data(capabilities: dict[str, Any]) -> bytes:
    return json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode() + b"\0"


def smallest_page(pgsizes: int) -> int:
    return 1 << int(math.log2(pgsizes & -pgsizes)) if pgsizes > 0 else 0


# --- messages ------------------------------------------------------------------------


@dataclass
class Message:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False

    @property
    def kind(self) -> int:
        return self.flags & FLAG_TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def close_fds(self) -> None:
        close_fds(self.fds)


def encode(
    msg_id: int,
    command: int,
    payload: bytes = b"",
    *,
    reply: bool = False,
    no_reply: bool = False,
    error: int | None = None,
) -> bytes:
    flags = TYPE_REPLY if reply else TYPE_COMMAND
    if no_reply:
        flags |= FLAG_NO_REPLY
    if error is not None:
        flags |= FLAG_ERROR
        payload = b""  # an error reply is the header only
    header = Header.build(
        {
            "msg_id": msg_id,
            "command": command,
            "msg_size": HEADER_SIZE + len(payload),
            "flags": flags,
            "error": error or 0,
        }
    )
    return bytes(header) + payload


async def read_message(sock: trio.socket.SocketType, max_payload: int) -> Message:
    """Read one message; FramingError (connection must close) for a header
    that cannot be trusted. Fds of a failed read are closed."""
    head: Received = await receive_exactly(sock, HEADER_SIZE)
    fds = head.fds
    try:
        header = Header.parse(head.data)
        if header.msg_size < HEADER_SIZE:
            raise FramingError(f"message size {header.msg_size} is smaller than the header")
        payload_size = header.msg_size - HEADER_SIZE
        if payload_size > max_payload:
            raise FramingError(f"message of {header.msg_size} bytes exceeds the limit")
        payload = b""
        truncated = head.fds_truncated
        if payload_size:
            body = await receive_exactly(sock, payload_size)
            fds.extend(body.fds)
            truncated = truncated or body.fds_truncated
            payload = body.data
    except BaseException:
        close_fds(fds)
        raise
    return Message(
        header.msg_id, header.command, header.flags, header.error, payload, fds, truncated
    )


async def write_message(
    sock: trio.socket.SocketType, data: bytes, fds: list[int] | None = None
) -> None:
    await send_all(sock, data, fds)


# --- description (for traces) ------------------------------------------------------

# The fixed head of each command's payload (replies start the same way).
_HEADS: dict[int, Struct] = {
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFds,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: IrqSetHead,
    Command.REGION_READ: RegionAccess,
    Command.REGION_WRITE: RegionAccess,
    Command.DMA_READ: DmaAccess,
    Command.DMA_WRITE: DmaAccess,
    Command.REGION_WRITE_MULTI: WriteMultiHead,
    Command.DEVICE_FEATURE: DeviceFeatureHead,
}


def describe(data: bytes, fds: int) -> dict[str, object]:
    """A whole message (header and payload) as a name and its fields, as far
    as they can be decoded; never raises for bad bytes."""
    if len(data) < HEADER_SIZE:
        return {"name": "truncated", "size": len(data)}
    header = Header.parse(data[:HEADER_SIZE])
    payload = data[HEADER_SIZE:]
    try:
        name = Command(header.command).name
    except ValueError:
        name = f"unknown({header.command})"
    described: dict[str, object] = {"name": name, "id": header.msg_id, "size": len(payload)}
    if header.flags & FLAG_TYPE_MASK == TYPE_REPLY:
        described["reply"] = True
    if header.flags & FLAG_ERROR:
        described["error"] = header.error
    if header.flags & FLAG_NO_REPLY:
        described["no_reply"] = True
    if fds:
        described["fds"] = fds
    head = _HEADS.get(header.command)
    if head is not None and len(payload) >= head.sizeof():
        try:
            parsed = head.parse(payload)
            described["fields"] = {k: v for k, v in parsed.items() if not k.startswith("_")}
            rest = payload[head.sizeof() :]
            if header.command in (Command.REGION_READ, Command.REGION_WRITE) and rest:
                described["data"] = rest[:64].hex()
        except Exception:  # best effort: the session checks the message
            described["undecodable"] = True
    return described
