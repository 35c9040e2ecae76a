"""vhost-user's inflight region (GET/SET_INFLIGHT_FD): shared memory, not a
message, so it has no construct definitions. Apart from ``vhost_user`` so
that the rings (which keep it up to date) do not import the vhost-user wire
format: a vfio-user daemon's rings never see an inflight region.
"""

from __future__ import annotations

import struct

# One region per queue, each aligned to 64 bytes, laid out as the spec's C
# structs with natural alignment (the packed queue header's 29 bytes of
# fields are padded to 32, where its descriptor array starts).
INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1
# features, version, desc_num, last_batch_head, used_idx
INFLIGHT_SPLIT_QUEUE = struct.Struct("<QHHHH")
# inflight, padding[5], next, counter
INFLIGHT_SPLIT_DESC = struct.Struct("<B5xHQ")
# features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx,
# used_wrap_counter, old_used_wrap_counter, padding (to the natural 32)
INFLIGHT_PACKED_QUEUE = struct.Struct("<QHHHHHHBB10x")
# inflight, padding, next, last, num, counter, id, flags, len, addr
INFLIGHT_PACKED_DESC = struct.Struct("<BxHHHQHHIQ")


def inflight_region_size(queue_size: int, packed: bool) -> int:
    """Bytes one queue's inflight region takes, alignment included."""
    if packed:
        raw = INFLIGHT_PACKED_QUEUE.size + queue_size * INFLIGHT_PACKED_DESC.size
    else:
        raw = INFLIGHT_SPLIT_QUEUE.size + queue_size * INFLIGHT_SPLIT_DESC.size
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT
