"""The benchmark still runs end to end (figures are bench/'s business, not the tests')."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "blk.py"


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon")
def test_blk_benchmark_runs_every_workload_against_every_back_end():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            *("--runs", "2", "--seconds", "0.2", "--depths", "1,32", "--queues", "1,2"),
            *("--image-size", "64"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures, against, targets, doorbells = done.stdout.strip().split("\n\n")
    cells = [
        (workload, queues, depth)
        for workload in ("4 KiB random read", "4 KiB random write", "128 KiB sequential read")
        for queues in ("1", "2")
        for depth in ("1", "32")
    ]
    qsd = ("qsd aio=threads", "qsd aio=io_uring", "qsd aio=io_uring+iothread")
    vfio_user = ("vfio-user-blk", "vfio-user-nvme")

    def parse(table: str, *widths: int) -> list[tuple[tuple[str, ...], list[str]]]:
        """Fields of these widths (the rest split on blanks); under two header lines."""
        rows = []
        for line in table.splitlines()[2:]:
            fields, at = [], 0
            for width in widths:
                fields.append(line[at : at + width].strip())
                at += width
            rows.append((tuple(fields), line[at:].split()))
        return rows

    def spreads_ordered(fields: list[str], table: str) -> None:
        for spread in fields:
            low, median, high = map(float, spread.split("/"))
            assert 0 <= low <= median <= high, table

    rows = parse(figures, 26, 2, 4, 27)
    assert [key for key, _ in rows] == [
        (*cell, kind) for cell in cells for kind in ("vhost-user-blk", *vfio_user, *qsd)
    ], figures
    for (*_, kind), fields in rows:
        if kind in qsd:  # no fast path to speak of; ratios of vhost-user-blk to it
            assert fields[6] == "-" and all(float(r) > 0 for r in fields[7:]), figures
        elif kind == "vfio-user-nvme":  # its I/O queues go native in a change of their own
            assert len(fields) == 7 and 0 <= float(fields[6].rstrip("%")) <= 100, figures
        else:  # the native loop served (nearly) every request, over either protocol
            assert len(fields) == 7 and float(fields[6].rstrip("%")) >= 99.0, figures
    # Each vfio-user back end against each other back end, run by run.
    rows = parse(against, 26, 2, 4, 16, 27)
    assert [key for key, _ in rows] == [
        (*cell, ours, kind)
        for cell in cells
        for ours in vfio_user
        for kind in ("vhost-user-blk", *qsd)
    ], against
    for _, fields in rows:
        assert len(fields) == 2 and all(float(f.split("/")[0]) > 0 for f in fields), against
        spreads_ordered(fields, against)
    # The three targets for each back end and queue count (against both
    # io_uring set-ups).
    verdicts = [line.rsplit("  ", 1)[-1] for line in targets.splitlines()[1:]]
    assert len(verdicts) == 2 * 2 * 4 and set(verdicts) <= {"met", "NOT met"}, targets
    # What the NVMe driver sent: doorbell messages and interrupts per command.
    rows = parse(doorbells, 26, 2, 4)
    assert [key for key, _ in rows] == cells, doorbells
    for _, fields in rows:
        assert len(fields) == 2, doorbells
        spreads_ordered(fields, doorbells)


def test_downtime_benchmark_reports_every_scenario_and_blob():
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "downtime.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    scenarios = ("reference", "fd store, vhost-user", "fd store, vfio-user", "migration")
    for scenario in (*scenarios, "upgrade in place, vhost-user", "upgrade in place, vfio-user"):
        assert scenario in done.stdout
    for blob in ("vhost-user blk", "vfio-user example", "handed-over vfio-user blk session"):
        assert blob in done.stdout


def test_input_latency_benchmark_runs():
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "input.py"), "--events", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split("  ")[0] for line in done.stdout.splitlines()[2:]]
    assert names == ["relay process (reference)", "vhost-user-input", "vfio-user-input"]


def test_console_throughput_benchmark_runs():
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "console.py"), "--size", "1", "--runs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split("  ")[0] for line in done.stdout.splitlines()[2:]]
    assert names == [
        "socketpair copy (reference)",
        *(
            f"{p}-console, {d}"
            for p in ("vhost-user", "vfio-user")
            for d in ("to guest", "to host")
        ),
    ]
    rates = [float(line.split()[-4]) for line in done.stdout.splitlines()[2:]]
    assert all(rate > 0 for rate in rates), done.stdout


def test_net_benchmark_runs():
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "net.py"), "--runs", "1", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [
        (size, path) for size in ("64", "1500") for path in ("guest,", "the", "stream")
    ]
    assert all(row[-2] == "0" for row in rows), done.stdout  # no frame came back wrong


def test_lab_benchmark_reports_every_condition_and_where_the_fast_path_was():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH.parent / "lab.py"),
            *("--runs", "1", "--seconds", "0.2", "--depths", "1,4", "--image-size", "64"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [(line[:34].strip(), line[34:].split()) for line in done.stdout.splitlines()[2:]]
    fast_path = {
        "no control client (reference)": "yes",
        "stats, once a second": "yes",
        "metrics, once a second": "yes",
        "full trace, read at full speed": "no",  # Python serves and reports each request
        "trace never read + garbage flood": "no",
        "trace never read, alone": "no",
        "garbage flood, alone": "yes",
        "garbage flood at another daemon": "yes",
        "no client, --no-fast-path": "no",
    }
    assert [(label, fields[0]) for label, fields in rows] == [
        (label, depth) for depth in ("1", "4") for label in fast_path
    ], done.stdout
    for label, fields in rows:
        assert fields[5] == fast_path[label], done.stdout
        assert float(fields[1].split("/")[0]) > 0, done.stdout  # IOPS
    reference = [fields for label, fields in rows if label.endswith("(reference)")]
    assert all(fields[2] == "1.00/1.00/1.00" for fields in reference), done.stdout


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon")
def test_footprint_benchmark_reports_every_target_for_every_back_end():
    options = ["--runs", "2", "--devices", "2", "--idle-seconds", "0.5", "--seconds", "0.2"]
    script = [sys.executable, str(BENCH.parent / "footprint.py"), *options, "--image-size", "64"]
    done = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    qsd = "qsd aio=io_uring"
    block = ["vhost-user-blk", "vfio-user-blk", "vfio-user-nvme"]
    devices = [*block, "vhost-user-rng", "vhost-user-console"]
    tables = done.stdout.strip().split("\n\n")[1:]
    # Each table: its title, a header, rows whose cells two blanks or more part.
    rows = [[re.split(r"\s{2,}", line) for line in t.splitlines()[2:]] for t in tables]
    assert [len(r) for r in rows] == [6, 10, 2, 4, 8, 5], done.stdout
    ready, pss, many, idle, per_io, restart = rows
    assert [r[0] for r in ready] == [*devices, qsd]
    assert [(r[0], r[1]) for r in pss] == [
        *((kind, "served once, no client") for kind in (*devices, qsd)),
        *((kind, "client, ring set up") for kind in (*block, qsd)),
    ]
    assert [r[0] for r in many] == ["vhost-user-blk", qsd]
    assert [r[0] for r in idle] == [*block, qsd]
    assert [(r[0], r[1]) for r in per_io] == [
        (kind, depth) for depth in ("1", "32") for kind in (*block, qsd)
    ]
    assert [r[0].split(" (")[0] for r in restart] == [
        "fd store, vhost-user-blk",
        "reload",
        "fd store, vfio-user-blk",
        "reload",
        f"{qsd}, reconnect",
    ]
    assert [r[0] for r in restart if r[0].startswith("reload")] == [
        "reload (upgrade), vhost-user-blk (stand-in)",
        "reload (upgrade), vfio-user-blk (stand-in)",
    ]
    for table in rows:  # a verdict on each of ours (none per I/O: no target), the reference
        for cells in table:
            if cells[0].startswith("qsd"):
                assert cells[-1] == "reference", done.stdout
            else:
                assert cells[-1] in (("-",) if table is per_io else ("met", "NOT met")), done.stdout
    for table in rows:  # every min/med/max in order, and every figure a number
        for cells in table:
            for cell in cells:
                if cell.count("/") == 2:
                    low, median, high = map(float, cell.split("/"))
                    assert 0 <= low <= median <= high, done.stdout
    assert all(float(r[2].split("/")[0]) > 0 for r in per_io), done.stdout  # CPU per request
