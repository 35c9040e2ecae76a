"""Code that libraries generate while they are imported, compiled once.

attrs writes the source of every class's ``__init__``, ``__repr__``,
``__eq__``... and compiles it (trio defines about a hundred such classes),
dataclasses ``exec``s the source of its methods and namedtuple ``eval``s its
constructor: about 15 ms of compiling at every start of every device process,
for the same source each time. While installed (from the program's first step
to its jail), ``GeneratedCode`` answers those ``compile``, ``exec`` and
``eval`` calls from a file of code objects, as the import system answers
``import`` from ``.pyc`` files; what is not in the file is compiled as before.

An entry holds everything ``compile`` makes its result from: the source, the
file name, the mode, the compiler flags (the ``__future__`` features, given or
inherited from the calling code) and the optimisation level. Its code is used
only if all of them are the caller's, so it is the code ``compile`` would make,
and changed source (another attrs, another class) is a miss, not an error. The
file is marshalled code, specific to the interpreter's byte-code
(``importlib.util.MAGIC_NUMBER``): another interpreter's file is ignored, as
is a damaged entry. It sits beside the package's ``.pyc`` files, with their
permissions; ``python -m vfiouserd.generated_code`` writes it for every device
and protocol (``make bytecode`` runs it; run it after ``pip install``), and a
daemon that finds none writes what it compiled, unless byte-code is not to be
written (``PYTHONDONTWRITEBYTECODE``), as the interpreter does with ``.pyc``.
"""

from __future__ import annotations
import __future__

import builtins
import contextlib
import importlib
import importlib.util
import marshal
import mmap
import os
import sys
import types
import zlib
from typing import Any

# The flags compile() inherits from the code calling it (CPython's PyCF_MASK):
# every __future__ feature's but nested_scopes' (that flag is CO_NESTED,
# which says something else of the caller).
FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    if _feature != "nested_scopes":
        FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag

MAGIC = b"vfiouserd generated code\n" + importlib.util.MAGIC_NUMBER
MAX_ENTRIES = 4096  # past this, a save keeps only what this process used

# An entry is found by everything compile() takes but the source, and the
# source's length and CRC; the entry is the whole source (UTF-8), compared
# before its code is used, then the marshalled code. Only the entries used
# are unmarshalled: the file has every device's.
Key = tuple[str, str, int, int, int, int]  # file name, mode, flags, optimize, length, CRC


_active: GeneratedCode | None = None  # the program's, installed until its jail


def default_path() -> str:
    package = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(package, "__pycache__", f"generated.{sys.implementation.cache_tag}.bin")


def _caller_flags(depth: int = 2) -> int:
    """The __future__ flags of the code that called our caller (none if C
    code called it with no Python frame below)."""
    try:
        return sys._getframe(depth).f_code.co_flags & FUTURE_FLAGS
    except ValueError:
        return 0


