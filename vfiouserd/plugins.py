"""Device plugins, found through the ``vfiouserd.devices`` entry-point group.

A third-party package adds a device by declaring, in its pyproject.toml::

    [project.entry-points."vfiouserd.devices"]
    mydev = "mypackage.mydev:MyDevice"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from vfiouserd.devices.pci import PciDevice
from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.log import get_logger

DeviceClass = type[VirtioDevice] | type[PciDevice]

ENTRY_POINT_GROUP = "vfiouserd.devices"
log = get_logger("plugins")


def device_plugins() -> dict[str, DeviceClass]:
    """Every installed device plugin by name: virtio devices (served over
    vhost-user and, through virtio-pci, vfio-user) and PCI devices (vfio-user).
    Broken plugins are logged and skipped."""
    plugins: dict[str, DeviceClass] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            device = entry.load()
        except Exception as exc:  # a broken third-party plugin must not stop the others
            log.error("plugin.load_failed", plugin=entry.name, error=repr(exc))
            continue
        if not (isinstance(device, type) and issubclass(device, VirtioDevice | PciDevice)):
            log.error("plugin.not_a_device", plugin=entry.name, target=entry.value)
            continue
        plugins[entry.name] = device
    return dict(sorted(plugins.items()))
