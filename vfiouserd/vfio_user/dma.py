"""The client's memory: DMA_MAP/DMA_UNMAP, and memory shared without an fd,
reached through DMA_READ/DMA_WRITE requests to the client."""

from __future__ import annotations

import errno

import trio

from vfiouserd.devices.pci import PciDevice
from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemoryError, RegionSpec, RemoteAccessError
from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.vfio_user.channel import Channel
from vfiouserd.vfio_user.messages import Reply, RequestError, parse
from vfiouserd.vfio_user.negotiation import Terms

log = get_logger("vfio_user")

LAYOUT_PROBE_TRIES = 8  # a probe whose memory changed meanwhile is asked again


class Dma:
    def __init__(self, device: PciDevice, terms: Terms, channel: Channel) -> None:
        self.device = device
        self.terms = terms
        self.channel = channel
        # How the client lays out DMA_READ/DMA_WRITE: asked at the first one.
        self.qemu_dma_layout: bool | None = None
        self._layout_lock = trio.Lock()

    # -- DMA_MAP, DMA_UNMAP -------------------------------------------------------

    async def map(self, message: Message) -> Reply:
        reply = self._add_region(message)
        self.device.memory_changed()
        return reply

    async def unmap(self, message: Message) -> Reply:
        reply = self._remove_regions(message)
        self.device.memory_changed()
        return reply

    def _add_region(self, message: Message) -> Reply:
        request = parse(message, vfu.DmaMap, "DMA_MAP")
        # Here argsz is the size of the request structure itself.
        if request.argsz != vfu.DmaMap.sizeof() or len(message.payload) != request.argsz:
            raise RequestError(
                errno.EINVAL,
                f"DMA_MAP argsz {request.argsz} with a {len(message.payload)}-byte payload",
            )
        if request.flags & ~vfu.DMA_FLAGS_KNOWN:
            raise RequestError(errno.EINVAL, f"DMA_MAP flags {request.flags:#x}")
        if request.size == 0 or (request.address | request.size) % self.terms.page_size:
            raise RequestError(
                errno.EINVAL,
                f"DMA region {request.address:#x}+{request.size:#x} is empty or not page aligned",
            )
        if request.address + request.size > 1 << 64:
            raise RequestError(errno.EINVAL, "DMA region wraps around 2^64")
        fd = message.fds[0] if message.fds else None
        spec = RegionSpec(
            request.address,
            request.size,
            fd,
            file_offset=request.offset if fd is not None else 0,
            readable=bool(request.flags & vfu.DmaFlag.READ),
            writable=bool(request.flags & vfu.DmaFlag.WRITE),
        )
        memory = self.device.memory
        if any(
            r.guest_address < request.address + request.size and request.address < r.guest_end
            for r in memory.regions
        ):
            raise RequestError(
                errno.EEXIST,
                f"DMA region {request.address:#x}+{request.size:#x} overlaps a mapping",
            )
        max_dma_maps = self.terms.config.max_dma_maps
        if len(memory.regions) >= max_dma_maps:
            raise RequestError(errno.ENOSPC, f"all {max_dma_maps} DMA maps used")
        try:
            memory.add_region(spec)
        except GuestMemoryError as exc:
            raise RequestError(errno.EINVAL, f"DMA region refused: {exc}") from exc
        message.fds.clear()  # owned by the mapping now
        log.debug(
            "dma.map",
            address=f"{request.address:#x}",
            size=request.size,
            mapped=fd is not None,
            flags=int(request.flags),
        )
        return Reply()

    def _remove_regions(self, message: Message) -> Reply:
        request = parse(message, vfu.DmaUnmap, "DMA_UNMAP")
        self.terms.check_argsz(request.argsz, vfu.DmaUnmap.sizeof(), "DMA_UNMAP")
        memory = self.device.memory
        if request.flags == vfu.DMA_UNMAP_FLAG_ALL:
            if request.address or request.size:
                raise RequestError(errno.EINVAL, "unmap-all with an address or size")
            memory.clear()
        elif request.flags:
            raise RequestError(errno.EINVAL, f"DMA_UNMAP flags {request.flags:#x}")
        else:
            try:
                region = memory.find_exact(request.address, request.size)
            except GuestMemoryError as exc:
                raise RequestError(errno.ENOENT, str(exc)) from exc
            # Memory the daemon maps is unmapped only once no ring walk or
            # device work is under way (the session's _needs_quiet): nothing
            # of it is in use. Memory reached through messages holds nothing
            # of ours.
            memory.remove(region)
        log.debug(
            "dma.unmap",
            address=f"{request.address:#x}",
            size=request.size,
            flags=int(request.flags),
        )
        return Reply(message.payload[: vfu.DmaUnmap.sizeof()])

    # -- DMA_READ, DMA_WRITE --------------------------------------------------------
    # Their layout: the spec's or QEMU's (protocol/vfio_user.py says how they
    # differ). Asked once per connection, before the first access.

    async def _learn_layout(self) -> bool:
        # Two walks may ask at once: one probe, whose answer stands (a second
        # one, answered differently, used to overturn it mid-connection).
        async with self._layout_lock:
            memory = self.device.memory
            for _ in range(LAYOUT_PROBE_TRIES):
                if self.qemu_dma_layout is not None:
                    break
                # Asked about memory the client certainly serves: a refusal
                # must mean the layout, never a bad address (the first access
                # may be a guest's, anywhere; our fuzzer: a ring at the end
                # of a region made a QEMU client refuse, read as "spec", and
                # every DMA reply after it was misread).
                remote = [r for r in memory.regions if r.mapping is None]
                if not remote:
                    raise RemoteAccessError("no memory is reached through the client")
                region = next((r for r in remote if r.readable), remote[0])
                generation = memory.generation
                probe = vfu.DmaAccess.build(
                    {"address": region.guest_address, "count": vfu.DMA_LAYOUT_PROBE}
                )
                reply = await self.channel.request(Command.DMA_READ, probe, refused_ok=True)
                if memory.generation != generation:
                    continue  # the region may be gone: its refusal tells nothing
                self.qemu_dma_layout = not reply.is_error
                log.info("dma.layout", layout="qemu" if self.qemu_dma_layout else "spec")
            if self.qemu_dma_layout is None:
                raise RemoteAccessError("client memory changed during every layout probe")
            return self.qemu_dma_layout

    async def dma_read(self, address: int, size: int) -> bytes:
        """Read client memory that has no fd, through DMA_READ requests."""
        layout, pad = vfu.dma_access_layout(await self._learn_layout())
        data_at = layout.sizeof()
        chunks = []
        limit = self.terms.dma_chunk
        for offset in range(0, size, limit):
            count = min(limit, size - offset)
            reply = await self.channel.request(
                Command.DMA_READ, vfu.DmaAccess.build({"address": address + offset, "count": count})
            )
            if len(reply.payload) != data_at + count + pad:
                raise RemoteAccessError(f"DMA_READ reply of {len(reply.payload)} bytes for {count}")
            chunks.append(reply.payload[data_at : data_at + count])
        return b"".join(chunks)

    async def dma_write(self, address: int, data: bytes) -> None:
        layout, pad = vfu.dma_access_layout(await self._learn_layout())
        limit = self.terms.dma_chunk
        for offset in range(0, len(data), limit):
            chunk = data[offset : offset + limit]
            reply = await self.channel.request(
                Command.DMA_WRITE,
                layout.build({"address": address + offset, "count": len(chunk)})
                + chunk
                + bytes(pad),
            )
            if len(reply.payload) > 16:
                raise RemoteAccessError(f"DMA_WRITE reply of {len(reply.payload)} bytes")


class ThreadedRemote:
    """Blocking DMA_READ/DMA_WRITE for a ring walk on a worker thread, which
    gives its turn up while the VMM answers (see vfiouserd.turns)."""

    def __init__(self, dma: Dma) -> None:
        self.dma = dma

    @staticmethod
    def _check_thread() -> None:
        # Round trips block: only a walk's worker thread may make them. On
        # the event loop this is a bug of ours (the queue breaks, the log
        # says ring.crashed), and the message says which.
        if trio.lowlevel.in_trio_run():
            raise RuntimeError("memory reached through the VMM from the event loop")

    def read(self, address: int, size: int) -> bytes:
        self._check_thread()
        try:
            return self.dma.device.turns.round_trip(self.dma.dma_read, address, size)
        except trio.RunFinishedError as exc:
            raise RemoteAccessError("the session ended") from exc

    def write(self, address: int, data: bytes) -> None:
        self._check_thread()
        try:
            self.dma.device.turns.round_trip(self.dma.dma_write, address, data)
        except trio.RunFinishedError as exc:
            raise RemoteAccessError("the session ended") from exc
