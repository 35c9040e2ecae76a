"""What the front end acked: the handlers whose rules depend on it share
one ``Features`` with the back end, which sets it."""

from __future__ import annotations

from dataclasses import dataclass

from vfiouserd.devices.virtio import bit
from vfiouserd.protocol import vhost_user as vu
from vfiouserd.protocol.vhost_user import ProtocolFeature


@dataclass
class Features:
    acked: int = 0  # SET_FEATURES: the device's, and vhost's own bits
    protocol: int = 0  # SET_PROTOCOL_FEATURES

    @property
    def device_bits(self) -> int:
        """The acked features without vhost's own: what the rings use."""
        return self.acked & ~bit(vu.VHOST_USER_F_PROTOCOL_FEATURES) & ~bit(vu.VHOST_F_LOG_ALL)

    def has(self, feature: int) -> bool:
        return bool(self.acked & bit(feature))

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol & bit(feature))
