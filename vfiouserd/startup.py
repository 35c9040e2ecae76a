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
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from typing import Any

# What trio and construct import for what a daemon never does.
NEVER_USED = ("ssl", "idna", "subprocess", "pdb", "pickle")

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
