"""What a daemon imports before it serves: only its device and its protocol.

Every module costs each device process start-up time and memory (one process
per device), so the daemon must not load the clients, the other protocol,
the other device plugins or heavy standard modules it never uses. Not timed:
the modules themselves are checked, in the program stopped where it would
enter the jail (after which it can import nothing), and in a real daemon,
jailed and serving. The modules trio and construct import for what a daemon
never does stay in sys.modules unloaded, and ldconfig does not run (see
vfiouserd.startup).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from daemon import Daemon

from vfiouserd import plugins, startup

ROOT = Path(__file__).resolve().parent.parent

# The program (vfiouserd.__main__, unchanged) up to jail.enter: then the
# modules it has loaded (not those still deferred) and the programs it ran,
# and out. jail.enter is replaced as soon as the jail module defines it (an
# audit hook sees every import), so the program imports in its own order.
PROBE = """
import json, os, sys

programs = []

def enter(options):
    from vfiouserd import startup
    left_out = {name for name, module in sys.modules.items() if module is None}
    loaded = set(sys.modules) - set(startup.still_deferred()) - left_out
    sys.stdout.write(json.dumps({"modules": sorted(loaded), "programs": programs}))
    sys.stdout.flush()
    os._exit(0)

def hook(event, args):
    if event == "subprocess.Popen":
        programs.append(os.fsdecode(args[0]))
    jail = sys.modules.get("vfiouserd.sandbox.jail")
    if jail is not None and vars(jail).get("enter", enter) is not enter:
        jail.enter = enter

