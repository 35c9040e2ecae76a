"""A hypothesis fuzzer over NVMe submission queue entries: the controller,
in process behind a vfio-user session, driven through the project's NVMe
driver (vfiouserd/client/nvme.py) with random admin and I/O commands
(opcodes, flags, NSIDs, CDW10-15, queue ids on create and delete, PRP1 and
PRP2 inside guest memory, in read-only memory, off its end, nowhere, or at
PRP lists that chain and loop; with a random PSDT, SGLs of random
descriptors, in the command or in segments that chain, loop or point
anywhere), raw doorbell writes and controller resets; guest memory mapped
into the daemon or reached by DMA messages.

After every example:
- each command the driver put in a queue got exactly one completion, with
  its SQ id and a status the spec defines (an AER at most one: it completes
  when an event comes, at once if refused), and no completion came that
  nothing asked for; where the spec leaves no choice, the status is the one
  it gives (reserved flags, unknown opcodes; an error for writes to a
  write-protected namespace and for blocks past a namespace's end), and a
  well-formed one-page read or write succeeds and moves the image's bytes;
- nothing crashed (no ``device.failed``/``session.crashed`` logged), no
  exception escaped, no wait ran past its bound;
- CSTS.CFS came only after a doorbell that may have started a queue a
  random command made (its memory anywhere: the controller's fatal status
  is then the spec's answer);
- the state it got into is one another controller takes (save, load, the
  same state);
- a controller reset, then a write, a read and a check of the image work,
  and the images kept their sizes (the write-protected one its bytes).

The driver's own queues live in memory the random PRPs never point at (a
driver that points the device at its own rings is beyond checking), and a
doorbell written behind the driver's back ends the checks for its queue.

A short run by default, so that ``make test`` stays fast; more examples
with VFIOUSERD_NVME_FUZZ_EXAMPLES=N.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vfiouserd.devices.nvme.formats as nvme
from conftest import MiB, _CrashRecorder, vfio_served
from vfiouserd import state
from vfiouserd.client.guest import GuestRam
from vfiouserd.client.nvme import NvmeDriver
from vfiouserd.devices.nvme import NvmeController
from vfiouserd.devices.nvme.formats import (
    AdminOpcode,
    Cns,
    Command,
    Completion,
    Feature,
    Generic,
    IoOpcode,
    LogPage,
    Media,
    Sct,
    SglDescriptor,
    SglType,
    Specific,
)
from vfiouserd.protocol import vfio_user as vfu

EXAMPLES = int(os.environ.get("VFIOUSERD_NVME_FUZZ_EXAMPLES", "30"))
PAGE = nvme.PAGE
LBA = 512

# Guest memory: the driver's rings and buffers (never a random target);
# the arena random PRPs point into, a hole behind it, then memory mapped
# read-only.
RINGS, RINGS_SIZE = 0x1_0000_0000, 4 * MiB
ARENA, ARENA_SIZE = 0x0, MiB
ARENA_END = ARENA + ARENA_SIZE
HOLE = ARENA_END
READ_ONLY, READ_ONLY_SIZE = ARENA_END + 64 * 1024, 64 * 1024
READ_ONLY_END = READ_ONLY + READ_ONLY_SIZE
MAPPED_DATA = [(ARENA, ARENA_END), (READ_ONLY, READ_ONLY_END)]  # where data may be
MAX_TRANSFER = 64 * PAGE  # the controller's MDTS
LAYOUT = [(RINGS, RINGS_SIZE), (ARENA, ARENA_SIZE), (READ_ONLY, READ_ONLY_SIZE)]

BLOCKS = (2048, 1024)  # namespace 1, namespace 2 (write protected)
DRIVER_QUEUES = (1, 2)  # the driver's I/O queue pairs; random commands may make 3 to 8
COMMAND_TIMEOUT = 3.0  # seconds for one completion: far more than any takes
EXAMPLE_TIMEOUT = 60.0

STATUSES = {Sct.GENERIC: set(Generic), Sct.COMMAND_SPECIFIC: set(Specific), Sct.MEDIA: set(Media)}
HANDLED_ADMIN = [
    AdminOpcode.IDENTIFY,
    AdminOpcode.CREATE_IO_CQ,
    AdminOpcode.CREATE_IO_SQ,
    AdminOpcode.DELETE_IO_SQ,
    AdminOpcode.DELETE_IO_CQ,
    AdminOpcode.GET_LOG_PAGE,
    AdminOpcode.SET_FEATURES,
    AdminOpcode.GET_FEATURES,
    AdminOpcode.ASYNC_EVENT_REQUEST,
    AdminOpcode.ABORT,
    AdminOpcode.KEEP_ALIVE,
    AdminOpcode.DOORBELL_BUFFER_CONFIG,
]
HANDLED_IO = [
    IoOpcode.FLUSH,
    IoOpcode.WRITE,
    IoOpcode.READ,
    IoOpcode.WRITE_ZEROES,
    IoOpcode.DATASET_MANAGEMENT,
]


# -- what the fuzzer draws -----------------------------------------------------------------


def mostly(usual: st.SearchStrategy, *rare: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` four times in five, else one of ``rare`` (shrinking to
    ``usual``). ``st.one_of`` cannot weigh: it drops repeated branches."""
    other = st.one_of(*rare)
    return st.integers(0, 4).flatmap(lambda i: usual if i < 4 else other)


def outside_rings(address: int) -> bool:
    return not RINGS - 64 * PAGE <= address < RINGS + RINGS_SIZE  # MDTS: 64 pages


