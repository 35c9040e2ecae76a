"""vfiouserd installed as a user installs it: a venv of Debian's
``/usr/bin/python3`` with the package from a copy of the sources (not
editable, so no import hook of an editable install), its ``.pyc`` files and
its generated code compiled (``python -m vfiouserd.generated_code``).

The real systemd of the tests installs it so in its ``/usr/local``
(tests/real_systemd.py); the footprint benchmark measures daemons of such a
venv (``installed_venv``), cached outside the clone, keyed by the sources.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VFIOUSERD_CACHE", Path.home() / ".cache" / "vfiouserd"))
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, as the units run it
# Built in place (the jail's waiter, like the .so files): not a source.
WAITER = "vfiouserd-waiter"
PACKAGE_SOURCES = [
    "pyproject.toml",
    "setup.py",
    "vfiouserd",
    "protocol",
    "devices",
    "sandbox",
    "systemd",
]


def _is_source(file: Path) -> bool:
    return not ("__pycache__" in file.parts or file.suffix in (".so", ".o") or file.name == WAITER)


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in PACKAGE_SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if _is_source(file):
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def copy_sources(destination: Path) -> None:
    """What pip installs from (a copy: building in the clone would leave
    build/ and .egg-info there)."""
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    junk = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info", WAITER)
    for name in [*PACKAGE_SOURCES, "README.md"]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, destination / name, ignore=junk)
        else:
            shutil.copy(ROOT / name, destination / name)


def install_steps(venv: str, source: str) -> list[list[str]]:
    """The commands that install vfiouserd from ``source`` into a new venv
    ``venv``, as a user would: Debian's Python, pip (not editable), then the
    generated code (``-P``: from the venv, never from a clone the working
    directory may be, whose vfiouserd/ would be imported instead)."""
    pip = ["env", f"PIP_CACHE_DIR={CACHE / 'pip'}", "PIP_DISABLE_PIP_VERSION_CHECK=1"]
    return [
        [SYSTEM_PYTHON, "-m", "venv", venv],
        [*pip, f"{venv}/bin/python3", "-m", "pip", "install", "-q", source],
        [f"{venv}/bin/python3", "-P", "-m", "vfiouserd.generated_code"],
    ]


def installed_venv() -> Path:
    """A venv of Debian's Python with this tree's vfiouserd installed, made
    once for these sources (the previous one is removed). Its program is
    ``bin/vfiouserd``: ``python -m vfiouserd`` run in the clone would import
    the clone's vfiouserd/."""
    venv = CACHE / "installed" / source_hash()
    if (venv / "complete").exists():
        return venv
    for old in venv.parent.glob("*"):
        shutil.rmtree(old, ignore_errors=True)
    source = venv.parent / f"{venv.name}.source"
    copy_sources(source)
    try:
        for step in install_steps(str(venv), str(source)):
            subprocess.run(step, check=True, timeout=900)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    (venv / "complete").write_text(source_hash())
    return venv