sys.addaudithook(hook)
from vfiouserd import __main__ as program
sys.exit(program.main(sys.argv[1:]))
"""

# Never needed to serve, whatever the device: the clients, standard modules
# only a configuration file or a tool reads (importlib.metadata and the email
# package it loads: plugins.entry_points reads entry points itself), the
# modules deferred for trio and construct, trio's parts a daemon does not use
# and what they would bring (hmac), OpenSSL's hashlib, and shutil with bz2
# and lzma (argparse's terminal width).
NEVER = (
    "vfiouserd.client",
    "vfiouserd.config",
    "tomllib",
    "shlex",
    "importlib.metadata",
    "importlib.resources",
    "email",
    *startup.NEVER_USED,
    *startup.TRIO_UNUSED,
    *startup.LEFT_OUT,
    "hmac",
    "shutil",
    "bz2",
    "lzma",
)
VHOST_USER = ("vfiouserd.vhost_user", "vfiouserd.protocol.vhost_user")
VFIO_USER = ("vfiouserd.vfio_user", "vfiouserd.protocol.vfio_user", "vfiouserd.devices.pci")
PLUGINS = ("blk", "rng", "input", "console", "vsock", "net", "example", "nvme")


def modules_before_the_jail(tmp_path, subcommand: str, *options: str) -> set[str]:
    command = [sys.executable, "-c", PROBE, subcommand, "--socket-path", str(tmp_path / "s")]
    done = subprocess.run(
        [*command, "--no-control", *options], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)
    assert probe["programs"] == []  # ldconfig for ctypes.util.find_library, say
    return set(probe["modules"])


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def other_plugins(*served: str) -> tuple[str, ...]:
    return tuple(f"vfiouserd.devices.{name}" for name in PLUGINS if name not in served)


@pytest.mark.parametrize(
    ("subcommand", "options", "needed", "not_needed"),
    [
        (
            "vhost-user-blk",
            ("--size", "1M"),
            ("vfiouserd.devices.blk", "vfiouserd.vhost_user.backend"),
            (*VFIO_USER, "vfiouserd.virtio_pci", *other_plugins("blk")),
        ),
        (
            "vhost-user-rng",
            (),
            ("vfiouserd.devices.rng", "vfiouserd.vhost_user.backend"),
            (*VFIO_USER, "vfiouserd.virtio_pci", *other_plugins("rng")),
        ),
        (
            "vfio-user-blk",
            ("--size", "1M"),
            ("vfiouserd.devices.blk", "vfiouserd.vfio_user.session", "vfiouserd.virtio_pci"),
            (*VHOST_USER, *other_plugins("blk")),
        ),
        (
            # NVMe reuses the disk's image handling (devices.blk), no rings.
            "vfio-user-nvme",
            ("--namespace", "{tmp}/disk.img", "--size", "1M"),
            ("vfiouserd.devices.nvme.controller", "vfiouserd.vfio_user.session"),
            (
                *VHOST_USER,
                "vfiouserd.virtio_pci",
                "vfiouserd.virtqueue",
                *other_plugins("nvme", "blk"),
            ),
        ),
    ],
)
def test_a_daemon_imports_only_its_device_and_protocol(
    tmp_path, subcommand, options, needed, not_needed
):
    options = [option.format(tmp=tmp_path) for option in options]
    modules = modules_before_the_jail(tmp_path, subcommand, *options)
    assert loaded(modules, needed) == sorted(needed)  # the probe stopped where it should
    assert loaded(modules, NEVER + not_needed) == []


def test_plugins_are_the_entry_points_importlib_metadata_finds(tmp_path, monkeypatch):
    # A distribution shadowing the installed vfiouserd (the first on the path
    # wins, whatever the spelling of its name) and a third-party plugin.
    shadow = tmp_path / "first" / "VFIOUSERD-9.0.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: VFIOUSERD\nVersion: 9.0\n")
    (shadow / "entry_points.txt").write_text("[vfiouserd.devices]\nblk = elsewhere:Blk\n")
    third = tmp_path / "last" / "third_party-1.0.dist-info"
    third.mkdir(parents=True)
    (third / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party\nVersion: 1.0\n")
    (third / "entry_points.txt").write_text(
        "[console_scripts]\nx = a:b\n\n# a comment\n[vfiouserd.devices]\n"
        "mine = third.party:Device [extra]\n  spaced=third.party : Other\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "first"))
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path / "last")])
    expected = [(e.name, e.value) for e in entry_points(group=plugins.ENTRY_POINT_GROUP)]
    assert plugins.entry_points() == expected
    assert ("blk", "elsewhere:Blk") in expected
    assert ("mine", "third.party:Device [extra]") in expected


# What loading each deferred module would import through the import system,
# as -X importtime lists it (the deferred module itself runs in place).
LOADED_WITH = {
    "ssl": "_ssl",
    "idna": "idna.core",
    "subprocess": "_posixsubprocess",
    "pdb": "bdb",
    "pickle": "_pickle",
}


def test_a_jailed_daemon_has_not_loaded_the_deferred_modules(tmp_path):
    assert sorted(LOADED_WITH) == sorted(startup.NEVER_USED)
    env = {"PYTHONPROFILEIMPORTTIME": "1"}  # -X importtime: each import on stderr
    with Daemon("vhost-user-rng", "--no-control", workdir=tmp_path, env=env) as daemon:
        log = daemon.log()
    assert "event=sandbox.entered" in log
    imported = set(re.findall(r"^import time: .*\| +(\S+)$", log, re.MULTILINE))
    assert {"trio", "construct", "vfiouserd.sandbox.jail"} <= imported  # the report is there
    assert sorted(imported & set(LOADED_WITH.values())) == []


def test_every_program_enters_through_vfiouserd_main():
    # Which defers modules and answers library look-ups before trio and
    # construct are imported.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["scripts"].values()) == {"vfiouserd.__main__:main"}


def test_a_deferred_module_loads_in_place_at_its_first_use(tmp_path):
    (tmp_path / "deferred_example.py").write_text("import sys\nVALUE = 42\nLOADS = 1\n")
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from vfiouserd import startup
assert startup.defer(("deferred_example", "no_such_module_here")) == ["deferred_example"]
import deferred_example
assert startup.still_deferred() == ["deferred_example"]
assert deferred_example.__name__ == "deferred_example"  # has its spec's attributes, unloaded
assert startup.still_deferred() == ["deferred_example"]
from deferred_example import VALUE
assert VALUE == 42 and startup.still_deferred() == []
import deferred_example as again
assert again is deferred_example and again.LOADS == 1 and sys.modules["deferred_example"] is again
try:
    again.missing
except AttributeError:
    pass
else:
    raise AssertionError("a missing attribute")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_deferred_module_that_cannot_load_raises_import_error(tmp_path):
    # As in the jail, where there is no file system left to load it from.
    source = tmp_path / "gone_example.py"
    source.write_text("VALUE = 1\n")
    script = f"""
import os, sys
sys.path.insert(0, {str(tmp_path)!r})
from vfiouserd import startup
startup.defer(("gone_example",))
import gone_example
os.unlink({str(source)!r})
try:
    gone_example.VALUE
