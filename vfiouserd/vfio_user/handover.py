"""A paused vfio-user session as a handover record, and set up again from
one (vfiouserd.handover says how a restart hands a session over)."""

from __future__ import annotations

import base64
import dataclasses
import socket
from typing import TYPE_CHECKING, Any

import trio

from vfiouserd import handover
from vfiouserd.devices.pci import IrqKind
from vfiouserd.handover import CONNECTION, TWIN, FdNames
from vfiouserd.memory import RegionSpec
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.vfio_user import records
from vfiouserd.vfio_user.migration import DirtyBitmaps

if TYPE_CHECKING:
    from vfiouserd.vfio_user.session import VfioUserSession

# The client's VERSION capabilities a handover record carries as they are.
CLIENT_VALUES = [f.name for f in dataclasses.fields(records.Client) if f.name != "present"]


def snapshot(session: VfioUserSession, names: FdNames) -> dict[str, Any]:
    device = session.device
    channel = session.channel
    client = session.terms.client
    migration = session.migration
    dirty = session.migration_commands.dirty
    record = records.Session(
        connection=names.name(channel.sock.fileno(), CONNECTION),
        twin=names.name(channel.twin.fileno() if channel.twin is not None else None, TWIN),
        client=records.Client(
            **{name: getattr(client, name) for name in CLIENT_VALUES},
            present=sorted(client.present),
        ),
        page_size=session.terms.page_size,
        next_msg_id=channel.next_msg_id,
        qemu_dma_layout=session.dma.qemu_dma_layout,
        dma=[
            records.DmaRegion(
                address=region.guest_address,
                size=region.size,
                fd=names.name(region.spec.fd),
                file_offset=region.spec.file_offset,
                readable=region.readable,
                writable=region.writable,
            )
            for region in device.memory.regions
        ],
        irqs={
            kind.name: records.IrqIndex(
                [names.name(fd) for fd in lines.eventfds],
                list(lines.masked),
                list(lines.pending),
            )
            for kind, lines in session.irqs.lines.items()
            if lines.count
        },
        intx_unmask=names.name(session.irq_commands.intx_unmask_fd),
        device_fds={key: names.name(fd) for key, fd in device.handover_fds().items()},
        migration=records.Migration(
            state=migration.state.name,
            outgoing=base64.b64encode(migration.outgoing).decode(),
            incoming=base64.b64encode(migration.incoming).decode(),
        ),
        dma_logging=dirty.to_document() if dirty is not None else None,
    )
    return handover.record_to_document(record)


def take_over(session: VfioUserSession, document: dict[str, Any], fd: handover.FdByName) -> None:
    """Set up what ``document`` describes, on the fds ``fd`` gives by name."""
    record = handover.record_from_document(records.Session, document)
    session.restored = True
    channel = session.channel
    twin = fd(record.twin)
    if twin is not None:
        channel.twin = trio.socket.from_stdlib_socket(socket.socket(fileno=twin))
    client = record.client
    terms = session.terms
    terms.client = vfu.Capabilities(
        **{name: getattr(client, name) for name in CLIENT_VALUES},
        present=set(client.present),
    )
    terms.page_size = record.page_size
    channel.next_msg_id = record.next_msg_id
    session.dma.qemu_dma_layout = record.qemu_dma_layout
    device = session.device
    device.adopt_handover_fds({key: fd(name) for key, name in record.device_fds.items()})
    for region in record.dma:
        device.memory.add_region(
            RegionSpec(
                region.address,
                region.size,
                fd(region.fd),
                file_offset=region.file_offset,
                readable=region.readable,
                writable=region.writable,
            )
        )
    for kind_name, saved in record.irqs.items():
        if kind_name not in IrqKind.__members__:
            raise ValueError(f"no interrupt index {kind_name!r}")
        lines = session.irqs.lines[IrqKind[kind_name]]
        if not len(saved.eventfds) == len(saved.masked) == len(saved.pending) == lines.count:
            raise ValueError(f"{kind_name}: {len(saved.eventfds)} vectors")
        for vector, name in enumerate(saved.eventfds):
            lines.set_eventfd(vector, fd(name))
        lines.masked[:] = saved.masked
        lines.pending[:] = saved.pending
    session.irq_commands.intx_unmask_fd = fd(record.intx_unmask)
    saved_migration = record.migration
    if saved_migration.state not in vfu.MigrationState.__members__:
        raise ValueError(f"no migration state {saved_migration.state!r}")
    migration = session.migration
    migration.state = vfu.MigrationState[saved_migration.state]
    migration.outgoing = memoryview(base64.b64decode(saved_migration.outgoing))
    migration.incoming = bytearray(base64.b64decode(saved_migration.incoming))
    if migration.state not in (vfu.MigrationState.RUNNING, vfu.MigrationState.PRE_COPY):
        device.quiesce()  # it was stopped for a migration: it stays so
    if record.dma_logging is not None:
        dirty = DirtyBitmaps.from_document(record.dma_logging)
        session.migration_commands.dirty = dirty
        device.memory.dirty = dirty