class GeneratedCode:
    """The cache, and the ``compile``, ``exec`` and ``eval`` that use it while
    installed."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_path()
        self.entries: dict[Key, tuple[int, int]] = {}  # where each is in self.data
        self.data: bytes | mmap.mmap = b""
        self.base = 0  # where the first entry is in self.data
        self.compiled: dict[Key, tuple[bytes, types.CodeType]] = {}  # made here: source, code
        self.used: set[Key] = set()
        self.hits = self.misses = 0
        self.loaded = False  # from a file of this interpreter's
        self._originals: tuple[Any, Any, Any] | None = None

    def load(self) -> None:
        """The file's entries, if it is one for this interpreter. Read into a
        mapping of its own, not the heap: close() gives it all back."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= len(MAGIC) + 4:
                    return
                data = mmap.mmap(-1, size)
                if f.readinto(data) != size or data[: len(MAGIC)] != MAGIC:
                    data.close()
                    return
            start = len(MAGIC) + 4
            length = int.from_bytes(data[len(MAGIC) : start], "little")
            entries = marshal.loads(data[start : start + length])
        except (OSError, EOFError, ValueError, TypeError):
            return
        if isinstance(entries, dict):  # each entry is checked as it is used
            self.entries, self.data, self.base = entries, data, start + length
            self.loaded = True
        else:
            data.close()

    def close(self) -> None:
        """The entries are not needed any more."""
        if isinstance(self.data, mmap.mmap):
            self.data.close()
        self.entries, self.data, self.base = {}, b"", 0

    def _cached(self, key: Key, encoded: bytes) -> types.CodeType | None:
        """The entry's code if its source is ``encoded``: compared and read
        where they are, not copied (copies would leave the heap in pieces
        that a long-running daemon keeps)."""
        where = self.entries.get(key)
        if where is None:
            return None
        try:
            offset, size = where
            start, length = self.base + offset, len(encoded)
            with memoryview(self.data) as data:
                if data[start : start + length] != encoded:
                    return None
                code = marshal.loads(data[start + length : start + size])
        except (EOFError, ValueError, TypeError):
            return None
        return code if type(code) is types.CodeType else None

    def code(
        self, source: str, filename: str, mode: str, flags: int, optimize: int
    ) -> types.CodeType | None:
        """compile(source, filename, mode, flags, dont_inherit=True, optimize);
        None if that raises (let the builtin raise it, with its own message)."""
        if optimize == -1:
            optimize = sys.flags.optimize
        encoded = source.encode("utf-8", "surrogatepass")
        key = (filename, mode, flags, optimize, len(encoded), zlib.crc32(encoded))
        made = self.compiled.get(key)
        code = made[1] if made is not None and made[0] == encoded else self._cached(key, encoded)
        if code is not None:
            self.hits += 1
        else:
            original = self._originals[0] if self._originals else builtins.compile
            try:
                code = original(source, filename, mode, flags, True, optimize)
            except (SyntaxError, ValueError):
                return None
            self.misses += 1
            self.compiled[key] = (encoded, code)
        self.used.add(key)
        return code

    def install(self) -> None:
        """From now on, compile, exec and eval of source text use the cache."""
        if self._originals is not None:
            return
        original_compile, original_exec, original_eval = (
            builtins.compile,
            builtins.exec,
            builtins.eval,
        )
        self._originals = (original_compile, original_exec, original_eval)

        # Each compiles with the calling code's __future__ flags, never with
        # this module's (the builtins would inherit them from these frames).
        def compile(
            source: Any,
            filename: Any,
            mode: str,
            flags: int = 0,
            dont_inherit: bool = False,
            optimize: int = -1,
            **keywords: Any,
        ) -> Any:
            if not dont_inherit:
                flags |= _caller_flags()
            plain = not keywords and not flags & ~FUTURE_FLAGS  # not ast.parse's
            if plain and type(source) is str and type(filename) is str:
                code = self.code(source, filename, mode, flags, optimize)
                if code is not None:
                    return code
            return original_compile(source, filename, mode, flags, True, optimize, **keywords)

        def source_code(source: Any, mode: str, flags: int) -> Any:
            """What exec or eval runs for ``source``, as they would compile it."""
            if not isinstance(source, (str, bytes, bytearray)):
                return source  # code, or not what the builtin takes: it says so
            if isinstance(source, str):
                if mode == "eval":  # the builtin drops leading blanks first
                    source = source.lstrip(" \t")
                code = self.code(source, "<string>", mode, flags, -1)
                if code is not None:
                    return code
            elif mode == "eval":
                source = source.lstrip(b" \t")
            return original_compile(source, "<string>", mode, flags, True)

        def exec(source: Any, globals: Any = None, locals: Any = None, /, **keywords: Any) -> None:
            if globals is None:  # the caller's namespace, not this function's
                caller = sys._getframe(1)
                globals, locals = caller.f_globals, caller.f_locals if locals is None else locals
            original_exec(source_code(source, "exec", _caller_flags()), globals, locals, **keywords)

        def eval(source: Any, globals: Any = None, locals: Any = None, /) -> Any:
            if globals is None:
                caller = sys._getframe(1)
                globals, locals = caller.f_globals, caller.f_locals if locals is None else locals
            return original_eval(source_code(source, "eval", _caller_flags()), globals, locals)

        builtins.compile, builtins.exec, builtins.eval = compile, exec, eval

    def uninstall(self) -> None:
        if self._originals is not None:
            builtins.compile, builtins.exec, builtins.eval = self._originals
            self._originals = None

    def save(self) -> bool:
        """Add what was compiled to the file (written whole, then renamed
        over it); whether it was written."""
        kept = self.entries if len(self.entries) + len(self.compiled) <= MAX_ENTRIES else self.used
        base = self.base
        pieces = {
            k: self.data[base + o : base + o + n] for k, (o, n) in self.entries.items() if k in kept
        }
        pieces.update(
            (k, source + marshal.dumps(code)) for k, (source, code) in self.compiled.items()
        )
        entries, offset = {}, 0
        for key, piece in pieces.items():
            entries[key] = (offset, len(piece))
            offset += len(piece)
        index = marshal.dumps(entries)
        temporary = f"{self.path}.{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(MAGIC + len(index).to_bytes(4, "little") + index)
                f.writelines(pieces.values())
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return False
        self.close()
        self.entries, self.data, self.compiled = entries, b"".join(pieces.values()), {}
        return True

    def save_if_none(self) -> bool:
        """save() what was compiled if there was no file to load (or one of
        another interpreter), where byte-code may be written. A file that is
        there is left as it is: some code is never the same twice (attrs
        writes each class's hash seed, which changes with every process,
        into its ``__hash__``), and a daemon would write it at every start."""
        if self.loaded or not self.compiled or sys.dont_write_bytecode:
            return False
        return self.save()


