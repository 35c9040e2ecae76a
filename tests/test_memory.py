"""GuestMemory: the one bounds-checked way to touch shared memory."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import open_fds
from vfiouserd.memory import GuestMemory, GuestMemoryError, RegionSpec

KiB = 1 << 10


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def memory():
    mem = GuestMemory(max_regions=4)
    # Two regions adjacent in guest-physical space, one further up; the
    # second is mapped with an mmap offset as QEMU does for split RAM blocks.
    mem.add_region(
        RegionSpec(
            0x0, 64 * KiB, memfd(64 * KiB, b"A" * 64 * KiB), user_address=0x7000_0000, mmap_offset=0
        )
    )
    mem.add_region(
        RegionSpec(
            0x10000,
            64 * KiB,
            memfd(68 * KiB, b"x" * 4096 + b"B" * 64 * KiB),
            user_address=0x9000_0000,
            mmap_offset=4096,
        )
    )
    mem.add_region(
        RegionSpec(0x100000, 4 * KiB, memfd(4 * KiB), user_address=0x8000_0000, mmap_offset=0)
    )
    yield mem
    mem.clear()


def test_translation_and_mmap_offset(memory):
    assert memory.read(0xFFFE, 4) == b"AABB"  # spans two adjacent regions
    assert memory.user_to_guest(0x9000_0010, 16) == 0x10010
    memory.write(0x100000, b"hello")
    assert bytes(memory.guest_view(0x100000, 5)) == b"hello"


def test_device_readable_views_are_read_only(memory):
    (view,) = memory.guest_buffers(0x100, 16, writable=False)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1


@pytest.mark.parametrize(
    "address,length",
    [
        (0x20000, 1),
        (0x1FFFF, 2),
        (0x100FFF, 2),
        (2**64 - 1, 2),
        (0x200000, 0x10),
    ],
)
def test_ranges_outside_memory_are_refused(memory, address, length):
    with pytest.raises(GuestMemoryError):
        memory.guest_buffers(address, length, writable=True)


def test_one_region_views_and_user_ranges_do_not_span(memory):
    with pytest.raises(GuestMemoryError):
        memory.guest_view(0xFFF0, 0x20)
    with pytest.raises(GuestMemoryError):
        memory.user_to_guest(0x7000_FFF0, 0x20)
    with pytest.raises(GuestMemoryError):
        memory.user_to_guest(0x1234, 1)


def test_region_checks(memory):
    before = open_fds()
    small = memfd(4 * KiB)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        memory.add_region(
            RegionSpec(0x100800, 4 * KiB, small, user_address=0x1_0000_0000, mmap_offset=0)
        )
    with pytest.raises(GuestMemoryError, match="overlaps"):
        memory.add_region(
            RegionSpec(0x800000, 4 * KiB, small, user_address=0x8000_0800, mmap_offset=0)
        )
    with pytest.raises(GuestMemoryError, match="holds"):
        memory.add_region(
            RegionSpec(0x800000, 8 * KiB, small, user_address=0x1_0000_0000, mmap_offset=0)
        )
    with pytest.raises(GuestMemoryError, match="size 0"):
        memory.add_region(RegionSpec(0x800000, 0, small, user_address=0x1_0000_0000, mmap_offset=0))
    memory.add_region(
        RegionSpec(0x800000, 4 * KiB, small, user_address=0x1_0000_0000, mmap_offset=0)
    )
    extra = memfd(4 * KiB)
    with pytest.raises(GuestMemoryError, match="slots"):
        memory.add_region(
            RegionSpec(0x900000, 4 * KiB, extra, user_address=0x2_0000_0000, mmap_offset=0)
        )
    os.close(extra)  # refused regions leave the fd with the caller
    memory.remove(memory.find_exact(0x800000, 4 * KiB, 0x1_0000_0000))
    assert open_fds() == before  # the removed region closed its fd


def test_replace_is_all_or_nothing(memory):
    generation = memory.generation
    good, bad = memfd(4 * KiB), memfd(4 * KiB)
    with pytest.raises(GuestMemoryError):
        memory.replace(
            [
                RegionSpec(0, 4 * KiB, good, user_address=0),
                RegionSpec(0x1000, 8 * KiB, bad, user_address=0x1000),
            ]
        )
    assert memory.generation == generation
    assert memory.read(0, 2) == b"AA"  # the old layout is intact
    memory.replace([RegionSpec(0x5000, 4 * KiB, good, user_address=0)])
    assert memory.generation > generation
    assert len(memory.regions) == 1
    os.close(bad)


@given(address=st.integers(0, 0x200000), length=st.integers(0, 0x30000))
def test_any_range_is_served_whole_or_refused(address, length):
    mem = GuestMemory()
    mem.add_region(RegionSpec(0x0, 64 * KiB, memfd(64 * KiB), user_address=0, mmap_offset=0))
    mem.add_region(
        RegionSpec(0x10000, 64 * KiB, memfd(64 * KiB), user_address=1 << 32, mmap_offset=0)
    )
    mem.add_region(
        RegionSpec(0x100000, 4 * KiB, memfd(4 * KiB), user_address=2 << 32, mmap_offset=0)
    )
    try:
        views = mem.guest_buffers(address, length, writable=True)
    except GuestMemoryError:
        inside = (address + length <= 0x20000) or (
            address >= 0x100000 and address + length <= 0x101000
        )
        assert not inside or length < 0
    else:
        assert sum(len(v) for v in views) == length
        # An empty range touches nothing, so it is fine anywhere.
        assert (
            length == 0
            or address + length <= 0x20000
            or (0x100000 <= address <= address + length <= 0x101000)
        )
    finally:
        mem.clear()


def test_mapping_at_a_file_offset_and_permissions():
    mem = GuestMemory()
    fd = memfd(64 * KiB, b"0" * 16 * KiB + b"R" * 16 * KiB + b"W" * 32 * KiB)
    mem.add_region(
        RegionSpec(0x1000_0000, 16 * KiB, os.dup(fd), file_offset=16 * KiB, writable=False)
    )
    mem.add_region(
        RegionSpec(0x2000_0000, 16 * KiB, os.dup(fd), file_offset=32 * KiB, readable=False)
    )
    try:
        assert mem.read(0x1000_0000, 3) == b"RRR"
        with pytest.raises(GuestMemoryError, match="not writable"):
            mem.guest_buffers(0x1000_0000, 16, writable=True)
        with pytest.raises(GuestMemoryError, match="not readable"):
            mem.guest_buffers(0x2000_0000, 16, writable=False)
        (view,) = mem.guest_buffers(0x2000_0000, 4, writable=True)
        view[:] = b"done"
        assert os.pread(fd, 4, 32 * KiB) == b"done"
        with pytest.raises(GuestMemoryError):  # rings need read and write
            mem.guest_view(0x1000_0000, 16)
        # An offset inside a page: mapped from the page start, sliced after it.
        mem.add_region(RegionSpec(0x3000_0000, 100, os.dup(fd), file_offset=16 * KiB + 3))
        assert mem.read(0x3000_0000, 2) == b"RR" and len(mem.guest_view(0x3000_0000, 100)) == 100
    finally:
        mem.clear()
        os.close(fd)


def test_regions_without_fd_are_tracked_but_not_mapped():
    mem = GuestMemory()
    mem.add_region(RegionSpec(0x4000, 8 * KiB, None))
    with pytest.raises(GuestMemoryError, match="not mapped"):
        mem.guest_buffers(0x4000, 16, writable=False)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(RegionSpec(0x5000, 4 * KiB, None))
    mem.remove(mem.find_exact(0x4000, 8 * KiB))
    assert not mem.regions
