"""The device's config space: GET_CONFIG and SET_CONFIG (changes the device
makes itself are announced by backend_channel.py)."""

from __future__ import annotations

from vfiouserd.devices.virtio import ConfigWriteError, VirtioDevice
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import Message
from vfiouserd.vhost_user.messages import RequestFailed


class ConfigSpace:
    def __init__(self, device: VirtioDevice) -> None:
        self.device = device

    @staticmethod
    def _header(message: Message) -> tuple[int, int, int]:
        header = vu.ConfigHeader.parse(message.payload)
        if len(message.payload) != vu.ConfigHeader.sizeof() + header.size:
            raise RequestFailed("config size field disagrees with the payload")
        if header.offset + header.size > vu.MAX_CONFIG_SIZE:
            raise RequestFailed(
                f"config access {header.offset}+{header.size} beyond {vu.MAX_CONFIG_SIZE} bytes"
            )
        if header.flags & ~vu.CONFIG_FLAG_MIGRATION:
            raise RequestFailed(f"unknown config flags {header.flags:#x}")
        return header.offset, header.size, header.flags

    def get_config(self, message: Message) -> bytes:
        offset, size, _ = self._header(message)
        space = self.device.config().ljust(vu.MAX_CONFIG_SIZE, b"\0")
        return message.payload[: vu.ConfigHeader.sizeof()] + space[offset : offset + size]

    def set_config(self, message: Message) -> None:
        offset, _, flags = self._header(message)
        try:
            self.device.write_config(
                offset,
                message.payload[vu.ConfigHeader.sizeof() :],
                migration=bool(flags & vu.CONFIG_FLAG_MIGRATION),
            )
        except ConfigWriteError as exc:
            raise RequestFailed(str(exc)) from exc
