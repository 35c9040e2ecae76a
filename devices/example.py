"""An example PCI device: the whole PCI plugin API in about 50 lines.

BAR0 holds 32-bit registers:
  0x00 ID         read-only 0x56460001
  0x04 LIVENESS   reads back the bitwise inverse of what was written
  0x08 FACTORIAL  write n, read n! modulo 2**32
  0x10 DMA_SRC    guest address to copy from (low, then high half at 0x14)
  0x18 DMA_DST    guest address to copy to (0x18, 0x1C)
  0x20 DMA_LEN    bytes to copy, at most 1 MiB
  0x24 DMA_START  write 1: copy, latch the CRC-32, raise the interrupt
  0x28 DMA_CRC    CRC-32 of the last copy; 0xFFFFFFFF if the copy failed
  0x2C IRQ_ACK    any write lowers the interrupt (it matters for INTx)
"""

from __future__ import annotations

import math
import zlib

from vfiouserd.devices.pci import Bar, PciDevice
from vfiouserd.memory import GuestMemoryError
from vfiouserd.state import INT_MAP, Field, Schema

WRITABLE = (0x04, 0x08, 0x10, 0x14, 0x18, 0x1C, 0x20)


class ExampleDevice(PciDevice):
    name = "example"
    description = "example PCI device: ID, liveness and factorial registers, DMA engine, MSI"
    vendor_id = 0x1234
    device_id = 0x5646
    msi_vectors = 1
    register_width = 4
    state = Schema(1, Field("registers", INT_MAP))  # what migrates with the device

    def __init__(self) -> None:
        super().__init__({0: Bar(4096)})
        self.device_reset()

    def device_reset(self) -> None:
        self.registers = dict.fromkeys((*WRITABLE, 0x28), 0)

    def _u64(self, offset: int) -> int:
        return self.registers[offset] | self.registers[offset + 4] << 32

    async def read_register(self, bar: int, offset: int, size: int) -> int:
        if offset == 0x00:
            return 0x56460001
        if offset == 0x04:
            return ~self.registers[0x04]
        if offset == 0x08:  # n! has 32 factors of two from n = 34 on
            n = self.registers[0x08]
            return math.factorial(n) % 2**32 if n < 34 else 0
        return self.registers.get(offset, 0)

    async def write_register(self, bar: int, offset: int, size: int, value: int) -> None:
        if offset in WRITABLE:
            self.registers[offset] = value
        elif offset == 0x24 and value & 1:
            self.run_in_background(self._copy)  # the interrupt says when it is done
        elif offset == 0x2C:
            self.lower_interrupt()

    async def _copy(self) -> None:
        try:
            if self.registers[0x20] > 1 << 20:
                raise GuestMemoryError("DMA_LEN above 1 MiB")
            data = await self.dma_read(self._u64(0x10), self.registers[0x20])
            await self.dma_write(self._u64(0x18), data)
            self.registers[0x28] = zlib.crc32(data)
        except GuestMemoryError:
            self.registers[0x28] = 0xFFFFFFFF
        self.interrupt(0)
