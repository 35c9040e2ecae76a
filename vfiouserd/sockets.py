"""The daemon's UNIX sockets: the listening socket at a path, the socket
file it leaves behind, sockets inherited as fds (systemd, a parent)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass


def listen_on_path(path: str) -> socket.socket:
    """Bind a listening socket at ``path``, replacing a stale socket file
    (one nobody listens on any more), never a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                pass  # stale
            else:
                raise FileExistsError(f"{path}: another server is listening there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class SocketFile:
    """The socket file a daemon created. It is removed at the end through its
    directory (the jailed daemon no longer sees the path), and only while it
    is still the file this daemon created, not a successor's."""

    directory: int  # an O_PATH fd
    name: str
    device: int
    inode: int

    @classmethod
    def created_at(cls, path: str) -> SocketFile:
        directory = os.open(
            os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        )
        name = os.path.basename(path)
        try:
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except OSError:
            os.close(directory)
            raise
        return cls(directory, name, info.st_dev, info.st_ino)

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # gone already, or not ours to touch
            info = os.stat(self.name, dir_fd=self.directory, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                os.unlink(self.name, dir_fd=self.directory)

    def close(self) -> None:
        os.close(self.directory)


def socket_from_fd(fd: int, inherited: bool = True) -> socket.socket:
    """Adopt an AF_UNIX stream socket (listening or connected): inherited
    (made close-on-exec here), or received close-on-exec already (in the
    jail, whose filter has no ioctl(FIOCLEX))."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"fd {fd} is not an AF_UNIX stream socket")
    if inherited:
        os.set_inheritable(fd, False)
    return sock


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
