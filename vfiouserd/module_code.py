"""The modules a daemon imports, compiled once without their docstrings.

A device process keeps the code of every module it imports for as long as it
runs, and with it every docstring of the standard library, trio, attrs and
construct it loads: about 1 MiB of the 20 an idle device may hold (issue 16),
text a daemon never shows. ``python -OO`` drops it too, but with the asserts,
and only from ``.opt-2.pyc`` files that Debian does not ship for its standard
library, behind a flag every launcher (a unit, a descriptor, a shell) would
have to pass. Instead, ``python -m vfiouserd.generated_code`` (``make
bytecode``, an installation) compiles the source of every module the daemons
import, without the docstrings of its modules, classes and functions, into
one file beside the package's ``.pyc`` files. From the program's first step to
its jail, the import system takes a module's code from that file if the
module is found where it was compiled from and its source has the size and
modification time it had then (what a ``.pyc`` is checked against); from its
``.pyc`` as usual otherwise. Nothing else changes: asserts stay, a module's
``__file__``, ``__cached__`` and ``__spec__`` are what they were, its loader
is still a ``SourceFileLoader``, and ``__doc__`` is None, as under ``-OO``.
(The command compiles under ``-X no_debug_ranges`` too: line numbers but no
columns, see vfiouserd.generated_code.)

This module is the first the program imports, and it imports little besides
what the import system is made of (not importlib.util: collections, functools,
contextlib...), so that what comes after it can come from the file.
"""

from __future__ import annotations

import importlib.machinery
import marshal
import mmap
import os
import sys
import types

TYPE_CHECKING = False  # not typing's: it is not loaded yet (type checkers know the name)
if TYPE_CHECKING:
    from collections.abc import Sequence

# The byte-code's version (importlib.util.MAGIC_NUMBER, without importlib.util).
MAGIC = b"vfiouserd module code\n" + importlib._bootstrap_external.MAGIC_NUMBER

# Where each module's code is: its source file, the source's st_mtime_ns and
# st_size when it was compiled, and the code's offset and length after the index.
Entry = tuple[str, int, int, int, int]

_active: tuple[ModuleCode, ModuleCodeFinder] | None = None  # until the jail


def default_path() -> str:
    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(package, "__pycache__", f"modules.{sys.implementation.cache_tag}.bin")


class ModuleCode:
    """The file: its index, and each module's code on demand."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_path()
        self.index: dict[str, Entry] = {}
        self.data: mmap.mmap | None = None
        self.base = 0  # where the first module's code is in self.data
        self.used = self.stale = 0

    def load(self) -> bool:
        """Read the file, if it is one for this interpreter and its -O level,
        into a mapping of its own: close() gives it all back to the system. (A
        mapping of the file would hold a descriptor that the program closes as
        it starts, with the others it did not expect.)"""
        header = len(MAGIC) + 5  # the magic, the -O level, the index's length
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= header:
                    return False
                data = mmap.mmap(-1, size)
                if f.readinto(data) != size:
                    data.close()
                    return False
        except OSError:
            return False
        try:
            if data[: len(MAGIC)] != MAGIC or data[len(MAGIC)] != sys.flags.optimize:
                raise ValueError("not this interpreter's")
            length = int.from_bytes(data[len(MAGIC) + 1 : header], "little")
            index = marshal.loads(data[header : header + length])
            if not isinstance(index, dict):
                raise ValueError("no index")
        except (ValueError, EOFError, TypeError):
            data.close()
            return False
        self.index, self.data, self.base = index, data, header + length
        return True

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.index, self.data = {}, None

    def code(self, name: str, source: str) -> types.CodeType | None:
        """Module ``name``'s code, if the file has it for this source file as
        it is now; None to compile it or take its .pyc as usual."""
        entry = self.index.get(name)
        if entry is None or self.data is None:
            return None
        try:
            path, mtime_ns, size, offset, length = entry
            if path != source:
                return None
            stat = os.stat(source)
            if stat.st_mtime_ns != mtime_ns or stat.st_size != size:
                self.stale += 1
                return None
            start = self.base + offset
            with memoryview(self.data) as data:
                code = marshal.loads(data[start : start + length])
        except (OSError, ValueError, EOFError, TypeError):
            return None
        if type(code) is not types.CodeType:
            return None
        self.used += 1
        return code


class CachedSourceLoader(importlib.machinery.SourceFileLoader):
    """A source file's loader whose code comes from the file when it can."""

    def __init__(self, fullname: str, path: str, cache: ModuleCode) -> None:
        super().__init__(fullname, path)
        self.cache = cache

    def get_code(self, fullname: str) -> types.CodeType | None:
        code = self.cache.code(fullname, self.path)
        return code if code is not None else super().get_code(fullname)


