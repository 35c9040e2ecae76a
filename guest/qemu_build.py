#!/usr/bin/env python3
"""Build a QEMU with ``vfio-user-pci`` from Debian's source package.

No QEMU in Debian 12 has a vfio-user client; Debian unstable's source
package does (QEMU >= 10.1). This fetches it with ``apt-get source``
through a private sources list, lists and cache (the system's apt set-up
is untouched), builds only ``x86_64-softmmu`` with a meson from PyPI, and
adds the firmware the ``+ds`` tarball leaves out: SeaBIOS and iPXE from
Debian's packages (``dpkg-deb -x``, never installed) and the option ROMs
``-kernel`` needs, built from the same source.

The result lives outside the clone, keyed by version and by this recipe:
``$VFIOUSERD_CACHE`` (default ``~/.cache/vfiouserd``)``/qemu/<version>-<recipe>/``.
A second run, or a CI run on the same machine, reuses it. The newest
version whose binary lists ``vfio-user-pci`` wins; older ones are tried only
if a newer one fails to build or lacks the device.

Prints the path of ``qemu-system-x86_64`` on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("VFIOUSERD_CACHE", Path.home() / ".cache" / "vfiouserd"))
QEMU_ROOT = CACHE / "qemu"
APT = QEMU_ROOT / "apt"
SOURCES = "deb-src http://deb.debian.org/debian unstable main\n"
# The oldest QEMU whose vfio-user-pci client works with our devices.
MINIMUM = "1:10.1"
FIRMWARE_PACKAGES = {
    "seabios": ["usr/share/seabios/bios-256k.bin", "usr/share/seabios/bios.bin"],
    "ipxe-qemu": [
        "usr/lib/ipxe/qemu/efi-virtio.rom",
        "usr/lib/ipxe/qemu/efi-e1000.rom",
        "usr/lib/ipxe/qemu/efi-e1000e.rom",
    ],
}
CONFIGURE = [
    "--target-list=x86_64-softmmu",
    "--disable-docs",
    "--disable-install-blobs",
    "--disable-werror",
    "--disable-user",
    "--disable-gtk",
    "--disable-sdl",
    "--disable-vnc",
    "--disable-spice",
    "--disable-opengl",
    "--disable-xen",
    "--disable-guest-agent",
    "--disable-tools",
    "--enable-vhost-user",
    "--enable-linux-aio",
    "--disable-download",  # every dependency comes from Debian; no git subprojects
]
# Only in some versions; used when configure knows them.
CONFIGURE_IF_KNOWN = ["--disable-rust"]


def log(message: str) -> None:
    print(f"qemu-build: {message}", file=sys.stderr, flush=True)


def run(*cmd: str | Path, cwd: Path | None = None, quiet: bool = False) -> str:
    result = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if quiet else None,
    )
    if result.returncode != 0:
        tail = result.stdout[-4000:] if result.stdout else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{tail}")
    return result.stdout


def apt_options() -> list[str]:
    """Private sources, lists and caches: the system's apt is not touched."""
    return [
        f"-o=Dir::Etc::sourcelist={APT / 'sources.list'}",
        "-o=Dir::Etc::sourceparts=-",
        f"-o=Dir::State::Lists={APT / 'lists'}",
        f"-o=Dir::Cache={APT / 'cache'}",
        "-o=APT::Get::List-Cleanup=0",
    ]


