#!/usr/bin/env python3
"""Build the tiny test guest: a Debian cloud kernel and a busybox initramfs.

Packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` under ``.cache/`` (nothing is installed into the system).
The initramfs holds busybox-static, the virtio modules, ``blkdiscard`` from
the host (for BLKZEROOUT / write-zeroes), Debian's ``nvme`` (nvme-cli, with
the libraries it loads), ``relay`` (a netcat for vsock and TCP, built static
from guest/relay.c) and ``guest/init``. Tests append a second cpio archive
with their own ``/test.sh``.

Outputs: .cache/guest/vmlinuz and .cache/guest/initramfs.cpio. Re-running is
cheap: nothing is rebuilt unless an input changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
DEBS = CACHE / "debs"
OUT = CACHE / "guest"
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
# uio_pci_generic: a generic driver that counts a PCI device's INTx interrupts
# (the example device has no driver of its own); loaded by the tests that use it.
MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
    "virtio_input",
    "evdev",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    "uio_pci_generic",
]
HOST_TOOLS = ["/usr/sbin/blkdiscard"]
# nvme-cli, unpacked from these packages (not installed on the host); the
# libraries it needs beyond them (libc, zlib, libcrypto, libsystemd's) come
# from the host, the same Debian release.
NVME_CLI_PACKAGES = ["nvme-cli", "libnvme1", "libjson-c5", "libdbus-1-3"]
NVME_CLI = "usr/sbin/nvme"
MULTIARCH_LIBS = "lib/x86_64-linux-gnu"
# Built here, static, for the guest: busybox has no AF_VSOCK client.
GUEST_PROGRAMS = [ROOT / "guest" / "relay.c"]


def run(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def kernel_package() -> str:
    """The versioned image package the cloud-kernel metapackage points at."""
    for line in run("apt-cache", "depends", KERNEL_META).splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    raise RuntimeError(f"cannot resolve {KERNEL_META}; run apt-get update")


def candidate(package: str) -> str:
    return run("apt-cache", "policy", package).split("Candidate:")[1].split()[0]


def download(package: str) -> Path:
    """apt-get download into .cache/debs (cached by exact version)."""
    DEBS.mkdir(parents=True, exist_ok=True)
    version = candidate(package)
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
    found = sorted(DEBS.glob(pattern))
    if not found:
        subprocess.run(
            ["apt-get", "download", f"{package}={version}"],
            cwd=DEBS,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        found = sorted(DEBS.glob(pattern))
    if not found:
        raise RuntimeError(f"apt-get download {package} produced no {pattern}")
    return found[-1]


def extract(deb: Path, into: Path) -> Path:
    if not into.exists():
        tmp = into.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run("dpkg-deb", "-x", str(deb), str(tmp))
        tmp.rename(into)
    return into


def library_closure(binary: str, search: list[Path] | None = None) -> list[str]:
    """The shared libraries ``binary`` loads (ldd), including the loader;
    ``search``: folders looked in before the host's."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(map(str, search))} if search else None
    listed = subprocess.run(
        ["ldd", binary], check=True, capture_output=True, text=True, env=env
    ).stdout
    missing = [line.split()[0] for line in listed.splitlines() if "not found" in line]
    if missing:
        raise RuntimeError(f"{binary} needs {missing}, which the host does not have")
    libs = []
    for line in listed.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


# -- cpio (newc) ---------------------------------------------------------------


