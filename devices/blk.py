"""virtio-blk backed by a raw image file (virtio 1.2 section 5.2).

Reads and writes go straight between the image and guest memory with
preadv/pwritev on memoryviews of the guest's buffers; nothing is copied.
"""

from __future__ import annotations

import argparse
import enum
import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Self

from vfiouserd import faults
from vfiouserd._native import ffi, lib
from vfiouserd.devices.virtio import (
    ConfigWriteError,
    DeviceId,
    NativeHandler,
    Request,
    VirtioDevice,
    bit,
    split_buffers,
)
from vfiouserd.log import get_logger
from vfiouserd.state import BOOL, U64, Field, Schema, StateError

log = get_logger("blk")

SECTOR = 512
ID_BYTES = 20
IOV_MAX = 1024
SEGMENT = struct.Struct("<QII")  # discard / write-zeroes: sector, num_sectors, flags
REQUEST_HEADER = struct.Struct("<IIQ")  # type, ioprio, sector
WRITE_ZEROES_FLAG_UNMAP = 1
# Config space layout (struct virtio_blk_config); offset of the one field a
# driver may write, and the total size we expose.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
WRITEBACK_OFFSET = 32


class BlkFeature(enum.IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


TYPE_NAMES = {
    RequestType.IN: "read",
    RequestType.OUT: "write",
    RequestType.FLUSH: "flush",
    RequestType.GET_ID: "get-id",
    RequestType.DISCARD: "discard",
    RequestType.WRITE_ZEROES: "write-zeroes",
}


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlkError(Exception):
    def __init__(self, status: BlkStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    return int(number) * units[unit]


class VirtioBlk(VirtioDevice):
    name = "blk"
    description = "virtio-blk on a raw image file (sparse, created with --size if missing)"
    device_id = DeviceId.BLOCK
    vhost_user_type = "block"
    has_sectors = True
    feature_names: ClassVar[dict[int, str]] = {f.value: f.name for f in BlkFeature}
    max_queues = 64
    max_segment_size = 1 << 20
    max_discard_sectors = (1 << 32) - 1
    max_discard_segments = 256
    # preadv/pwritev: the native fast path's; the 2 variants: Python's.
    syscalls = frozenset({"preadv2", "pwritev2", "preadv", "pwritev", "fallocate", "fdatasync"})
    state = Schema(1, Field("capacity", U64), Field("writeback", BOOL))

    def __init__(
        self,
        fd: int,
        *,
        read_only: bool = False,
        num_queues: int = 1,
        serial: str = "vfiouserd",
        queue_size: int = 128,
    ) -> None:
        features = (
            bit(BlkFeature.SIZE_MAX)
            | bit(BlkFeature.SEG_MAX)
            | bit(BlkFeature.BLK_SIZE)
            | bit(BlkFeature.FLUSH)
            | bit(BlkFeature.CONFIG_WCE)
            | bit(BlkFeature.TOPOLOGY)
            | bit(BlkFeature.DISCARD)
            | bit(BlkFeature.WRITE_ZEROES)
        )
        if read_only:
            features |= bit(BlkFeature.RO)
        if num_queues > 1:
            features |= bit(BlkFeature.MQ)
        # What the native fast path reads on every request (see
        # blk_fastpath.c): the fields below live in it.
        self._native = ffi.new("struct vfu_blk *")
        super().__init__(features=features, num_queues=num_queues)
        self.fd = fd
        self._native.fd = fd
        self.read_only = read_only
        self._native.read_only = int(read_only)
        self.serial = serial.encode()[:ID_BYTES]
        # The config is read before any ring exists; seg_max assumes QEMU's
        # default vhost-user-blk queue size (bigger rings only waste a little).
        self.queue_size = queue_size
        self.writeback = True
        # Size in 512-byte sectors (a partial last sector is not exposed);
        # read again only on reload, not per request.
        self.capacity = image_size(fd) // SECTOR

    @property
    def writeback(self) -> bool:
        return bool(self._native.writeback)

    @writeback.setter
    def writeback(self, enabled: bool) -> None:
        self._native.writeback = int(enabled)

    @property
    def capacity(self) -> int:
        return int(self._native.capacity)

    @capacity.setter
    def capacity(self, sectors: int) -> None:
        self._native.capacity = sectors

    def native_handler(self, queue: int) -> NativeHandler:
        return NativeHandler(lib.vfu_blk_check, lib.vfu_blk_serve, self._native)

    # -- plugin wiring ------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--blk-file",
            metavar="PATH",
            help="raw image file or block device (default: an in-memory disk)",
        )
        parser.add_argument(
            "--size",
            type=parse_size,
            metavar="BYTES",
            help="create a sparse image of this size if PATH is missing "
            "(e.g. 1G); size of the in-memory disk without --blk-file",
        )
        parser.add_argument(
            "--read-only",
            action="store_true",
            help="offer VIRTIO_BLK_F_RO; writes fail and never reach the file",
        )
        parser.add_argument(
            "--num-queues",
            type=int,
            default=cls.max_queues,
            metavar="N",
            help=f"request queues offered (1-{cls.max_queues}, default {cls.max_queues}): over "
            "vhost-user the most the front end may use (QEMU uses one per vCPU unless told "
            "otherwise), over vfio-user the number the guest sees (Linux uses one per vCPU)",
        )
        parser.add_argument("--serial", default=None, help="GET_ID string (20 bytes max)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        if not 1 <= args.num_queues <= cls.max_queues:
            raise ValueError(f"--num-queues must be between 1 and {cls.max_queues}")
        fd = open_image(args.blk_file, args.size, args.read_only)
        serial = args.serial or (os.path.basename(args.blk_file) if args.blk_file else "ram")
        return cls(fd, read_only=args.read_only, num_queues=args.num_queues, serial=serial)

    @classmethod
    def capabilities(cls) -> list[str]:
        return ["read-only", "blk-file"]

    # -- config space ---------------------------------------------------------

    config_can_change = True  # the image may grow: SIGHUP re-reads its size

    def config(self) -> bytes:
        return CONFIG.pack(
            self.capacity,
            self.max_segment_size,  # size_max
            self.queue_size - 2,  # seg_max: room for header and status
            0,
            0,
            0,  # geometry: not offered
            SECTOR,  # blk_size
            0,
            0,
            1,
            0,  # topology: physical exp, alignment, min_io (sectors), opt_io
            int(self.writeback),
            0,  # unused0
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_segments,
            1,  # discard_sector_alignment
            self.max_discard_sectors,  # max_write_zeroes_sectors
            self.max_discard_segments,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
            0,
            0,
            0,  # secure erase: not offered
        )

    def write_config(self, offset: int, data: bytes, *, migration: bool = False) -> None:
        if (
            offset == WRITEBACK_OFFSET
            and len(data) == 1
            and self.has_feature(BlkFeature.CONFIG_WCE)
        ):
            self.writeback = bool(data[0])
            log.info("writeback.set", enabled=self.writeback)
            return
        if offset <= WRITEBACK_OFFSET < offset + len(data) and not migration:
            raise ConfigWriteError("only the 1-byte writeback field may be written")
        super().write_config(offset, data, migration=migration)

    def reset(self) -> None:
        super().reset()
        self.writeback = True

    def check_state(self, values: dict[str, Any]) -> None:
        # A grown image is the same disk: the guest keeps the size it knows
        # until ``reload`` announces the new one.
        if values["capacity"] > self.capacity:
            raise StateError(
                f"the disk had {values['capacity']} sectors, this image has {self.capacity}"
            )

    def reload(self) -> None:
        capacity = image_size(self.fd) // SECTOR
        if capacity != self.capacity:
            log.info("capacity.changed", old=self.capacity, new=capacity)
            self.capacity = capacity
            self.config_changed()

    # -- requests -----------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        return {"sectors": self.capacity, "writeback": self.writeback, "read_only": self.read_only}

    def handle(self, queue: int, request: Request) -> int:
        if request.writable_size < 1:
            log.error("request.no_status_byte", queue=queue)
            return 0
        _, data_in, status_view = split_buffers(request.writable, 0, request.writable_size - 1)
        header = request.read(REQUEST_HEADER.size)
        used = request.writable_size  # data area plus the status byte, unless stated otherwise
        try:
            if len(header) < REQUEST_HEADER.size:
                raise BlkError(BlkStatus.IOERR, f"request header of {len(header)} bytes")
            kind, _, sector = REQUEST_HEADER.unpack(header)
            _, data_out, _ = split_buffers(request.readable, REQUEST_HEADER.size)
            name = TYPE_NAMES.get(kind, str(kind))
            size = sum(len(v) for v in (data_in if kind == RequestType.IN else data_out))
            if request.details is not None:  # traced, or fault rules look at it
                request.describe(type=name, sector=sector, sectors=size // SECTOR)
                self._injected_error(queue, name, sector, size)
            status, used = self._serve(kind, sector, data_out, data_in, used)
            if request.details is not None and kind == RequestType.IN:
                self._corrupt(queue, sector, data_in)
        except BlkError as exc:
            log.warning("request.failed", queue=queue, status=exc.status.name, reason=str(exc))
            status, used = exc.status, 1
            request.status = exc.status.name
        status_view[0][0] = status
        return used

    @staticmethod
    def _injected_error(queue: int, kind: str, sector: int, size: int) -> None:
        span = (sector, sector + max(size // SECTOR, 1))
        failing = faults.rules.sector_fault("ioerr", queue, kind, span)
        if failing is not None:
            raise BlkError(BlkStatus.IOERR, f"injected fault: sectors {failing[0]}-{failing[1]}")

    @staticmethod
    def _corrupt(queue: int, sector: int, data_in: list[memoryview]) -> None:
        """Flip every bit of the sectors a corrupt rule covers."""
        size = sum(len(v) for v in data_in)
        span = (sector, sector + size // SECTOR)
        if span[1] <= span[0]:
            return
        hit = faults.rules.sector_fault("corrupt", queue, "read", span)
        if hit is None:
            return
        offset, length = (hit[0] - sector) * SECTOR, (hit[1] - hit[0]) * SECTOR
        for view in split_buffers(data_in, offset, length)[1]:
            view[:] = bytes(b ^ 0xFF for b in view)

    def _serve(
        self,
        kind: int,
        sector: int,
        data_out: list[memoryview],
        data_in: list[memoryview],
        used: int,
    ) -> tuple[BlkStatus, int]:
        if kind == RequestType.IN:
            self._read(sector, data_in)
        elif kind == RequestType.OUT:
            self._write(sector, data_out)
            used = 1
        elif kind == RequestType.FLUSH:
            self._flush()
            used = 1
        elif kind == RequestType.GET_ID:
            serial = self.serial.ljust(ID_BYTES, b"\0")
            done = 0
            for view in split_buffers(data_in, 0, ID_BYTES)[1]:
                view[:] = serial[done : done + len(view)]
                done += len(view)
            return BlkStatus.OK, done + 1
        elif kind in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            feature = BlkFeature.DISCARD if kind == RequestType.DISCARD else BlkFeature.WRITE_ZEROES
            if not self.has_feature(feature):
                raise BlkError(BlkStatus.UNSUPP, f"{RequestType(kind).name} not negotiated")
            self._discard_or_zero(kind, data_out)
            used = 1
        else:
            raise BlkError(BlkStatus.UNSUPP, f"request type {kind}")
        return BlkStatus.OK, used

    def _check_range(self, sector: int, size: int) -> int:
        if size % SECTOR:
            raise BlkError(BlkStatus.IOERR, f"transfer of {size} bytes is not whole sectors")
        if sector + size // SECTOR > self.capacity:
            raise BlkError(BlkStatus.IOERR, f"sectors {sector}+{size // SECTOR} beyond the disk")
        return sector * SECTOR

    def _read(self, sector: int, buffers: list[memoryview]) -> None:
        offset = self._check_range(sector, sum(len(b) for b in buffers))
        for batch in _iov_batches(buffers):
            wanted = sum(len(b) for b in batch)
            got = _retry(os.preadv, self.fd, batch, offset)
            if got < wanted:  # the file shrank under us: what is missing reads as zeros
                for view in split_buffers(batch, got)[1]:
                    view[:] = bytes(len(view))
            offset += wanted

    def _write(self, sector: int, buffers: list[memoryview]) -> None:
        if self.read_only:
            raise BlkError(BlkStatus.IOERR, "write to a read-only disk")
        offset = self._check_range(sector, sum(len(b) for b in buffers))
        for batch in _iov_batches(buffers):
            while batch:
                done = _retry(os.pwritev, self.fd, batch, offset)
                if done == 0:
                    raise BlkError(BlkStatus.IOERR, "image write made no progress")
                offset += done
                batch = split_buffers(batch, done)[1]
        if not self.writeback:
            self._flush()

    def _flush(self) -> None:
        if self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise BlkError(BlkStatus.IOERR, f"fdatasync: {exc.strerror}") from exc

    def _discard_or_zero(self, kind: int, data_out: list[memoryview]) -> None:
        if self.read_only:
            raise BlkError(BlkStatus.IOERR, "discard or write-zeroes on a read-only disk")
        size = sum(len(v) for v in data_out)
        if not size or size % SEGMENT.size:
            raise BlkError(BlkStatus.IOERR, f"segment list of {size} bytes")
        count = size // SEGMENT.size
        if count > self.max_discard_segments:  # checked before copying anything
            raise BlkError(BlkStatus.IOERR, f"{count} segments exceed {self.max_discard_segments}")
        raw = b"".join(bytes(v) for v in data_out)
        segments = [SEGMENT.unpack_from(raw, i * SEGMENT.size) for i in range(count)]
        for sector, sectors, flags in segments:  # validate all before changing anything
            allowed = WRITE_ZEROES_FLAG_UNMAP if kind == RequestType.WRITE_ZEROES else 0
            if flags & ~allowed:
                raise BlkError(BlkStatus.UNSUPP, f"segment flags {flags:#x}")
            if sectors > self.max_discard_sectors:
                raise BlkError(BlkStatus.IOERR, f"segment of {sectors} sectors is too long")
            self._check_range(sector, sectors * SECTOR)
        for sector, sectors, flags in segments:
            if kind == RequestType.DISCARD or flags & WRITE_ZEROES_FLAG_UNMAP:
                punch_hole(self.fd, sector * SECTOR, sectors * SECTOR)
            else:
                zero_range(self.fd, sector * SECTOR, sectors * SECTOR)
        if not self.writeback:
            self._flush()

    def close(self) -> None:
        os.close(self.fd)


def _iov_batches(buffers: list[memoryview]) -> list[list[memoryview]]:
    return [buffers[i : i + IOV_MAX] for i in range(0, len(buffers), IOV_MAX)] or [[]]


def _retry(
    call: Callable[[int, list[memoryview], int], int],
    fd: int,
    buffers: list[memoryview],
    offset: int,
) -> int:
    if not buffers:
        return 0
    try:
        return call(fd, buffers, offset)
    except OSError as exc:
        raise BlkError(BlkStatus.IOERR, f"image I/O at {offset}: {exc.strerror}") from exc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    if lib.fallocate(fd, mode, offset, length) == 0:
        return 0
    return int(ffi.errno)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate; reads return zeros afterwards (or, if the file system
    cannot punch holes, write the zeros)."""
    err = _fallocate(fd, lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE, offset, length)
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
        _write_zeros(fd, offset, length)
    elif err:
        raise BlkError(BlkStatus.IOERR, f"punching a hole: {os.strerror(err)}")


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero while keeping the blocks allocated."""
    err = _fallocate(fd, lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE, offset, length)
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
        # e.g. tmpfs: punch, then allocate the range again.
        punch_hole(fd, offset, length)
        err = _fallocate(fd, lib.FALLOC_FL_KEEP_SIZE, offset, length)
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.ENOSPC):
            err = 0  # the range reads as zeros; allocation was only a wish
    if err:
        raise BlkError(BlkStatus.IOERR, f"zeroing: {os.strerror(err)}")


def _write_zeros(fd: int, offset: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    while length:
        n = min(length, len(chunk))
        try:
            os.pwrite(fd, chunk[:n], offset)
        except OSError as exc:
            raise BlkError(BlkStatus.IOERR, f"writing zeros: {exc.strerror}") from exc
        offset += n
        length -= n


def image_size(fd: int) -> int:
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return info.st_size


def open_image(path: str | None, size: int | None, read_only: bool) -> int:
    """Open (or create sparse) the image; without a path, an in-memory disk."""
    if path is None:
        fd = os.memfd_create("vfiouserd-blk", os.MFD_CLOEXEC)
        os.ftruncate(fd, size if size is not None else 1 << 30)
        return fd
    flags = os.O_RDONLY if read_only else os.O_RDWR
    if not os.path.exists(path):
        if size is None:
            raise FileNotFoundError(f"{path} does not exist (give --size to create it)")
        if read_only:
            raise ValueError("refusing to create a new image that is read-only")
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        return fd
    return os.open(path, flags | os.O_CLOEXEC)