def refresh_sources() -> None:
    (APT / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (APT / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (APT / "sources.list").write_text(SOURCES)
    run("apt-get", *apt_options(), "-q", "update", quiet=True)


def version_key(version: str) -> object:
    """Debian version order, through dpkg itself."""

    class Key:
        def __init__(self, v: str) -> None:
            self.v = v

        def __lt__(self, other: Key) -> bool:
            return (
                subprocess.run(["dpkg", "--compare-versions", self.v, "lt", other.v]).returncode
                == 0
            )

    return Key(version)


def candidate_versions() -> list[str]:
    """Source versions of qemu in unstable, newest first, at least MINIMUM."""
    text = run("apt-cache", *apt_options(), "showsrc", "qemu")
    versions = {
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Version:")
    }
    usable = [v for v in versions if not version_key(v) < version_key(MINIMUM)]
    return sorted(usable, key=version_key, reverse=True)  # type: ignore[arg-type]


# Raise when a build step changes in a way the lists above do not show.
RECIPE_VERSION = 1


def recipe_hash() -> str:
    """What the build depends on besides the QEMU version: a new hash, a new build."""
    recipe = [RECIPE_VERSION, CONFIGURE, CONFIGURE_IF_KNOWN, FIRMWARE_PACKAGES]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]


def prefix_for(version: str) -> Path:
    return QEMU_ROOT / f"{version.split(':')[-1]}-{recipe_hash()}"


def binary(prefix: Path) -> Path:
    return prefix / "bin" / "qemu-system-x86_64"


def has_vfio_user(qemu: Path) -> bool:
    out = subprocess.run(
        [str(qemu), "-device", "help"], capture_output=True, text=True, check=False
    ).stdout
    return '"vfio-user-pci"' in out


def cached() -> Path | None:
    """The newest finished build of this recipe, without looking at the network."""
    builds = []
    for stamp in QEMU_ROOT.glob(f"*-{recipe_hash()}/build.json"):
        info = json.loads(stamp.read_text())
        if binary(stamp.parent).exists():
            builds.append((info["version"], stamp.parent))
    if not builds:
        return None
    builds.sort(key=lambda b: version_key(b[0]), reverse=True)  # type: ignore[arg-type]
    return binary(builds[0][1])


def fetch_source(version: str, into: Path) -> Path:
    """apt-get source (download only), then dpkg-source -x with Debian's patches."""
    downloads = QEMU_ROOT / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    upstream = version.split(":")[-1]
    dsc = downloads / f"qemu_{upstream}.dsc"
    if not dsc.exists():
        log(f"downloading the qemu {version} source package")
        run(
            "apt-get",
            *apt_options(),
            "-q",
            "source",
            "--download-only",
            f"qemu={version}",
            cwd=downloads,
            quiet=True,
        )
    run("dpkg-source", "--no-check", "-x", dsc, into, quiet=True)
    return into


def firmware(into: Path) -> None:
    """SeaBIOS and iPXE from Debian 12's packages, unpacked, never installed."""
    with tempfile.TemporaryDirectory(prefix="qemu-firmware-") as tmp:
        for package, files in FIRMWARE_PACKAGES.items():
            run("apt-get", "-q", "download", package, cwd=Path(tmp), quiet=True)
            deb = next(Path(tmp).glob(f"{package}_*.deb"))
            unpacked = Path(tmp) / package
            run("dpkg-deb", "-x", deb, unpacked)
            for name in files:
                shutil.copy(unpacked / name, into / Path(name).name)


def build(version: str) -> Path:
    prefix = prefix_for(version)
    work = QEMU_ROOT / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(prefix, ignore_errors=True)
    work.mkdir(parents=True)
    source = fetch_source(version, work / "src")

    tools = work / "venv"
    run(sys.executable, "-m", "venv", tools)
    run(tools / "bin" / "pip", "install", "-q", "meson>=1.5", quiet=True)
    env_path = f"{tools / 'bin'}:{os.environ['PATH']}"

    known = run(source / "configure", "--help", cwd=source)
    options = CONFIGURE + [o for o in CONFIGURE_IF_KNOWN if o.split("=")[0] in known]
    builddir = work / "build"
    builddir.mkdir()
    log(f"configuring qemu {version}")
    subprocess.run(
        [
            str(source / "configure"),
            f"--prefix={prefix}",
            f"--python={tools / 'bin' / 'python3'}",
            *options,
        ],
        cwd=builddir,
        check=True,
        env={**os.environ, "PATH": env_path},
        stdout=subprocess.DEVNULL,
    )
    log(f"building qemu {version} (several minutes)")
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["make", f"-j{jobs}"],
        cwd=builddir,
        check=True,
        env={**os.environ, "PATH": env_path},
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["make", "install"],
        cwd=builddir,
        check=True,
        env={**os.environ, "PATH": env_path},
        stdout=subprocess.DEVNULL,
    )

    datadir = prefix / "share" / "qemu"
    datadir.mkdir(parents=True, exist_ok=True)
    roms = list((builddir / "pc-bios" / "optionrom").glob("*.bin"))
    if not any(rom.name == "linuxboot_dma.bin" for rom in roms):
        raise RuntimeError("the option ROMs were not built (is gcc-multilib installed?)")
    for rom in roms:
        shutil.copy(rom, datadir / rom.name)
    firmware(datadir)

    qemu = binary(prefix)
    if not has_vfio_user(qemu):
        raise RuntimeError(f"qemu {version} was built without vfio-user-pci")
    (prefix / "build.json").write_text(json.dumps({"version": version, "recipe": recipe_hash()}))
    shutil.rmtree(work, ignore_errors=True)
    for old in QEMU_ROOT.glob("*/build.json"):  # builds of other recipes are of no use now
        if old.parent != prefix and json.loads(old.read_text())["recipe"] != recipe_hash():
            shutil.rmtree(old.parent, ignore_errors=True)
    return qemu


def ensure() -> Path:
    found = cached()
    if found is not None:
        return found
    refresh_sources()
    errors = []
    for version in candidate_versions():
        try:
            return build(version)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            log(f"qemu {version} is not usable: {exc}")
            errors.append(f"{version}: {exc}")
    raise SystemExit("no QEMU with vfio-user-pci could be built:\n" + "\n".join(errors))


if __name__ == "__main__":
    print(ensure())
