"""A paused vhost-user session as a handover record, and set up again from
one (vfiouserd.handover says how a restart hands a session over)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from vfiouserd import handover
from vfiouserd.handover import CONNECTION, FdNames
from vfiouserd.log import get_logger
from vfiouserd.memory import RegionSpec
from vfiouserd.vhost_user import records

if TYPE_CHECKING:
    from vfiouserd.vhost_user.backend import VhostUserBackend

log = get_logger("vhost_user")


def snapshot(backend: VhostUserBackend, names: FdNames) -> dict[str, Any]:
    """Everything the front end set up, for the next daemon. The rings
    stopped between two requests, so their bases are exact."""
    queue_set = backend.queue_set
    queues = []
    for queue in queue_set.queues:
        started = queue.started
        base = queue_set.stop(queue)
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
    if backend.device_state.transfer is not None:
        log.warning("handover.transfer_dropped", reason="a device-state transfer was open")
    dirty = backend.dirty_log
    dirty_log = None
    if dirty.log is not None and dirty.description is not None:
        size, offset = dirty.description
        dirty_log = records.DirtyLog(names.name(dirty.log.mapping.fd), size, offset)
    inflight_region = backend.inflight
    inflight = None
    if inflight_region.mapping is not None and inflight_region.description is not None:
        inflight = records.Inflight(
            names.name(inflight_region.mapping.fd), *inflight_region.description
        )
    channel = backend.backend_channel.socket
    record = records.Session(
        connection=names.name(backend.sock.fileno(), CONNECTION),
        acked_features=backend.features.acked,
        protocol_features=backend.features.protocol,
        status=backend.status,
        memory=[
            records.Region(
                region.guest_address,
                region.size,
                cast(int, region.user_address),  # every vhost-user region has one
                region.mmap_offset,
                names.name(region.spec.fd),
            )
            for region in backend.memory.regions
        ],
        queues=queues,
        inflight=inflight,
        dirty_log=dirty_log,
        log_kick=names.name(dirty.kick_fd),
        backend_channel=names.name(channel.fileno() if channel is not None else None),
    )
    return handover.record_to_document(record)


def take_over(backend: VhostUserBackend, document: dict[str, Any], fd: handover.FdByName) -> None:
    """Set up what ``document`` describes, on the fds ``fd`` gives by name."""
    record = handover.record_from_document(records.Session, document)
    features = backend.features
    features.protocol = record.protocol_features
    backend.status = record.status
    backend.memory.replace(
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
    acked = record.acked_features
    if acked & ~backend.offered_features:
        raise ValueError(f"features {acked:#x} this device does not offer")
    features.acked = acked
    queue_set = backend.queue_set
    queue_set.set_features(features.device_bits)
    if len(record.queues) != len(queue_set.queues):
        raise ValueError(f"{len(record.queues)} queues for {len(queue_set.queues)}")
    for queue, saved in zip(queue_set.queues, record.queues, strict=True):
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
            backend.restored_queues.append((queue, saved.broken))
    inflight = record.inflight
    if inflight is not None:
        inflight_fd = fd(inflight.fd)
        if inflight_fd is None:
            raise ValueError("an inflight region without its fd")
        backend.inflight.map(
            inflight_fd,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
    dirty = backend.dirty_log
    if record.dirty_log is not None:
        log_fd = fd(record.dirty_log.fd)
        if log_fd is None:
            raise ValueError("a dirty log without its fd")
        dirty.map(log_fd, record.dirty_log.size, record.dirty_log.offset)
    kick = fd(record.log_kick)
    if kick is not None:
        dirty.kick_fd = kick
    dirty.update()
    channel = fd(record.backend_channel)
    if channel is not None:
        backend.backend_channel.adopt(channel)
