"""The NVMe controller's own formats, bytes only: BAR0 registers, queue
entries, Identify and log page layouts, opcodes and status codes (NVMe base
specification 1.4, over PCIe). The controller and the project's NVMe driver
(vfiouserd/client/nvme.py) share them, as virtio-blk's request header is
shared from devices/blk.py.

Everything is little endian. "0-based" fields hold N-1. Statuses are kept as
Linux does, the CQE's status field without its phase bit: SC bits 7:0, SCT
10:8, CRD 12:11, M 13, DNR 14 (``status()`` builds one; a command that fails
raises ``NvmeError`` with it).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

PAGE = 4096  # memory page size: MPSMIN = MPSMAX = 0 (4 KiB)
SQE_SIZE = 64
CQE_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4
IDENTIFY_SIZE = 4096
BROADCAST_NSID = 0xFFFFFFFF


class Reg(enum.IntEnum):
    """BAR0 register offsets."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CMBLOC = 0x38
    CMBSZ = 0x3C
    DOORBELLS = 0x1000


def cap(
    *, mqes: int, timeout_500ms: int, dstrd: int = 0, cqr: bool = True, css_nvm: bool = True
) -> int:
    """CAP: MQES 15:0 (0-based), CQR 16, TO 31:24, DSTRD 35:32, CSS 44:37,
    MPSMIN 51:48 = MPSMAX 55:52 = 0 (4 KiB pages only)."""
    return mqes | int(cqr) << 16 | timeout_500ms << 24 | dstrd << 32 | int(css_nvm) << 37


class CC(NamedTuple):
    """Controller Configuration, decoded."""

    en: bool
    css: int
    mps: int
    ams: int
    shn: int
    iosqes: int
    iocqes: int

    @classmethod
    def decode(cls, value: int) -> CC:
        return cls(
            bool(value & 1),
            value >> 4 & 7,
            value >> 7 & 0xF,
            value >> 11 & 7,
            value >> 14 & 3,
            value >> 16 & 0xF,
            value >> 20 & 0xF,
        )


CC_EN = 1
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2
CSTS_SHST_SHIFT = 2
NSSR_RESET = 0x4E564D65  # "NVMe"


def doorbell(offset: int, stride_log2: int = 0) -> tuple[int, bool] | None:
    """(queue id, is a CQ head doorbell) for a BAR0 offset at or past the
    doorbells; None if it falls between two doorbells."""
    stride = 4 << stride_log2
    index, rest = divmod(offset - Reg.DOORBELLS, stride)
    if rest or index < 0:
        return None
    return index // 2, bool(index & 1)


def doorbell_offset(qid: int, completion: bool, stride_log2: int = 0) -> int:
    return Reg.DOORBELLS + (2 * qid + int(completion)) * (4 << stride_log2)


# -- queue entries -----------------------------------------------------------------------

# opcode, flags (FUSE 1:0, PSDT 7:6), CID, NSID, CDW2-3, MPTR, PRP1, PRP2, CDW10-15
SQE = struct.Struct("<BBHIQQQQ6I")
# DW0, DW1, SQ head, SQ id, CID, status (phase in bit 0)
CQE = struct.Struct("<IIHHHH")
assert SQE.size == SQE_SIZE and CQE.size == CQE_SIZE


class Command(NamedTuple):
    opcode: int
    flags: int
    cid: int
    nsid: int
    cdw2_3: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Command:
        return cls(*SQE.unpack_from(data, offset))

    def encode(self) -> bytes:
        return SQE.pack(*self)

    @property
    def fuse(self) -> int:
        return self.flags & 3

    @property
    def psdt(self) -> int:
        return self.flags >> 6

    @property
    def slba(self) -> int:
        return self.cdw10 | self.cdw11 << 32

    @property
    def nlb(self) -> int:
        """Number of logical blocks (NLB is 0-based on the wire)."""
        return (self.cdw12 & 0xFFFF) + 1

    @property
    def sgl1(self) -> SglDescriptor:
        """The first SGL descriptor: where PRP1 and PRP2 are (PSDT 01b, 10b)."""
        return SglDescriptor.decode(struct.pack("<QQ", self.prp1, self.prp2))


