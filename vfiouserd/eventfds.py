"""Eventfds a peer hands us: telling one from other fds, and signalling one."""

from __future__ import annotations

import os
import stat

from vfiouserd.log import get_logger

log = get_logger("eventfd")


def is_eventfd_like(fd: int) -> bool:
    """Anonymous-inode fds (eventfds) have no file type bits; files, devices,
    pipes and sockets do. Checked with fstat, which needs no /proc."""
    return stat.S_IFMT(os.fstat(fd).st_mode) == 0


def signal_eventfd(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # saturated: plenty of wake-ups pending
    except OSError as exc:  # the peer gave us something that is not an eventfd
        log.warning("eventfd.write_failed", fd=fd, error=os.strerror(exc.errno or 0))
