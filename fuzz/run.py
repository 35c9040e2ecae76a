"""Fuzz one device for a while: ``python -m fuzz.run --device vhost-user-blk``.

Cases run one after another against a real daemon until ``--duration``
seconds or ``--cases`` cases are done. Each finding prints one ``FINDING``
line (with the command that replays it) and leaves the case's trace and
log excerpt under ``WORKDIR/findings/``; the daemon is then restarted and
the run goes on. A summary ends the run; the exit status is 1 if anything
was found.

Replaying: ``--seed N --case K`` runs case K alone on a fresh daemon;
``--from J`` runs cases J..K on one daemon, as the run that found it did
(the daemon keeps device state between connections).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

import trio

from fuzz.harness import DEVICES, Finding, Harness, Limits, MiB

PROGRESS_EVERY = 60.0  # seconds between progress lines on stderr
NUMBERS = re.compile(r"0x[0-9a-f]+|\d+")


def signature(finding: Finding) -> str:
    """What tells findings apart: the check and its detail without numbers."""
    detail = NUMBERS.sub("N", finding.detail)[:160]
    return f"{finding.check}: {detail}"


def save(finding: Finding, workdir: Path) -> Path:
    directory = workdir / "findings"
    directory.mkdir(exist_ok=True)
    path = directory / f"{finding.device}-seed{finding.seed}-case{finding.case}.txt"
    with path.open("a") as out:
        out.write(finding.line() + "\n\n" + finding.detail + "\n\ntrace:\n")
        out.writelines(f"  {line}\n" for line in finding.trace)
        out.write("\ndaemon log during the case:\n" + finding.log_excerpt + "\n\n")
    return path


async def fuzz(args: argparse.Namespace, workdir: Path) -> int:
    spec = DEVICES[args.device]
    limits = Limits(
        handshake_timeout=args.handshake_timeout,
        rss_bound=args.rss_bound_mib * MiB,
        case_timeout=args.case_timeout,
    )
    harness = Harness(spec, workdir, args.seed, limits=limits, only_kind=args.kind)
    if args.case is not None:
        first = args.start if args.start is not None else args.case
        indexes: range = range(first, args.case + 1)
    else:
        indexes = range(args.start or 0, (args.start or 0) + (args.cases or 1 << 62))
    started = time.monotonic()
    last_progress = started
    findings: list[Finding] = []
    kinds: collections.Counter[str] = collections.Counter()
    ran = 0
    await harness.start(indexes.start)
    try:
        for index in indexes:
            if args.case is None and time.monotonic() - started > args.duration:
                break
            result = await harness.run_case(index)
            ran += 1
            kinds[result.kind] += 1
            if args.verbose:
                print(
                    f"case {index} {result.kind} {result.seconds:.2f}s"
                    f" findings={len(result.findings)}",
                    file=sys.stderr,
                    flush=True,
                )
            for finding in result.findings:
                findings.append(finding)
                print(finding.line(), flush=True)
                save(finding, workdir)
            if result.findings:
                await harness.restart(index + 1)
            if time.monotonic() - last_progress > PROGRESS_EVERY:
                last_progress = time.monotonic()
                print(
                    f"progress device={spec.name} cases={ran} findings={len(findings)}"
                    f" elapsed={last_progress - started:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        harness.stop()
        elapsed = time.monotonic() - started
        distinct = collections.Counter(signature(f) for f in findings)
        print(
            f"SUMMARY device={spec.name} seed={args.seed} cases={ran} findings={len(findings)}"
            f" distinct={len(distinct)} restarts={harness.restarts} seconds={elapsed:.0f}"
            f" fuzzer_swept_fds={harness.swept_fds} workdir={workdir}",
            flush=True,
        )
        print("  kinds: " + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())), flush=True)
        for text, count in distinct.most_common():
            print(f"  {count:4d} x {text}", flush=True)
    return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("--device", required=True, choices=sorted(DEVICES))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--cases", type=int, help="stop after this many cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--case", type=int, help="replay this case only (see --from)")
    parser.add_argument(
        "--from", dest="start", type=int, help="first case index (with --case: replay a range)"
    )
    parser.add_argument("--kind", help="only this kind of case (the draws stay the same)")
    parser.add_argument("--workdir", type=Path, help="logs, disk image, findings (default: temp)")
    parser.add_argument("--handshake-timeout", type=float, default=Limits.handshake_timeout)
    parser.add_argument("--case-timeout", type=float, default=Limits.case_timeout)
    parser.add_argument("--rss-bound-mib", type=int, default=Limits.rss_bound // MiB)
    parser.add_argument("--verbose", action="store_true", help="one line per case on stderr")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.device}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    try:
        return trio.run(fuzz, args, workdir)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
