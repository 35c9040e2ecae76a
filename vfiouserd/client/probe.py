"""``vfiouserd probe SOCKET``: describe a vfio-user device like ``lspci -vv``."""

from __future__ import annotations

import json
import os
from typing import Any

from vfiouserd.client.vfio_user import VfioUserClient
from vfiouserd.protocol import vfio_user as vfu

CAPABILITY_NAMES = {
    0x01: "Power Management",
    0x05: "MSI",
    0x09: "Vendor Specific",
    0x10: "Express",
    0x11: "MSI-X",
}
VIRTIO_CFG = {1: "common", 2: "notify", 3: "ISR", 4: "device", 5: "PCI config window"}
IRQ_NAMES = ["INTx", "MSI", "MSI-X", "ERR", "REQ"]


async def describe(client: VfioUserClient) -> dict[str, Any]:
    info = await client.device_info()
    config = await client.region_read(vfu.PciRegion.CONFIG, 0, 64)
    header = {
        "vendor": int.from_bytes(config[0:2], "little"),
        "device": int.from_bytes(config[2:4], "little"),
        "revision": config[8],
        "class": int.from_bytes(config[9:12], "little"),
        "subsystem_vendor": int.from_bytes(config[0x2C:0x2E], "little"),
        "subsystem": int.from_bytes(config[0x2E:0x30], "little"),
        "interrupt_pin": config[0x3D],
    }
    regions = []
    for index in range(info.num_regions):
        region = await client.region_info(index)
        if region.fd is not None:
            os.close(region.fd)
        entry: dict[str, Any] = {
            "index": index,
            "size": region.size,
            "flags": region.flags,
            "mappable": region.mappable,
            "sparse_mmap": region.sparse_areas,
        }
        if index <= vfu.PciRegion.BAR5 and region.size:
            bar = int.from_bytes(config[0x10 + 4 * index : 0x14 + 4 * index], "little")
            entry["type"] = (
                "I/O"
                if bar & 1
                else ("64-bit" if bar & 4 else "32-bit") + (", prefetchable" if bar & 8 else "")
            )
        regions.append(entry)
    irqs = []
    for index in range(info.num_irqs):
        irq = await client.irq_info(index)
        irqs.append({"index": index, "count": irq.count, "flags": irq.flags})
    capabilities = []
    for cap_id, offset in await client.capabilities():
        cap: dict[str, Any] = {
            "id": cap_id,
            "offset": offset,
            "name": CAPABILITY_NAMES.get(cap_id, f"{cap_id:#04x}"),
        }
        if cap_id == 0x09 and header["vendor"] == 0x1AF4:
            cfg_type = await client.config_read(offset + 3, 1)
            cap["virtio"] = {
                "type": VIRTIO_CFG.get(cfg_type, str(cfg_type)),
                "bar": await client.config_read(offset + 4, 1),
                "offset": await client.config_read(offset + 8, 4),
                "length": await client.config_read(offset + 12, 4),
            }
        elif cap_id == 0x11:
            control = await client.config_read(offset + 2, 2)
            table = await client.config_read(offset + 4, 4)
            pba = await client.config_read(offset + 8, 4)
            cap["msix"] = {
                "vectors": (control & 0x7FF) + 1,
                "table_bar": table & 7,
                "table_offset": table & ~7,
                "pba_bar": pba & 7,
                "pba_offset": pba & ~7,
            }
        elif cap_id == 0x05:
            control = await client.config_read(offset + 2, 2)
            cap["msi"] = {
                "vectors": 1 << (control >> 1 & 7),
                "64bit": bool(control & 0x80),
                "per_vector_masking": bool(control & 0x100),
            }
        capabilities.append(cap)
    return {
        "version": list(client.version),
        "flags": info.flags,
        "header": header,
        "regions": regions,
        "irqs": irqs,
        "capabilities": capabilities,
        "server": {
            "max_data_xfer_size": client.server.max_data_xfer_size,
            "max_msg_fds": client.server.max_msg_fds,
            "max_dma_maps": client.server.max_dma_maps,
        },
    }


def render(device: dict[str, Any]) -> str:
    h = device["header"]
    lines = [
        f"{h['vendor']:04x}:{h['device']:04x} (rev {h['revision']:02x}) class {h['class']:06x}",
        f"\tSubsystem: {h['subsystem_vendor']:04x}:{h['subsystem']:04x}",
        f"\tvfio-user {device['version'][0]}.{device['version'][1]}, "
        f"reset {'yes' if device['flags'] & 1 else 'no'}, "
        f"max transfer {device['server']['max_data_xfer_size']}, "
        f"max fds {device['server']['max_msg_fds']}",
    ]
    if h["interrupt_pin"]:
        lines.append(f"\tInterrupt: pin {'ABCD'[h['interrupt_pin'] - 1]}")
    for region in device["regions"]:
        if not region["size"]:
            continue
        name = {6: "Expansion ROM", 7: "Config space", 8: "VGA"}.get(
            region["index"], f"Region {region['index']}"
        )
        kind = f" ({region['type']})" if "type" in region else ""
        mmap = ", mmap" if region["mappable"] else ""
        sparse = "".join(f" [{o:#x}+{s:#x}]" for o, s in region["sparse_mmap"])
        lines.append(f"\t{name}: size={region['size']:#x}{kind}{mmap}{sparse}")
    for cap in device["capabilities"]:
        detail = ""
        if "virtio" in cap:
            v = cap["virtio"]
            detail = f": virtio {v['type']} in BAR{v['bar']} at {v['offset']:#x}+{v['length']:#x}"
        elif "msix" in cap:
            m = cap["msix"]
            detail = (
                f": {m['vectors']} vectors, table BAR{m['table_bar']}+{m['table_offset']:#x},"
                f" PBA BAR{m['pba_bar']}+{m['pba_offset']:#x}"
            )
        elif "msi" in cap:
            m = cap["msi"]
            detail = (
                f": {m['vectors']} vectors, 64-bit {m['64bit']}, masking {m['per_vector_masking']}"
            )
        lines.append(f"\tCapabilities: [{cap['offset']:02x}] {cap['name']}{detail}")
    for irq in device["irqs"]:
        if irq["count"]:
            lines.append(
                f"\tIRQ {IRQ_NAMES[irq['index']]}: {irq['count']} (flags {irq['flags']:#x})"
            )
    return "\n".join(lines)


async def probe(socket_path: str, as_json: bool = False) -> int:
    async with VfioUserClient.connect(socket_path) as client:
        device = await describe(client)
    print(json.dumps(device, indent=2) if as_json else render(device))
    return 0
