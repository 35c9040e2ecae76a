"""The test itself on a network daemon's frame stream: each Ethernet frame
after a 4-byte big-endian length, the framing of QEMU's ``-netdev stream``.
A StreamPeer records every frame the guest sends, with the time it came,
and can play a host on the link that answers ARP and ping for one address."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

LENGTH = struct.Struct(">I")
ETHERNET = struct.Struct("!6s6sH")  # destination, source, ethertype
ARP_BODY = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
IPV4, ARP, RARP = 0x0800, 0x0806, 0x8035
ARP_REQUEST, ARP_REPLY, RARP_REQUEST = 1, 2, 3
ICMP, ECHO_REPLY, ECHO_REQUEST = 1, 0, 8
SHORTEST = 60  # Ethernet's minimum without the FCS: shorter frames are padded


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Frame:
    at: float  # time.monotonic() when it was read
    data: bytes

    @property
    def source(self) -> bytes:
        return self.data[6:12]

    @property
    def ethertype(self) -> int:
        return int.from_bytes(self.data[12:14], "big")

    def is_rarp_from(self, mac: bytes) -> bool:
        """A reverse request announcing ``mac`` (RFC 903, what a switch learns from)."""
        if self.ethertype != RARP or self.source != mac or len(self.data) < 14 + ARP_BODY.size:
            return False
        _, _, _, _, op, sender, _, target, _ = ARP_BODY.unpack_from(self.data, 14)
        return op == RARP_REQUEST and sender == mac and target == mac


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_reply(frame: bytes, mac: bytes, address: bytes) -> bytes | None:
    """Our answer to an ARP request for ``address``, else None."""
    if len(frame) < 14 + ARP_BODY.size or ETHERNET.unpack_from(frame)[2] != ARP:
        return None
    _, _, _, _, op, sender_mac, sender_ip, _, target_ip = ARP_BODY.unpack_from(frame, 14)
    if op != ARP_REQUEST or target_ip != address:
        return None
    body = ARP_BODY.pack(1, IPV4, 6, 4, ARP_REPLY, mac, address, sender_mac, sender_ip)
    return (ETHERNET.pack(sender_mac, mac, ARP) + body).ljust(SHORTEST, b"\0")


def echo_reply(frame: bytes, mac: bytes, address: bytes) -> bytes | None:
    """Our answer to a ping (ICMP echo request) to ``address``, else None."""
    if len(frame) < 14 + 20 or ETHERNET.unpack_from(frame)[2] != IPV4:
        return None
    header_size = (frame[14] & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    ip = frame[14 : 14 + total]
    if ip[9] != ICMP or ip[16:20] != address or len(ip) < header_size + 8:
        return None
    icmp = ip[header_size:]
    if icmp[0] != ECHO_REQUEST:
        return None
    icmp = bytes([ECHO_REPLY, 0, 0, 0]) + icmp[4:]
    icmp = icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]
    header = bytearray(ip[:20])  # without options: the addresses swapped
    header[0], header[8] = 0x45, 64
    header[2:4] = (20 + len(icmp)).to_bytes(2, "big")
    header[12:16], header[16:20] = ip[16:20], ip[12:16]
    header[10:12] = b"\0\0"
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return (ETHERNET.pack(frame[6:12], mac, IPV4) + bytes(header) + icmp).ljust(SHORTEST, b"\0")


class StreamPeer(threading.Thread):
    """Connected to a daemon's ``--stream-listen`` socket, reading until
    closed. With ``host`` (MAC and IPv4 address as text) it answers ARP and
    ping for that address, as a host on the link would."""

    def __init__(self, path: str, host: tuple[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.host = (mac_bytes(host[0]), socket.inet_aton(host[1])) if host else None
        self._frames: list[Frame] = []
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        pending = b""
        try:
            while data := self.sock.recv(1 << 16):
                pending += data
                while len(pending) >= LENGTH.size:
                    (size,) = LENGTH.unpack_from(pending)
                    if len(pending) < LENGTH.size + size:
                        break
                    frame = pending[LENGTH.size : LENGTH.size + size]
                    pending = pending[LENGTH.size + size :]
                    with self._lock:
                        self._frames.append(Frame(time.monotonic(), frame))
                    self._answer(frame)
        except OSError:
            pass  # closed under us by close()
        except BaseException as exc:  # the test reports it
            self.error = exc

    def _answer(self, frame: bytes) -> None:
        if self.host is None:
            return
        reply = arp_reply(frame, *self.host) or echo_reply(frame, *self.host)
        if reply is not None:
            self.sock.sendall(LENGTH.pack(len(reply)) + reply)

    def frames(self) -> list[Frame]:
        with self._lock:
            return list(self._frames)

    def frames_from(self, mac: str, since: float = 0.0) -> list[Frame]:
        source = mac_bytes(mac)
        return [frame for frame in self.frames() if frame.source == source and frame.at >= since]

    def close(self) -> None:
        """Unplug: the daemon sees the end of its stream."""
        with contextlib.suppress(OSError):  # the daemon may have gone first
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.join(10)
