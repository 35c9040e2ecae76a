"""GET_IRQ_INFO and SET_IRQS: the client installs, fires, masks and
unmasks the vectors of interrupts.py, and may hand us a fd it signals when
the guest ends an INTx (watched here)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

import trio

from vfiouserd.devices.pci import IrqKind
from vfiouserd.eventfds import is_eventfd_like
from vfiouserd.log import get_logger
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import Message
from vfiouserd.vfio_user.interrupts import Interrupts
from vfiouserd.vfio_user.messages import Reply, RequestError, parse
from vfiouserd.vfio_user.negotiation import Terms

log = get_logger("vfio_user")


class IrqCommands:
    def __init__(self, irqs: Interrupts, terms: Terms, parked: Callable[[], bool]) -> None:
        self.irqs = irqs
        self.terms = terms
        self._parked = parked  # the session's: parked for a handover, which keeps the fds
        self.intx_unmask_fd: int | None = None
        self._intx_unmask_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Watch in ``nursery`` (the session's), an unmask fd handed over too."""
        self._nursery = nursery
        if self.intx_unmask_fd is not None:
            self._watch_intx_unmask(self.intx_unmask_fd)

    def close(self) -> None:
        if self.intx_unmask_fd is not None and (self._parked() or self._intx_unmask_scope is None):
            os.close(self.intx_unmask_fd)  # its watcher left it open
        self.intx_unmask_fd = None

    async def get_info(self, message: Message) -> Reply:
        request = parse(message, vfu.IrqInfo, "GET_IRQ_INFO")
        self.terms.check_argsz(request.argsz, vfu.IrqInfo.sizeof(), "GET_IRQ_INFO")
        if request.index >= vfu.PCI_NUM_IRQS:
            raise RequestError(errno.EINVAL, f"IRQ index {request.index} does not exist")
        kind = IrqKind(request.index)
        flags = vfu.IrqInfoFlag.EVENTFD  # MSI/MSI-X vectors can be set one by one
        if kind is IrqKind.INTX:
            flags |= vfu.IrqInfoFlag.MASKABLE | vfu.IrqInfoFlag.AUTOMASKED
        return Reply(
            vfu.IrqInfo.build(
                {
                    "argsz": vfu.IrqInfo.sizeof(),
                    "flags": flags,
                    "index": request.index,
                    "count": self.irqs.lines[kind].count,
                }
            )
        )

    async def set_irqs(self, message: Message) -> Reply:
        head = parse(message, vfu.IrqSetHead, "SET_IRQS")
        data = message.payload[vfu.IrqSetHead.sizeof() :]
        # argsz covers the request: header and bool data (clients differ on
        # whether eventfds count, as the kernel's int array does).
        size = vfu.IrqSetHead.sizeof() + len(data)
        if not size <= head.argsz <= size + 4 * head.count:
            raise RequestError(
                errno.EINVAL, f"SET_IRQS argsz {head.argsz} for a {size}-byte request"
            )
        kind_flags = head.flags & vfu.IRQ_SET_DATA_MASK
        action = head.flags & vfu.IRQ_SET_ACTION_MASK
        if (
            head.flags & ~(vfu.IRQ_SET_DATA_MASK | vfu.IRQ_SET_ACTION_MASK)
            or kind_flags.bit_count() != 1
            or action.bit_count() != 1
        ):
            raise RequestError(errno.EINVAL, f"SET_IRQS flags {head.flags:#x}")
        if head.index >= vfu.PCI_NUM_IRQS:
            raise RequestError(errno.EINVAL, f"IRQ index {head.index} does not exist")
        if message.fds and kind_flags != vfu.IrqSetFlag.DATA_EVENTFD:
            raise RequestError(errno.EINVAL, "fds without DATA_EVENTFD")
        kind = IrqKind(head.index)
        irqs = self.irqs
        lines = irqs.lines[kind]
        if lines.count == 0:
            raise RequestError(errno.EINVAL, f"device has no {kind.name} interrupts")
        if head.count == 0:
            if not (
                kind_flags == vfu.IrqSetFlag.DATA_NONE
                and action == vfu.IrqSetFlag.ACTION_TRIGGER
                and head.start == 0
            ):
                raise RequestError(errno.EINVAL, "count 0 is only 'disable all'")
            lines.close()
            log.debug("irq.disable", kind=kind.name)
            return Reply()
        if head.start >= lines.count or head.start + head.count > lines.count:
            raise RequestError(
                errno.EINVAL, f"vectors {head.start}+{head.count} beyond {lines.count}"
            )
        vectors = range(head.start, head.start + head.count)
        if kind_flags == vfu.IrqSetFlag.DATA_BOOL:
            if len(data) != head.count or head.argsz < vfu.IrqSetHead.sizeof() + head.count:
                raise RequestError(errno.EINVAL, f"{len(data)} bool bytes for {head.count}")
            selected = [v for v, flag in zip(vectors, data, strict=True) if flag]
        elif data:
            raise RequestError(errno.EINVAL, "data with DATA_NONE or DATA_EVENTFD")
        else:
            selected = list(vectors)
        if kind_flags == vfu.IrqSetFlag.DATA_EVENTFD and action == vfu.IrqSetFlag.ACTION_UNMASK:
            if kind is not IrqKind.INTX or len(message.fds) > 1:
                raise RequestError(errno.EINVAL, "an unmask eventfd is for INTx only")
            if message.fds and not is_eventfd_like(message.fds[0]):
                raise RequestError(errno.EINVAL, "the unmask fd is not an eventfd")
            self._watch_intx_unmask(message.fds.pop() if message.fds else None)
            return Reply()
        if kind_flags == vfu.IrqSetFlag.DATA_EVENTFD:
            if action != vfu.IrqSetFlag.ACTION_TRIGGER:
                raise RequestError(errno.EINVAL, "eventfds are only for TRIGGER and UNMASK")
            if message.fds and len(message.fds) != head.count:
                raise RequestError(errno.EINVAL, f"{len(message.fds)} fds for {head.count} vectors")
            if not all(is_eventfd_like(fd) for fd in message.fds):
                raise RequestError(errno.EINVAL, "an IRQ fd is not an eventfd")
            for fd in message.fds:
                os.set_blocking(fd, False)
            if message.fds:
                others = [
                    other
                    for other, other_lines in irqs.lines.items()
                    if other is not kind and other_lines.enabled
                ]
                if others:
                    raise RequestError(errno.EINVAL, f"{others[0].name} interrupts are in use")
            installed: list[int | None] = [*message.fds] if message.fds else [None] * head.count
            for vector, eventfd in zip(vectors, installed, strict=True):
                irqs.install(kind, vector, eventfd)
            message.fds.clear()
            log.debug(
                "irq.eventfds",
                kind=kind.name,
                start=head.start,
                count=head.count,
                assigned=any(fd is not None for fd in lines.eventfds),
            )
            return Reply()
        if action == vfu.IrqSetFlag.ACTION_TRIGGER:
            for vector in selected:
                # As VFIO's: a vector with no eventfd is not fired, nor left
                # pending (the VMM's loopback, not the device's interrupt).
                if lines.eventfds[vector] is not None:
                    irqs.fire(kind, vector)  # INTx too: one shot, then automasked
            return Reply()
        if kind is not IrqKind.INTX:
            raise RequestError(errno.EINVAL, f"{kind.name} vectors are masked by the client")
        for vector in selected:
            if action == vfu.IrqSetFlag.ACTION_MASK:
                irqs.mask(kind, vector)
            else:
                irqs.unmask(kind, vector)
        return Reply()

    def _watch_intx_unmask(self, fd: int | None) -> None:
        """The VMM signals ``fd`` when the guest ends the interrupt (KVM's
        resampling irqfd): unmask INTx then. ``None`` stops watching."""
        if self._intx_unmask_scope is not None:
            self._intx_unmask_scope.cancel()
            self._intx_unmask_scope = None
        self.intx_unmask_fd = fd
        if fd is None:
            return
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._intx_unmask_scope = scope

        async def watch() -> None:
            try:
                with scope:
                    while True:
                        await trio.lowlevel.wait_readable(fd)
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(fd)
                        self.irqs.unmask(IrqKind.INTX, 0)
            except OSError as exc:
                log.warning("intx.unmask_fd_failed", error=str(exc))
            finally:
                if not self._parked():  # a parked session hands it over
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)
                    if self.intx_unmask_fd == fd:
                        self.intx_unmask_fd = None

        os.set_blocking(fd, False)
        self._nursery.start_soon(watch)
