"""vhost-user back-end descriptors and program names, from the plugin registry.

QEMU's ``docs/interop/vhost-user.json`` has management software (libvirt)
find back ends through JSON files naming a program, which it runs with
``--print-capabilities`` and ``--socket-path``/``--fd`` and nothing else: it
cannot pass a subcommand. So every virtio device gets a program name,
``vfiouserd-vhost-user-<device>``, that is the ``vfiouserd`` program under
another name (``main`` reads its own name), and a descriptor pointing at it.
Nothing here is written per device: a new plugin gets both.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from vfiouserd.devices.virtio import VirtioDevice
from vfiouserd.plugins import DeviceClass

if TYPE_CHECKING:  # pathlib only for the tool: a daemon reads its name without it
    from pathlib import Path

PROGRAM_PREFIX = "vfiouserd-"
DESCRIPTOR_PRIORITY = 50  # the number files in a descriptor directory sort by


def program_name(device: str) -> str:
    return f"{PROGRAM_PREFIX}vhost-user-{device}"


def subcommand_of_program(program: str) -> str | None:
    """The subcommand a program name stands for (``vfiouserd-vhost-user-blk``
    runs ``vhost-user-blk``), or None for ``vfiouserd`` itself."""
    name = os.path.basename(program)
    if not name.startswith(PROGRAM_PREFIX):
        return None
    return name.removeprefix(PROGRAM_PREFIX) or None


def descriptor_file(device: str) -> str:
    return f"{DESCRIPTOR_PRIORITY}-vfiouserd-{device}.json"


def descriptor(device: str, plugin: type[VirtioDevice], bin_dir: str) -> dict[str, object]:
    return {
        "description": f"vfiouserd: {plugin.description}; jailed, one process per device",
        "type": plugin.vhost_user_type,
        "binary": os.path.join(bin_dir, program_name(device)),
        "tags": ["vfiouserd"],
    }


def render(document: dict[str, object]) -> str:
    return json.dumps(document, indent=2) + "\n"


def descriptors(plugins: dict[str, DeviceClass], bin_dir: str) -> dict[str, str]:
    """File name: contents, for every virtio device (vhost-user serves only those)."""
    return {
        descriptor_file(name): render(descriptor(name, plugin, bin_dir))
        for name, plugin in plugins.items()
        if issubclass(plugin, VirtioDevice)
    }


def write(plugins: dict[str, DeviceClass], bin_dir: str, output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in descriptors(plugins, bin_dir).items():
        path = output / name
        path.write_text(text)
        written.append(path)
    return written


def link_programs(plugins: dict[str, DeviceClass], bin_dir: Path, target: Path) -> list[Path]:
    """``vfiouserd-vhost-user-<device>`` symlinks to ``target`` (the
    ``vfiouserd`` program) in ``bin_dir``; returns those made. A link there
    already is replaced; a file is kept (pip's own scripts for the built-in
    devices run the same ``main``)."""
    linked = []
    for name, plugin in plugins.items():
        if not issubclass(plugin, VirtioDevice):
            continue
        link = bin_dir / program_name(name)
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            continue
        os.symlink(target, link)
        linked.append(link)
    return linked