class ModuleCodeFinder:
    """Just before the import system's path finder: the spec that finder
    makes for a module of the file, with a loader that reads the file."""

    def __init__(self, cache: ModuleCode) -> None:
        self.cache = cache

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.cache.index:
            return None  # the finders after this one, as if it were not there
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = CachedSourceLoader(name, spec.loader.path, self.cache)
        return spec


def start(path: str | None = None) -> bool:
    """Imports take modules' code from the file from now on (the program's
    first step); whether there is a file of this interpreter's."""
    global _active
    if _active is not None:
        return True
    cache = ModuleCode(path)
    if not cache.load():
        return False
    finder = ModuleCodeFinder(cache)
    finders = sys.meta_path
    position = next(
        (i for i, f in enumerate(finders) if f is importlib.machinery.PathFinder), len(finders)
    )
    finders.insert(position, finder)
    _active = cache, finder
    return True


def finish() -> tuple[int, int] | None:
    """The program has imported all it will (its jail is next): the file is
    let go. How many modules came from it, and how many it had for sources
    changed since; None if there was none."""
    global _active
    if _active is None:
        return None
    (cache, finder), _active = _active, None
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    used, stale = cache.used, cache.stale
    cache.close()
    return used, stale


def without_docstrings(source: bytes, path: str) -> types.CodeType:
    """The module's code as the import system compiles it (with this
    interpreter's -O level), but with no docstring for the module, its
    classes or its functions: ``__doc__`` is None."""
    import ast

    tree = ast.parse(source, path)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        first = body[0] if body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            if len(body) == 1:  # a body must have a statement
                body[0] = ast.copy_location(ast.Pass(), first)
            else:
                del body[0]
    return compile(tree, path, "exec", dont_inherit=True)


def write(path: str | None = None, names: list[str] | None = None) -> int:
    """Compile the modules ``names`` (default: every module imported from a
    source file so far) into the file, written whole and renamed over the
    last one; how many it holds."""
    index: dict[str, Entry] = {}
    pieces: list[bytes] = []
    offset = 0
    for name in sorted(sys.modules if names is None else names):
        spec = getattr(sys.modules.get(name), "__spec__", None)
        loader = getattr(spec, "loader", None)
        if spec is None or spec.name != name or spec.origin is None:
            continue
        if not isinstance(loader, importlib.machinery.SourceFileLoader):
            continue  # built in, frozen, an extension, or a loader of its own
        source = spec.origin
        try:
            stat = os.stat(source)  # before reading: a later change makes it stale
            with open(source, "rb") as f:
                code = without_docstrings(f.read(), source)
        except (OSError, SyntaxError, ValueError):
            continue
        piece = marshal.dumps(code)
        index[name] = (source, stat.st_mtime_ns, stat.st_size, offset, len(piece))
        pieces.append(piece)
        offset += len(piece)
    path = path or default_path()
    encoded = marshal.dumps(index)
    header = MAGIC + bytes([sys.flags.optimize]) + len(encoded).to_bytes(4, "little")
    temporary = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "wb") as f:
            f.write(header + encoded)
            f.writelines(pieces)
        os.replace(temporary, path)
    except OSError:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return len(index)