def command(
    opcode: int,
    cid: int = 0,
    nsid: int = 0,
    *,
    prp1: int = 0,
    prp2: int = 0,
    flags: int = 0,
    cdw: tuple[int, ...] = (),
) -> Command:
    """A command with CDW10 onwards from ``cdw``."""
    words = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
    return Command(opcode, flags, cid, nsid, 0, 0, prp1, prp2, *words)


# PSDT: PRPs; SGLs with MPTR a contiguous buffer; SGLs with MPTR an SGL
PSDT_PRP, PSDT_SGL, PSDT_SGL_MPTR_SGL = 0, 1, 2


class SglType(enum.IntEnum):
    """SGL Descriptor Type (SGL identifier bits 7:4)."""

    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3
    KEYED_DATA_BLOCK = 0x4
    TRANSPORT_DATA_BLOCK = 0x5
    VENDOR_SPECIFIC = 0xF


# address, length, 3 reserved bytes, SGL identifier (type 7:4, sub type 3:0)
SGL_DESCRIPTOR = struct.Struct("<QI3xB")
SGL_DESCRIPTOR_SIZE = 16
assert SGL_DESCRIPTOR.size == SGL_DESCRIPTOR_SIZE

# Identify Controller OACS bits: the optional admin commands offered
OACS_DOORBELL_BUFFER_CONFIG = 1 << 8

# Identify Controller SGLS bits
SGLS_BYTE_GRANULAR, SGLS_DWORD_GRANULAR = 0b01, 0b10  # bits 1:0: SGLs supported, alignment
SGLS_KEYED = 1 << 2
SGLS_BIT_BUCKET = 1 << 16
SGLS_MPTR_BYTE_ALIGNED = 1 << 17
SGLS_LONGER_THAN_DATA = 1 << 18  # an SGL may describe more than the command moves
SGLS_MPTR_SGL = 1 << 19
SGLS_OFFSET = 1 << 20


class SglDescriptor(NamedTuple):
    address: int
    length: int
    kind: int  # SglType
    subtype: int = 0

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> SglDescriptor:
        address, length, identifier = SGL_DESCRIPTOR.unpack_from(data, offset)
        return cls(address, length, identifier >> 4, identifier & 0xF)

    def encode(self) -> bytes:
        return SGL_DESCRIPTOR.pack(self.address, self.length, self.kind << 4 | self.subtype)

    def sgl1(self) -> tuple[int, int]:
        """(PRP1, PRP2): this descriptor as a command's SGL1."""
        low, high = struct.unpack("<QQ", self.encode())
        return low, high


class Completion(NamedTuple):
    dw0: int
    dw1: int
    sq_head: int
    sq_id: int
    cid: int
    status: int  # without the phase bit (see the module's docstring)
    phase: bool

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Completion:
        dw0, dw1, head, sqid, cid, raw = CQE.unpack_from(data, offset)
        return cls(dw0, dw1, head, sqid, cid, raw >> 1, bool(raw & 1))

    def encode(self) -> bytes:
        return CQE.pack(
            self.dw0, self.dw1, self.sq_head, self.sq_id, self.cid, self.status << 1 | self.phase
        )


# -- opcodes -----------------------------------------------------------------------------


class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NS_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NS_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80
    SECURITY_SEND = 0x81
    SECURITY_RECEIVE = 0x82
    SANITIZE = 0x84


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


def opcode_name(admin: bool, opcode: int) -> str:
    table: type[enum.IntEnum] = AdminOpcode if admin else IoOpcode
    try:
        return table(opcode).name.lower().replace("_", "-")
    except ValueError:
        return f"{opcode:#04x}"


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NS_DESCRIPTORS = 0x03
    CSI_NAMESPACE = 0x05
    CSI_CONTROLLER = 0x06


