"""The benchmark still runs end to end (figures are bench/'s business, not the tests')."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "blk_randread.py"


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon")
def test_randread_benchmark_runs_against_both_back_ends():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--runs",
            "1",
            "--seconds",
            "0.3",
            "--depths",
            "1,4",
            "--image-size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [
        line.split()
        for line in done.stdout.splitlines()
        if line.startswith(("vfiouserd", "qemu-storage-daemon"))
    ]
    assert {(row[0], row[1]) for row in rows} == {
        (kind, depth) for kind in ("vfiouserd", "qemu-storage-daemon") for depth in ("1", "4")
    }


def test_downtime_benchmark_reports_every_scenario_and_blob():
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "downtime.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for scenario in ("reference", "fd store, vhost-user", "fd store, vfio-user", "migration"):
        assert scenario in done.stdout
    for blob in ("vhost-user blk", "vfio-user example", "handed-over vfio-user blk session"):
        assert blob in done.stdout
