"""Interrupt delivery over vfio-user, in VFIO's model (SET_IRQS).

The VMM installs an eventfd per vector of each interrupt index; a vector
that fires writes it. At most one of INTx, MSI and MSI-X is active, as with
VFIO. Masking of MSI/MSI-X vectors belongs to the VMM, which emulates the
guest-visible MSI-X table (QEMU's vfio-pci does); INTx is level-triggered
and automasked until the VMM unmasks it.

An MSI or MSI-X vector that fires without an eventfd while other vectors
of its index have one is pending, as a masked vector is under PCI: QEMU
installs a vector's eventfd only when the guest first unmasks it (it never
sends SET_IRQS MASK for MSI-X), so "no eventfd" is its "masked". The PBA
shows the bit; the eventfd's arrival delivers it. Disabling the index
(count 0) clears the bits. Not covered: QEMU enables MSI-X with no vector
assigned at all, and until the first one is, the index looks unused here
and an interrupt takes the INTx path (telling the two apart needs VFIO's
index-enabled state, which the handover record does not carry).

The PCI model (devices/pci.py) decides *when* a function interrupts; this
module decides *how* that reaches the VMM.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar
from weakref import WeakKeyDictionary

import trio

from vfiouserd import faults
from vfiouserd.devices.pci import IrqKind, PciDevice
from vfiouserd.eventfds import signal_eventfd
from vfiouserd.log import get_logger
from vfiouserd.trace import tracer

log = get_logger("interrupts")


@dataclass
class IrqLines:
    """One VFIO interrupt index: eventfds per vector, masks, pending bits."""

    count: int
    eventfds: list[int | None] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)
    # Called before an eventfd changes (PciDevice.interrupts_changing).
    changing: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self.eventfds = [None] * self.count
        self.masked = [False] * self.count
        self.pending = [False] * self.count

    @property
    def enabled(self) -> bool:
        return any(fd is not None for fd in self.eventfds)

    def set_eventfd(self, vector: int, fd: int | None) -> None:
        self.changing()
        old = self.eventfds[vector]
        if old is not None:
            os.close(old)
        self.eventfds[vector] = fd

    def close(self) -> None:
        for vector in range(self.count):
            self.set_eventfd(vector, None)
            self.masked[vector] = False
            self.pending[vector] = False


class Interrupts:
    """The interrupt indexes of one PCI function and the eventfds behind them."""

    _of_function: ClassVar[WeakKeyDictionary[PciDevice, Interrupts]] = WeakKeyDictionary()

    @classmethod
    def of(cls, function: PciDevice) -> Interrupts:
        """The function's delivery, made and installed at the first session:
        it outlives sessions as the device does (eventfds go at detach)."""
        interrupts = cls._of_function.get(function)
        if interrupts is None:
            interrupts = cls._of_function[function] = cls(function)
            function.irqs = interrupts
        return interrupts

    def __init__(self, function: PciDevice) -> None:
        self.function = function
        self.lines = {
            IrqKind.INTX: IrqLines(1 if function.interrupt_pin else 0),
            IrqKind.MSI: IrqLines(function.msi_vectors),
            IrqKind.MSIX: IrqLines(function.msix_vectors),
            IrqKind.ERR: IrqLines(0),
            IrqKind.REQ: IrqLines(0),
        }
        for lines in self.lines.values():
            lines.changing = function.interrupts_changing

    def active(self) -> IrqKind | None:
        for kind in (IrqKind.MSIX, IrqKind.MSI, IrqKind.INTX):
            if self.lines[kind].enabled:
                return kind
        return None

    def fire(self, kind: IrqKind, vector: int) -> bool:
        """Deliver ``vector`` of ``kind`` (or leave it pending); False if
        it cannot be, even later."""
        lines = self.lines[kind]
        if vector >= lines.count or (lines.eventfds[vector] is None and not self._holds(kind)):
            return False
        if faults.rules.has_rules:
            # A virtio function's queue interrupts met the rules at their queue.
            catch_all = not self.function.interrupts_ruled_by_queue
            held = faults.rules.interrupt(vector=vector, catch_all=catch_all)
            if held is not None:
                if held != math.inf:
                    trio.lowlevel.spawn_system_task(self._fire_later, held, kind, vector)
                return True
        return self._deliver(kind, vector)

    async def _fire_later(self, delay: float, kind: IrqKind, vector: int) -> None:
        await trio.sleep(delay)
        try:
            self._deliver(kind, vector)
        except Exception:  # a late interrupt must never end the daemon
            log.exception("fault.delayed_interrupt_failed", vector=vector)

    def _holds(self, kind: IrqKind) -> bool:
        """Whether a vector of ``kind`` without an eventfd waits for one:
        MSI and MSI-X vectors while their index is in use."""
        return kind is not IrqKind.INTX and self.lines[kind].enabled

    def _deliver(self, kind: IrqKind, vector: int) -> bool:
        lines = self.lines[kind]
        if vector >= lines.count:
            return False
        fd = lines.eventfds[vector]
        if fd is None and not self._holds(kind):
            return False
        if fd is None or lines.masked[vector]:
            lines.pending[vector] = True
            if tracer.wants("irq"):
                why = "masked" if fd is not None else "no-eventfd"
                tracer.emit("irq", "pending", type=kind.name, vector=vector, why=why)
            return True
        if tracer.wants("irq"):
            tracer.emit("irq", "raise", type=kind.name, vector=vector)
        signal_eventfd(fd)
        if kind is IrqKind.INTX:
            lines.masked[vector] = True  # automasked until the VMM unmasks
        return True

    def pending(self, kind: IrqKind, vector: int) -> bool:
        lines = self.lines[kind]
        return vector < lines.count and lines.pending[vector]

    def eventfd(self, kind: IrqKind, vector: int) -> int | None:
        """MSI and MSI-X only: INTx needs its line's level and automask."""
        lines = self.lines[kind]
        if kind is IrqKind.INTX or vector >= lines.count or lines.masked[vector]:
            return None
        return lines.eventfds[vector]

    def install(self, kind: IrqKind, vector: int, fd: int | None) -> None:
        """The VMM gives ``vector`` an eventfd (None: takes it away); one
        that fired without one is delivered now."""
        lines = self.lines[kind]
        lines.set_eventfd(vector, fd)
        waiting = kind is not IrqKind.INTX and lines.pending[vector] and not lines.masked[vector]
        if fd is not None and waiting:
            lines.pending[vector] = False
            self._deliver(kind, vector)

    def unmask(self, kind: IrqKind, vector: int) -> None:
        lines = self.lines[kind]
        lines.masked[vector] = False
        if kind is IrqKind.INTX:
            # A level interrupt still asserted fires again.
            lines.pending[vector] = False
            if self.function.intx_up:
                self.fire(kind, vector)
        elif lines.pending[vector]:
            lines.pending[vector] = False
            self._deliver(kind, vector)

    def mask(self, kind: IrqKind, vector: int) -> None:
        self.lines[kind].masked[vector] = True

    def close(self) -> None:
        for lines in self.lines.values():
            lines.close()