except ImportError as exc:
    assert exc.name == "gone_example", exc
    assert startup.still_deferred() == ["gone_example"]
else:
    raise AssertionError("loaded without its source")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# trio's namespaces, and the names each has (its public ones), as a plain
# ``import trio`` makes them and as the program does (unused_parts deferred).
TRIO_NAMES = """
import json, sys
from vfiouserd import startup
if sys.argv[1] == "program":
    startup.defer()
    with startup.unused_parts("trio"):
        import trio
    deferred = startup.still_deferred()
else:
    import trio
    deferred = []
names = {}
for namespace in ("trio", "trio.lowlevel", "trio.socket", "trio.abc", "trio.to_thread",
                  "trio.from_thread"):
    module = sys.modules[namespace]
    public = sorted(n for n in dir(module) if not n.startswith("_"))
    if sys.argv[1] == "program":  # taken out of the namespace: asked for by name
        public = sorted(set(public) | set(sys.argv[2].split()))
    values = {}
    for name in public:
        try:
            value = getattr(module, name)
        except AttributeError:
            continue
        values[name] = [type(value).__name__, getattr(value, "__qualname__", None)]
    names[namespace] = values
print(json.dumps({"names": names, "deferred": deferred,
                  "loaded_after": startup.still_deferred(), "hmac": "hmac" in sys.modules}))
"""


def test_trios_unused_parts_load_when_a_name_of_theirs_is_first_used():
    """Every name trio's namespaces have is there, the same object's type and
    name, though the modules defining some of them ran only when asked."""
    plain = subprocess.run(
        [sys.executable, "-c", TRIO_NAMES, "plain"], capture_output=True, text=True
    )
    assert plain.returncode == 0, plain.stderr
    reference = json.loads(plain.stdout)
    every = " ".join({n for values in reference["names"].values() for n in values})
    done = subprocess.run(
        [sys.executable, "-c", TRIO_NAMES, "program", every], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    program = json.loads(done.stdout)
    assert set(startup.TRIO_UNUSED) <= set(program["deferred"])  # until asked
    assert not set(startup.TRIO_UNUSED) & set(program["loaded_after"])  # then loaded
    assert program["names"] == reference["names"]


def test_a_placeholder_used_while_its_package_is_imported_says_so(tmp_path):
    package = tmp_path / "placeholder_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from ._part import thing\nfrom ._part import other as renamed\n"
        "try:\n    thing()\nexcept ImportError as exc:\n    SAID = str(exc)\n"
    )
    (package / "_part.py").write_text("def thing():\n    return 'real'\nother = 7\n")
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from vfiouserd import startup
with startup.unused_parts("placeholder_pkg", ("placeholder_pkg._part", "placeholder_pkg._none")):
    import placeholder_pkg
assert "used while its package was imported" in placeholder_pkg.SAID, placeholder_pkg.SAID
assert startup.still_deferred() == ["placeholder_pkg._part"]
assert "thing" not in vars(placeholder_pkg)  # taken out, until asked for
assert placeholder_pkg.thing() == "real" and placeholder_pkg.renamed == 7
assert startup.still_deferred() == [] and placeholder_pkg._part.other == 7
try:
    placeholder_pkg.missing
except AttributeError as exc:
    assert "missing" in str(exc)
else:
    raise AssertionError("a missing name")
with startup.unused_parts("never_imported_pkg", ("never_imported_pkg._x",)):
    pass
assert "never_imported_pkg._x" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_hashlib_without_openssl_has_what_devices_use():
    """_hashlib left out, hashlib serves its algorithms from the interpreter's
    own modules, all loaded with it (before the jail), with the same digests."""
    import hashlib

    expected = {name: hashlib.new(name, b"vfiouserd").hexdigest() for name in ("md5", "sha256")}
    script = """
import json, sys
from vfiouserd import startup
assert startup.leave_out() == ["_hashlib"]
import hashlib, uuid
loaded = sorted(n for n in sys.modules if n.startswith(("_md5", "_sha", "_blake2")))
digests = {name: hashlib.new(name, b"vfiouserd").hexdigest() for name in ("md5", "sha256")}
assert hashlib.sha256(b"x").digest() == hashlib.new("sha256", b"x").digest()
print(json.dumps({"digests": digests, "loaded": loaded, "openssl": sys.modules["_hashlib"]}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["digests"] == expected and result["openssl"] is None
    assert {"_md5", "_sha256", "_sha512", "_blake2"} <= set(result["loaded"])


def test_known_libraries_are_found_without_ldconfig():
    script = """
