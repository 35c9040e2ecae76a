"""The modules' code without docstrings (vfiouserd.module_code): from its
file while installed, for a module whose source is the one it was compiled
from; from the import system's usual .pyc otherwise; nothing else changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vfiouserd import module_code

MODULE = '''\
"""The module's docstring."""
from __future__ import annotations


def documented(x: int) -> int:
    """A function's docstring."""

    def inner():
        """A nested function's docstring."""
        return x

    return inner() * 2


def only_a_docstring():
    """All it has."""


async def asynchronous():
    """An async function's docstring."""
    return 1


class Documented:
    """A class's docstring."""

    def method(self):
        """A method's docstring."""
        return "method"


def checked(value):
    assert value, "asserts stay"
    return value


def not_a_docstring():
    x = 1
    "a string after the first statement"
    return x
'''

# Run in a fresh interpreter: the cache (argv[1]) started, the package in
# argv[2] imported, what it looks like and what finish() says, as JSON.
PROBE = """
import asyncio, importlib.machinery, json, sys
from vfiouserd import module_code
started = module_code.start(sys.argv[1])
finder_in = any(type(f).__name__ == "ModuleCodeFinder" for f in sys.meta_path)
sys.path.insert(0, sys.argv[2])
import pkg.mod as mod
try:
    mod.checked(0)
    asserted = False
except AssertionError as exc:
    asserted = str(exc)
result = {
    "started": started,
    "finder_in": finder_in,
    "docs": [mod.__doc__, mod.documented.__doc__, mod.only_a_docstring.__doc__,
             mod.asynchronous.__doc__, mod.Documented.__doc__, mod.Documented.method.__doc__],
    "values": [mod.documented(3), mod.only_a_docstring(), asyncio.run(mod.asynchronous()),
               mod.Documented().method(), mod.not_a_docstring()],
    "asserted": asserted,
    "loader": isinstance(mod.__loader__, importlib.machinery.SourceFileLoader),
    "file": mod.__file__, "cached": mod.__cached__, "spec_origin": mod.__spec__.origin,
    "annotations": mod.documented.__annotations__,
    "finish": module_code.finish(),
    "finder_after": any(type(f).__name__ == "ModuleCodeFinder" for f in sys.meta_path),
}
print(json.dumps(result))
"""

DOCS = [
    "The module's docstring.",
    "A function's docstring.",
    "All it has.",
    "An async function's docstring.",
    "A class's docstring.",
    "A method's docstring.",
]


@pytest.fixture
def package(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (root / "pkg" / "mod.py").write_text(MODULE)
    return root


def write_cache(root: Path, path: Path) -> int:
    """The cache of pkg and pkg.mod, written by a fresh interpreter that imported them."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        import pkg.mod
        from vfiouserd import module_code
        print(module_code.write({str(path)!r}, ["pkg", "pkg.mod", "not.imported"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def probe(cache: Path, root: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(cache), str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_modules_come_from_the_file_without_docstrings_and_otherwise_unchanged(tmp_path, package):
    cache = tmp_path / "modules.bin"
    assert write_cache(package, cache) == 2  # a module not imported is not in it
    seen = probe(cache, package)
    assert seen["started"] and seen["finder_in"]
    assert seen["docs"] == [None] * len(DOCS)
    assert seen["values"] == [6, None, 1, "method", 1]
    assert seen["asserted"] == "asserts stay"
    assert seen["annotations"] == {"x": "int", "return": "int"}
    mod = package / "pkg" / "mod.py"
    assert seen["loader"] and seen["file"] == seen["spec_origin"] == str(mod)
    assert seen["cached"] == str(
        mod.parent / "__pycache__" / f"mod.{sys.implementation.cache_tag}.pyc"
    )
    assert seen["finish"] == [2, 0]  # both modules from the file, none stale
    assert not seen["finder_after"]


def test_a_changed_source_is_imported_as_usual(tmp_path, package):
    cache = tmp_path / "modules.bin"
    write_cache(package, cache)
    mod = package / "pkg" / "mod.py"
    mod.write_text(MODULE.replace("return inner() * 2", "return inner() * 3"))
    seen = probe(cache, package)
    assert seen["docs"] == DOCS  # compiled from the source by the import system
    assert seen["values"][0] == 9
    assert seen["finish"] == [1, 1]  # the package from the file; the module stale


def test_a_source_found_elsewhere_is_not_taken_for_the_one_compiled(tmp_path, package):
    cache = tmp_path / "modules.bin"
    write_cache(package, cache)
    elsewhere = tmp_path / "elsewhere"
    package.rename(elsewhere)
    seen = probe(cache, elsewhere)
    assert seen["docs"] == DOCS
    assert seen["finish"] == [0, 0]


@pytest.mark.parametrize(
    "damage",
    ["other interpreter", "other -O level", "truncated", "empty", "not an index", "bad code"],
)
def test_a_file_it_cannot_use_changes_nothing(tmp_path, package, damage):
    cache = tmp_path / "modules.bin"
    write_cache(package, cache)
    data = bytearray(cache.read_bytes())
    header = len(module_code.MAGIC)
    if damage == "other interpreter":
        data[header - 1] ^= 0xFF  # the byte-code's magic number
    elif damage == "other -O level":
        data[header] = 2
    elif damage == "truncated":
        del data[header + 10 :]
    elif damage == "empty":
        data.clear()
    elif damage == "not an index":
        length = int.from_bytes(data[header + 1 : header + 5], "little")
        data[header + 5 : header + 5 + length] = b"\xff" * length
    else:  # every module's code unreadable
        length = int.from_bytes(data[header + 1 : header + 5], "little")
        start = header + 5 + length
        data[start:] = b"\x00" * (len(data) - start)
    cache.write_bytes(bytes(data))
    seen = probe(cache, package)
    assert seen["docs"] == DOCS and seen["values"] == [6, None, 1, "method", 1]
    if damage == "bad code":
        assert seen["started"] and seen["finish"] == [0, 0]
    else:
        assert not seen["started"] and seen["finish"] is None


def test_without_a_file_nothing_is_installed(tmp_path, package):
    seen = probe(tmp_path / "none.bin", package)
    assert not seen["started"] and not seen["finder_in"] and seen["docs"] == DOCS


def test_the_programs_file_has_what_both_protocols_import():
    """Written by ``make bytecode`` (vfiouserd.generated_code) beside the
    package's .pyc files, from the daemon's modules as they are now, with
    line numbers but no columns."""
    subprocess.run([sys.executable, "-m", "vfiouserd.generated_code"], check=True, timeout=120)
    cache = module_code.ModuleCode()
    assert cache.load()
    try:
        for name in (
            "typing",
            "trio._core._run",
            "attr._make",
            "construct.core",
            "vfiouserd.cli",
            "vfiouserd.vhost_user.backend",
            "vfiouserd.vfio_user.session",
            "vfiouserd.virtio_pci",
            "vfiouserd.devices.blk",
        ):
            module = sys.modules.get(name) or __import__(name, fromlist=["_"])
            code = cache.code(name, module.__spec__.origin)
            assert code is not None, name
            # Compiled without columns (-X no_debug_ranges), with line numbers.
            positions = list(code.co_positions())
            assert all(start is None for _, _, start, _ in positions), name
            assert any(line is not None for line, _, _, _ in positions), name
    finally:
        cache.close()
