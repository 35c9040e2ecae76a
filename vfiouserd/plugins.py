"""Device plugins, found through the ``vfiouserd.devices`` entry-point group.

A third-party package adds a device by declaring, in its pyproject.toml::

    [project.entry-points."vfiouserd.devices"]
    mydev = "mypackage.mydev:MyDevice"

A daemon loads only the plugin it serves (``device_plugin``): every other
one would cost it start-up time and memory for nothing.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeAlias, TypeGuard

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
    plugins = _load(entry_points())
    return dict(sorted(plugins.items()))


def device_plugin(name: str) -> DeviceClass | None:
    """The plugin called ``name`` (None if there is none, or it is broken),
    loading no other plugin."""
    return _load(entry for entry in entry_points() if entry[0] == name).get(name)


def entry_points() -> list[tuple[str, str]]:
    """The group's entry points, (name, "module:attribute"), in the order
    importlib.metadata gives them: from the distributions in the directories
    on sys.path, the first of each distribution name only. Read here, not
    through importlib.metadata, which imports email, csv and zipfile: about
    1.5 MiB and a few milliseconds more for every daemon. (Zipped
    distributions, which it reads too, are not looked into.)"""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for directory in sys.path:
        try:
            children = os.listdir(directory or ".")
        except OSError:  # gone, or a zip file
            continue
        for child in children:
            stem, _, kind = child.lower().rpartition(".")
            if kind not in ("dist-info", "egg-info"):
                continue
            distribution = re.sub(r"[-_.]+", "_", stem.partition("-")[0])
            if distribution in seen:
                continue
            seen.add(distribution)
            try:
                with open(os.path.join(directory or ".", child, "entry_points.txt")) as file:
                    found += _in_group(file.read())
            except OSError:  # no entry points
                continue
    return found


def _in_group(text: str) -> Iterator[tuple[str, str]]:
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == ENTRY_POINT_GROUP and line and not line.startswith("#"):
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()


def _load(entries: Iterable[tuple[str, str]]) -> dict[str, DeviceClass]:
    plugins: dict[str, DeviceClass] = {}
    for name, value in entries:
        try:
            module, _, attribute = value.partition(":")
            device: object = importlib.import_module(module.strip())
            for part in attribute.partition("[")[0].strip().split("."):  # extras: none here
                if part:
                    device = getattr(device, part)
        except Exception as exc:  # a broken third-party plugin must not stop the others
            log.error("plugin.load_failed", plugin=name, error=repr(exc))
            continue
        if not _is_device(device):
            log.error("plugin.not_a_device", plugin=name, target=value)
            continue
        plugins[name] = device
    return plugins


def _is_device(device: object) -> TypeGuard[DeviceClass]:
    if not isinstance(device, type):
        return False
    if issubclass(device, VirtioDevice):
        return True
    # A PCI device class exists only once its module defined PciDevice:
    # a daemon serving a virtio device over vhost-user never imports it.
    pci = sys.modules.get("vfiouserd.devices.pci")
    return pci is not None and issubclass(device, pci.PciDevice)
