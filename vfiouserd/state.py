"""Device state: one opaque, versioned blob for every device and both protocols.

A blob is what a migration carries and what a restarted daemon reloads::

    header   magic "VFUSTATE", format version, device type (the plugin's
             name), device ABI version, payload length, CRC-32 of the payload
    payload  sections, each: name, its layout version, length, bytes

The device ABI version is the plugin's (like a versioned machine type, it
pins what the guest sees); each section (the device's own fields, and over
vfio-user the PCI function and virtio-pci transport around it) has its own
layout version. Loading refuses, with a message naming the reason, a blob of
another device type, a newer ABI or section layout than this daemon knows, a
bad checksum, a truncated or malformed blob.

A layer declares its fields once as a ``Schema``; fields added later carry
the version that introduced them and a default for older blobs.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import construct as c

MAGIC = b"VFUSTATE"
FORMAT_VERSION = 1


class StateError(Exception):
    """A blob this daemon cannot load; the message says why."""


HEADER = c.Struct(
    "magic" / c.Bytes(8),
    "format_version" / c.Int16ul,
    "device_type" / c.PaddedString(32, "ascii"),
    "abi_version" / c.Int32ul,
    "length" / c.Int64ul,
    "checksum" / c.Int32ul,
)
HEADER_SIZE = HEADER.sizeof()

SECTION_HEAD = c.Struct(
    "name" / c.PascalString(c.Int8ul, "ascii"),
    "version" / c.Int32ul,
    "length" / c.Int32ul,
)


class _IntMap(c.Adapter):  # type: ignore[misc]  # construct has no types
    """A dict of small integers (register offset: value) as pairs."""

    def _decode(self, obj: Any, context: Any, path: Any) -> dict[int, int]:
        return {pair[0]: pair[1] for pair in obj}

    def _encode(self, obj: dict[int, int], context: Any, path: Any) -> list[list[int]]:
        return [[key, value] for key, value in sorted(obj.items())]


# Field kinds: what a device declares its state with. Devices name these
# and never see the wire format (construct) behind them.
class Kind(Protocol):
    """What a field kind does (construct's objects, typed for our use)."""

    def build(self, obj: Any) -> bytes: ...

    def parse(self, data: bytes) -> Any: ...


U8: Kind = c.Int8ul
U16: Kind = c.Int16ul
U32: Kind = c.Int32ul
U64: Kind = c.Int64ul
BOOL: Kind = c.Flag
BYTES: Kind = c.Prefixed(c.Int32ul, c.GreedyBytes)  # bytes of any length
INT_MAP: Kind = _IntMap(c.PrefixedArray(c.Int16ul, c.Sequence(c.Int32ul, c.Int64ul)))


def records(**fields: Kind) -> Kind:
    """A list (up to 65,535) of records, dicts with these fields in this
    order, e.g. one per queue: ``records(size=U16, enabled=BOOL)``."""
    kind: Kind = c.PrefixedArray(
        c.Int16ul, c.Struct(*(c.Renamed(kind, newname=name) for name, kind in fields.items()))
    )
    return kind


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind  # U8 ... INT_MAP, records(...)
    since: int = 1  # the layout version that added the field
    default: Any = None  # its value when loading an older layout


class Schema:
    """The fields of one section, in order, and the layout version."""

    def __init__(self, version: int, *fields: Field) -> None:
        self.version = version
        self.fields = fields
        assert all(f.since <= version for f in fields), "a field newer than the schema"

    def encode(self, values: Mapping[str, Any]) -> bytes:
        return b"".join(f.kind.build(values[f.name]) for f in self.fields)

    def decode(self, data: bytes, version: int, section: str) -> dict[str, Any]:
        if version > self.version:
            raise StateError(
                f"section {section!r} has layout version {version}, newer than this "
                f"daemon's {self.version}"
            )
        values: dict[str, Any] = {}
        offset = 0
        for f in self.fields:
            if f.since > version:
                values[f.name] = f.default
                continue
            try:
                value = f.kind.parse(data[offset:])
                size = len(f.kind.build(value))
            except (c.ConstructError, ValueError) as exc:
                raise StateError(f"section {section!r}, field {f.name!r}: {exc}") from exc
            values[f.name] = value
            offset += size
        if offset != len(data):
            raise StateError(f"section {section!r}: {len(data) - offset} bytes beyond its fields")
        return values


@dataclass
class Blob:
    device_type: str
    abi_version: int
    sections: dict[str, tuple[int, bytes]]  # name: (layout version, bytes)

    def encode(self) -> bytes:
        payload = b"".join(
            SECTION_HEAD.build({"name": name, "version": version, "length": len(data)}) + data
            for name, (version, data) in self.sections.items()
        )
        header = HEADER.build(
            {
                "magic": MAGIC,
                "format_version": FORMAT_VERSION,
                "device_type": self.device_type,
                "abi_version": self.abi_version,
                "length": len(payload),
                "checksum": zlib.crc32(payload),
            }
        )
        return bytes(header) + payload

    @classmethod
    def decode(cls, blob: bytes, *, device_type: str, max_abi: int) -> Blob:
        """Parse and check a blob meant for a ``device_type`` device whose
        plugin knows ABI versions up to ``max_abi``."""
        if len(blob) < HEADER_SIZE:
            raise StateError(f"truncated: {len(blob)} bytes, shorter than the header")
        try:
            header = HEADER.parse(blob[:HEADER_SIZE])
        except c.ConstructError as exc:
            raise StateError(f"malformed header: {exc}") from exc
        if header.magic != MAGIC:
            raise StateError("not a vfiouserd device state (bad magic)")
        if header.format_version > FORMAT_VERSION:
            raise StateError(
                f"state format {header.format_version} is newer than this daemon's {FORMAT_VERSION}"
            )
        if header.device_type != device_type:
            raise StateError(
                f"state of a {header.device_type!r} device cannot be loaded into a "
                f"{device_type!r} device"
            )
        if header.abi_version > max_abi:
            raise StateError(
                f"device ABI version {header.abi_version} is newer than this plugin's {max_abi}"
            )
        payload = blob[HEADER_SIZE:]
        if len(payload) != header.length:
            raise StateError(
                f"truncated: the header says {header.length} bytes, got {len(payload)}"
            )
        if zlib.crc32(payload) != header.checksum:
            raise StateError("checksum mismatch: the state was corrupted")
        sections: dict[str, tuple[int, bytes]] = {}
        offset = 0
        while offset < len(payload):
            try:
                head = SECTION_HEAD.parse(payload[offset:])
            except c.ConstructError as exc:
                raise StateError(f"malformed section header at {offset}: {exc}") from exc
            start = offset + len(SECTION_HEAD.build(head))
            end = start + head.length
            if end > len(payload):
                raise StateError(f"section {head.name!r} runs past the end")
            if head.name in sections:
                raise StateError(f"section {head.name!r} appears twice")
            sections[head.name] = (head.version, payload[start:end])
            offset = end
        return cls(header.device_type, header.abi_version, sections)

    def section(self, name: str, schema: Schema) -> dict[str, Any]:
        if name not in self.sections:
            raise StateError(f"section {name!r} is missing")
        version, data = self.sections[name]
        return schema.decode(data, version, name)

    def expect_only(self, names: Iterable[str]) -> None:
        extra = set(self.sections) - set(names)
        if extra:
            raise StateError(f"sections this device does not have: {sorted(extra)}")


class Stateful(Protocol):
    """What a device offers to be saved and loaded (``VirtioDevice`` and
    ``PciDevice`` implement it; a plugin only declares its ``state``)."""

    @property
    def name(self) -> str: ...

    @property
    def abi_version(self) -> int: ...

    def state_sections(self) -> dict[str, Schema]: ...

    def save_state(self) -> dict[str, dict[str, Any]]: ...

    def load_state(self, sections: dict[str, dict[str, Any]]) -> None:
        """Take the decoded sections; raise StateError, changing nothing, if
        this device cannot take them (a disk of another size, say)."""


def save(device: Stateful) -> bytes:
    schemas = device.state_sections()
    values = device.save_state()
    sections = {
        name: (schema.version, schema.encode(values[name])) for name, schema in schemas.items()
    }
    return Blob(device.name, device.abi_version, sections).encode()


def load(device: Stateful, blob: bytes) -> None:
    """Load ``blob`` into ``device`` or raise StateError leaving it as it was."""
    decoded = Blob.decode(blob, device_type=device.name, max_abi=device.abi_version)
    schemas = device.state_sections()
    decoded.expect_only(schemas)
    device.load_state({name: decoded.section(name, schema) for name, schema in schemas.items()})
