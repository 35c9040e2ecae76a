"""What a vhost-user session hands to the next daemon (see vfiouserd.handover).

Fds are named by their fd-store names; None where the front end never gave
one. The JSON form is ``record_to_document``; a daemon reads one back with
``record_from_document``, which checks every field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Region:
    guest_address: int
    size: int
    user_address: int
    mmap_offset: int
    fd: str | None


@dataclass(frozen=True)
class Queue:
    size: int
    desc: int
    avail: int
    used: int
    log: int
    flags: int
    addresses_set: bool
    base: int  # GET_VRING_BASE's answer when the session paused
    enabled: bool
    started: bool
    broken: bool
    kick: str | None
    call: str | None
    err: str | None


@dataclass(frozen=True)
class Inflight:
    fd: str | None
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class DirtyLog:
    fd: str | None
    size: int
    offset: int


@dataclass(frozen=True)
class Session:
    connection: str | None
    acked_features: int
    protocol_features: int
    status: int
    memory: list[Region]
    queues: list[Queue]
    inflight: Inflight | None
    dirty_log: DirtyLog | None
    log_kick: str | None
    backend_channel: str | None
