"""What the program does first, before it imports trio or construct: less to load.

trio, construct and pyseccomp do work as they are imported for what a
daemon never needs. The program's entry point (vfiouserd.__main__) skips it:

- Modules they import for what a daemon never does are deferred: ``ssl``
  (trio's TLS streams; the daemon never speaks TLS), ``idna`` (trio, for
  host names that are not ASCII), ``subprocess`` (trio's run_process; a
  jailed daemon cannot run a program anyway), ``pdb`` (construct's Debugger)
  and ``pickle`` (construct's Pickled). Together they cost every device
  process about 2 MiB and 11 ms of CPU at start-up. A deferred module is an empty
  module with the real one's spec (name, file, loader) in sys.modules:
  ``import ssl`` finds it there and binds it, and the first attribute asked
  of it that it lacks runs the real module's code in it, in place, so that
  every reference to it holds the real module from then on.
  (importlib.util.LazyLoader does not do on Python 3.11: the import
  statement reads a module's ``__spec__`` as it finds it in sys.modules,
  which loads a lazy module at once.) A jailed daemon has no file system to
  load anything from: a deferred module used there for the first time
  raises ImportError.
- ``ctypes.util.find_library`` runs ``ldconfig -p`` at every call; trio
  (libpthread, to name its threads) and pyseccomp (libc, libseccomp) call
  it as they are imported: three runs, about 4 ms of every start. While
  they are imported, ``known_libraries`` answers those names with the
  sonames the dynamic loader knows them by, once it has loaded them. Until
  something asks ``ctypes.util`` for more, it stays deferred too: it imports
  shutil, subprocess and tempfile for ldconfig's sake (3 ms more).
- hashlib's binding to OpenSSL (``_hashlib``) is left out altogether: with
  trio's TLS and DTLS deferred, only hashlib would load OpenSSL, whose
  initialisation costs every device 0.5 MiB of heap and more of the
  library's pages. hashlib then serves its algorithms from the interpreter's
  own modules (md5, sha1, the sha2 and sha3 families, blake2, shake), all
  loaded as it is imported, before the jail; it lacks only what OpenSSL alone
  has (``pbkdf2_hmac``, ``scrypt``, algorithms such as ripemd160).
- trio's own modules for what a jailed daemon cannot do (TLS, DTLS and TCP,
  processes, files and paths: ``TRIO_UNUSED``, 0.5 MiB with the hmac and
  pathlib they bring) are deferred too, although trio's
  ``__init__`` imports names from them (``from ._subprocess import
  run_process``), which loads a deferred module. ``unused_parts`` has such a
  module answer each name asked of it, while its package is imported, with a
  placeholder; once the package is imported, each placeholder bound in the
  package's modules (``trio.run_process``, ``trio.lowlevel.open_process``)
  is taken out of the module, which gets a ``__getattr__`` for the names
  taken out: the first use of one runs its module and binds the real value.
  Unlike trio's own, those objects keep their defining module's
  ``__module__`` (``trio._path``, not ``trio``).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from typing import Any

# What trio and construct import for what a daemon never does.
NEVER_USED = ("ssl", "idna", "subprocess", "pdb", "pickle")

# Never loaded (see the module's doc): ``import`` fails as if not installed.
LEFT_OUT = ("_hashlib",)

# trio's modules for what a jailed daemon cannot do: TLS, DTLS and TCP (its
# network namespace has no network), processes (no program to run), files
# and paths (an empty root); not UNIX sockets, which a device may use in the
# directories bound into its jail.
TRIO_UNUSED = (
    "trio._dtls",
    "trio._file_io",
    "trio._highlevel_open_tcp_listeners",
    "trio._highlevel_open_tcp_stream",
    "trio._highlevel_ssl_helpers",
    "trio._path",
    "trio._ssl",
    "trio._subprocess",
)

# The libraries trio and pyseccomp look up by name as they are imported, by
# their sonames (the ABI's: glibc's libc and libpthread, libseccomp 2.x).
SONAMES = {"c": "libc.so.6", "pthread": "libpthread.so.0", "seccomp": "libseccomp.so.2"}

_loading = threading.RLock()


class DeferredModule(types.ModuleType):
    """A module whose code has not run yet: the first attribute it lacks runs it."""

    def __getattr__(self, attribute: str) -> Any:
        with _loading:
            if type(self) is DeferredModule:  # not loaded by another thread meanwhile
                _load(self)
        return getattr(self, attribute)


def _load(module: types.ModuleType) -> None:
    spec = module.__spec__
    if spec is None or spec.loader is None:  # defer() gives each one both
        raise ImportError(f"deferred module {module.__name__} has no loader")
    module.__class__ = types.ModuleType  # a plain module from now on
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        module.__class__ = DeferredModule  # the next use tries again
        raise ImportError(f"deferred module {spec.name}: {exc}", name=spec.name) from exc


def defer(names: tuple[str, ...] = NEVER_USED) -> list[str]:
    """Put these modules in sys.modules (and a submodule in its package),
    deferred; not those already imported, nor those not installed (whose
    import fails as before). The names deferred."""
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)  # imports a submodule's package
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = DeferredModule
        sys.modules[name] = module
        package, _, child = name.rpartition(".")
        if package:  # what the import system does for a submodule it loads
            setattr(sys.modules[package], child, module)
        deferred.append(name)
    return deferred


def leave_out(names: tuple[str, ...] = LEFT_OUT) -> list[str]:
    """Have ``import`` of these modules raise ImportError, as for a module not
    installed (None in sys.modules); not those already imported. The names
    left out."""
    left_out = [name for name in names if name not in sys.modules]
    for name in left_out:
        sys.modules[name] = None  # type: ignore[assignment]
    return left_out


def still_deferred() -> list[str]:
    """The modules in sys.modules whose code has not run (nothing used them)."""
    return sorted(name for name, module in sys.modules.items() if type(module) is DeferredModule)


@contextlib.contextmanager
def known_libraries(sonames: Mapping[str, str] = SONAMES) -> Iterator[None]:
    """Meanwhile, ``ctypes.util.find_library`` answers a name of ``sonames``
    with its soname, without running ldconfig, if the dynamic loader loads
    it by that name; any other name, or one that does not load, as before.
    ``ctypes.util`` not yet imported is deferred (see the module's doc)."""
    import ctypes

    defer(("ctypes.util",))
    util: Any = sys.modules["ctypes.util"]
    original: Any = vars(util).get("find_library")  # None while util is deferred

    def ldconfig(name: str) -> str | None:
        nonlocal original
        if original is None:  # its code, in place, makes the real one
            with _loading:
                if type(util) is DeferredModule:
                    _load(util)
            original = vars(util)["find_library"]
            util.find_library = find_library  # ours again, until the end
        return original(name)  # type: ignore[no-any-return]

    def find_library(name: str) -> str | None:
        soname = sonames.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)  # loaded for good: its caller loads it next
            except OSError:
                pass
            else:
                return soname
        return ldconfig(name)

    util.find_library = find_library
    try:
        yield
    finally:
        if type(util) is DeferredModule:
            del util.find_library  # the real one, at its first use
        elif original is not None:
            util.find_library = original
        # else: loaded meanwhile for something else, with the real one