class Feature(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B
    KEEP_ALIVE_TIMER = 0x0F


class LogPage(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04


class AsyncEventType(enum.IntEnum):
    ERROR = 0
    SMART = 1
    NOTICE = 2


# Asynchronous event information, error type
AEI_INVALID_DOORBELL_REGISTER = 0x00
AEI_INVALID_DOORBELL_VALUE = 0x01
# SMART / health type
AEI_TEMPERATURE_THRESHOLD = 0x01


def async_event(kind: int, info: int, log_page: int) -> int:
    """An AER completion's DW0."""
    return kind | info << 8 | log_page << 16


# -- status codes --------------------------------------------------------------------------


class Sct(enum.IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2


class Generic(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    DATA_TRANSFER_ERROR = 0x04
    INTERNAL_ERROR = 0x06
    ABORT_REQUESTED = 0x07
    ABORTED_SQ_DELETION = 0x08
    INVALID_NAMESPACE = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    INVALID_SGL_SEGMENT_DESCRIPTOR = 0x0D
    INVALID_NUMBER_OF_SGL_DESCRIPTORS = 0x0E
    DATA_SGL_LENGTH_INVALID = 0x0F
    METADATA_SGL_LENGTH_INVALID = 0x10
    SGL_DESCRIPTOR_TYPE_INVALID = 0x11
    PRP_OFFSET_INVALID = 0x13
    SGL_OFFSET_INVALID = 0x16
    SGL_DATA_BLOCK_GRANULARITY_INVALID = 0x1E
    NAMESPACE_WRITE_PROTECTED = 0x20
    LBA_OUT_OF_RANGE = 0x80
    CAPACITY_EXCEEDED = 0x81


class Specific(enum.IntEnum):
    COMPLETION_QUEUE_INVALID = 0x00
    INVALID_QUEUE_IDENTIFIER = 0x01
    INVALID_QUEUE_SIZE = 0x02
    ABORT_LIMIT_EXCEEDED = 0x03
    ASYNC_EVENT_LIMIT_EXCEEDED = 0x05
    INVALID_INTERRUPT_VECTOR = 0x08
    INVALID_LOG_PAGE = 0x09
    INVALID_QUEUE_DELETION = 0x0C
    FEATURE_NOT_SAVEABLE = 0x0D


class Media(enum.IntEnum):
    WRITE_FAULT = 0x80
    UNRECOVERED_READ_ERROR = 0x81


DNR = 1 << 14


def status(sct: int, sc: int, *, dnr: bool = True) -> int:
    return sc | sct << 8 | (DNR if dnr else 0)


def status_name(value: int) -> str:
    sct, sc = value >> 8 & 7, value & 0xFF
    table: type[enum.IntEnum] | None = {0: Generic, 1: Specific, 2: Media}.get(sct)
    if table is not None:
        try:
            return table(sc).name.lower()
        except ValueError:
            pass
    return f"sct{sct}-sc{sc:#04x}"


SUCCESS = 0


class NvmeError(Exception):
    """A command fails with this status (``status()``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def generic(sc: int, reason: str) -> NvmeError:
    return NvmeError(status(Sct.GENERIC, sc), reason)


def specific(sc: int, reason: str) -> NvmeError:
    return NvmeError(status(Sct.COMMAND_SPECIFIC, sc), reason)


# -- data structures ------------------------------------------------------------------------

DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in LBAs (1-based), SLBA
DSM_ATTR_DEALLOCATE = 1 << 2


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


class ControllerIdentity(NamedTuple):
    vendor_id: int
    subsystem_vendor_id: int
    serial: str
    model: str
    firmware: str
    version: int
    mdts: int
    cntlid: int
    oaes: int
    aerl: int  # 0-based
    acl: int  # 0-based
    elpe: int  # 0-based
    oncs: int
    vwc: int
    namespaces: int
    subnqn: str
    wctemp: int
    cctemp: int
    sgls: int  # SGLS_*
    oacs: int  # OACS_*


def identify_controller(c: ControllerIdentity) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", data, 0x00, c.vendor_id, c.subsystem_vendor_id)
    data[0x04:0x18] = _ascii(c.serial, 20)
    data[0x18:0x40] = _ascii(c.model, 40)
    data[0x40:0x48] = _ascii(c.firmware, 8)
    data[0x48] = 6  # RAB
    data[0x49:0x4C] = b"\x00\x54\x52"  # IEEE OUI (any)
    data[0x4D] = c.mdts
    struct.pack_into("<HI", data, 0x4E, c.cntlid, c.version)
    struct.pack_into("<I", data, 0x5C, c.oaes)
    data[0x6F] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<H", data, 0x100, c.oacs)
    data[0x102] = c.acl
    data[0x103] = c.aerl
    data[0x104] = 0x03  # FRMW: slot 1 read-only, one slot
    data[0x105] = 0  # LPA
    data[0x106] = c.elpe
    data[0x107] = 0  # NPSS: one power state
    struct.pack_into("<HH", data, 0x10A, c.wctemp, c.cctemp)
    data[0x200] = SQES_LOG2 << 4 | SQES_LOG2
    data[0x201] = CQES_LOG2 << 4 | CQES_LOG2
    struct.pack_into("<IH", data, 0x204, c.namespaces, c.oncs)
    data[0x20D] = c.vwc
    struct.pack_into("<I", data, 0x218, c.sgls)
    subnqn = c.subnqn.encode("ascii")[:255]
    data[0x300 : 0x300 + len(subnqn)] = subnqn
    struct.pack_into("<H", data, 0x800, 0x09C4)  # PSD0: max power 25 W
    return bytes(data)


def identify_namespace(blocks: int, lba_log2: int, *, write_protected: bool) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", data, 0x00, blocks, blocks, blocks)  # NSZE, NCAP, NUSE
    data[0x19] = 0  # NLBAF: one format
    data[0x1A] = 0  # FLBAS: format 0, no metadata
    data[0x21] = 0x09  # DLFEAT: deallocated blocks read zeros; Write Zeroes may deallocate
    data[0x63] = int(write_protected)  # NSATTR
    struct.pack_into("<I", data, 0x80, lba_log2 << 16)  # LBAF0: no metadata
    return bytes(data)


NIDT_UUID = 3


def namespace_descriptors(uuid: bytes) -> bytes:
    data = bytearray(IDENTIFY_SIZE)
    data[0:4] = bytes((NIDT_UUID, 16, 0, 0))
    data[4:20] = uuid
    return bytes(data)


def active_namespaces(nsids: list[int], after: int) -> bytes:
    listed = sorted(n for n in nsids if n > after)[:1024]
    return struct.pack(f"<{len(listed)}I", *listed).ljust(IDENTIFY_SIZE, b"\0")


class Health(NamedTuple):
    temperature: int  # kelvin
    critical_warning: int
    data_units_read: int  # thousands of 512-byte units, rounded up
    data_units_written: int
    read_commands: int
    write_commands: int
    power_cycles: int
    power_on_hours: int
    unsafe_shutdowns: int
    media_errors: int
    error_entries: int


SMART_SIZE = 512


def smart_log(h: Health) -> bytes:
    data = bytearray(SMART_SIZE)
    data[0] = h.critical_warning
    struct.pack_into("<HBB", data, 0x01, h.temperature, 100, 10)  # temp, spare, threshold
    for offset, value in (
        (0x20, h.data_units_read),
        (0x30, h.data_units_written),
        (0x40, h.read_commands),
        (0x50, h.write_commands),
        (0x70, h.power_cycles),
        (0x80, h.power_on_hours),
        (0x90, h.unsafe_shutdowns),
        (0xA0, h.media_errors),
        (0xB0, h.error_entries),
    ):
        data[offset : offset + 16] = value.to_bytes(16, "little")
    return bytes(data)


def firmware_slot_log(firmware: str) -> bytes:
    data = bytearray(512)
    data[0] = 1  # AFI: slot 1 active
    data[8:16] = _ascii(firmware, 8)
    return bytes(data)
