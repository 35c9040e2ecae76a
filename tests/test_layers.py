"""The folders are the architecture: what each layer may not import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder: module prefixes its code never imports
FORBIDDEN = {
    # Bytes only: nothing of devices, sessions or the server.
    "protocol": (
        "vfiouserd.devices",
        "vfiouserd.vhost_user",
        "vfiouserd.vfio_user",
        "vfiouserd.server",
        "vfiouserd.virtqueue",
    ),
    # The jail confines whatever runs; it knows nothing of what it serves.
    "sandbox": (
        "vfiouserd.server",
        "vfiouserd.vhost_user",
        "vfiouserd.vfio_user",
        "vfiouserd.devices",
        "vfiouserd.cli",
    ),
    # Device semantics only: no wire formats (state is declared with
    # vfiouserd.state's field kinds), no protocol, no VMM connection (host
    # sockets a device serves, a console's say, are its own).
    # How interrupts reach a VMM (eventfds) is the transports' business.
    "devices": (
        "construct",
        "vfiouserd.eventfds",
        "vfiouserd.virtqueue",
        "vfiouserd.virtio_pci",
        "vfiouserd.protocol",
        "vfiouserd.vhost_user",
        "vfiouserd.vfio_user",
        "vfiouserd.server",
    ),
}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_it_should_not_know(folder):
    found = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))  # a device's package too
        for module in imported_modules(path)
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[folder])
    }
    assert not found