def _cpio_entry(
    name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
    header += b"\0" * (-len(header) % 4)
    return header + data + b"\0" * (-len(data) % 4)


def write_cpio(root: Path, target: Path, extra_nodes: bool = True) -> None:
    """Pack ``root`` as a newc archive (what the kernel unpacks as initramfs)."""
    chunks = []
    ino = 1
    if extra_nodes:
        chunks.append(_cpio_entry("dev", stat.S_IFDIR | 0o755, b"", ino))
        chunks.append(_cpio_entry("dev/console", stat.S_IFCHR | 0o600, b"", ino + 1, (5, 1)))
        ino += 2
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = Path(directory) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                data = os.readlink(path).encode()
            elif stat.S_ISREG(info.st_mode):
                data = path.read_bytes()
            else:
                data = b""
            chunks.append(_cpio_entry(str(path.relative_to(root)), info.st_mode, data, ino))
            ino += 1
    chunks.append(_cpio_entry("TRAILER!!!", 0, b"", 0))
    target.write_bytes(b"".join(chunks))


def script_archive(script: str) -> bytes:
    """A one-file cpio holding /test.sh, to append to the initramfs."""
    return _cpio_entry("test.sh", stat.S_IFREG | 0o755, script.encode(), 1) + _cpio_entry(
        "TRAILER!!!", 0, b"", 0
    )


# -- build -----------------------------------------------------------------------


def build() -> tuple[Path, Path]:
    init = (ROOT / "guest" / "init").read_bytes()
    kernel_pkg = kernel_package()
    inputs = {
        "kernel": kernel_pkg,
        "busybox": run("apt-cache", "policy", BUSYBOX).split("Candidate:")[1].split()[0],
        "init": hashlib.sha256(init).hexdigest(),
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "tools": [hashlib.sha256(Path(t).read_bytes()).hexdigest() for t in HOST_TOOLS],
        "programs": [hashlib.sha256(p.read_bytes()).hexdigest() for p in GUEST_PROGRAMS],
        "nvme_cli": [candidate(p) for p in NVME_CLI_PACKAGES],
    }
    stamp = OUT / "inputs.json"
    vmlinuz, initramfs = OUT / "vmlinuz", OUT / "initramfs.cpio"
    if stamp.exists() and json.loads(stamp.read_text()) == inputs and initramfs.exists():
        return vmlinuz, initramfs

    kernel_root = extract(download(kernel_pkg), CACHE / "unpacked" / kernel_pkg)
    busybox_root = extract(download(BUSYBOX), CACHE / "unpacked" / BUSYBOX)
    version = next((kernel_root / "lib" / "modules").iterdir()).name
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(kernel_root / "boot" / f"vmlinuz-{version}", vmlinuz)

    staging = OUT / f"root.{os.getpid()}"  # test runs in parallel may build at once
    shutil.rmtree(staging, ignore_errors=True)
    for d in ("bin", "sbin", "proc", "sys", "tmp", "run", "mnt"):
        (staging / d).mkdir(parents=True)
    busybox = staging / "bin" / "busybox"
    shutil.copy(busybox_root / "bin" / "busybox", busybox)
    (staging / "init").write_bytes(init)
    (staging / "init").chmod(0o755)

    # Modules: those named plus their dependencies, with busybox's depmod.
    modules_src = kernel_root / "lib" / "modules" / version
    run(str(busybox), "depmod", "-b", str(kernel_root), version)
    deps: dict[str, list[str]] = {}
    for line in (modules_src / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    wanted: set[str] = set()
    for module in MODULES:
        match = [m for m in deps if Path(m).name.replace("-", "_") == f"{module}.ko"]
        if not match:
            raise RuntimeError(f"kernel {version} has no module {module}")
        wanted.add(match[0])
        wanted.update(deps[match[0]])
    for module in wanted:
        target = staging / "lib" / "modules" / version / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(modules_src / module, target)
    run(str(busybox), "depmod", "-b", str(staging), version)

    # Host tools with their libraries (same Debian release as the kernel).
    for tool in HOST_TOOLS:
        for path in [tool, *library_closure(tool)]:
            target = staging / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    add_nvme_cli(staging)
    for source in GUEST_PROGRAMS:
        run("gcc", "-static", "-O2", "-Wall", "-o", str(staging / "bin" / source.stem), str(source))
    lib64 = staging / "lib64"
    if not lib64.exists() and (staging / "usr" / "lib64").exists():
        lib64.symlink_to("usr/lib64")

    partial = initramfs.with_suffix(f".{os.getpid()}")
    write_cpio(staging, partial)
    partial.replace(initramfs)  # whole, or not at all, for a run reading it meanwhile
    shutil.rmtree(staging)
    stamp.write_text(json.dumps(inputs))
    return vmlinuz, initramfs


def add_nvme_cli(staging: Path) -> None:
    """nvme-cli at /usr/sbin/nvme, its packages' libraries beside the host's."""
    roots = [
        extract(deb, CACHE / "unpacked" / deb.stem) for deb in map(download, NVME_CLI_PACKAGES)
    ]
    own = [root / "usr" / MULTIARCH_LIBS for root in roots] + [
        root / MULTIARCH_LIBS for root in roots
    ]
    binary = roots[0] / NVME_CLI
    target = staging / NVME_CLI
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(binary, target)
    for path in library_closure(str(binary), [d for d in own if d.is_dir()]):
        packaged = any(Path(path).is_relative_to(d) for d in own)
        # The guest's loader finds both kinds in its multiarch folder.
        target = staging / (f"{MULTIARCH_LIBS}/{Path(path).name}" if packaged else path.lstrip("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


if __name__ == "__main__":
    kernel, initrd = build()
    print(
        f"guest kernel: {kernel}\nguest initramfs: {initrd} ({initrd.stat().st_size // 1024} KiB)",
        file=sys.stderr,
    )
