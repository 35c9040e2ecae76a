"""The dirty log for migration: the front end shares a bitmap
(SET_LOG_BASE) where every write to guest memory is marked while it asks
for that (LOG_ALL), and an eventfd (SET_LOG_FD) to signal."""

from __future__ import annotations

import os

from vfiouserd.log import get_logger
from vfiouserd.memory import GuestMemory, GuestMemoryError, Mapping, SharedDirtyLog
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import Message
from vfiouserd.vhost_user.features import Features
from vfiouserd.vhost_user.messages import RequestFailed, u64_reply
from vfiouserd.virtqueue import QueueSet

log = get_logger("vhost_user")


class DirtyLog:
    def __init__(self, memory: GuestMemory, queue_set: QueueSet, features: Features) -> None:
        self.memory = memory
        self.queue_set = queue_set
        self.features = features
        self.log: SharedDirtyLog | None = None
        self.description: tuple[int, int] | None = None  # size, offset: for a handover
        self._kick_fd: int | None = None  # SET_LOG_FD before any log

    @property
    def kick_fd(self) -> int | None:
        return self.log.kick_fd if self.log is not None else self._kick_fd

    @kick_fd.setter
    def kick_fd(self, fd: int) -> None:
        """Adopt ``fd`` (a handover's): the current log's, or the next's."""
        if self.log is not None:
            self.log.kick_fd = fd
        else:
            self._kick_fd = fd

    def set_log_base(self, message: Message) -> bytes:
        description = message.parse(vu.LogDescription)
        if not message.fds:
            raise RequestFailed("SET_LOG_BASE without the log's fd")
        self.map(message.fds.pop(), description.size, description.offset)
        return u64_reply(0)

    def map(self, fd: int, size: int, offset: int) -> None:
        try:
            mapping = Mapping.map_fd(fd, size, file_offset=offset)
        except GuestMemoryError as exc:
            os.close(fd)
            raise RequestFailed(f"dirty log: {exc}") from exc
        # The log fd (SET_LOG_FD) stays with whichever log is current.
        kick_fd, self._kick_fd = self._kick_fd, None
        if self.log is not None:
            kick_fd, self.log.kick_fd = self.log.kick_fd, None
        self.drop()  # QEMU sends a new, bigger log when memory grows
        self.log = SharedDirtyLog(mapping, size)
        self.log.kick_fd = kick_fd
        self.description = (size, offset)
        self.update()
        log.info("dirty_log.set", size=size)

    def set_log_fd(self, message: Message) -> None:
        fd = message.fds.pop()
        os.set_blocking(fd, False)
        if self.log is not None:
            if self.log.kick_fd is not None:
                os.close(self.log.kick_fd)
            self.log.kick_fd = fd
        else:
            if self._kick_fd is not None:
                os.close(self._kick_fd)
            self._kick_fd = fd

    def update(self) -> None:
        """Writes are logged while the front end asks (LOG_ALL) and a log exists."""
        logging = self.features.has(vu.VHOST_F_LOG_ALL) and self.log
        self.memory.dirty = self.log if logging else None
        self.queue_set.memory_changed()  # the fast path does not log: rings look again

    def drop(self) -> None:
        self.memory.dirty = None
        if self.log is not None:
            if self.log.beyond:
                log.warning("dirty_log.too_small", pages_not_logged=self.log.beyond)
            self.log.close()
            self.log = None
            self.description = None
        if self._kick_fd is not None:
            os.close(self._kick_fd)
            self._kick_fd = None
