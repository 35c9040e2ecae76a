"""Device plugins, found through the ``vfiouserd.devices`` entry-point group.

A third-party package adds a device by declaring, in its pyproject.toml::

    [project.entry-points."vfiouserd.devices"]
    mydev = "mypackage.mydev:MyDevice"

A daemon loads only the plugin it serves (``device_plugin``): every other
one would cost it start-up time and memory for nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, TypeAlias

from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.log import get_logger

if TYPE_CHECKING:
    from vfiouserd.devices.pci import PciDevice

DeviceClass: TypeAlias = "type[VirtioDevice] | type[PciDevice]"

ENTRY_POINT_GROUP = "vfiouserd.devices"
log = get_logger("plugins")


def device_plugins() -> dict[str, DeviceClass]:
    """Every installed device plugin by name: virtio devices (served over
    vhost-user and, through virtio-pci, vfio-user) and PCI devices (vfio-user).
    Broken plugins are logged and skipped."""
    plugins = _load(entry_points(group=ENTRY_POINT_GROUP))
    return dict(sorted(plugins.items()))


def device_plugin(name: str) -> DeviceClass | None:
    """The plugin called ``name`` (None if there is none, or it is broken),
    loading no other plugin."""
    return _load(entry_points(group=ENTRY_POINT_GROUP, name=name)).get(name)


def _load(entries: Iterable[EntryPoint]) -> dict[str, DeviceClass]:
    plugins: dict[str, DeviceClass] = {}
    for entry in entries:
        try:
            device = entry.load()
        except Exception as exc:  # a broken third-party plugin must not stop the others
            log.error("plugin.load_failed", plugin=entry.name, error=repr(exc))
            continue
        if not _is_device(device):
            log.error("plugin.not_a_device", plugin=entry.name, target=entry.value)
            continue
        plugins[entry.name] = device
    return plugins


def _is_device(device: object) -> bool:
    if not isinstance(device, type):
        return False
    if issubclass(device, VirtioDevice):
        return True
    # A PCI device class exists only once its module defined PciDevice:
    # a daemon serving a virtio device over vhost-user never imports it.
    pci = sys.modules.get("vfiouserd.devices.pci")
    return pci is not None and issubclass(device, pci.PciDevice)
