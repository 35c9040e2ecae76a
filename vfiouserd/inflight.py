"""Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), so a restarted back end
resubmits what a killed one had taken from a ring and not completed, in the
order it was taken, and never completes anything twice.

The front end keeps the region across back-end restarts and hands it to each
new back end (SET_INFLIGHT_FD). Its layout is the spec's (see
``protocol.vhost_user_inflight``); the steps below follow the spec's order,
so that a crash between any two of them leaves a state the recovery
understands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vfiouserd._native import lib
from vfiouserd.protocol.vhost_user_inflight import (
    INFLIGHT_PACKED_DESC,
    INFLIGHT_PACKED_QUEUE,
    INFLIGHT_SPLIT_DESC,
    INFLIGHT_SPLIT_QUEUE,
    INFLIGHT_VERSION,
)

NO_ENTRY = 0xFFFF


class InflightError(Exception):
    """The region is inconsistent beyond what recovery can repair."""


class SplitInflight:
    """One split queue's region: a state per head descriptor."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.counter = 0

    # header fields
    def _header(self) -> tuple[int, int, int, int, int]:
        return INFLIGHT_SPLIT_QUEUE.unpack_from(self.view, 0)

    def _set_header(
        self, *, version: int, desc_num: int, last_batch_head: int, used_idx: int
    ) -> None:
        INFLIGHT_SPLIT_QUEUE.pack_into(
            self.view, 0, 0, version, desc_num, last_batch_head, used_idx
        )

    def _desc(self, index: int) -> tuple[int, int, int]:
        offset = INFLIGHT_SPLIT_QUEUE.size + index * INFLIGHT_SPLIT_DESC.size
        return INFLIGHT_SPLIT_DESC.unpack_from(self.view, offset)

    def _set_desc(self, index: int, inflight: int, next_index: int, counter: int) -> None:
        offset = INFLIGHT_SPLIT_QUEUE.size + index * INFLIGHT_SPLIT_DESC.size
        INFLIGHT_SPLIT_DESC.pack_into(self.view, offset, inflight, next_index, counter)

    # the ring's steps
    def fetched(self, head: int) -> None:
        """A head descriptor was taken from the available ring (or taken
        again after a restart): its order first, then the inflight mark."""
        inflight, next_index, _ = self._desc(head)
        self._set_desc(head, inflight, next_index, self.counter)
        self.counter += 1
        lib.vfu_fence_release()
        self._set_desc(head, 1, next_index, self.counter - 1)

    def completing(self, head: int) -> None:
        """Before the used index that publishes ``head`` moves: the last batch."""
        _, version, desc_num, last_batch_head, used_idx = self._header()
        inflight, _, counter = self._desc(head)
        self._set_desc(head, inflight, last_batch_head, counter)
        self._set_header(
            version=version, desc_num=desc_num, last_batch_head=head, used_idx=used_idx
        )
        lib.vfu_fence_release()

    def completed(self, head: int, used_idx: int) -> None:
        """After the used index moved to ``used_idx``."""
        lib.vfu_fence_release()
        _, next_index, counter = self._desc(head)
        self._set_desc(head, 0, next_index, counter)
        lib.vfu_fence_release()
        _, version, desc_num, last_batch_head, _ = self._header()
        self._set_header(
            version=version, desc_num=desc_num, last_batch_head=last_batch_head, used_idx=used_idx
        )

    def recover(self, ring_used_idx: int) -> list[int]:
        """At ring start: repair the last batch, and return the heads to
        resubmit, oldest first. A fresh region only starts tracking."""
        _, version, desc_num, last_batch_head, used_idx = self._header()
        if version == 0:
            self._set_header(
                version=INFLIGHT_VERSION,
                desc_num=self.queue_size,
                last_batch_head=NO_ENTRY,
                used_idx=ring_used_idx,
            )
            return []
        if desc_num != self.queue_size:
            raise InflightError(
                f"region tracks {desc_num} descriptors, the queue has {self.queue_size}"
            )
        if used_idx != ring_used_idx:
            # The used index reached the driver before the batch was cleared.
            batch = (ring_used_idx - used_idx) & 0xFFFF
            head = last_batch_head
            for _ in range(batch):
                if head >= self.queue_size:
                    raise InflightError(f"last batch list reaches descriptor {head}")
                _, next_index, counter = self._desc(head)
                self._set_desc(head, 0, next_index, counter)
                head = next_index
            self._set_header(
                version=version,
                desc_num=desc_num,
                last_batch_head=last_batch_head,
                used_idx=ring_used_idx,
            )
        pending = [
            (counter, head)
            for head in range(self.queue_size)
            for inflight, _, counter in [self._desc(head)]
            if inflight
        ]
        pending.sort()
        self.counter = pending[-1][0] + 1 if pending else 0
        return [head for _, head in pending]