@contextlib.contextmanager
def as_the_program() -> Iterator[None]:
    """Meanwhile, imports go as the program's do: what it never uses
    deferred or left out, the libraries it looks up known (the program's
    entry point, and the code files' writer, which must import as it does)."""
    defer()
    leave_out()
    with known_libraries(), unused_parts("trio"):
        yield


class Placeholder:
    """What a module of ``unused_parts`` answers for one of its names while
    its package is imported; never used: taken out once the package is."""

    def __init__(self, module: str, name: str) -> None:
        self.placeholder_for = (module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{'.'.join(self.placeholder_for)} used while its package was imported")


class PendingModule(DeferredModule):
    """A module of ``unused_parts`` while its package is imported."""

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # the import system's questions
            raise AttributeError(attribute)
        return Placeholder(self.__name__, attribute)


@contextlib.contextmanager
def unused_parts(package: str, names: tuple[str, ...] = TRIO_UNUSED) -> Iterator[None]:
    """Meanwhile, the package's submodules ``names`` are deferred even though
    the package imports names from them (see the module's doc); not those
    already imported, nor any if the package is."""
    if package in sys.modules:
        yield
        return
    found = importlib.util.find_spec(package)  # finds it, does not run it
    locations = found.submodule_search_locations if found is not None else None
    pending: dict[str, types.ModuleType] = {}
    for name in names:
        if name in sys.modules:
            continue
        spec = _find_submodule(name, locations)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = PendingModule
        sys.modules[name] = pending[name] = module
    try:
        yield
    finally:
        for module in pending.values():
            module.__class__ = DeferredModule
        if package in sys.modules:
            _take_out_placeholders(package)
            for name, module in pending.items():
                setattr(sys.modules[package], name.rpartition(".")[2], module)
        else:  # not imported after all: as before
            for name in pending:
                del sys.modules[name]


def _find_submodule(name: str, locations: Any) -> importlib.machinery.ModuleSpec | None:
    """What the import system would find for a submodule, its package not
    imported (importlib.util.find_spec would import it)."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(name, locations) if find_spec is not None else None
        if spec is not None:
            return spec  # type: ignore[no-any-return]
    return None


def _take_out_placeholders(package: str) -> None:
    for name, module in list(sys.modules.items()):
        if name != package and not name.startswith(package + "."):
            continue
        namespace = vars(module)
        lazy = {
            key: value.placeholder_for
            for key, value in namespace.items()
            if type(value) is Placeholder
        }
        if lazy:
            for key in lazy:
                del namespace[key]
            namespace["__getattr__"] = _lazy_getattr(module, lazy)


def _lazy_getattr(module: types.ModuleType, lazy: dict[str, tuple[str, str]]) -> Any:
    """A module's ``__getattr__`` for the names ``lazy`` took out of it."""
    namespace = vars(module)
    own = namespace.get("__getattr__")

    def __getattr__(name: str) -> Any:
        where = lazy.get(name)
        if where is None:
            if own is not None:
                return own(name)
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        value = getattr(sys.modules[where[0]], where[1])  # runs the module's code
        namespace[name] = value
        return value

    return __getattr__
