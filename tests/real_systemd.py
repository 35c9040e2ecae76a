"""A real systemd for the tests: PID 1 of a private PID and mount namespace.

PID 1 on the test machines is not systemd, but a real systemd runs as PID 1
of its own namespaces (``unshare --pid --fork --mount``) with fresh ``/run``,
``/tmp`` and ``/var/tmp``, and overlays on ``/etc``, ``/var/lib``, ``/var/log``
and ``/usr/local``, so nothing it or a test writes reaches the host: units
and configuration files go to ``/etc``, a dynamic user's images to
``/var/lib``, and vfiouserd itself to ``/usr/local``, installed as a user
would (a venv of Debian's ``/usr/bin/python3``, not editable, readable by a
dynamic user; cached outside the clone, keyed by the package's sources).

``systemctl``, ``systemd-run``, ``journalctl`` and anything else run inside
through ``nsenter``; the host reaches the namespace's files through
``/proc/PID/root`` (a QEMU on the host connects to a unit's socket there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from installation import CACHE, ROOT, copy_sources, install_steps, source_hash

INSTALL_CACHE = CACHE / "systemd-usr-local"
VENV = "/usr/local/lib/vfiouserd"
# Runs as PID 1 of the new namespaces, then becomes systemd.
INIT = """#!/bin/sh
set -eu
exec 3>"$LAYERS/systemd.out"  # opened now: /tmp is hidden below
mount --make-rprivate /
overlay() {  # DIR UPPER WORK: writes to DIR land in UPPER, the host's DIR stays as it is
    mkdir -p "$2" "$3"
    mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$1"
}
overlay /etc "$LAYERS/etc" "$LAYERS/etc.work"
overlay /var/lib "$LAYERS/var-lib" "$LAYERS/var-lib.work"
overlay /var/log "$LAYERS/var-log" "$LAYERS/var-log.work"
overlay /usr/local "$INSTALL/upper" "$INSTALL/work"
for dir in /run /tmp /var/tmp; do
    mount -t tmpfs -o mode=755 tmpfs "$dir"
done
chmod 1777 /tmp /var/tmp
mount -t proc proc /proc
export container=other
exec /lib/systemd/systemd --system --unit=basic.target </dev/null >&3 2>&3
"""


class RealSystemd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.layers = workdir / "layers"
        self.install = INSTALL_CACHE / source_hash()
        self.unshare: subprocess.Popen | None = None
        self.pid = 0

    # -- life ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> RealSystemd:
        self.layers.mkdir(parents=True, exist_ok=True)
        fresh_install = not (self.install / "complete").exists()
        if fresh_install:
            shutil.rmtree(self.install, ignore_errors=True)
            for old in INSTALL_CACHE.glob("*"):  # one cached installation is enough
                shutil.rmtree(old, ignore_errors=True)
        self.install.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.layers / "unshare.err", "wb")  # noqa: SIM115 - closed in stop()
        init = self.layers / "init.sh"
        init.write_text(INIT)
        init.chmod(0o755)
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", str(init)],
            env={
                "PATH": os.environ["PATH"],
                "LAYERS": str(self.layers),
                "INSTALL": str(self.install),
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.pid:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
            if children.exists() and children.read_text().split():
                self.pid = int(children.read_text().split()[0])
            elif self.unshare.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not start: {self._errors()}")
            else:
                time.sleep(0.02)
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if self.unshare.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd is {state!r}: {self._errors()}")
            time.sleep(0.1)
        if fresh_install:
            self._install_vfiouserd()
        self._install_units()
        return self

    def _errors(self) -> str:
        texts = [
            (self.layers / n).read_text(errors="replace")
            for n in ("unshare.err", "systemd.out")
            if (self.layers / n).exists()
        ]
        return "\n".join(texts)[-3000:]

    def stop(self) -> None:
        """SIGKILL to PID 1 of the namespace ends everything in it."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
        if self.unshare is not None:
            self.unshare.wait(30)
            self._stderr.close()
        self.pid = 0

    def __enter__(self) -> RealSystemd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside ---------------------------------------------------------------------------

    def run(
        self, *command: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "LANG": "C.UTF-8",
                "SYSTEMD_PAGER": "",
                "SYSTEMD_COLORS": "0",
            },
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)}: status {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def path(self, inside: str) -> str:
        """A path inside the namespace as the host reaches it."""
        return f"/proc/{self.pid}/root{inside}"

    def write(self, inside: str, text: str) -> None:
        self.run("mkdir", "-p", os.path.dirname(inside))
        self.run("tee", inside, input=text)

    # -- set-up ---------------------------------------------------------------------------

    def _install_vfiouserd(self) -> None:
        """A venv of Debian's Python with the package (not editable), in the
        /usr/local overlay whose upper layer is the cache. The sources are
        copied next to it first: the clone may be under /tmp, which the
        namespace does not see."""
        source = self.install / "source"
        copy_sources(source)
        for step in install_steps(VENV, str(source)):
            self.run(*step, timeout=900)
        self.run("ln", "-sf", f"{VENV}/bin/vfiouserd", "/usr/local/bin/vfiouserd")
        (self.install / "complete").write_text(source_hash())

    def _install_units(self) -> None:
        for unit in ("vfiouserd@.service", "vfiouserd@.socket"):
            self.write(f"/etc/systemd/system/{unit}", (ROOT / "systemd" / unit).read_text())
        if self.run("getent", "group", "kvm", check=False).returncode != 0:
            self.run("groupadd", "--system", "kvm")  # the socket unit's SocketGroup=
        self.systemctl("daemon-reload")