@dataclass
class StoredDescriptor:
    address: int
    length: int
    buffer_id: int
    flags: int


@dataclass
class PackedResubmit:
    entry: int
    descriptors: list[StoredDescriptor]


class PackedInflight:
    """One packed queue's region: descriptor copies on a free list, and the
    used position before and after the update in progress."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.counter = 0

    @staticmethod
    def initialize(view: memoryview, queue_size: int) -> None:
        """A new region (GET_INFLIGHT_FD): every entry free, wrap counters 1."""
        INFLIGHT_PACKED_QUEUE.pack_into(view, 0, 0, 0, queue_size, 0, 0, 0, 0, 1, 1)
        for index in range(queue_size):
            offset = INFLIGHT_PACKED_QUEUE.size + index * INFLIGHT_PACKED_DESC.size
            INFLIGHT_PACKED_DESC.pack_into(view, offset, 0, index + 1, 0, 0, 0, 0, 0, 0, 0)

    def _header(self) -> list[int]:
        return list(INFLIGHT_PACKED_QUEUE.unpack_from(self.view, 0))

    def _set_header(self, fields: list[int]) -> None:
        INFLIGHT_PACKED_QUEUE.pack_into(self.view, 0, *fields)

    def _desc(self, index: int) -> list[int]:
        if index >= self.queue_size:
            raise InflightError(f"inflight entry {index} is outside a queue of {self.queue_size}")
        offset = INFLIGHT_PACKED_QUEUE.size + index * INFLIGHT_PACKED_DESC.size
        return list(INFLIGHT_PACKED_DESC.unpack_from(self.view, offset))

    def _set_desc(self, index: int, fields: list[int]) -> None:
        if index >= self.queue_size:
            raise InflightError(f"inflight entry {index} is outside a queue of {self.queue_size}")
        offset = INFLIGHT_PACKED_QUEUE.size + index * INFLIGHT_PACKED_DESC.size
        INFLIGHT_PACKED_DESC.pack_into(self.view, offset, *fields)

    # header indexes
    FREE, OLD_FREE, USED, OLD_USED, WRAP, OLD_WRAP = 3, 4, 5, 6, 7, 8
    # descriptor indexes
    INFLIGHT, NEXT, LAST, NUM, COUNTER, ID, FLAGS, LEN, ADDR = range(9)

    def fetched(self, chain: list[StoredDescriptor]) -> int:
        """A whole chain was taken from the ring; returns its entry."""
        header = self._header()
        entry = header[self.OLD_FREE]
        head = self._desc(entry)
        head[self.NUM], head[self.COUNTER] = 0, self.counter
        self.counter += 1
        self._set_desc(entry, head)
        lib.vfu_fence_release()
        head[self.INFLIGHT] = 1
        self._set_desc(entry, head)
        free = header[self.FREE]
        for position, descriptor in enumerate(chain):
            if position == len(chain) - 1:
                head = self._desc(entry)
                head[self.LAST] = free
                self._set_desc(entry, head)
            head = self._desc(entry)
            head[self.NUM] += 1
            self._set_desc(entry, head)
            slot = self._desc(free)
            slot[self.ID], slot[self.FLAGS] = descriptor.buffer_id, descriptor.flags
            slot[self.LEN], slot[self.ADDR] = descriptor.length, descriptor.address
            self._set_desc(free, slot)
            free = slot[self.NEXT]
            header[self.FREE] = free
            self._set_header(header)
        lib.vfu_fence_release()
        header[self.OLD_FREE] = free
        self._set_header(header)
        return entry

    def completing(self, entry: int, used_idx: int, used_wrap: bool) -> None:
        """Before the descriptor flags publish ``entry``'s completion; the
        used position after it is ``used_idx``/``used_wrap``."""
        header = self._header()
        head = self._desc(entry)
        last = self._desc(head[self.LAST])
        last[self.NEXT] = header[self.FREE]
        self._set_desc(head[self.LAST], last)
        header[self.FREE] = entry
        header[self.USED], header[self.WRAP] = used_idx, int(used_wrap)
        self._set_header(header)
        lib.vfu_fence_release()

    def completed(self, entry: int) -> None:
        """After the flags were written: the update is committed."""
        lib.vfu_fence_release()
        head = self._desc(entry)
        head[self.INFLIGHT] = 0
        self._set_desc(entry, head)
        lib.vfu_fence_release()
        header = self._header()
        header[self.OLD_FREE] = header[self.FREE]
        header[self.OLD_USED] = header[self.USED]
        header[self.OLD_WRAP] = header[self.WRAP]
        self._set_header(header)

    def resubmitted(self, entry: int) -> None:
        """A chain taken again after a restart: it keeps its entry, and its
        place in the order of what is in flight now."""
        head = self._desc(entry)
        head[self.COUNTER] = self.counter
        self.counter += 1
        self._set_desc(entry, head)

    def recover(
        self,
        ring_used_idx: int,
        ring_used_wrap: bool,
        slot_published: Callable[[int, bool], bool],
    ) -> tuple[int, bool, list[PackedResubmit]]:
        """At ring start: commit or roll back the update in progress, and
        return the used position and the chains to resubmit, oldest first.
        ``slot_published(index, wrap)`` says whether the device had already
        marked the ring slot ``index`` used for wrap counter ``wrap``."""
        header = self._header()
        if header[1] == 0:  # a fresh region: start from the ring's position
            header[1], header[2] = INFLIGHT_VERSION, self.queue_size
            header[self.USED] = header[self.OLD_USED] = ring_used_idx
            header[self.WRAP] = header[self.OLD_WRAP] = int(ring_used_wrap)
            self._set_header(header)
            return ring_used_idx, ring_used_wrap, []
        if header[2] != self.queue_size:
            raise InflightError(
                f"region tracks {header[2]} descriptors, the queue has {self.queue_size}"
            )
        for field, limit in (
            (self.USED, 1),
            (self.OLD_USED, 1),
            (self.FREE, 0),
            (self.OLD_FREE, 0),
        ):
            if header[field] > self.queue_size - limit:  # a free list may end at the size
                raise InflightError(
                    f"inflight header field {field} is {header[field]}, the queue has"
                    f" {self.queue_size} descriptors"
                )
        if header[self.USED] != header[self.OLD_USED] and slot_published(
            header[self.OLD_USED], bool(header[self.OLD_WRAP])
        ):
            header[self.OLD_FREE] = header[self.FREE]
            header[self.OLD_USED] = header[self.USED]
            header[self.OLD_WRAP] = header[self.WRAP]
        header[self.FREE] = header[self.OLD_FREE]
        header[self.USED] = header[self.OLD_USED]
        header[self.WRAP] = header[self.OLD_WRAP]
        self._set_header(header)
        # Whatever is on the free list is not in flight.
        free, seen = header[self.FREE], 0
        while free < self.queue_size and seen < self.queue_size:
            entry = self._desc(free)
            entry[self.INFLIGHT] = 0
            self._set_desc(free, entry)
            free, seen = entry[self.NEXT], seen + 1
        pending = []
        for index in range(self.queue_size):
            entry = self._desc(index)
            if not entry[self.INFLIGHT]:
                continue
            if not 1 <= entry[self.NUM] <= self.queue_size:
                raise InflightError(f"inflight entry {index} claims {entry[self.NUM]} descriptors")
            chain, slot = [], index
            for _ in range(entry[self.NUM]):
                stored = self._desc(slot)
                chain.append(
                    StoredDescriptor(
                        stored[self.ADDR], stored[self.LEN], stored[self.ID], stored[self.FLAGS]
                    )
                )
                slot = stored[self.NEXT]
            pending.append((entry[self.COUNTER], PackedResubmit(index, chain)))
        pending.sort(key=lambda item: item[0])
        self.counter = pending[-1][0] + 1 if pending else 0
        return header[self.USED], bool(header[self.WRAP]), [p for _, p in pending]
