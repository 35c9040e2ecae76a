"""The Error Information log (Get Log Page 01h): the last CAPACITY commands
that completed with an error, newest first, one 64-byte entry each, and the
count of every error recorded (SMART's Number of Error Information Log
Entries). The spec clears it at no reset: it lives as long as the device
state does (a restarted or migrated daemon keeps it; a new process is a
power cycle).

An entry holds what is known without help from the command's handler: the
queue and CID, the status with the phase tag it is posted with, the NSID,
the SLBA of an I/O command failed for its LBAs or its media, and the field
to blame where the status alone names it.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, NamedTuple

from vfiouserd.devices.nvme.formats import Command, Generic, IoOpcode, Sct, Specific
from vfiouserd.devices.nvme.queues import Queues, SubmissionQueue

CAPACITY = 64
ELPE = CAPACITY - 1  # Identify Controller's ELPE is 0-based
ENTRY_SIZE = 64
NOT_APPLICABLE = 0xFFFF  # Parameter Error Location when no field is to blame
MAX_COUNT = (1 << 64) - 1

# Error Count, SQID, CID, Status Field (phase tag in bit 0), Parameter Error
# Location, LBA, Namespace, Vendor Specific Information Available, Transport
# Type, reserved, Command Specific Information, Transport Type Specific
# Information, reserved
ENTRY = struct.Struct("<QHHHHQIBB2xQH22x")
assert ENTRY.size == ENTRY_SIZE

LBA_COMMANDS = (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES)


class ErrorEntry(NamedTuple):
    error_count: int
    sqid: int
    cid: int
    status: int  # the CQE's status field, without the phase tag
    phase: bool
    location: int
    lba: int
    nsid: int

    def encode(self) -> bytes:
        raw_status = self.status << 1 | self.phase
        head = (
            self.error_count,
            self.sqid,
            self.cid,
            raw_status,
            self.location,
            self.lba,
            self.nsid,
        )
        return ENTRY.pack(*head, 0, 0, 0, 0)  # nothing vendor or transport specific

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> ErrorEntry:
        count, sqid, cid, raw_status, location, lba, nsid, *_ = ENTRY.unpack_from(data, offset)
        return cls(count, sqid, cid, raw_status >> 1, bool(raw_status & 1), location, lba, nsid)


def location(byte: int, bit: int = 0) -> int:
    """Parameter Error Location: byte in the command (bits 7:0), bit in it (10:8)."""
    return byte | bit << 8


# Command-specific statuses and the admin command field each blames.
_SPECIFIC_FIELDS: dict[int, int] = {
    Specific.INVALID_QUEUE_IDENTIFIER: location(40),  # QID, CDW10 15:0
    Specific.INVALID_QUEUE_SIZE: location(42),  # QSIZE, CDW10 31:16
    Specific.COMPLETION_QUEUE_INVALID: location(46),  # CQID, CDW11 31:16
    Specific.INVALID_INTERRUPT_VECTOR: location(46),  # IV, CDW11 31:16
    Specific.INVALID_LOG_PAGE: location(40),  # LID, CDW10 7:0
    Specific.FEATURE_NOT_SAVEABLE: location(43, 7),  # SV, CDW10 bit 31
}


def error_location(admin: bool, cmd: Command, status: int) -> int:
    """The field of ``cmd`` to blame for ``status``, where only one can be."""
    sct, sc = status >> 8 & 7, status & 0xFF
    if sct == Sct.GENERIC:
        if sc == Generic.INVALID_OPCODE:
            return location(0)
        fused_or_reserved = cmd.flags & 0x3F  # checked before any other field
        if sc == Generic.INVALID_FIELD and fused_or_reserved:
            return location(1, (fused_or_reserved & -fused_or_reserved).bit_length() - 1)
        if sc == Generic.INVALID_NAMESPACE:
            return location(4)
        if sc == Generic.LBA_OUT_OF_RANGE and not admin and cmd.opcode in LBA_COMMANDS:
            return location(40)  # SLBA
        if sc == Generic.PRP_OFFSET_INVALID and admin:  # a queue's base
            return location(24)
    elif sct == Sct.COMMAND_SPECIFIC and admin:
        return _SPECIFIC_FIELDS.get(sc, NOT_APPLICABLE)
    return NOT_APPLICABLE


class ErrorLog:
    def __init__(self, queues: Queues) -> None:
        """``queues``: where a failed command's completion will be posted."""
        self.queues = queues
        self.count = 0
        self.entries: deque[ErrorEntry] = deque(maxlen=CAPACITY)  # oldest first

    def record(self, sq: SubmissionQueue, cmd: Command, status: int) -> None:
        """``cmd`` from ``sq`` is about to complete with ``status``."""
        self.count = self.count + 1 if self.count < MAX_COUNT else 1  # rolls over to 1
        admin = sq.qid == 0
        sct, sc = status >> 8 & 7, status & 0xFF
        lba_failed = sct == Sct.MEDIA or (sct == Sct.GENERIC and sc == Generic.LBA_OUT_OF_RANGE)
        has_lba = not admin and cmd.opcode in LBA_COMMANDS and lba_failed
        self.entries.append(
            ErrorEntry(
                self.count,
                sq.qid,
                cmd.cid,
                status,
                self._posting_phase(sq),
                error_location(admin, cmd, status),
                cmd.slba if has_lba else 0,
                cmd.nsid,
            )
        )

    def _posting_phase(self, sq: SubmissionQueue) -> bool:
        """The phase tag the completion gets: after those waiting for room."""
        cq = self.queues.cqs.get(sq.cqid)
        if cq is None:
            return False
        wraps = (cq.tail + len(cq.waiting)) // cq.size
        return cq.phase ^ bool(wraps & 1)

    def page(self) -> bytes:
        """The log page: newest first, zeros after the last entry."""
        data = b"".join(entry.encode() for entry in reversed(self.entries))
        return data.ljust(CAPACITY * ENTRY_SIZE, b"\0")

    # -- state -------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {
            "error_count": self.count,
            "error_log": [
                {
                    "count": e.error_count,
                    "sqid": e.sqid,
                    "cid": e.cid,
                    "status": e.status << 1 | e.phase,
                    "location": e.location,
                    "lba": e.lba,
                    "nsid": e.nsid,
                }
                for e in self.entries
            ],
        }

    @staticmethod
    def check(values: dict[str, Any]) -> str | None:
        """What is wrong with a saved log, if anything: more entries than
        it holds, or counts that are not the last ones, oldest first."""
        saved = values["error_log"]
        if len(saved) > CAPACITY:
            return f"{len(saved)} error log entries, more than {CAPACITY}"
        expected = values["error_count"]
        for entry in reversed(saved):
            if expected == 0 or entry["count"] != expected:
                return f"error log entry {entry['count']}, expected {expected}"
            expected = expected - 1 if expected > 1 else MAX_COUNT
        return None

    def load(self, values: dict[str, Any]) -> None:
        self.count = values["error_count"]
        self.entries = deque(
            (
                ErrorEntry(
                    e["count"],
                    e["sqid"],
                    e["cid"],
                    e["status"] >> 1,
                    bool(e["status"] & 1),
                    e["location"],
                    e["lba"],
                    e["nsid"],
                )
                for e in values["error_log"]
            ),
            maxlen=CAPACITY,
        )