import ctypes.util, json, os, sys
from vfiouserd import startup

programs = []
sys.addaudithook(lambda event, args: programs.append(1) if event == "subprocess.Popen" else None)
names = sorted(startup.SONAMES)
slow = [ctypes.util.find_library(name) for name in names]
ran = len(programs)
with startup.known_libraries():
    fast = [ctypes.util.find_library(name) for name in names]
    fast_ran = len(programs) - ran
    ctypes.util.find_library("m")  # any other name: as before
    other_ran = len(programs) - ran - fast_ran
restored = ctypes.util.find_library("c") and len(programs) > ran + fast_ran + other_ran
print(json.dumps([slow, fast, ran, fast_ran, other_ran, bool(restored)]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    slow, fast, ran, fast_ran, other_ran, restored = json.loads(done.stdout)
    assert fast == slow and None not in fast  # what ldconfig says, here
    assert ran > 0 and fast_ran == 0 and other_ran > 0 and restored


@pytest.mark.parametrize("subcommand", ["vhost-user-blk", "vfio-user-nvme"])
def test_a_daemon_compiles_almost_none_of_the_code_its_libraries_generate(tmp_path, subcommand):
    """attrs' methods (trio's classes), dataclasses' and namedtuple's come
    from the file ``make bytecode`` writes (vfiouserd.generated_code), as
    modules come from .pyc files; only what is new at every start (attrs puts
    the process's hash seed into each ``__hash__`` it writes) is compiled."""
    subprocess.run([sys.executable, "-m", "vfiouserd.generated_code"], check=True, timeout=60)
    options = ("--blk-file", str(tmp_path / "d.img")) if "blk" in subcommand else ()
    options += ("--namespace", str(tmp_path / "d.img")) if "nvme" in subcommand else ()
    arguments = (*options, "--size", "1M", "--no-control", "--log-level", "debug")
    with Daemon(subcommand, *arguments, workdir=tmp_path) as daemon:
        log = daemon.log()
    assert "event=sandbox.entered" in log, log
    found = re.search(r"event=startup.generated_code hits=(\d+) misses=(\d+)", log)
    assert found is not None, log
    hits, misses = int(found[1]), int(found[2])
    assert hits >= 150 and misses <= hits // 4, (hits, misses)
    # And the modules' code without docstrings (vfiouserd.module_code), from
    # the file the same command writes: every module but those imported
    # before the program's first step, none stale.
    found = re.search(r"event=startup.module_code used=(\d+) stale=(\d+)", log)
    assert found is not None, log
    assert int(found[1]) >= 150 and int(found[2]) == 0, found[0]


def test_ctypes_util_stays_deferred_while_only_known_libraries_are_asked_for():
    """Its imports (shutil, subprocess, tempfile) are for ldconfig: not
    loaded for the names known_libraries answers; loaded, in place, for any
    other; and after the context, ctypes.util is the real module either way."""
    script = """
import json, sys
from vfiouserd import startup

programs = []
sys.addaudithook(lambda event, args: programs.append(1) if event == "subprocess.Popen" else None)
results = {}
with startup.known_libraries():
    import ctypes.util
    results["known"] = ctypes.util.find_library("c")
    results["deferred"] = startup.still_deferred() == ["ctypes.util"]
    results["no shutil"] = "shutil" not in sys.modules and programs == []
    results["other"] = ctypes.util.find_library("m") is not None and len(programs) > 0
    results["loaded"] = startup.still_deferred() == [] and "shutil" in sys.modules
    ran = len(programs)
    results["known again"] = ctypes.util.find_library("c") == "libc.so.6" and len(programs) == ran
results["real after"] = ctypes.util.find_library.__module__ == "ctypes.util"
with startup.known_libraries():  # and when it is still deferred at the end
    pass
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results == {
        "known": "libc.so.6",
        "deferred": True,
        "no shutil": True,
        "other": True,
        "loaded": True,
        "known again": True,
        "real after": True,
    }
    script = """
from vfiouserd import startup
with startup.known_libraries():
    import ctypes.util
    assert ctypes.util.find_library("pthread") == "libpthread.so.0"
assert startup.still_deferred() == ["ctypes.util"]
assert ctypes.util.find_library.__module__ == "ctypes.util"  # loaded now, the real one
assert startup.still_deferred() == [] and ctypes.util.find_library("c")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