NOWHERE = [  # nothing mapped there
    HOLE,
    READ_ONLY_END,
    0x8000_0000,
    RINGS + RINGS_SIZE,
    1 << 52,
    (1 << 64) - PAGE,
    (1 << 64) - 8,
    (1 << 64) - 4,
]
ARENA_PAGES = st.integers(0, ARENA_SIZE // PAGE - 1).map(lambda i: ARENA + i * PAGE)
ADDRESSES = st.one_of(
    ARENA_PAGES,  # page aligned, in memory
    st.integers(ARENA, ARENA_END - 1).map(lambda a: a & ~3),  # dword aligned
    st.integers(ARENA, ARENA_END - 1),  # anywhere
    st.sampled_from([ARENA_END - PAGE, ARENA_END - 512, ARENA_END - 8, READ_ONLY - PAGE]),
    st.integers(0, READ_ONLY_SIZE // PAGE - 1).map(lambda i: READ_ONLY + i * PAGE),
    st.sampled_from(NOWHERE),
    st.integers(0, (1 << 64) - 1).filter(outside_rings),
)
DATA_PAGES = mostly(ARENA_PAGES, ADDRESSES)
FIRST_PAGES = mostly(  # PRP1 may start anywhere dword aligned in its page
    ARENA_PAGES, st.integers(ARENA, ARENA_END - 1).map(lambda a: a & ~3), ADDRESSES
)


@dataclass
class PrpList:
    """PRP2 pointing into list pages written to the arena first."""

    prp2: int
    pages: list[tuple[int, bytes]]  # (address, contents)


@st.composite
def prp_lists(draw: st.DrawFn) -> PrpList:
    """1 to 3 list pages, the last slot of each pointing to the next one,
    back to the first (a loop), to itself, to data, or anywhere."""
    count = draw(st.integers(1, 3))
    pages = draw(st.lists(ARENA_PAGES, min_size=count, max_size=count, unique=True))
    offset = draw(
        mostly(
            st.sampled_from([0, 8, PAGE - 8 * 63, PAGE - 8 * 10, PAGE - 8 * 2, PAGE - 8]),
            st.integers(0, PAGE // 8 - 1).map(lambda i: 8 * i),
            st.integers(0, PAGE - 1),  # not qword aligned
        )
    )
    written = []
    for index, page in enumerate(pages):
        start = offset & ~7 if index == 0 else 0
        slots = (PAGE - start) // 8
        pattern = draw(st.lists(DATA_PAGES, min_size=1, max_size=4))
        entries = [pattern[i % len(pattern)] for i in range(slots - 1)]
        last = draw(st.sampled_from(["next", "first", "self", "data", "address"]))
        if last == "next":
            entries.append(pages[(index + 1) % count])
        elif last == "first":
            entries.append(pages[0])
        elif last == "self":
            entries.append(page)
        elif last == "data":
            entries.append(pattern[(slots - 1) % len(pattern)])
        else:
            entries.append(draw(ADDRESSES))
        written.append((page + start, struct.pack(f"<{slots}Q", *entries)))
    return PrpList(pages[0] + offset, written)


U32 = st.integers(0, (1 << 32) - 1)
U16 = st.integers(0, 0xFFFF)
BYTES = st.integers(0, 255)

SGL_LENGTHS = mostly(
    st.sampled_from([512, 1024, 4096, 8192, 65536]),
    st.sampled_from([0, 4, 508, 2048, 2050]),  # NULL, odd pieces, not dword granular
    U32,
)
SGL_ANY = st.builds(  # any descriptor: mostly a Data Block, else a bit bucket or any type
    SglDescriptor,
    mostly(ARENA_PAGES, ADDRESSES),
    SGL_LENGTHS,
    mostly(st.just(SglType.DATA_BLOCK), st.just(SglType.BIT_BUCKET), st.integers(0, 15)),
    mostly(st.just(0), st.integers(0, 15)),
)
SEGMENT_KINDS = (SglType.SEGMENT, SglType.LAST_SEGMENT)
# A segment (at most 42 descriptors) starts in one of these and ends in the arena.
SEGMENT_PAGES = st.integers(0, ARENA_SIZE // PAGE - 2).map(lambda i: ARENA + i * PAGE)
SGL_FAULTS = [
    "piece",  # one descriptor any descriptor
    "short",  # less data than the transfer
    "loop",  # a segment points back to the first one (or itself) before the data ends
    "pointer",  # a segment descriptor anywhere, of any length, type or sub type
    "middle",  # a segment descriptor before the end of its segment
    "end",  # a segment without its pointer
    "offset",  # segments anywhere in their page
]


@dataclass
class Sgl:
    sgl1: SglDescriptor  # in the command
    segments: list[tuple[int, bytes]]  # (address, contents)
    # Where a list without faults puts the data: (address, or None for a
    # bit bucket's share, bytes); None with a fault.
    pieces: list[tuple[int | None, int]] | None


@st.composite
def sgls(draw: st.DrawFn, span: int, read: bool) -> Sgl:
    """An SGL for ``span`` bytes as a driver makes one, four times in five:
    the data in 1 to 40 dword pieces in the arena (NULL descriptors among
    them; bit buckets in a read), maybe a descriptor past the data, in the
    command or in 1 to 3 segments in the arena, each ending in a descriptor
    of the next one; else with one of SGL_FAULTS."""
    fault = draw(
        st.integers(0, 4).flatmap(lambda i: st.sampled_from(SGL_FAULTS) if i == 4 else st.none())
    )
    count = draw(mostly(st.integers(1, 4), st.integers(5, 40)))
    cuts = sorted(draw(st.lists(st.integers(0, span // 4), min_size=count - 1, max_size=count - 1)))
    lengths = [4 * (b - a) for a, b in zip([0, *cuts], [*cuts, span // 4], strict=True)]
    pieces: list[tuple[int | None, int]] = []
    data: list[SglDescriptor] = []
    for length in lengths:
        address = draw(ARENA_PAGES) + 4 * draw(st.integers(0, 255))
        if read and draw(st.integers(0, 5)) == 0:
            data.append(SglDescriptor(0, length, SglType.BIT_BUCKET))
            pieces.append((None, length))
        else:
            data.append(SglDescriptor(address, length, SglType.DATA_BLOCK))
            pieces.append((address, length))
    if fault == "piece":
        data[draw(st.integers(0, count - 1))] = draw(SGL_ANY)
    elif fault == "short":
        data[-1] = data[-1]._replace(
            length=max(0, data[-1].length - 4 * draw(st.integers(1, 1024)))
        )
    if draw(st.integers(0, 3)) == 0:  # past the data: never looked at
        data.append(draw(SGL_ANY))
    if len(data) == 1 and fault is None and draw(st.booleans()):
        return Sgl(data[0], [], pieces)
    groups = draw(st.integers(1, min(3, len(data))))
    bounds = sorted(
        draw(
            st.lists(
                st.integers(1, len(data) - 1), min_size=groups - 1, max_size=groups - 1, unique=True
            )
        )
        if len(data) > 1
        else []
    )
    split = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    groups = len(split)
    if fault == "loop":  # the data ends past a pointer back
        split = split[: max(1, groups - 1)]
        groups = len(split)
    pages = draw(st.lists(SEGMENT_PAGES, min_size=groups, max_size=groups, unique=True))
    offset = draw(st.sampled_from([0, 16, PAGE - 256]))
    if fault == "offset":
        offset = draw(st.integers(1, PAGE - 1).filter(lambda o: o % 8))
    starts = [page + offset for page in pages]
    sizes = [len(g) + (i < groups - 1 or fault == "loop") for i, g in enumerate(split)]

    def pointer(index: int) -> SglDescriptor:
        last = index == groups - 1 and fault != "loop"
        return SglDescriptor(starts[index], sizes[index] * 16, SEGMENT_KINDS[last])

    written = []
    for index, group in enumerate(split):
        entries = list(group)
        if index < groups - 1:
            entries.append(pointer(index + 1))
        elif fault == "loop":
            entries.append(pointer(0))
        written.append(entries)
    first = pointer(0)
    if fault == "pointer":
        victim = draw(st.integers(0, groups - 1))
        bad = draw(
            st.sampled_from(
                [
                    pointer(victim)._replace(address=draw(ADDRESSES)),
                    pointer(victim)._replace(length=draw(st.sampled_from([0, 8, 24, 16]) | U32)),
                    pointer(victim)._replace(kind=draw(st.integers(0, 15))),
                    pointer(victim)._replace(subtype=draw(st.integers(1, 15))),
                ]
            )
        )
        if victim == 0:
            first = bad
        else:
            written[victim - 1][-1] = bad
    elif fault == "middle":
        victim = draw(st.integers(0, groups - 1))
        at = draw(st.integers(0, len(written[victim]) - 1))
        written[victim].insert(at, pointer(draw(st.integers(0, groups - 1))))
        sizes[victim] += 1
        first = pointer(0) if victim == 0 else first
        if victim:
            written[victim - 1][-1] = pointer(victim)
    elif fault == "end" and groups > 1:
        victim = draw(st.integers(0, groups - 2))
        written[victim].pop()
        sizes[victim] -= 1
        first = pointer(0) if victim == 0 else first
        if victim:
            written[victim - 1][-1] = pointer(victim)
    segments = [
        (start, b"".join(e.encode() for e in entries))
        for start, entries in zip(starts, written, strict=True)
    ]
    return Sgl(first, segments, pieces if fault is None else None)


QUEUES = st.integers(0, 9)
QIDS = mostly(QUEUES, st.sampled_from([62, 63, 64, 65, 0xFFFF]), U16)
QSIZES = mostly(  # 0-based
    st.sampled_from([1, 2, 3, 15, 63]), st.sampled_from([0, 1022, 1023, 1024, 0xFFFF]), U16
)
IO_NSIDS = mostly(st.sampled_from([1, 1, 2]), st.sampled_from([0, 3, 0xFFFFFFFE, 0xFFFFFFFF]), U32)
ADMIN_NSIDS = st.one_of(st.sampled_from([0, 1, 2, 3, 0xFFFFFFFE, 0xFFFFFFFF]), U32)
FAR_LBAS = st.one_of(
    st.sampled_from([1 << 32, (1 << 64) - 1, (1 << 64) - 8]), st.integers(0, (1 << 64) - 1)
)
NLBS = mostly(  # 0-based: within a page, two pages, a list
    st.one_of(st.integers(0, 7), st.integers(8, 15), st.integers(16, 511)),
    st.sampled_from([512, 513, 0xFFFF]),
    U16,
)
IO_FLAGS = mostly(st.just(0), st.sampled_from([1 << 30, 1 << 25, 1 << 31, 1 << 30 | 1 << 25]))


def words(*given: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[int, ...]]:
    """CDW10 onwards: ``given``, then zeros."""
    return st.tuples(*given, *[st.just(0)] * (6 - len(given)))


RANDOM_WORDS = words(U32, U32, U32, U32, U32, U32)


def admin_words(opcode: int) -> st.SearchStrategy[tuple[int, ...]]:
    if opcode == AdminOpcode.IDENTIFY:
        cns = mostly(st.sampled_from(list(Cns)), BYTES)
        return words(cns, mostly(st.just(0), BYTES.map(lambda c: c << 24)))
    if opcode in (AdminOpcode.CREATE_IO_CQ, AdminOpcode.CREATE_IO_SQ):
        cdw10 = st.builds(lambda q, s: q | s << 16, QIDS, QSIZES)
        flags = mostly(st.sampled_from([1, 3]), st.sampled_from([0, 2]), U16)
        vector_or_cq = mostly(QUEUES, st.integers(0, 70), U16)
        return words(cdw10, st.builds(lambda f, v: f | v << 16, flags, vector_or_cq))
    if opcode in (AdminOpcode.DELETE_IO_SQ, AdminOpcode.DELETE_IO_CQ):
        return words(QIDS)
    if opcode == AdminOpcode.GET_LOG_PAGE:
        lid = mostly(st.sampled_from(list(LogPage)), BYTES)
        numdl = mostly(st.sampled_from([15, 127, 1023]), st.sampled_from([0, 0xFFFF]), U16)
        rae = st.integers(0, 1)
        cdw10 = st.builds(lambda lid, rae, n: lid | rae << 15 | n << 16, lid, rae, numdl)
        numdu = mostly(st.just(0), U16)
        offset = mostly(st.just(0), st.sampled_from([4, 6, 512, 4096]), U32)
        return words(cdw10, numdu, offset, mostly(st.just(0), U32))
    if opcode in (AdminOpcode.SET_FEATURES, AdminOpcode.GET_FEATURES):
        fid = mostly(st.sampled_from(list(Feature)), BYTES)
        select = mostly(st.just(0), st.integers(0, 7))
        cdw10 = st.builds(lambda f, s, v: f | s << 8 | v << 31, fid, select, st.integers(0, 1))
        value = mostly(st.sampled_from([0, 1, 2, 0xFF, 300, 0x1F0157, 0x10000, 0x30001]), U32)
        return words(cdw10, value)
    if opcode == AdminOpcode.ABORT:
        return words(st.builds(lambda q, c: q | c << 16, QIDS, U16))
    return RANDOM_WORDS


@st.composite
def block_ranges(draw: st.DrawFn, nsid: int) -> tuple[int, ...]:
    """SLBA and NLB: inside the namespace, at its end (one block either
    side), or far beyond."""
    blocks = {2: BLOCKS[1]}.get(nsid, BLOCKS[0])
    nlb = draw(NLBS) + 1
    end = st.integers(-2, 2).map(lambda d: max(0, blocks - nlb + d))
    slba = draw(st.one_of(st.integers(0, blocks - 1), end, FAR_LBAS))
    flags, cdw13 = draw(IO_FLAGS), draw(mostly(st.just(0), U32))
    return (slba & 0xFFFFFFFF, slba >> 32, nlb - 1 | flags, cdw13, 0, 0)


def io_words(opcode: int, nsid: int) -> st.SearchStrategy[tuple[int, ...]]:
    if opcode in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES, IoOpcode.COMPARE):
        return block_ranges(nsid)
    if opcode == IoOpcode.DATASET_MANAGEMENT:
        count = mostly(st.integers(0, 3), BYTES)
        attributes = mostly(st.just(4), st.sampled_from([0, 1, 2, 7]), U32)
        return words(count, attributes)
    return RANDOM_WORDS


@dataclass
class Submit:
    queue: int  # 0: the admin queue; else one of the driver's I/O queues (-1: none)
    cmd: Command  # its CID is the driver's
    lists: list[tuple[int, bytes]] = field(default_factory=list)  # written to the arena first
    wait: bool = True  # for its completion before the next action
    pieces: list[tuple[int | None, int]] | None = None  # where a clean SGL has the data


@dataclass
class Doorbell:
    offset: int
    width: int
    value: int


@dataclass
class Reset:
    settle: bool  # let commands in flight complete first


ADMIN_OPCODES = mostly(st.sampled_from(HANDLED_ADMIN), st.sampled_from(list(AdminOpcode)), BYTES)
IO_OPCODES = mostly(st.sampled_from([IoOpcode.READ, IoOpcode.WRITE, *IoOpcode]), BYTES)


@st.composite
def submits(draw: st.DrawFn) -> Submit:
    queue = draw(st.sampled_from([0, *DRIVER_QUEUES, DRIVER_QUEUES[0]]))
    admin = queue == 0
    opcode = draw(ADMIN_OPCODES if admin else IO_OPCODES)
    nsid = draw(ADMIN_NSIDS if admin else IO_NSIDS)
    cdw = draw(mostly(admin_words(opcode) if admin else io_words(opcode, nsid), RANDOM_WORDS))
    flags = draw(mostly(st.sampled_from([0, 0, nvme.PSDT_SGL << 6]), BYTES))
    prp1 = draw(FIRST_PAGES)
    lists: list[tuple[int, bytes]] = []
    kind = draw(st.sampled_from(["none", "page", "list", "list"]))
    prp2 = 0
    pieces = None
    if flags == nvme.PSDT_SGL << 6 and not admin and draw(st.integers(0, 3)):
        # An I/O command that gets as far as its data, three times in four.
        opcode = draw(st.sampled_from([IoOpcode.READ, IoOpcode.WRITE, IoOpcode.DATASET_MANAGEMENT]))
        nsid = draw(mostly(st.just(1), st.just(2)))
        nlb = draw(mostly(st.integers(1, 64), st.integers(65, 512)))
        slba = draw(st.integers(0, BLOCKS[nsid - 1] - nlb))
        cdw = (slba, 0, nlb - 1, 0, 0, 0)
        if opcode == IoOpcode.DATASET_MANAGEMENT:
            cdw = draw(io_words(opcode, nsid))
    if flags >> 6:  # any PSDT but PRPs: an SGL for what the command moves
        span = 4096
        if opcode in (IoOpcode.READ, IoOpcode.WRITE):
            span = ((cdw[2] & 0xFFFF) + 1) * LBA
        elif opcode == IoOpcode.DATASET_MANAGEMENT:
            span = ((cdw[0] & 0xFF) + 1) * nvme.DSM_RANGE.size
        sgl = draw(sgls(span, opcode == IoOpcode.READ))
        (prp1, prp2), lists, pieces = sgl.sgl1.sgl1(), sgl.segments, sgl.pieces
    elif kind == "page":
        prp2 = draw(DATA_PAGES)
    elif kind == "list":
        listed = draw(prp_lists())
        prp2, lists = listed.prp2, listed.pages
    cmd = nvme.command(opcode, nsid=nsid, prp1=prp1, prp2=prp2, flags=flags, cdw=cdw)
    return Submit(queue, cmd, lists, draw(mostly(st.just(True), st.just(False))), pieces)


DOORBELLS = st.builds(
    Doorbell,
    st.one_of(
        st.builds(nvme.doorbell_offset, mostly(QUEUES, st.integers(0, 70)), st.booleans()),
        st.integers(0x1000, 0x3FFC),
    ),
    st.sampled_from([4, 4, 4, 2, 1]),
    st.one_of(st.sampled_from([0, 1, 2, 3, 15, 16, 63, 64, 1023, 1024, 0xFFFF]), U32),
)


@st.composite
def other_queues(draw: st.DrawFn) -> list[Submit | Doorbell]:
    """A queue pair the driver does not use: created by the admin commands
    a driver would send, anywhere in memory, with random commands in its
    SQ (when it is in the arena), then its doorbell."""
    qid = draw(st.integers(DRIVER_QUEUES[-1] + 1, 8))
    entries = draw(st.sampled_from([2, 3, 4, 16]))
    cqid = draw(st.sampled_from([qid, qid, *DRIVER_QUEUES]))
    vector = draw(st.sampled_from([qid, 0, 3, 64]))  # the driver installed eventfds for 0-3
    cq_base, sq_base = draw(ARENA_PAGES), draw(ARENA_PAGES)
    if draw(st.integers(0, 2)) == 0:
        cq_base = draw(st.sampled_from([*NOWHERE[:4], READ_ONLY]))
    if draw(st.integers(0, 2)) == 0:
        sq_base = draw(st.sampled_from([*NOWHERE[:4], ARENA_END - PAGE]))
    steps: list[Submit | Doorbell] = []
    if cqid == qid:
        create = nvme.command(
            AdminOpcode.CREATE_IO_CQ,
            prp1=cq_base,
            cdw=((entries - 1) << 16 | qid, vector << 16 | 3),
        )
        steps.append(Submit(0, create))
    create = nvme.command(
        AdminOpcode.CREATE_IO_SQ, prp1=sq_base, cdw=((entries - 1) << 16 | qid, cqid << 16 | 1)
    )
    steps.append(Submit(0, create))
    commands = draw(st.lists(SUBMITS, max_size=entries - 1))
    if ARENA <= sq_base < ARENA_END - PAGE:
        lists = [page for c in commands for page in c.lists]
        table = b"".join(c.cmd._replace(cid=0x8000 + i).encode() for i, c in enumerate(commands))
        steps.append(Submit(-1, nvme.command(0), [*lists, (sq_base, table)]))  # memory only
    tail = draw(st.one_of(st.just(len(commands)), st.integers(0, entries)))
    steps.append(Doorbell(nvme.doorbell_offset(qid, False), 4, tail))
    return steps


SUBMITS, RESETS = submits(), st.builds(Reset, st.booleans())


def step(i: int) -> st.SearchStrategy[list[Submit | Doorbell | Reset]]:
    """Mostly a command of the driver's, else a raw doorbell write, a reset,
    or a queue pair the driver does not use, at work."""
    if i < 14:
        return SUBMITS.map(lambda action: [action])
    if i < 17:
        return DOORBELLS.map(lambda action: [action])
    if i < 18:
        return RESETS.map(lambda action: [action])
    return other_queues()


STEPS = st.integers(0, 19).flatmap(step)
ACTIONS = st.lists(STEPS, min_size=1, max_size=16).map(lambda s: list(itertools.chain(*s)))


@dataclass
class Setup:
    with_fd: bool  # guest memory mapped into the daemon, or reached by DMA messages
    admin_entries: int
    io_entries: int
    seed: int  # of what the images and memory hold at first


SETUPS = st.builds(
    Setup,
    st.booleans(),
    st.sampled_from([32, 8]),
    st.sampled_from([2, 3, 16, 64]),
    st.integers(0, (1 << 32) - 1),
)


# -- running an example ----------------------------------------------------------------------


class Bug(AssertionError):
    pass


@dataclass
class Sent:
    qid: int
    cmd: Command
    aer: bool  # an AER: completes when an event comes (or at once when refused)
    quiet: bool  # submitted while no other command was in flight
    data: bytes | None = None  # a one-page write's data, as it was in memory
    pieces: list[tuple[int | None, int]] | None = None  # where its data is (``where``)
    fragile: bool = False  # its data pointer is in memory another command may change
    alone: bool = False  # quiet, and nothing else submitted before it completed


class Run:
    def __init__(
        self, driver: NvmeDriver, setup: Setup, image: str, crashes: _CrashRecorder
    ) -> None:
        self.driver = driver
        self.setup = setup
        self.image = image  # namespace 1's
        self.crashes = crashes  # no use waiting for a command once one is logged
        self.resets = 0
        self.started()

    def started(self) -> None:
        """Fresh queues (after the first enable or a reset)."""
        self.live = set(self.driver.queues)  # the driver's queues (0: admin)
        self.trusted = set(self.live)  # those whose accounting holds
        self.sent: dict[tuple[int, int], Sent] = {}
        self.seen: Counter[tuple[int, int]] = Counter()
        self.created: set[int] = set()  # SQs random commands made (and did not delete)
        self.excused = False  # a doorbell may have started one of them
        self.fatal = False

    async def reset(self) -> None:
        """Enable, with room for I/O queues 1 to 8; the driver's own are
        DRIVER_QUEUES."""
        driver = self.driver
        await driver.enable(self.setup.admin_entries)
        assert (await driver.set_feature(Feature.NUMBER_OF_QUEUES, 7 | 7 << 16)).status == 0
        for qid in DRIVER_QUEUES:
            assert (await driver.create_cq(qid, self.setup.io_entries)).status == 0
            assert (await driver.create_sq(qid, self.setup.io_entries)).status == 0
        # CIDs of their own: a completion left from before shows as one
        # nothing asked for.
        self.resets += 1
        for queue in driver.queues.values():
            queue.next_cid = self.resets % 16 * 4096
        self.started()

    async def collect(self, qid: int) -> None:
        queue = self.driver.queues[qid]
        found = self.driver._collect(queue)
        for entry in found:
            self.completed(qid, entry)
        if found:
            await self.driver.write32(nvme.doorbell_offset(queue.cqid, True), queue.cq_head)

    def completed(self, cqid: int, entry: Completion) -> None:
        key = (entry.sq_id, entry.cid)
        self.seen[key] += 1
        sent = self.sent.get(key)
        if sent is None:
            if entry.sq_id in self.live or not self.excused:
                raise Bug(f"CQ {cqid}: a completion nothing asked for: {entry}")
            return
        if self.seen[key] > 1:
            raise Bug(f"a second completion for {sent}: {entry}")
        self.check(sent, entry)

    async def cfs(self) -> bool:
        if await self.driver.csts() & nvme.CSTS_CFS:
            if not self.excused:
                raise Bug("CSTS.CFS, yet no queue a random command made had a doorbell")
            self.fatal = True
        return self.fatal

    async def submit(self, action: Submit) -> None:
        qid = action.queue
        ram = self.driver.ram
        if qid == -1:  # only the memory: another queue's commands
            for address, data in action.lists:
                ram.write(address, data)
            for key in self.in_flight():
                self.sent[key].alone = False
            return
        if qid not in self.trusted:
            return
        in_flight = self.in_flight()
        if sum(key[0] == qid for key in in_flight) >= self.driver.queues[qid].size - 2:
            for key in in_flight:  # the queue would overflow
                await self.wait(key)
        if self.fatal or qid not in self.trusted:
            return
        for address, data in action.lists:  # once the commands waited for are done
            ram.write(address, data)
        for key in self.in_flight():
            self.sent[key].alone = False
        cmd = action.cmd
        cid = await self.driver.submit(qid, cmd)
        cmd = cmd._replace(cid=cid)
        aer = qid == 0 and cmd.opcode == AdminOpcode.ASYNC_EVENT_REQUEST
        pieces = where(qid, cmd, action.pieces)
        data = None
        if pieces and cmd.opcode == IoOpcode.WRITE:
            data = b"".join(ram.read(a, n) for a, n in pieces if a is not None)
        quiet = not self.in_flight()
        fragile = bool(cmd.psdt and action.lists)
        self.sent[(qid, cid)] = Sent(qid, cmd, aer, quiet, data, pieces, fragile, quiet)
        if action.wait and not aer:
            await self.wait((qid, cid))

    def in_flight(self) -> list[tuple[int, int]]:
        """Commands of trusted queues not completed yet (AERs aside)."""
        return [
            key
            for key, sent in self.sent.items()
            if not sent.aer and not self.seen[key] and sent.qid in self.trusted
        ]

    async def wait(self, key: tuple[int, int]) -> None:
        qid = key[0]
        with trio.move_on_after(COMMAND_TIMEOUT) as waited:
            polls = 0
            while not self.seen[key] and key in self.sent and qid in self.trusted:
                await self.collect(qid)
                if 0 in self.trusted and qid != 0:
                    await self.collect(0)  # AERs an event completed
                polls += 1
                if self.excused and polls % 64 == 0 and await self.cfs():
                    return
                if self.crashes.lines:
                    raise Bug("a bug was logged")
                await trio.sleep(0.0005)
        if waited.cancelled_caught and not await self.cfs():
            raise Bug(f"no completion for {self.sent[key]} in {COMMAND_TIMEOUT} s")

    def check(self, sent: Sent, entry: Completion) -> None:
        """A status the spec defines, with DNR on every error; the one the
        spec gives where it leaves no choice; the data a one-page transfer
        moved."""
        status, cmd = entry.status, sent.cmd
        sct, sc = status >> 8 & 7, status & 0xFF
        defined = sc in STATUSES.get(sct, ()) and not status & ~0x47FF  # no CRD, no M
        if status and not (defined and status & nvme.DNR):
            raise Bug(f"status {status:#x} for {cmd}")
        expected = None
        # Fused, reserved bits; PSDT 10b (not offered), 11b; SGLs for admin commands.
        if cmd.fuse or cmd.flags & 0x3C or cmd.psdt > nvme.PSDT_SGL or (cmd.psdt and not sent.qid):
            expected = nvme.status(Sct.GENERIC, Generic.INVALID_FIELD)
        elif cmd.opcode not in (HANDLED_ADMIN if sent.qid == 0 else HANDLED_IO):
            expected = nvme.status(Sct.GENERIC, Generic.INVALID_OPCODE)
        if expected is not None and status != expected:
            wanted = nvme.status_name(expected)
            raise Bug(f"{nvme.status_name(status)} for {cmd}, the spec says {wanted}")
        if sent.qid == 0:
            if cmd.opcode == AdminOpcode.CREATE_IO_SQ and not status:
                self.created.add(cmd.cdw10 & 0xFFFF)
            if cmd.opcode == AdminOpcode.DELETE_IO_SQ and not status:
                self.created.discard(cmd.cdw10 & 0xFFFF)
                self.deleted(cmd.cdw10 & 0xFFFF)
            if cmd.opcode == AdminOpcode.DOORBELL_BUFFER_CONFIG and not status:
                # Shadow doorbells in random memory: the I/O queues' tails
                # and heads are whatever it holds; any of them may start.
                self.trusted.intersection_update({0})
                self.excused = True
            return
        blocks = {1: BLOCKS[0], 2: BLOCKS[1]}.get(cmd.nsid, 0)
        ranged = cmd.opcode in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES)
        if ranged and blocks and cmd.slba + cmd.nlb > blocks and not status:
            raise Bug(f"{cmd} beyond the {blocks} blocks of namespace {cmd.nsid} succeeded")
        pieces = sent.pieces
        if status:
            well_formed = pieces and cmd.nsid == 1 and cmd.slba + cmd.nlb <= blocks
            well_formed = well_formed and cmd.nlb * LBA <= MAX_TRANSFER
            if cmd.opcode == IoOpcode.READ:  # not into read-only memory
                well_formed = well_formed and all(
                    a is None or within(a, n, [(ARENA, ARENA_END)]) for a, n in pieces or []
                )
            if sent.fragile:  # its SGL's segments as they were written
                well_formed = well_formed and sent.alone and not self.excused
            if well_formed:
                raise Bug(f"{nvme.status_name(status)} for a well-formed {cmd}")
            return
        writes = cmd.opcode in (IoOpcode.WRITE, IoOpcode.WRITE_ZEROES) or (
            cmd.opcode == IoOpcode.DATASET_MANAGEMENT and cmd.cdw11 & nvme.DSM_ATTR_DEALLOCATE
        )
        if writes and cmd.nsid == 2:
            raise Bug(f"a write to the write-protected namespace succeeded: {cmd}")
        if pieces and cmd.nsid == 1 and sent.alone and not self.in_flight() and not self.excused:
            with open(self.image, "rb") as f:
                f.seek(cmd.slba * LBA)
                on_disk = f.read(cmd.nlb * LBA)
            if cmd.opcode == IoOpcode.READ:  # what landed, bit buckets' shares aside
                landed = [(a, n) for a, n in pieces if a is not None]
                if overlapping(landed):
                    return
                moved = b"".join(self.driver.ram.read(a, n) for a, n in landed)
                starts = itertools.accumulate((n for _, n in pieces), initial=0)
                on_disk = b"".join(
                    on_disk[at : at + n]
                    for at, (a, n) in zip(starts, pieces, strict=False)
                    if a is not None
                )
            else:
                moved = sent.data or b""
            if moved != on_disk:
                raise Bug(f"the data of {cmd} is not the image's")

    def deleted(self, qid: int) -> None:
        """A random command deleted one of the driver's queues: no more I/O
        goes there, and completions on its id are a new queue's (commands
        it held that had not run owe none)."""
        if qid not in self.live:
            return
        self.live.discard(qid)
        self.trusted.discard(qid)
        for key in [k for k in self.sent if k[0] == qid]:
            del self.sent[key]
            self.seen.pop(key, None)

    async def doorbell(self, action: Doorbell) -> None:
        for key in self.in_flight():
            if key[0] == 0:  # the queues admin commands made are known first
                await self.wait(key)
        target = nvme.doorbell(action.offset) if action.width == 4 else None
        if target is not None:
            qid = target[0]
            if qid == 0:  # stale admin commands may run: anything goes
                self.trusted.clear()
                self.excused = True
            elif qid in self.live:  # stale commands may run, completions be lost
                self.trusted.discard(qid)
            elif qid in self.created:  # a queue anywhere in memory may start
                self.excused = True
        raw = action.value.to_bytes(8, "little")[: action.width]
        await self.driver.client.region_write(0, action.offset, raw, no_reply=True)

    async def settle(self) -> None:
        """Every command in flight completes; late or repeated completions
        show."""
        for key in self.in_flight():
            await self.wait(key)
        await trio.sleep(0.02)
        for qid in sorted(self.trusted):
            await self.collect(qid)

    def check_completed(self) -> None:
        aers = 0
        for key, sent in self.sent.items():
            if sent.qid not in self.trusted or self.fatal:
                continue
            if sent.aer:
                aers += not self.seen[key]
            elif self.seen[key] != 1:
                raise Bug(f"{self.seen[key]} completions for {sent}")
        if aers > 4:  # AERL + 1
            raise Bug(f"{aers} AERs held, more than the controller offers")


def where(
    qid: int, cmd: Command, pieces: list[tuple[int | None, int]] | None
) -> list[tuple[int | None, int]] | None:
    """Where a read or write with no other flags has its data, if all of
    it is in mapped memory: PRP1 when the data fits in its page, the
    command's Data Block descriptor, or the pieces of an SGL drawn without
    faults (an address None: a bit bucket's share); else None."""
    if qid == 0 or cmd.opcode not in (IoOpcode.READ, IoOpcode.WRITE):
        return None
    span = ((cmd.cdw12 & 0xFFFF) + 1) * LBA
    if cmd.flags == 0:
        pieces = [(cmd.prp1, span)] if cmd.prp1 % PAGE + span <= PAGE and not cmd.prp1 & 3 else None
    elif cmd.flags == nvme.PSDT_SGL << 6 and pieces is None:
        sgl1 = cmd.sgl1
        fits = sgl1.kind == SglType.DATA_BLOCK and not sgl1.subtype and sgl1.length >= span
        pieces = [(cmd.prp1, span)] if fits and not (sgl1.address | sgl1.length) & 3 else None
    elif cmd.flags != nvme.PSDT_SGL << 6:
        return None
    inside = all(a is None or within(a, n, MAPPED_DATA) for a, n in pieces or [])
    return pieces if pieces and inside else None


def within(address: int, size: int, areas: list[tuple[int, int]]) -> bool:
    return any(low <= address and address + size <= high for low, high in areas)


def overlapping(ranges: list[tuple[int, int]]) -> bool:
    ordered = sorted((a, a + n) for a, n in ranges if n)
    return any(end > start for (_, end), (start, _) in itertools.pairwise(ordered))


async def run_example(
    setup: Setup, actions: list[Submit | Doorbell | Reset], folder: str, crashes: _CrashRecorder
) -> None:
    noise = random.Random(setup.seed)  # what images and memory hold at first
    images = []
    for index, blocks in enumerate(BLOCKS):
        path = os.path.join(folder, f"ns{index + 1}.img")
        with open(path, "wb") as f:
            f.write(noise.randbytes(blocks * LBA))
        images.append(path)
    with open(images[1], "rb") as f:
        protected = hashlib.md5(f.read()).digest()
    opened = [
        (os.open(images[0], os.O_RDWR), False, images[0]),
        (os.open(images[1], os.O_RDONLY), True, images[1]),
    ]
    device = NvmeController(opened)
    ram = GuestRam(LAYOUT)
    ram.write(ARENA, noise.randbytes(ARENA_SIZE))
    ram.write(READ_ONLY, noise.randbytes(READ_ONLY_SIZE))
    try:
        async with vfio_served(device, ram=ram) as client:
            for region in ram.regions:
                flags = vfu.DmaFlag.READ
                if region.guest_address != READ_ONLY:
                    flags |= vfu.DmaFlag.WRITE
                fd = region.fd if setup.with_fd else None
                await client.dma_map(region.guest_address, region.size, fd=fd, flags=flags)
            driver = NvmeDriver(client, ram)
            await driver.setup_pci()
            run = Run(driver, setup, images[0], crashes)
            await run.reset()
            for action in actions:
                if isinstance(action, Submit):
                    await run.submit(action)
                elif isinstance(action, Doorbell):
                    await run.doorbell(action)
                else:
                    if action.settle:
                        await run.settle()
                        run.check_completed()
                    await run.reset()
                if run.fatal:
                    break
            await run.settle()
            run.check_completed()
            # Whatever state it got into, another controller takes it.
            twin = NvmeController([(os.dup(fd), ro, label) for fd, ro, label in opened])
            try:
                state.load(twin, state.save(device))
                assert twin.save_device_state() == device.save_device_state()
            finally:
                twin.close()
            # Still usable: a reset, then I/O whose data lands in the image.
            await run.reset()
            data = os.urandom(8192)
            assert (await driver.write(1, 1, 8, data)).status == 0
            done, back = await driver.read(2, 1, 8, len(data))
            assert done.status == 0 and back == data
            with open(images[0], "rb") as f:
                f.seek(8 * LBA)
                assert f.read(len(data)) == data
            assert await driver.csts() == nvme.CSTS_RDY
            driver.close()
    finally:
        device.close()
        ram.close()
    for path, blocks in zip(images, BLOCKS, strict=True):
        assert os.path.getsize(path) == blocks * LBA, "an image changed size"
    with open(images[1], "rb") as f:
        assert hashlib.md5(f.read()).digest() == protected, "the protected namespace changed"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(setup=SETUPS, actions=ACTIONS)
def test_random_submission_queue_entries(setup, actions):
    # The crash-mark fixture's recorder, per example (so that hypothesis
    # shrinks a crash); a crash is the finding even when a hang follows it.
    crashes = _CrashRecorder()
    logger = logging.getLogger("vfiouserd")
    logger.addHandler(crashes)
    try:
        with tempfile.TemporaryDirectory() as folder:

            async def main() -> None:
                with trio.fail_after(EXAMPLE_TIMEOUT):
                    await run_example(setup, actions, folder, crashes)

            trio.run(main)
    except BaseException as exc:
        if crashes.lines:
            raise Bug("a bug was logged:\n" + "\n".join(crashes.lines)) from exc
        raise
    finally:
        logger.removeHandler(crashes)
    assert not crashes.lines, "a bug was logged:\n" + "\n".join(crashes.lines)