def start() -> GeneratedCode:
    """The program's cache, loaded and installed (its first step)."""
    global _active
    if _active is None:
        _active = GeneratedCode()
        _active.load()
        _active.install()
    return _active


def finish() -> tuple[int, int, bool] | None:
    """The program has imported all it will (its jail is next): the builtins
    are its own again, and what it compiled is saved. Its hits, misses and
    whether it saved; None if start() was not called."""
    global _active
    cache, _active = _active, None
    if cache is None:
        return None
    cache.uninstall()
    saved = cache.save_if_none()
    cache.close()
    return cache.hits, cache.misses, saved


def main(argv: list[str]) -> int:
    """Compile what every device and both protocols generate as they are
    imported, into the package's cache (``make bytecode``) or argv's file."""
    from vfiouserd import module_code, startup

    cache = GeneratedCode(argv[0] if argv else None)  # not loaded: written afresh
    cache.install()
    with startup.as_the_program():  # as the daemon imports them
        # The program, both protocols' sessions (the program imports one, as
        # a daemon needs it) and every device plugin.
        for module in (
            "vfiouserd.cli",
            "vfiouserd.vhost_user.backend",
            "vfiouserd.vfio_user.session",
            "vfiouserd.virtio_pci",  # a virtio device over vfio-user
            "locale",  # argparse's messages (gettext), as a daemon parses its options
        ):
            importlib.import_module(module)
        from vfiouserd import plugins

        plugins.device_plugins()
    cache.uninstall()
    if not cache.save():
        print(f"cannot write {cache.path}", file=sys.stderr)
        return 1
    # The modules they imported, without docstrings (vfiouserd.module_code),
    # beside this file, or beside argv's.
    name = os.path.basename(module_code.default_path())
    modules = os.path.join(os.path.dirname(cache.path), name)
    try:
        module_code.write(modules)
    except OSError as exc:
        print(f"cannot write {modules}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Both files hold code compiled without the columns of each instruction's
    # position (-X no_debug_ranges): 0.2 MiB of every daemon's line tables,
    # which only point a traceback's carets into source lines that a jailed
    # daemon cannot read anyway. Line numbers stay.
    if "no_debug_ranges" not in sys._xoptions and not os.environ.get("PYTHONNODEBUGRANGES"):
        os.execv(sys.executable, [sys.executable, "-X", "no_debug_ranges", *sys.orig_argv[1:]])
    sys.exit(main(sys.argv[1:]))
