"""What a vfio-user session hands to the next daemon (see vfiouserd.handover).

Fds are named by their fd-store names; None where the client never gave
one. The JSON form is ``record_to_document``; a daemon reads one back with
``record_from_document``, which checks every field. The keys are those
earlier daemons wrote: a restart may be an upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Client:
    """What the client said in VERSION."""

    max_msg_fds: int
    max_data_xfer_size: int
    max_dma_maps: int
    pgsizes: int
    twin_socket: bool
    twin_socket_fd_index: int | None
    write_multiple: bool
    present: list[str]  # the capabilities it named


@dataclass(frozen=True)
class DmaRegion:
    address: int
    size: int
    fd: str | None  # None: reached through DMA_READ/DMA_WRITE
    file_offset: int
    readable: bool
    writable: bool


@dataclass(frozen=True)
class IrqIndex:
    eventfds: list[str | None]  # per vector
    masked: list[bool]
    pending: list[bool]


@dataclass(frozen=True)
class Migration:
    state: str  # a MigrationState name
    outgoing: str  # base64: the device state not read yet
    incoming: str  # base64: the device state written so far


@dataclass(frozen=True)
class Session:
    connection: str | None
    twin: str | None
    client: Client
    page_size: int
    next_msg_id: int
    qemu_dma_layout: bool | None  # None: not learnt yet
    dma: list[DmaRegion]
    irqs: dict[str, IrqIndex]  # by IrqKind name
    intx_unmask: str | None
    device_fds: dict[str, str | None]  # the PCI device's own (BAR memory, doorbells)
    migration: Migration
    dma_logging: dict[str, Any] | None  # DirtyBitmaps.to_document()
