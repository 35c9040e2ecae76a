"""VERSION: our limits, the client's capabilities, and what the two agree.

The session reads the first message and sends the reply; this module
judges the request and says what the reply offers.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from vfiouserd.protocol import vfio_user as vfu
from vfiouserd.protocol.vfio_user import Command, Message
from vfiouserd.vfio_user.messages import ProtocolViolation, RequestError

DMA_CHUNK_LIMIT = 64 * 1024  # bytes per DMA_READ/DMA_WRITE (see dma_chunk)


@dataclass
class ServerConfig:
    max_data_xfer_size: int = vfu.DEFAULT_MAX_DATA_XFER
    max_msg_fds: int = 16
    max_dma_maps: int = 1024
    page_sizes: int = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Terms:
    """One connection's terms: shared by the session and every handler,
    set at VERSION (or by a handover) and fixed after."""

    config: ServerConfig
    client: vfu.Capabilities = field(default_factory=vfu.Capabilities)
    page_size: int = vfu.PAGE_SIZE

    @property
    def max_fds_in(self) -> int:
        """Fds the client may send in one message: what our VERSION reply
        said, which is the spec's default when it said nothing."""
        if "max_msg_fds" in self.client.present:
            return self.config.max_msg_fds
        return vfu.Capabilities().max_msg_fds

    @property
    def max_payload(self) -> int:
        return self.config.max_data_xfer_size + vfu.MAX_MESSAGE_SLACK

    @property
    def dma_chunk(self) -> int:
        # The client takes at most its max_data_xfer_size per transfer, and a
        # DMA_READ reply must fit in a message we accept. QEMU (10.2) writes
        # a message with one sendmsg and drops what the socket did not take,
        # so a reply larger than its socket buffer (about 208 KiB) arrives
        # cut short: stay well below that.
        return min(self.client.max_data_xfer_size, self.config.max_data_xfer_size, DMA_CHUNK_LIMIT)

    def check_argsz(self, argsz: int, minimum: int, what: str) -> None:
        """argsz bounds the reply: at least the fixed structure, at most what
        one message may carry."""
        if argsz < minimum:
            raise RequestError(errno.EINVAL, f"{what} argsz {argsz} < {minimum}")
        if argsz > self.max_payload:
            raise RequestError(errno.EINVAL, f"{what} argsz {argsz} exceeds the message limit")

    def accept_version(self, message: Message) -> int:
        """Take the client's VERSION; the minor version both speak."""
        if message.command != Command.VERSION or message.kind != vfu.TYPE_COMMAND:
            raise ProtocolViolation(f"first message is command {message.command}, not VERSION")
        if message.fds:
            raise ProtocolViolation("VERSION carried fds")
        if len(message.payload) < vfu.VersionHead.sizeof():
            raise ProtocolViolation("VERSION payload too short")
        head = vfu.VersionHead.parse(message.payload)
        if head.major != vfu.MAJOR:
            raise ProtocolViolation(f"client speaks major version {head.major}")
        self.client = vfu.parse_version_data(message.payload[vfu.VersionHead.sizeof() :])
        page_sizes = self.client.pgsizes & self.config.page_sizes
        if not page_sizes:
            raise ProtocolViolation(f"no common DMA page size in {self.client.pgsizes:#x}")
        self.page_size = vfu.smallest_page(page_sizes)
        return min(int(head.minor), vfu.MINOR)

    def reply_capabilities(self) -> dict[str, object]:
        """A subset of what the client offered: our own limits, the common
        page sizes, write_multiple if asked (the twin socket is the
        session's to add). Compact, because QEMU's reply buffer is the size
        of its request."""
        reply_caps: dict[str, object] = {}
        present = self.client.present
        config = self.config
        if "max_msg_fds" in present:
            reply_caps["max_msg_fds"] = config.max_msg_fds
        if "max_data_xfer_size" in present:
            # Ours: the most the client may put in one transfer to us. Ours to
            # the client are bounded by its own value.
            reply_caps["max_data_xfer_size"] = config.max_data_xfer_size
        if "max_dma_maps" in present:
            reply_caps["max_dma_maps"] = config.max_dma_maps
        if "pgsizes" in present:
            reply_caps["pgsizes"] = self.client.pgsizes & config.page_sizes
        if "write_multiple" in present:
            reply_caps["write_multiple"] = self.client.write_multiple
        return reply_caps
